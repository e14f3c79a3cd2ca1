"""The shared-posterior .npz format (stochastic weight sharing, Lin et al., AISTATS 2025), version 1.

Each weight's posterior N(mu, sigma^2) is a point (mu, sigma) in 2-D; a shared posterior encodes the
points of an initializer by a small codebook of components. Loaded with ``allow_pickle=False``.

Header keys (no initializer prefix):

- ``format``    the string ``"pfpc-shared-posterior"``;
- ``version``   the integer 1;
- ``semantics`` ``"independent"`` (the default when absent): every weight is drawn independently
  from its own Gaussian, which is looked up through its component; the PFP math is unchanged.
  ``"shared_draw"``: one draw per component, shared by all weights that use it (the behaviour of
  the paper's code; blends and exceptions are drawn on their own); the weights of a component are
  then fully correlated and the variance of a linear layer needs grouped sums
  (`passes.apply_shared_draws`, docs/shared_posterior.md). Propagated by the compiled PFP only; `load`
  refuses it elsewhere (sampling would draw every weight on its own); `expand` gives its marginals.

Per covered ONNX initializer ``<name>`` (flat positions are row-major in the initializer's shape):

- ``<name>.component_mean``, ``<name>.component_std``: float [K], std >= 0;
- ``<name>.component_index``: uint8 or uint16, the initializer's shape, values < K;
- optional alpha blending, for weights between two components: ``<name>.blend_position`` (int [B],
  flat positions), ``<name>.blend_component`` (uint8/uint16 [B, 2]) and ``<name>.blend_alpha``
  (float [B] in [0, 1]): mu = a mu_1 + (1 - a) mu_2, sigma = a sigma_1 + (1 - a) sigma_2 (the W2
  geodesic between the two 1-D Gaussians); overrides the component index at those positions;
- optional exceptions kept individually: ``<name>.exception_position`` (int [E], flat),
  ``<name>.exception_mean``, ``<name>.exception_std`` (float [E]); override index and blend;
- optional ``<name>.channel_scale`` (float [C]) and ``<name>.channel_axis`` (int, default 0, C =
  the initializer's size along it): weight = scale[c] * (what the above gives), i.e. mean scale*mu,
  std |scale|*sigma (batch-norm folding multiplies every output channel by its own factor).

Initializers not covered may carry the ordinary posterior keys (``<name>.std`` etc., see
`posterior`); the ONNX value of a covered initializer is replaced by the shared posterior's mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import PfpcError
from .npz import read_npz

FORMAT = "pfpc-shared-posterior"
VERSION = 1
SEMANTICS = ("independent", "shared_draw")
HEADER = ("format", "version", "semantics")
FIELDS = ("component_mean", "component_std", "component_index", "blend_position", "blend_component", "blend_alpha",
          "exception_position", "exception_mean", "exception_std", "channel_scale", "channel_axis")
REQUIRED = ("component_mean", "component_std", "component_index")
GROUPS = (("blend_position", "blend_component", "blend_alpha"), ("exception_position", "exception_mean", "exception_std"))


@dataclass
class SharedTensor:
    """One covered initializer: its codebook and how its weights use it (fields as in the format)."""

    shape: tuple
    component_mean: np.ndarray
    component_std: np.ndarray
    component_index: np.ndarray
    blend_position: np.ndarray | None = None
    blend_component: np.ndarray | None = None
    blend_alpha: np.ndarray | None = None
    exception_position: np.ndarray | None = None
    exception_mean: np.ndarray | None = None
    exception_std: np.ndarray | None = None
    channel_scale: np.ndarray | None = None
    channel_axis: int = 0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def components(self) -> int:
        return int(self.component_mean.size)

    @property
    def exceptions(self) -> int:
        return 0 if self.exception_position is None else int(self.exception_position.size)

    @property
    def blends(self) -> int:
        return 0 if self.blend_position is None else int(self.blend_position.size)


@dataclass
class SharedPosterior:
    semantics: str
    tensors: dict  # initializer name -> SharedTensor
    rest: dict  # the ordinary posterior keys of the tensors it does not cover


def is_shared(arrays: dict) -> bool:
    return "format" in arrays


def expand_tensor(shared: SharedTensor) -> tuple[np.ndarray, np.ndarray]:
    """The reference semantics: (mean, std) per weight, float64, in the initializer's shape."""
    mu = shared.component_mean.astype(np.float64)[shared.component_index.reshape(-1).astype(np.int64)]
    sigma = shared.component_std.astype(np.float64)[shared.component_index.reshape(-1).astype(np.int64)]
    if shared.blends:
        first, second = (shared.blend_component[:, i].astype(np.int64) for i in (0, 1))
        alpha = shared.blend_alpha.astype(np.float64)
        position = shared.blend_position.astype(np.int64)
        mu[position] = alpha * shared.component_mean[first] + (1 - alpha) * shared.component_mean[second]
        sigma[position] = alpha * shared.component_std[first] + (1 - alpha) * shared.component_std[second]
    if shared.exceptions:
        position = shared.exception_position.astype(np.int64)
        mu[position] = shared.exception_mean
        sigma[position] = shared.exception_std
    mu, sigma = mu.reshape(shared.shape), sigma.reshape(shared.shape)
    if shared.channel_scale is not None:
        view = [1] * len(shared.shape)
        view[shared.channel_axis] = -1
        scale = shared.channel_scale.astype(np.float64).reshape(view)
        mu, sigma = mu * scale, sigma * np.abs(scale)
    return mu, sigma


def draw_arrays(tensor: SharedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(group, signed std) per weight, flat, in the initializer's layout, for semantics
    ``shared_draw``: the component, or -1 for blends and exceptions (drawn on their own); the std
    times the sign of the channel scale."""
    groups = tensor.component_index.reshape(-1).astype(np.int64)
    for positions in (tensor.blend_position, tensor.exception_position):
        if positions is not None:
            groups[positions] = -1
    _, sigma = expand_tensor(tensor)
    if tensor.channel_scale is not None:
        view = [1] * len(tensor.shape)
        view[tensor.channel_axis] = -1
        sigma = sigma * np.sign(tensor.channel_scale.astype(np.float64)).reshape(view)
    return groups, sigma.reshape(-1)


def draws(shared: SharedPosterior) -> dict:
    """Initializer -> (components, group per weight, signed std per weight) (`draw_arrays`)."""
    return {name: (tensor.components, *draw_arrays(tensor)) for name, tensor in shared.tensors.items()}


def expand(shared: SharedPosterior) -> dict:
    """The equivalent full posterior as arrays: ``<name>.mean`` and ``<name>.std`` per covered
    initializer plus the uncovered keys. For ``shared_draw`` these are the marginals only."""
    arrays = dict(shared.rest)
    for name, tensor in shared.tensors.items():
        mu, sigma = expand_tensor(tensor)
        arrays[f"{name}.mean"], arrays[f"{name}.std"] = mu.astype(np.float32), sigma.astype(np.float32)
    return arrays


def to_arrays(shared: SharedPosterior) -> dict:
    """The .npz contents of ``shared`` (`save` writes them)."""
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION, np.int64), "semantics": np.array(shared.semantics)}
    arrays.update(shared.rest)
    for name, tensor in shared.tensors.items():
        for field in FIELDS:
            value = getattr(tensor, field)
            if field == "channel_axis":
                if tensor.channel_scale is not None:
                    arrays[f"{name}.channel_axis"] = np.array(value, np.int64)
            elif value is not None:
                arrays[f"{name}.{field}"] = np.asarray(value)
    return arrays


def save(shared: SharedPosterior, path) -> None:
    np.savez(path, **to_arrays(shared))


def parse(arrays: dict, shapes: dict, source: str) -> SharedPosterior:
    """Check ``arrays`` (an .npz's contents) against ``shapes`` (initializer name -> shape).

    Every problem is a one-line PfpcError naming ``source`` and the key."""
    def fail(message):
        raise PfpcError(f"{source}: {message}")

    def text(key):
        value = arrays[key]
        if value.ndim != 0 or value.dtype.kind != "U":
            fail(f"'{key}' must be a string")
        return str(value)

    if text("format") != FORMAT:
        fail(f"'format' is '{text('format')}', expected '{FORMAT}'")
    if "version" not in arrays:
        fail("no 'version' key")
    version = arrays["version"]
    if version.ndim != 0 or version.dtype.kind not in "iu" or int(version) != VERSION:
        fail(f"shared-posterior version {version.tolist()!r} is not supported (this pfpc reads version {VERSION})")
    semantics = text("semantics") if "semantics" in arrays else "independent"
    if semantics not in SEMANTICS:
        fail(f"'semantics' is '{semantics}', expected one of {', '.join(SEMANTICS)}")
    fields, rest = {}, {}
    for key, value in arrays.items():
        if key in HEADER:
            continue
        tensor, _, field = key.rpartition(".")
        if field in FIELDS and tensor:
            fields.setdefault(tensor, {})[field] = value
        else:
            rest[key] = value
    tensors = {}
    for name, given in sorted(fields.items()):
        if name not in shapes:
            fail(f"'{name}.{next(iter(given))}' names no initializer of the model")
        tensors[name] = _tensor(name, given, tuple(shapes[name]), fail)
        for key in rest:
            if key.rpartition(".")[0] == name:
                fail(f"'{key}': tensor '{name}' is covered by the shared posterior and cannot also have '{key.rpartition('.')[2]}'")
    return SharedPosterior(semantics, tensors, rest)


def _tensor(name, given, shape, fail) -> SharedTensor:
    size = int(np.prod(shape))
    for field in REQUIRED:
        if field not in given:
            fail(f"tensor '{name}' has no '{name}.{field}'")
    for group in GROUPS:
        present = [f for f in group if f in given]
        if present and len(present) != len(group):
            missing = [f for f in group if f not in given]
            fail(f"tensor '{name}': '{name}.{present[0]}' needs '{name}.{missing[0]}' too")
    if "channel_axis" in given and "channel_scale" not in given:
        fail(f"tensor '{name}': '{name}.channel_axis' without '{name}.channel_scale'")

    def floats(field, ndim=1, count=None, nonnegative=False):
        key, value = f"{name}.{field}", given[field]
        if value.dtype.kind != "f":
            fail(f"'{key}' has dtype {value.dtype}, expected floating point")
        if value.ndim != ndim or (count is not None and value.shape[0] != count):
            fail(f"'{key}' has shape {list(value.shape)}, expected {'[' + str(count) + ']' if count is not None else f'{ndim} dimension(s)'}")
        if not np.all(np.isfinite(value)):
            fail(f"'{key}' holds NaN or infinite values")
        if nonnegative and np.any(value < 0):
            fail(f"'{key}' holds negative values")
        return value.astype(np.float32)

    def indices(field, bound, shape_expected, kinds="u", what="a component"):
        key, value = f"{name}.{field}", given[field]
        if value.dtype.kind not in kinds or (kinds == "u" and value.dtype.itemsize > 2):
            fail(f"'{key}' has dtype {value.dtype}, expected {'uint8 or uint16' if kinds == 'u' else 'integers'}")
        if list(value.shape) != list(shape_expected):
            fail(f"'{key}' has shape {list(value.shape)}, expected {list(shape_expected)}")
        if value.size and (value.min() < 0 or value.max() >= bound):
            fail(f"'{key}' holds {value.max() if value.max() >= bound else value.min()}, not {what} in [0, {bound})")
        return value

    means = floats("component_mean")
    stds = floats("component_std", count=means.size, nonnegative=True)
    if means.size == 0:
        fail(f"'{name}.component_mean' is empty")
    result = SharedTensor(shape, means, stds, indices("component_index", means.size, shape))
    for group in GROUPS:
        if group[0] not in given:
            continue
        count = given[group[0]].size
        position = indices(group[0], size, [count], kinds="iu", what="a flat position")
        if np.unique(position).size != count:
            fail(f"'{name}.{group[0]}' lists a position twice")
        setattr(result, group[0], position.astype(np.int64))
        if group[1] == "blend_component":
            result.blend_component = indices("blend_component", means.size, [count, 2])
            alpha = floats("blend_alpha", count=count)
            if np.any((alpha < 0) | (alpha > 1)):
                fail(f"'{name}.blend_alpha' holds values outside [0, 1]")
            result.blend_alpha = alpha
        else:
            result.exception_mean = floats("exception_mean", count=count)
            result.exception_std = floats("exception_std", count=count, nonnegative=True)
    if "channel_scale" in given:
        axis = given.get("channel_axis", np.array(0))
        if axis.ndim != 0 or axis.dtype.kind not in "iu" or not -len(shape) <= int(axis) < len(shape):
            fail(f"'{name}.channel_axis' must be an integer axis of the shape {list(shape)}")
        result.channel_axis = int(axis) % len(shape)
        result.channel_scale = floats("channel_scale", count=shape[result.channel_axis])
    return result


def load(arrays: dict, shapes: dict, source: str, shared_draw: bool = False) -> tuple[SharedPosterior, dict]:
    """A shared posterior for propagation or sampling: (parsed, expanded arrays). ``shared_draw``
    is refused unless the caller propagates it (the compiled PFP: ``shared_draw=True``); the
    expansion's independent draws (sampling, verification, evaluation) would misrepresent it."""
    shared = parse(arrays, shapes, source)
    if shared.semantics == "shared_draw" and not shared_draw:
        raise PfpcError(f"{source}: semantics 'shared_draw' (one draw per component) is only supported by the compiled PFP "
                        "(pfpc MODEL --posterior, mode pfp); sampling and evaluation draw every weight on its own")
    return shared, expand(shared)


def read(path) -> SharedPosterior:
    """Parse a shared-posterior file without a model (shapes from the component indices)."""
    arrays = read_npz(path)
    if not is_shared(arrays):
        raise PfpcError(f"{os.fspath(path)}: not a shared posterior (no 'format' key)")
    shapes = {key.rpartition(".")[0]: arrays[key].shape for key in arrays if key.endswith(".component_index")}
    return parse(arrays, shapes, os.fspath(path))
