"""Import the posterior of a BNN trained with another library as a pfpc posterior .npz.

``import_posterior(format, checkpoint, onnx_model)`` reads the checkpoint (a file or the object in
memory), turns every Gaussian weight into (mean, std) with the library's own transform, places it on
the ONNX initializer that holds that mean (`matching`) and returns the ``<initializer>.std`` arrays
that ``pfpc --posterior`` reads. ``match_posterior`` returns the same with the report of what matched
how. One module per library; the CLI is ``pfpc import-posterior --from FORMAT CHECKPOINT --onnx M -o P``.
"""

from __future__ import annotations

import os

import onnx

from ...errors import PfpcError
from ..onnx_model import fold_constants, load_model
from ..posterior import bind_posterior
from . import bayesian_torch, blitz, pyro_ppl, tfp, torch_uncertainty, torchbnn, tyxe
from .checkpoint import key_list, load, state_dict_arrays
from .matching import ImportResult, match_gaussians

FORMATS = {
    "bayesian-torch": bayesian_torch,
    "blitz": blitz,
    "torchbnn": torchbnn,
    "torch-uncertainty": torch_uncertainty,
    "pyro": pyro_ppl,
    "tyxe": tyxe,
    "tfp": tfp,
}
#: Formats read from a plain state dict, tried for the "did you mean" hint of an unknown layout.
STATE_DICT_FORMATS = ("bayesian-torch", "blitz", "torchbnn", "torch-uncertainty", "tfp")


def extract(format: str, checkpoint, label: str | None = None) -> tuple:
    """(label, Gaussians) of ``checkpoint`` read as ``format``; a one-line error listing the keys
    found when it holds no posterior of that format."""
    if format not in FORMATS:
        raise PfpcError(f"unknown posterior format '{format}' (known: {', '.join(FORMATS)})")
    label, obj = load(checkpoint, label)
    gaussians = FORMATS[format].extract(obj, label)
    if not gaussians:
        raise PfpcError(_unknown_layout(format, obj, label))
    return label, gaussians


def _unknown_layout(format, obj, label):
    message = f"{label}: no {format} posterior found (expected {FORMATS[format].EXPECTED})"
    try:
        keys = list(state_dict_arrays(obj, label)) if not (isinstance(obj, dict) and "params" in obj) else list(obj["params"])
    except PfpcError:
        keys = []
    others = [name for name in STATE_DICT_FORMATS if name != format and _has_posterior(name, obj, label)]
    hint = f"; it looks like --from {others[0]}" if others else ""
    return f"{message}{hint}; the checkpoint holds {key_list(keys)}"


def _has_posterior(format, obj, label):
    try:
        return bool(FORMATS[format].extract(obj, label))
    except PfpcError:
        return False


def _onnx(model):
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return fold_constants(copy), "model"
    return load_model(model, batch=1, shapes_only=True), os.path.basename(os.fspath(model))


def match_posterior(format: str, checkpoint, onnx_model, allow_unmatched: bool = False) -> ImportResult:
    """The imported posterior arrays and the report of what matched (see `matching`)."""
    label, gaussians = extract(format, checkpoint)
    model, _ = _onnx(onnx_model)
    result = match_gaussians(gaussians, model, label, allow_unmatched)
    bind_posterior(model, result.arrays, label)  # the arrays must be what `pfpc --posterior` accepts
    return result


def import_posterior(format: str, checkpoint, onnx_model, allow_unmatched: bool = False) -> dict:
    """``{<initializer>.std: array}`` for ``onnx_model`` (path or ModelProto) from ``checkpoint``
    (path, module, state dict, Pyro param store or guide, TyXe BNN) trained with ``format``."""
    return match_posterior(format, checkpoint, onnx_model, allow_unmatched).arrays


def write_npz(arrays: dict, path) -> None:
    """Write the posterior .npz atomically, so that an error leaves nothing behind."""
    import numpy as np

    atomic_write(path, lambda stream: np.savez(stream, **arrays), "posterior")


def atomic_write(path, write, what: str) -> None:
    """Call ``write(stream)`` on a temporary file beside ``path`` and rename it to ``path``
    (`pfpc.atomic.write_file`, pfpc's one atomic writer)."""
    from ...atomic import write_file

    write_file(path, write, what)
