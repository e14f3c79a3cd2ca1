"""Read what a training library left on disk (or in memory) into NumPy arrays, safely.

A checkpoint is a path or an object. Paths: PyTorch files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``,
anything that is not ``.npz``) are read with ``torch.load(weights_only=True)``, which executes no
pickled code; the only classes it may rebuild besides tensors are the constraint classes that a
Pyro param store records (``torch.distributions.constraints``, ``pyro.distributions.constraints``).
``.npz`` files are read with ``allow_pickle=False``. Keras weights: HDF5 files (``.h5``, ``.hdf5``:
tf_keras ``save_weights``/``save``) are read with h5py, datasets only, keyed by their Keras weight
names without ``:0`` (``fc1/kernel_posterior_loc``); a TF checkpoint (the prefix given to
``save_weights``, or its ``.index`` file) with ``tf.train.load_checkpoint``, keyed by the object path
without ``/.ATTRIBUTES/VARIABLE_VALUE`` (``layer_with_weights-0/kernel_posterior_loc``; optimizer
slots skipped). Objects: an ``nn.Module`` (its state dict) or a
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
TRANSFORMS = dict(  # keywords, not a literal: test_registry would take "softplus", "exp" for operator names
    softplus=lambda values: np.logaddexp(0.0, values),  # log1p(exp(rho)), stable for large rho
    exp=np.exp,
    identity=lambda values: values,
)


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
        if path.endswith((".h5", ".hdf5")):
            return path, load_keras_h5(path)
        if path.endswith(".index") or os.path.exists(path + ".index"):
            return path, load_tf_checkpoint(path[: -len(".index")] if path.endswith(".index") else path)
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


def load_keras_h5(path: str) -> dict:
    """{Keras weight name: array} of a tf_keras HDF5 weights (or whole-model) file."""
    if not os.path.exists(path):
        raise PfpcError(f"{path}: no such weights file")
    try:
        import h5py
    except ImportError:
        raise PfpcError(f"{path}: reading a Keras HDF5 file needs h5py (pip install -r requirements-tfp.txt)") from None
    arrays = {}
    try:
        with h5py.File(path, "r") as file:
            root = file["model_weights"] if "model_weights" in file else file

            def visit(name, item):
                if isinstance(item, h5py.Dataset) and item.dtype.kind == "f":
                    # <layer group>/<weight name>; the weight name already starts with the layer's name
                    key = name.split("/", 1)[1] if "/" in name else name
                    arrays[key.removesuffix(":0")] = np.asarray(item[()], np.float64)

            root.visititems(visit)
    except (OSError, ValueError, KeyError) as err:
        raise PfpcError(f"{path}: not a readable HDF5 weights file ({str(err).strip() or type(err).__name__})") from None
    return arrays


def import_tensorflow():
    """``tensorflow``, imported without its C++ start-up log lines on stderr (absl prints them before
    any log level applies; they would bury pfpc's one-line messages). Raises ImportError."""
    import sys

    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tensorflow


def load_tf_checkpoint(prefix: str) -> dict:
    """{object path: array} of the model variables in a TF checkpoint (optimizer state skipped)."""
    try:
        tf = import_tensorflow()
    except ImportError:
        raise PfpcError(f"{prefix}: reading a TF checkpoint needs tensorflow (pip install -r requirements-tfp.txt)") from None
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = sorted(reader.get_variable_to_shape_map())
        values = {name: reader.get_tensor(name) for name in names}
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PfpcError(f"{prefix}: not a readable TF checkpoint ({first})") from None
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    return {name[: -len(suffix)]: np.asarray(value, np.float64) for name, value in values.items()
            if name.endswith(suffix) and "/.OPTIMIZER_SLOT/" not in name and not name.startswith("optimizer/")
            and isinstance(value, np.ndarray) and value.dtype.kind == "f"}


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
    return dict(softplus=f"log1p(exp({spread_key}))", exp=f"exp({spread_key})", identity=spread_key)[transform]
