"""The default pass pipeline, listed in one place. Each entry is (name, pass instance)."""

from __future__ import annotations

from .fold_weight_layout import FoldWeightLayout
from .eliminate_zero_variance import EliminateZeroVariance
from .substitute_layers import SubstituteLayers


def default_passes():
    """Passes run by `pfpc.compile` unless ``passes=`` says otherwise, in order."""
    return [
        ("fold_weight_layout", FoldWeightLayout()),
        ("substitute_layers", SubstituteLayers()),
        ("eliminate_zero_variance", EliminateZeroVariance()),
    ]
