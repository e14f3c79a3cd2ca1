"""Read what a training library left on disk (or in memory) into NumPy arrays, safely.

A checkpoint is a path or an object. Paths: PyTorch files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``,
anything that is not ``.npz``) are read with ``torch.load(weights_only=True)``, which executes no
pickled code; the only classes it may rebuild besides tensors are the constraint classes that a
Pyro param store records (``torch.distributions.constraints``, ``pyro.distributions.constraints``).
``.npz`` files are read with ``allow_pickle=False``. Objects: an ``nn.Module`` (its state dict) or a
dict of tensors/arrays. State dicts wrapped by training loops (``{"state_dict": ...}``,
``{"model_state_dict": ...}``, ``{"model": ...}``) are unwrapped.

`paired_gaussians` turns the ``<module>.<mean name>`` / ``<module>.<spread name>`` pairs that the
torch-based libraries store into `Gaussian` s with the library's own std transform.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from ...errors import PfpcError
from ..posterior import read_npz

#: Keys under which training loops nest the model's state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")

#: The std transforms the libraries use (named, never guessed: each format fixes its own).
TRANSFORMS = {
    "softplus": lambda values: np.logaddexp(0.0, values),  # log1p(exp(rho)), stable for large rho
    "exp": np.exp,
    "identity": lambda values: values,
}


@dataclass
class Gaussian:
    """One stochastic tensor of the checkpoint: its parameter name in the training code (module
    path and role, e.g. ``fc1.weight``), mean and std in the library's layout, and where they came
    from (for the report)."""

    name: str
    mean: np.ndarray
    std: np.ndarray
    source: str

    @property
    def role(self) -> str | None:
        """``weight`` or ``bias`` when the name says so (Pyro sites may have other names)."""
        leaf = self.name.rpartition(".")[2]
        return leaf if leaf in ("weight", "bias") else None


def load(checkpoint, source: str | None = None):
    """(label for messages, loaded object): a path is read, an object is returned as it is."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if path.endswith(".npz"):
            return path, read_npz(path)
        return path, load_torch_file(path)
    return source or type(checkpoint).__name__, checkpoint


def load_torch_file(path: str):
    """``torch.load(weights_only=True)`` with the constraint classes of a Pyro param store allowed."""
    if not os.path.exists(path):
        raise PfpcError(f"{path}: no such checkpoint file")
    try:
        import torch
    except ImportError:
        raise PfpcError(f"{path}: reading a PyTorch checkpoint needs torch (pip install 'pfpc[import]')") from None
    try:
        with torch.serialization.safe_globals(_constraint_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _unsafe_globals(path)
        what = f" ({', '.join(found[:4])})" if found else ""
        raise PfpcError(
            f"{path}: the checkpoint holds pickled Python objects{what}; pfpc reads checkpoints with "
            "torch.load(weights_only=True) only: save model.state_dict() (or pyro.get_param_store().save(path))"
        ) from err
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PfpcError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def _constraint_classes():
    from torch.distributions import constraints

    modules = [constraints]
    try:
        from pyro.distributions import constraints as pyro_constraints

        modules.append(pyro_constraints)
    except ImportError:
        pass
    return sorted(
        {value for module in modules for value in vars(module).values()
         if isinstance(value, type) and issubclass(value, constraints.Constraint)},
        key=lambda cls: f"{cls.__module__}.{cls.__qualname__}",
    )


def _unsafe_globals(path):
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint

        return get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []


def to_numpy(value) -> np.ndarray | None:
    """A float array from a tensor or array; None for anything else (ints, None, objects)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not value.is_floating_point():
            return None
        return value.double().numpy()
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return value.astype(np.float64)
    return None


def state_dict_arrays(obj, label: str) -> dict:
    """The flat {name: float array} of a module, state dict or wrapped state dict."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise PfpcError(f"{label}: expected a state dict (a mapping of parameter names to tensors), found {type(obj).__name__}")
    while not any(to_numpy(value) is not None for value in obj.values()):
        nested = [key for key in WRAPPER_KEYS if isinstance(obj.get(key), dict)]
        if not nested:
            break
        obj = obj[nested[0]]
    return {str(key): array for key, value in obj.items() if (array := to_numpy(value)) is not None}


def key_list(keys, limit: int = 8) -> str:
    """``'a', 'b', ... (N keys)`` for one-line messages."""
    keys = list(keys)
    shown = ", ".join(f"'{key}'" for key in keys[:limit])
    return f"{shown}{', ...' if len(keys) > limit else ''} ({len(keys)} keys)" if keys else "no tensors"


def paired_gaussians(arrays: dict, pairs, transform: str, ignore=()) -> list[Gaussian]:
    """Gaussians from ``<module>.<mean_key>`` / ``<module>.<spread_key>`` pairs, in checkpoint order.

    ``pairs``: (mean_key, spread_key, role) triples, e.g. ("mu_weight", "rho_weight", "weight");
    ``transform``: the name in `TRANSFORMS` that turns the spread into a std. Keys whose last
    component starts with one of ``ignore`` are skipped. A mean without its spread is an error.
    """
    found = []
    for key, value in arrays.items():
        module, _, leaf = key.rpartition(".")
        if leaf.startswith(tuple(ignore)):
            continue
        for mean_key, spread_key, role in pairs:
            if leaf != mean_key:
                continue
            spread_name = f"{module}.{spread_key}" if module else spread_key
            if spread_name not in arrays:
                raise PfpcError(f"checkpoint: '{key}' has no '{spread_name}' beside it")
            spread = arrays[spread_name]
            if spread.shape != value.shape:
                raise PfpcError(f"checkpoint: '{key}' has shape {list(value.shape)} but '{spread_name}' has {list(spread.shape)}")
            std = TRANSFORMS[transform](spread)
            name = f"{module}.{role}" if module else role
            found.append(Gaussian(name, value, std, f"{key}, {spread_name} (std = {_formula(transform, spread_key)})"))
    return found


def _formula(transform, spread_key):
    return {"softplus": f"log1p(exp({spread_key}))", "exp": f"exp({spread_key})", "identity": spread_key}[transform]
