"""Load a Gaussian posterior .npz (README, "The posterior .npz") and bind it to the model's
initializers.

Keys are ``<initializer>.std``, ``.var``, ``.logvar`` or ``.rho`` (std = softplus(rho)), exactly
one per stochastic tensor, and optionally ``<initializer>.mean`` to override the ONNX value. A
tensor without a key is deterministic. The result is canonical: float32 mean and variance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import PfpcError
from . import shared_posterior
from .npz import read_npz  # noqa: F401 - the posterior reader's home for its users (importers)

PARAMETERISATIONS = ("std", "var", "logvar", "rho")


@dataclass
class Posterior:
    """Per initializer: its mean and, for stochastic tensors, its variance (float32)."""

    means: dict
    variances: dict
    shared: object = None  # the shared_posterior.SharedPosterior this was expanded from, if any

    def variance(self, name):
        return self.variances.get(name)


def _to_variance(kind, values):
    values = values.astype(np.float64)
    with np.errstate(over="ignore"):  # an overflow is reported by the caller, naming the key
        if kind == "std":
            return values * values
        if kind == "var":
            return values
        if kind == "logvar":
            return np.exp(values)
        std = np.logaddexp(0.0, values)  # softplus, stable for large rho
        return std * std


def bind_posterior(model: onnx.ModelProto, arrays: dict, source: str = "posterior", shared_draw: bool = False) -> Posterior:
    """Check ``arrays`` against the model's initializers and return the canonical posterior.
    ``shared_draw``: the caller propagates a shared posterior's one-draw-per-component semantics
    (the compiled PFP); everything else refuses it."""
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    shared = None
    if shared_posterior.is_shared(arrays):
        shared, arrays = shared_posterior.load(arrays, {k: v.shape for k, v in initializers.items()}, source, shared_draw)
    means = {name: value for name, value in initializers.items() if value.dtype == np.float32}
    variances, seen = {}, {}
    for key, values in arrays.items():
        tensor, _, kind = key.rpartition(".")
        if not tensor or kind not in PARAMETERISATIONS + ("mean",):
            raise PfpcError(
                f"{source}: key '{key}' is not <initializer>.{{std,var,logvar,rho,mean}}"
            )
        if tensor not in initializers:
            raise PfpcError(f"{source}: key '{key}' names no initializer of the model")
        if initializers[tensor].dtype != np.float32:
            raise PfpcError(f"{source}: key '{key}' names initializer '{tensor}' of dtype {initializers[tensor].dtype}, not a float32 weight")
        expected = initializers[tensor].shape
        if values.shape != expected:
            raise PfpcError(f"{source}: '{key}' has shape {list(values.shape)}, initializer '{tensor}' has {list(expected)}")
        if not np.issubdtype(values.dtype, np.floating):
            raise PfpcError(f"{source}: '{key}' has dtype {values.dtype}, expected floating point")
        if not np.all(np.isfinite(values)):
            raise PfpcError(f"{source}: '{key}' holds NaN or infinite values")
        if kind == "mean":
            means[tensor] = values.astype(np.float32)
            continue
        if tensor in seen:
            raise PfpcError(f"{source}: tensor '{tensor}' has two parameterisations ('{seen[tensor]}' and '{key}')")
        seen[tensor] = key
        if kind in ("std", "var") and np.any(values < 0):
            raise PfpcError(f"{source}: '{key}' holds negative values")
        variance = _to_variance(kind, values)
        if not np.all(np.isfinite(variance)) or np.any(variance > np.finfo(np.float32).max):
            raise PfpcError(f"{source}: '{key}' gives variances that overflow float32")
        variances[tensor] = variance.astype(np.float32)
    return Posterior(means, variances, shared)


def load_posterior(model: onnx.ModelProto, path, shared_draw: bool = False) -> Posterior:
    """`bind_posterior` of the .npz at ``path``, whose members are checked by name and declared
    size against the model before any is decompressed."""
    sizes = {init.name: int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer}
    npy_header = 64 * 1024  # the .npy header is at most 64 KiB

    def allowed(key):
        if key == "format":
            return None
        tensor, _, kind = key.rpartition(".")
        if kind in PARAMETERISATIONS + ("mean",) and tensor in sizes:
            return None
        if _has_shared_format(path):  # a shared posterior's own keys: checked by shared_posterior.load
            return None
        if not tensor or kind not in PARAMETERISATIONS + ("mean",):
            return "is not <initializer>.{std,var,logvar,rho,mean}"
        return "names no initializer of the model"

    def max_bytes(key):
        tensor, _, kind = key.rpartition(".")
        if tensor in sizes and kind in PARAMETERISATIONS + ("mean",):
            return 8 * sizes[tensor] + npy_header  # float64 at most
        # a shared posterior's codebooks, indices and blends: at most 48 bytes per weight of the model
        return 48 * sum(sizes.values()) + npy_header

    return bind_posterior(model, read_npz(path, allowed, max_bytes), os.fspath(path), shared_draw)


def _has_shared_format(path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return "format.npy" in archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
