"""The default pass pipeline, listed in one place. Each entry is (name, pass instance)."""

from __future__ import annotations

from .fold_weight_layout import FoldWeightLayout
from .choose_moment_representation import ChooseMomentRepresentation
from .detach_weight_std import DetachWeightStd
from .eliminate_zero_variance import EliminateZeroVariance
from .fold_weight_moments import FoldWeightMoments
from .fuse_operators import FuseOperators
from .substitute_layers import SubstituteLayers


def default_passes():
    """Passes run by `pfpc.compile` unless ``passes=`` says otherwise, in order."""
    return [
        ("fold_weight_layout", FoldWeightLayout()),
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
    return passes[:1] + [("detach_weight_std", DetachWeightStd())] + passes[1:]
