"""The default pass pipeline, listed in one place. Each entry is (name, pass instance).

The ordering rules are data on the passes: ``requires`` names the passes (by their TVM pass
name) that must have run before one, ``after`` those that must run before it when the pipeline
has them; `check_order` enforces both for any pass list `pfpc.compile` is given.
"""

from __future__ import annotations

from ..errors import PfpcError

from .carry_channel_covariance import DEFAULT_BUDGET, CarryChannelCovariance
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
from .share_dense_scale import ShareDenseScale
from .substitute_layers import SubstituteLayers


def default_passes(covariance: str = "auto", covariance_budget: float = DEFAULT_BUDGET, shared_scale: str = "auto"):
    """Passes run by `pfpc.compile` unless ``passes=`` says otherwise, in order (`for_target`
    adapts them to the target). ``covariance``, ``covariance_budget``: `CarryChannelCovariance`'s
    mode and work budget; ``shared_scale``: `ShareDenseScale`'s mode (the same budget)."""
    return [
        ("lower_1d_to_2d", Lower1dTo2d()),
        ("fold_weight_layout", FoldWeightLayout()),
        ("fold_batch_norm", FoldBatchNorm()),
        ("pad_conv_inputs", PadConvInputs()),
        ("pool_before_relu", PoolBeforeRelu()),
        ("substitute_layers", SubstituteLayers()),
        ("eliminate_zero_variance", EliminateZeroVariance()),
        ("carry_channel_covariance", CarryChannelCovariance(covariance, covariance_budget)),
        # --covariance none asks for the diagonal PFP: auto's shared scale too (on still applies it)
        ("share_dense_scale", ShareDenseScale("off" if (covariance, shared_scale) == ("none", "auto") else shared_scale, covariance_budget)),
        ("fuse_operators", FuseOperators()),
        ("choose_moment_representation", ChooseMomentRepresentation()),
        ("fold_weight_moments", FoldWeightMoments()),
    ]


def for_target(passes, target):
    """``passes`` for ``target`` (a `codegen.targets.Target`): on cores without SIMD
    (``accumulate`` "scalar": the Cortex-M4/M7) a 3x3 convolution of the PFP tests its zero border
    itself instead of reading a padded copy (`PadConvInputs`' ``border_taps``): its unrolled
    window's tests cost fewer instructions than the copy, and the copy's buffer, at ResNet-8's
    arena peak, is gone. Cortex-M4 instructions with / without the copies: digits LeNet PFP
    188,760 / 164,900; ResNet-8 PFP 97.95 M / 93.79 M; but the seed LeNet-5's 5x5 windows PFP
    2,910,240 / 3,078,800, and the deterministic network (ResNet-8 23.18 M / 27.32 M), keep the
    copy. SIMD targets keep it too (branch-free rows). There too the covariance form's window sums
    are summed along rows, then columns (`CarryChannelCovariance`'s ``separable_sums``): ResNet-8
    PFP 118.56 M -> 112.34 M Cortex-M4 instructions; SIMD targets keep one kernel per window sum,
    whose rows of partial sums vectorise. Application cores ("channel_rows": the host, Cortex-A)
    sum rows too short for that separably (``separable_sums="narrow"``): DS-CNN's 25x5 maps."""
    if target is None or target.accumulate not in ("scalar", "channel_rows"):
        return list(passes)
    scalar = target.accumulate == "scalar"

    def adapted(transform):
        if isinstance(transform, PadConvInputs) and scalar:
            return PadConvInputs(border_taps=9)
        if isinstance(transform, (CarryChannelCovariance, ShareDenseScale)):
            return type(transform)(transform.mode, transform.budget, separable_sums=True if scalar else "narrow")
        return transform
    return [(name, adapted(transform)) for name, transform in passes]


def check_order(passes) -> None:
    """One-line error when a pass list breaks a pass's ``requires`` or ``after``."""
    # a plain function given as a pass has no TVM pass info: its label names it
    names = [transform.info.name if hasattr(transform, "info") else label for label, transform in passes]
    for index, (label, transform) in enumerate(passes):
        for required in getattr(transform, "requires", ()):
            if required not in names[:index]:
                raise PfpcError(f"pass list: {label} ({names[index]}) needs {required} to run before it")
        for earlier in getattr(transform, "after", ()):
            if earlier in names[index + 1 :]:
                raise PfpcError(f"pass list: {label} ({names[index]}) must run after {earlier}, which follows it")


def svi_passes():
    """Passes of ``mode="svi"``: the weight stds are set aside once their layout is final, and the
    rest compiles the deterministic network that the generated code runs once per weight sample."""
    passes = default_passes()
    after = [name for name, _ in passes].index("fold_batch_norm") + 1  # the last pass that rewrites weights
    return passes[:after] + [("detach_weight_std", DetachWeightStd())] + passes[after:]
