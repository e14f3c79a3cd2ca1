"""Place a checkpoint's Gaussians on the ONNX model's initializers and write them as ``.std`` keys.

Exporters rename and re-lay-out weights, so a Gaussian named ``fc1.weight`` (module path + role in
the training code) is looked for, in this order:

1. by name: the initializer ``fc1.weight``;
2. by name suffix: one name is the other with leading module components dropped (``net.0.weight``
   from a TyXe/Pyro site vs ``0.weight``, or ``model.fc1.weight`` from a wrapped state dict);
3. a bias goes where its layer's weight went (the bias input of the same Conv/Gemm/MatMul+Add);
4. by shape and order: the first remaining weight/bias initializer, in graph order, of the same
   role whose shape fits and whose values are the checkpoint's mean.

Every placement is checked against the values: the ONNX initializer must hold the checkpoint's mean,
possibly transposed (Gemm ``transB=0`` and MatMul hold ``[in, out]``, PyTorch ``[out, in]``) or scaled
per output channel, which is what an exporter's batch-norm folding does (``w * gamma/sqrt(var+eps)``):
then the std is scaled by the same ``|factor|`` and the folded bias keeps the ONNX value as its
mean with its std scaled likewise. Anything else is refused with a message naming both tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import PfpcError
from .checkpoint import Gaussian

#: Relative tolerance for "the initializer holds the checkpoint's mean" (float32 round trip).
VALUE_RTOL = 1e-5
#: ... and for "it holds the mean times a per-channel factor" (the exporter computed the product).
SCALE_RTOL = 1e-4


@dataclass
class Slot:
    """An initializer used as the weight or bias of a linear node, with its ONNX layout."""

    initializer: str
    role: str  # "weight" or "bias"
    node: str
    op: str
    output_axis: int  # the axis of output channels in the ONNX layout
    transposed: bool  # holds the PyTorch [out, in] matrix as [in, out]


@dataclass
class Match:
    gaussian: Gaussian
    initializer: str
    how: str
    notes: list = field(default_factory=list)
    std: np.ndarray | None = None  # in the ONNX layout


@dataclass
class ImportResult:
    """The posterior arrays (``<initializer>.std``) and what was matched how."""

    arrays: dict
    matches: list
    unmatched: list
    deterministic: list

    def report(self) -> str:
        lines = [f"matched {len(self.matches)} stochastic tensors:"]
        for match in self.matches:
            notes = "".join(f"; {note}" for note in match.notes)
            lines.append(f"  {match.initializer} {list(match.std.shape)} <- {match.gaussian.source} [{match.how}{notes}]")
        if self.unmatched:
            lines.append(f"NOT matched ({len(self.unmatched)}, left out of the posterior):")
            lines += [f"  {g.name} {list(g.mean.shape)} from {g.source}" for g in self.unmatched]
        if self.deterministic:
            lines.append(f"deterministic (no posterior): {', '.join(self.deterministic)}")
        return "\n".join(lines)


def linear_slots(model: onnx.ModelProto) -> dict:
    """{initializer: Slot} for the weights and biases of Conv, ConvTranspose, Gemm and MatMul(+Add),
    in graph order (Identity nodes between an initializer and its consumer are looked through)."""
    initializers = {init.name for init in model.graph.initializer}
    alias = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Identity"}

    def source(name):
        while name in alias:
            name = alias[name]
        return name if name in initializers else None

    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    slots = {}

    def add(name, role, node, axis, transposed):
        init = source(name) if name else None
        if init is not None and init not in slots:
            slots[init] = Slot(init, role, node.name or node.output[0], node.op_type, axis, transposed)

    for node in model.graph.node:
        inputs = list(node.input) + [""] * 3
        transposed_conv = node.op_type == "ConvTranspose"  # weight [in, out / groups, ...]: output channels on axis 1
        if node.op_type == "Conv" or transposed_conv:
            add(inputs[1], "weight", node, 1 if transposed_conv else 0, False)
            add(inputs[2], "bias", node, 0, False)
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            add(inputs[1], "weight", node, 0 if trans_b else 1, not trans_b)
            add(inputs[2], "bias", node, 0, False)
        elif node.op_type == "MatMul" and source(inputs[1]):
            add(inputs[1], "weight", node, -1, True)
            for user in consumers.get(node.output[0], []):
                if user.op_type == "Add":
                    other = [name for name in user.input if name != node.output[0]]
                    if other:
                        add(other[0], "bias", node, 0, False)
    return slots


def _suffix_match(a: str, b: str) -> bool:
    left, right = a.split("."), b.split(".")
    shorter, longer = sorted((left, right), key=len)
    return len(shorter) < len(longer) and longer[-len(shorter):] == shorter


def _placements(gaussian, slot, shape):
    """The layouts to try, preferred first: (ONNX array from a checkpoint array, note)."""
    identity = (lambda a: a, None)
    transpose = (lambda a: a.T, "transposed: the ONNX holds [in, out]")
    if gaussian.mean.ndim != 2:
        options = [identity]
    else:
        options = [transpose, identity] if slot is not None and slot.transposed else [identity, transpose]
    return [(f, note) for f, note in options if f(gaussian.mean).shape == tuple(shape)]


def _channel_scale(onnx_value, mean, axis):
    """The per-output-channel factor s with onnx_value == s * mean, or None."""
    moved_value, moved_mean = np.moveaxis(onnx_value, axis, 0), np.moveaxis(mean, axis, 0)
    flat_value = moved_value.reshape(len(moved_value), -1)
    flat_mean = moved_mean.reshape(len(moved_mean), -1)
    norm = np.sum(flat_mean * flat_mean, axis=1)
    scale = np.where(norm > 0, np.sum(flat_value * flat_mean, axis=1) / np.where(norm > 0, norm, 1.0), 1.0)
    predicted = scale[:, None] * flat_mean
    tolerance = SCALE_RTOL * max(np.max(np.abs(flat_value)), 1e-30)
    if not np.all(np.abs(predicted - flat_value) <= tolerance + SCALE_RTOL * np.abs(flat_value)):
        return None
    shape = [1] * onnx_value.ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _equal(onnx_value, mean):
    tolerance = VALUE_RTOL * max(np.max(np.abs(mean)), 1e-30) if mean.size else 0.0
    return np.all(np.abs(onnx_value - mean) <= tolerance + VALUE_RTOL * np.abs(mean))


class _Matcher:
    def __init__(self, model, source):
        self.values = {init.name: numpy_helper.to_array(init).astype(np.float64)
                       for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
        self.slots = linear_slots(model)
        self.by_node = {}
        for slot in self.slots.values():
            self.by_node.setdefault(slot.node, {})[slot.role] = slot
        self.source = source
        self.taken = {}  # initializer -> Match
        self.node_scale = {}  # node -> per-channel factor of its folded weight

    def fit(self, gaussian, initializer, strict):
        """(ONNX-layout std, notes) if ``gaussian`` can live in ``initializer``; None if the shapes
        or values do not fit and not ``strict``; a PfpcError naming both if ``strict``."""
        slot = self.slots.get(initializer)
        value = self.values[initializer]
        placements = _placements(gaussian, slot, value.shape)
        if not placements:
            if strict:
                raise PfpcError(f"{self.source}: '{gaussian.name}' has shape {list(gaussian.mean.shape)}, the ONNX initializer "
                                f"'{initializer}' has {list(value.shape)}")
            return None
        for layout, note in placements:
            mean, std = layout(gaussian.mean), layout(gaussian.std)
            notes = [note] if note else []
            if _equal(value, mean):
                return std, notes
            if slot is None:
                continue
            if slot.role == "weight":
                scale = _channel_scale(value, mean, slot.output_axis)
                if scale is not None:
                    self.node_scale[slot.node] = scale.reshape(-1)
                    span = f"{np.min(np.abs(scale)):.3g}..{np.max(np.abs(scale)):.3g}"
                    return std * np.abs(scale), notes + [f"batch norm folded by the exporter: std scaled per channel by |factor| {span}"]
            elif slot.node in self.node_scale and len(self.node_scale[slot.node]) == value.size:
                scale = self.node_scale[slot.node].reshape(value.shape)
                return std * np.abs(scale), notes + ["batch norm folded by the exporter: mean from the ONNX, std scaled like the weight"]
        if strict:
            error = np.max(np.abs(value - placements[0][0](gaussian.mean)))
            raise PfpcError(f"{self.source}: the ONNX initializer '{initializer}' does not hold the checkpoint's mean of "
                            f"'{gaussian.name}' (max |difference| {error:.3g}); was the ONNX exported from this checkpoint's means?")
        return None

    def take(self, gaussian, initializer, how, strict):
        fitted = self.fit(gaussian, initializer, strict)
        if fitted is None:
            return None
        std, notes = fitted
        match = Match(gaussian, initializer, how, notes, std)
        self.taken[initializer] = match
        return match


def match_gaussians(gaussians: list, model: onnx.ModelProto, source: str, allow_unmatched: bool = False) -> ImportResult:
    """Place ``gaussians`` on the initializers of ``model`` (see the module docstring)."""
    matcher = _Matcher(model, source)
    free = [name for name in matcher.values]
    pending, matches = [], {}
    # weights first: a folded batch norm is detected on the weight and applied to its bias
    ordered = sorted(gaussians, key=lambda g: g.role == "bias")
    for gaussian in ordered:
        target, how = None, None
        if gaussian.name in matcher.values:
            target, how = gaussian.name, "by name"
        else:
            candidates = [name for name in free if _suffix_match(gaussian.name, name)]
            if len(candidates) == 1:
                target, how = candidates[0], "by name suffix"
        if target is None and gaussian.role == "bias":
            weight = matches.get(gaussian.name[: -len("bias")] + "weight")
            slot = weight is not None and matcher.slots.get(weight.initializer)
            bias_slot = slot and matcher.by_node[slot.node].get("bias")
            if bias_slot:
                target, how = bias_slot.initializer, f"bias of the node that has '{weight.initializer}'"
        if target is not None:
            if target in matcher.taken:
                raise PfpcError(f"{source}: '{gaussian.name}' and '{matcher.taken[target].gaussian.name}' both map to the ONNX initializer '{target}'")
            matches[gaussian.name] = matcher.take(gaussian, target, how, strict=True)
        else:
            pending.append(gaussian)
    unmatched = []
    for gaussian in pending:  # by shape and order, in the checkpoint's order
        match = None
        for slot in matcher.slots.values():
            if slot.initializer not in matcher.taken and gaussian.role in (slot.role, None):
                match = matcher.take(gaussian, slot.initializer, "by shape and order (values agree)", strict=False)
                if match is not None:
                    break
        if match is None:
            unmatched.append(gaussian)
        else:
            matches[gaussian.name] = match
    if not matches:
        raise PfpcError(f"{source}: none of its {len(gaussians)} stochastic tensors matches an initializer of the ONNX model "
                        f"(checkpoint: {', '.join(g.name for g in gaussians[:6])}; ONNX: {', '.join(list(matcher.values)[:6])})")
    if unmatched and not allow_unmatched:
        listed = ", ".join(f"'{g.name}' {list(g.mean.shape)}" for g in unmatched[:6])
        raise PfpcError(f"{source}: {len(unmatched)} stochastic tensors match no initializer of the ONNX model ({listed}); "
                        "use --allow-unmatched (allow_unmatched=True) to leave them deterministic")
    order = {name: index for index, name in enumerate(matcher.values)}
    placed = sorted(matches.values(), key=lambda m: order[m.initializer])
    arrays = {f"{m.initializer}.std": m.std.astype(np.float32) for m in placed}
    deterministic = [name for name in matcher.slots if name not in matcher.taken]
    return ImportResult(arrays, placed, unmatched, deterministic)
