"""The default pass pipeline, listed in one place. Each entry is (name, pass instance)."""

from __future__ import annotations

from .fold_batch_norm import FoldBatchNorm
from .fold_weight_layout import FoldWeightLayout
from .lower_1d_to_2d import Lower1dTo2d
from .pad_conv_inputs import PadConvInputs
from .pool_before_relu import PoolBeforeRelu
from .choose_moment_representation import ChooseMomentRepresentation
from .detach_weight_std import DetachWeightStd
from .eliminate_zero_variance import EliminateZeroVariance
from .fold_weight_moments import FoldWeightMoments
from .fuse_operators import FuseOperators
from .substitute_layers import SubstituteLayers


def default_passes():
    """Passes run by `pfpc.compile` unless ``passes=`` says otherwise, in order."""
    return [
        ("lower_1d_to_2d", Lower1dTo2d()),
        ("fold_weight_layout", FoldWeightLayout()),
        ("fold_batch_norm", FoldBatchNorm()),
        ("pad_conv_inputs", PadConvInputs()),
        ("pool_before_relu", PoolBeforeRelu()),
        ("substitute_layers", SubstituteLayers()),
        ("eliminate_zero_variance", EliminateZeroVariance()),
        ("fuse_operators", FuseOperators()),
        ("choose_moment_representation", ChooseMomentRepresentation()),
        ("fold_weight_moments", FoldWeightMoments()),
    ]


def svi_passes():
    """Passes of ``mode="svi"``: the weight stds are set aside once their layout is final, and the
    rest compiles the deterministic network that the generated code runs once per weight sample."""
    passes = default_passes()
    after = [name for name, _ in passes].index("fold_batch_norm") + 1  # the last pass that rewrites weights
    return passes[:after] + [("detach_weight_std", DetachWeightStd())] + passes[after:]
