"""Import the checked ONNX model into Relax, weights as named function parameters.

The result is the deterministic posterior-mean network as TVM's ONNX importer produces it, with
two function attributes the passes read:

- ``pfp.params``: parameter name -> weight mean (every parameter after ``num_input``);
- ``pfp.weight_var``: parameter name -> weight variance, for stochastic weights only;
- ``pfp.onnx_names``: parameter name -> ONNX initializer name (for messages and C comments);
- ``pfp.onnx_nodes``: binding name -> the ONNX node it computes (provenance: the C kernels are
  named after their nodes).
"""

from __future__ import annotations

import collections
import contextlib
import re

import numpy as np
import onnx
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx, onnx_frontend

from ..c_identifiers import C_KEYWORDS
from ..errors import PfpcError
from .. import ir_state
from ..ir import constant_value
from ..ops import registry as R
from ..ops.kernel import OnnxNode
from .explicit_pads import make_pads_explicit
from .onnx_model import graph_inputs, input_shapes
from .posterior import Posterior

#: Operators accepted only as the last node(s): the model's outputs become their inputs' moments.
OUTPUT_OPS = R.onnx_ops(R.Kind.OUTPUT)


def _unsupported_reason(node, outputs, ranks) -> str | None:
    """Why ``node`` cannot be compiled, or None. ``ranks``: tensor name -> rank, where known;
    ``outputs``: the model outputs and what reaches them through Identity nodes alone."""
    if node.op_type in OUTPUT_OPS and node.domain in ("", "ai.onnx") and not all(out in outputs for out in node.output):
        return "supported only as a last node whose output is a model output"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return R.unsupported_reason(node, attrs, ranks.get(node.input[0]) if node.input else None)


def check_supported(model: onnx.ModelProto, name: str) -> None:
    """Raise one error that lists every unsupported node (name, op type and why)."""
    outputs = {value.name for value in model.graph.output}
    consumers = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    for node in reversed(list(model.graph.node)):  # a softmax followed by Identity at the output is final too
        if node.input and node.input[0] not in outputs and consumers.get(node.input[0]) == [node] \
                and node.op_type == "Identity" and node.output[0] in outputs:
            outputs.add(node.input[0])
    ranks = {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in list(model.graph.input) + list(model.graph.value_info)
        if value.type.tensor_type.HasField("shape")
    }
    unsupported = []
    for node in model.graph.node:
        reason = _unsupported_reason(node, outputs, ranks)
        if reason is not None:
            unsupported.append(f"{node.name or node.output[0]} ({node.op_type}{': ' + reason if reason else ''})")
    if unsupported:
        raise PfpcError(f"{name}: {len(unsupported)} unsupported node(s): " + ", ".join(unsupported))
    for value in model.graph.output:
        elem_type = value.type.tensor_type.elem_type
        if elem_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.FLOAT):
            producer = next((n for n in model.graph.node if value.name in n.output), None)
            node = f" (from {producer.name or producer.output[0]}, {producer.op_type})" if producer is not None else ""
            raise PfpcError(f"{name}: output '{value.name}'{node} is {onnx.helper.tensor_dtype_to_np_dtype(elem_type)}: "
                            "pfpc's outputs are float32 means and variances")


def onnx_node(node, index: int) -> OnnxNode:
    """The provenance record of the ``index``-th node of an ONNX file: a node without a name
    (many exporters write none) is ``<op_type>_<index>``."""
    return OnnxNode(index, node.name or f"{node.op_type}_{index}", node.op_type)


def import_model(model: onnx.ModelProto, posterior: Posterior, name: str = "model") -> tvm.IRModule:
    check_supported(model, name)
    by_output = {out: onnx_node(node, index) for index, node in enumerate(model.graph.node) for out in node.output if out}
    graph_outputs = {value.name for value in model.graph.output}
    model = make_pads_explicit(model)
    model = _constants_as_constant_nodes(model, posterior, name)
    model, original_names = tame_names(model)
    converted = []  # per converted node: (OnnxNode or None, is a graph output, result expression)
    plan = [(node.name, next((by_output[original_names.get(o, o)] for o in node.output if original_names.get(o, o) in by_output), None),
             any(original_names.get(o, o) in graph_outputs for o in node.output)) for node in model.graph.node]
    try:
        with _pfpc_converters(plan, converted):
            mod = from_onnx(model, shape_dict=input_shapes(model), keep_params_in_input=True)
    except PfpcError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PfpcError(f"{name}: TVM's ONNX importer fails: {first}") from None
    provenance = _binding_nodes(mod["main"], converted)
    mod = relax.transform.DeadCodeElimination()(mod)  # e.g. the sigmoid of a SiLU that `_Mul` made one operator
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    if num_input != len(graph_inputs(model)):
        raise PfpcError(f"{name}: expected {len(graph_inputs(model))} inputs, the importer made {num_input}")
    weight_params = list(func.params[num_input:])
    onnx_by_relax = {param: original_names.get(init, init) for param, init in _match_initializers(model, weight_params, name).items()}
    params, variances = {}, {}
    for param in weight_params:
        onnx_name = onnx_by_relax[param.name]
        mean = posterior.means.get(onnx_name)
        if mean is None:
            raise PfpcError(f"{name}: weight '{onnx_name}' is not float32")
        params[param.name] = mean
        if onnx_name in posterior.variances:
            variances[param.name] = posterior.variances[onnx_name]
    func = func.without_attr("params")
    bound = {binding.var.name for block in func.body.blocks for binding in block.bindings}
    provenance = {var: nodes for var, nodes in provenance.items() if var in bound}
    for key, value in ir_state.encode(means=params, variances=variances, onnx_names=onnx_by_relax, onnx_nodes=provenance).items():
        func = func.with_attr(key, value)
    mod["main"] = func
    return mod


def _match_initializers(model, weight_params, name):
    """Map Relax parameter names back to ONNX initializer names (same order, sanitised names)."""
    used = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    mapping = {}
    if len(used) < len(weight_params):
        raise PfpcError(f"{name}: the importer made more weight parameters than there are initializers")
    # the initializers' positions under every name TVM may give a parameter after one (the name
    # sanitised, as it is, with PyTorch's "onnx::" prefix removed), in file order: a scan of all
    # of them per parameter was quadratic (1,000-node chain: 196,000 names sanitised, 4 s)
    positions = {}
    for position, init in enumerate(used):
        for key in {_sanitize(init.name), init.name, init.name.removeprefix("onnx::")}:
            positions.setdefault(key, collections.deque()).append(position)
    taken = set()
    for param in weight_params:
        shape = [int(d) for d in param.ty.shape]
        candidates = positions.get(param.name, collections.deque())
        while candidates and candidates[0] in taken:  # the earliest initializer not matched yet
            candidates.popleft()
        if not candidates:
            raise PfpcError(f"{name}: cannot match imported parameter '{param.name}' to an initializer")
        init = used[candidates[0]]
        if list(init.dims) != shape:
            raise PfpcError(f"{name}: parameter '{param.name}' has shape {shape}, initializer '{init.name}' {list(init.dims)}")
        taken.add(candidates[0])
        mapping[param.name] = init.name
    return mapping


_TAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,47}")
#: kernel parameter names of activations (`pfpc.ir.operand_names`)
_ACTIVATION_NAMES = re.compile(r"(x|in)[0-9]*")


def _is_tame(text: str) -> bool:
    return bool(_TAME.fullmatch(text)) and text not in C_KEYWORDS and not _ACTIVATION_NAMES.fullmatch(text)


def tame_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` whose tensor and node names are short ASCII identifiers (dots allowed),
    no C keyword, unique: names become Relax variables, kernel and parameter names in the C, and
    an ONNX file may hold any text there (quotes, comment delimiters, newlines, non-ASCII, names
    that collide once sanitised). Tame names are kept, so readable models keep readable C.

    Returns the copy and {new tensor name: original name} for the renamed tensors."""
    graph = model.graph
    values = [v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)]
    tensors = list(dict.fromkeys(values + [i.name for i in graph.initializer]
                                 + [t for node in graph.node for t in list(node.input) + list(node.output)]))
    untamed_nodes = [node.name for node in graph.node if node.name and not _is_tame(node.name)]
    taken = {t for t in tensors if _is_tame(t)} | {n.name for n in graph.node if _is_tame(n.name)}
    renamed = {}

    def fresh(text):
        base = re.sub(r"[^A-Za-z0-9_.]", "_", text)[:40]
        base = base if _is_tame(base) else f"t_{base}"[:40]
        candidate, index = base, 2
        while candidate in taken:
            candidate, index = f"{base}_{index}", index + 1
        taken.add(candidate)
        return candidate

    for tensor in tensors:
        if tensor and not _is_tame(tensor):
            renamed[tensor] = fresh(tensor)
    if not renamed and not untamed_nodes:
        return model, {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        value.name = renamed.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renamed.get(t, t) for t in node.input]
        node.output[:] = [renamed.get(t, t) for t in node.output]
        if node.name and not _is_tame(node.name):
            node.name = fresh(node.name)
    return copy, {new: old for old, new in renamed.items()}


def _sanitize(text):
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)
    return out if out and not out[0].isdigit() else "_" + out


def _constants_as_constant_nodes(model, posterior, name):
    """Shapes, axes, clip bounds and pad values are compile-time constants, not weights: make them
    Constant nodes so the importer folds them instead of turning them into parameters."""
    constant_names = {
        node.input[index]
        for node in model.graph.node
        for index in R.CONSTANT_INPUTS.get(node.op_type, ())
        if index < len(node.input) and node.input[index]
    }
    stochastic = sorted(constant_names & set(posterior.variances))
    if stochastic:
        raise PfpcError(f"{name}: '{stochastic[0]}' is a clip bound or pad value; it cannot have a posterior variance")
    constant = [
        init for init in model.graph.initializer if init.data_type != onnx.TensorProto.FLOAT or init.name in constant_names
    ]
    if not constant:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [init for init in copy.graph.initializer if init.data_type == onnx.TensorProto.FLOAT and init.name not in constant_names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(keep)
    constants = [onnx.helper.make_node("Constant", [], [init.name], value=init) for init in constant]
    nodes = constants + list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _constant_scalar(expr, default):
    """The value of an optional scalar constant input of a converter (None: ``default``)."""
    if expr is None:
        return default
    value = constant_value(expr)
    if value is None or value.size != 1:
        raise PfpcError("a clip bound or pad value is not a scalar constant")
    return float(value.reshape(-1)[0])


class _Clip(onnx_frontend.OnnxOpConverter):
    """Clip as one ``relax.clip`` (TVM's converter emits opaque maximum/minimum kernels)."""

    op_type = "Clip"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return relax.op.clip(inputs[0], float(attr.get("min", -np.inf)), float(attr.get("max", np.inf)))

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        lower = _constant_scalar(inputs[1] if len(inputs) > 1 else None, -np.inf)
        upper = _constant_scalar(inputs[2] if len(inputs) > 2 else None, np.inf)
        return relax.op.clip(inputs[0], lower, upper)


class _Pad(onnx_frontend.OnnxOpConverter):
    """Pad (constant, edge, reflect) as ``relax.nn.pad`` (TVM's converter emits opaque kernels)."""

    op_type = "Pad"

    @classmethod
    def _impl_v2(cls, bb, inputs, attr, params):
        return cls._pad(inputs[0], list(attr["pads"]), None, float(attr.get("value", 0.0)), attr)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        pads = constant_value(inputs[1])
        axes = constant_value(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        if pads is None or (len(inputs) > 3 and inputs[3] is not None and axes is None):
            raise PfpcError("Pad: the pads and axes must be constants")
        value = _constant_scalar(inputs[2] if len(inputs) > 2 else None, 0.0)
        return cls._pad(inputs[0], [int(p) for p in pads], axes, value, attr)

    @staticmethod
    def _pad(data, pads, axes, value, attr):
        rank = len(data.ty.shape)
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        width = [0] * (2 * rank)
        for index, axis in enumerate(axes):
            width[2 * axis], width[2 * axis + 1] = pads[index], pads[index + len(axes)]
        mode = attr.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        shape = [int(d) for d in data.ty.shape]
        if mode == "reflect" and any(max(width[2 * a], width[2 * a + 1]) >= shape[a] for a in range(rank) if width[2 * a] or width[2 * a + 1]):
            raise PfpcError(f"Pad: reflect pads {pads} must be smaller than the padded dimensions {shape}")
        return relax.op.nn.pad(data, width, mode, value)


def _constant_ints(expr, what):
    """The integers of a constant (or of a shape the importer folded into a ``ShapeExpr``)."""
    if isinstance(expr, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in expr.values):
        return [int(v) for v in expr.values]
    value = constant_value(expr)
    if value is None:
        raise PfpcError(f"{what} must be a constant")
    return [int(v) for v in np.asarray(value).reshape(-1)]


class _Split(onnx_frontend.OnnxOpConverter):
    """Split as one ``relax.strided_slice`` per output (each a `slice` stage)."""

    op_type = "Split"

    @classmethod
    def _split(cls, bb, data, axis, sizes, count):
        rank = len(data.ty.shape)
        axis %= rank
        length = int(data.ty.shape[axis])
        if sizes is None:  # equal parts, the last smaller (opset 18)
            part = -(-length // count)
            sizes = [min(part, length - k * part) for k in range(count)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        return relax.Tuple([bb.emit(relax.op.strided_slice(data, [axis], [int(begin)], [int(end)]))
                            for begin, end in zip(starts, starts[1:])])

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        sizes = attr.get("split")
        return cls._split(bb, inputs[0], attr.get("axis", 0), None if sizes is None else list(sizes), attr["tvm_custom"]["num_outputs"])

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        sizes = _constant_ints(inputs[1], "Split: the split sizes") if len(inputs) > 1 and inputs[1] is not None else None
        return cls._split(bb, inputs[0], attr.get("axis", 0), sizes, attr.get("num_outputs", attr["tvm_custom"]["num_outputs"]))


class _Gather(onnx_frontend.Gather):
    """Gather of a tensor at constant indices (``y[:, -1]``, the last step of a recurrent
    layer) as one ``relax.strided_slice`` per index (each a `slice` stage), concatenated, and
    the index axis reshaped away or to the indices' shape. Anything else (shapes, constant
    data) as TVM converts it."""

    op_type = "Gather"

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, indices = inputs[0], inputs[1]
        index_values = constant_value(indices)
        if index_values is None or isinstance(data, (relax.ShapeExpr, tvm.ir.GenericConst)) or not isinstance(data.ty, relax.TensorType):
            return super()._impl_v13(bb, inputs, attr, params)
        shape = [int(d) for d in data.ty.shape]
        axis = attr.get("axis", 0) % len(shape)
        index_values = np.asarray(index_values).astype(np.int64)
        flat = [int(i) % shape[axis] for i in index_values.reshape(-1)]
        parts = [bb.emit(relax.op.strided_slice(data, [axis], [i], [i + 1])) for i in flat]
        gathered = parts[0] if len(parts) == 1 else bb.emit(relax.op.concat(parts, axis))
        return relax.op.reshape(gathered, shape[:axis] + list(index_values.shape) + shape[axis + 1:])


class _Tile(onnx_frontend.OnnxOpConverter):
    """Tile by constant repeats as ``relax.tile`` (TVM's converter emits an opaque kernel)."""

    op_type = "Tile"

    @classmethod
    def _impl_v6(cls, bb, inputs, attr, params):
        return relax.op.tile(inputs[0], _constant_ints(inputs[1], "Tile: the repeats"))


class _Expand(onnx_frontend.OnnxOpConverter):
    """Expand to a constant shape as ``relax.broadcast_to`` of the broadcast shape (ONNX Expand
    broadcasts both ways)."""

    op_type = "Expand"

    @classmethod
    def _impl_v8(cls, bb, inputs, attr, params):
        shape = np.broadcast_shapes(tuple(int(d) for d in inputs[0].ty.shape), tuple(_constant_ints(inputs[1], "Expand: the shape")))
        return relax.op.broadcast_to(inputs[0], [int(d) for d in shape])


class _InstanceNormalization(onnx_frontend.OnnxOpConverter):
    """InstanceNormalization as ``relax.nn.group_norm`` with one group per channel (TVM's
    converter spells it out in mean, variance, sqrt and divide)."""

    op_type = "InstanceNormalization"

    @classmethod
    def _impl_v6(cls, bb, inputs, attr, params):
        data = inputs[0]
        rank = len(data.ty.shape)
        return relax.op.nn.group_norm(data, inputs[1], inputs[2], num_groups=int(data.ty.shape[1]), channel_axis=1,
                                      axes=list(range(2, rank)), epsilon=float(attr.get("epsilon", 1e-5)))


class _GroupNormalization(onnx_frontend.OnnxOpConverter):
    """GroupNormalization (opset 21: scale and bias per channel) as one ``relax.nn.group_norm``
    with its scale and bias (TVM's converter normalises without them, then multiplies and adds)."""

    op_type = "GroupNormalization"

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        data = inputs[0]
        return relax.op.nn.group_norm(data, inputs[1], inputs[2], num_groups=int(attr["num_groups"]), channel_axis=1,
                                      axes=list(range(2, len(data.ty.shape))), epsilon=float(attr.get("epsilon", 1e-5)))


class _LRN(onnx_frontend.OnnxOpConverter):
    """LRN as one marker (TVM's converter squares x, which the PFP cannot treat as a product)."""

    op_type = "LRN"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _marker(bb, "lrn", inputs[0], size=attr["size"], alpha=attr.get("alpha", 1e-4), beta=attr.get("beta", 0.75),
                       bias=attr.get("bias", 1.0))


class _Resize(onnx_frontend.Resize):
    """Resize as TVM converts it (``relax.image.resize2d`` over H and W), refusing a scaling of
    N or C (which that would drop); opset 10's (X, scales) form is asymmetric, as Upsample."""

    op_type = "Resize"

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        attr = {**attr, "coordinate_transformation_mode": b"asymmetric", "nearest_mode": b"floor"}
        return cls._impl_v11(bb, [inputs[0], None, inputs[1]], attr, params)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        shape = [int(d) for d in inputs[0].ty.shape]
        scales = constant_value(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
        sizes = constant_value(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        if scales is not None and scales.size and [float(v) for v in scales.reshape(-1)[:2]] != [1.0, 1.0]:
            raise PfpcError(f"Resize: scales {[float(v) for v in scales.reshape(-1)]}: only the last two axes can be resized")
        if sizes is not None and sizes.size and [int(v) for v in sizes.reshape(-1)[:2]] != shape[:2]:
            raise PfpcError(f"Resize: sizes {[int(v) for v in sizes.reshape(-1)]}: only the last two axes can be resized")
        if (sizes is None or not sizes.size) and scales is not None and len(shape) == 4:
            # ONNX maps coordinates with the given scale, resize2d with output / input: they
            # differ where the output size is rounded down (3 x 0.5 -> 1 read x[1], not x[0.5])
            for size, scale in zip(shape[2:], scales.reshape(-1)[2:]):
                if float(np.floor(size * float(scale))) != size * float(scale):
                    raise PfpcError(f"Resize: scale {float(scale)} of an axis of {size} rounds the output down to "
                                    f"{int(np.floor(size * float(scale)))}: such a scale is not supported (give sizes instead)")
        return super()._impl_v18(bb, inputs, attr, params)


class _Upsample(onnx_frontend.OnnxOpConverter):
    """Upsample (opsets 7-9) as ``relax.image.resize2d``: Resize with asymmetric coordinates
    (nearest: rounded down)."""

    op_type = "Upsample"

    @classmethod
    def _resize(cls, data, scales, attr):
        shape = [int(d) for d in data.ty.shape]
        if len(shape) != 4 or list(scales[:2]) != [1.0, 1.0]:
            raise PfpcError(f"Upsample: scales {list(scales)}: only the last two axes of a 4-D input can be scaled")
        mode = attr.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        size = [int(np.floor(d * s)) for d, s in zip(shape[2:], scales[2:])]
        return relax.op.image.resize2d(data, size, method="nearest_neighbor" if mode == "nearest" else "linear",
                                       coordinate_transformation_mode="asymmetric", rounding_method="floor")

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        return cls._resize(inputs[0], [float(s) for s in attr["scales"]], attr)

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        scales = constant_value(inputs[1])
        if scales is None:
            raise PfpcError("Upsample: the scales must be a constant")
        return cls._resize(inputs[0], [float(s) for s in np.asarray(scales).reshape(-1)], attr)


def _marker(bb, stage, data, **params):
    """The registry's marker of a Gaussian operator without a Relax counterpart
    (`registry.MARKER_OP`): ``R.call_pure_packed("pfpc.<stage>", x, *params)``, its scalar
    parameters in the order of the entry's ``marker_params``. `SubstituteLayers` turns it into the
    stage (`registry.stage_of`)."""
    data = bb.normalize(data)
    values = [relax.prim_value(tvm.tirx.FloatImm("float32", float(params[name]))) for name in R.MARKERS[stage].marker_params]
    return relax.op.call_pure_packed(R.MARKER_PREFIX + stage, data, *values, ty_args=data.ty)


class _HardSigmoid(onnx_frontend.OnnxOpConverter):
    """HardSigmoid as one marker (TVM's converter emits multiply, add, clip)."""

    op_type = "HardSigmoid"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _marker(bb, "hard_sigmoid", inputs[0], alpha=attr.get("alpha", 0.2), beta=attr.get("beta", 0.5))


class _HardSwish(onnx_frontend.OnnxOpConverter):
    """HardSwish(x) = x HardSigmoid(x; 1/6, 1/2) as one marker."""

    op_type = "HardSwish"

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        return _marker(bb, "hard_swish", inputs[0], alpha=1.0 / 6.0, beta=0.5)


class _Elu(onnx_frontend.OnnxOpConverter):
    op_type = "Elu"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _marker(bb, "elu", inputs[0], alpha=attr.get("alpha", 1.0))


class _Selu(onnx_frontend.OnnxOpConverter):
    op_type = "Selu"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _marker(bb, "selu", inputs[0], alpha=attr.get("alpha", 1.67326319217681884765625),
                       gamma=attr.get("gamma", 1.05070102214813232421875))


class _Softplus(onnx_frontend.OnnxOpConverter):
    """Softplus as ``relax.nn.softplus`` (TVM's converter emits maximum, abs, exp, log)."""

    op_type = "Softplus"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return relax.op.nn.softplus(inputs[0])


def _binding(bb, expr):
    """The value bound to the Relax variable ``expr`` in the importer's block, or None."""
    if not isinstance(expr, relax.Var):
        return None
    try:
        return bb.lookup_binding(expr)
    except Exception:
        return None


def _same_tensor(bb, first, second) -> bool:
    """Whether two importer expressions compute the same tensor: the importer hands a node's
    inputs over as expressions (an unbound call, or a variable bound to it)."""

    def resolved(expr):
        bound = _binding(bb, expr)
        return expr if bound is None else bound

    return first.same_as(second) or tvm_ffi.structural_equal(resolved(first), resolved(second))


class _Mul(onnx_frontend.Mul):
    """x * Sigmoid(x) (SiLU/Swish) and x * HardSigmoid(x) (HardSwish as exporters before opset
    14 write it) as one operator of x: the two factors are not independent, so the product rule
    of `multiply` does not apply. Any other product as TVM converts it."""

    op_type = "Mul"

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        for data, gate in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
            value = _binding(bb, gate)
            if value is None and isinstance(gate, relax.Call):
                value = gate
            if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
                continue
            if value.op.name == "relax.sigmoid" and _same_tensor(bb, value.args[0], data):
                return relax.op.nn.silu(data)
            marker = R.marker_stage(value)
            if marker is not None and marker[0] == "hard_sigmoid" and _same_tensor(bb, value.args[1], data):
                return _marker(bb, "hard_swish", data, **marker[1])
        return super()._impl_v7(bb, inputs, attr, params)


class _Max(onnx_frontend.OnnxOpConverter):
    """Max of several tensors as a chain of ``relax.maximum`` (TVM's converter stacks them)."""

    op_type = "Max"

    combine = staticmethod(relax.op.maximum)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        result = inputs[0]
        for operand in inputs[1:]:
            result = bb.normalize(cls.combine(result, operand))
        return result


class _Min(_Max):
    op_type = "Min"
    combine = staticmethod(relax.op.minimum)


class _Sum(onnx_frontend.OnnxOpConverter):
    """Sum of several tensors as a chain of ``relax.add`` (TVM's converter stacks them)."""

    op_type = "Sum"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        total = inputs[0]
        for operand in inputs[1:]:
            total = bb.normalize(relax.op.add(total, operand))
        return total


def _binding_nodes(func, converted) -> dict:
    """Binding name -> (OnnxNode,): the node whose conversion emitted it. Each node's result was
    bound as soon as it was converted (`_pfpc_converters`), so a binding belongs to the first
    node converted after it was emitted; the results of output nodes are bound by the importer
    at the end, matched by identity."""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    position = {b.var: i for i, b in enumerate(bindings)}
    owner = {}
    boundary = -1
    for node, output, result in converted:
        results = list(result.fields) if isinstance(result, relax.Tuple) else [result]
        ends = [position[r] for r in results if isinstance(r, relax.Var) and r in position]
        if output and not ends:
            for index, binding in enumerate(bindings):
                if any(binding.value.same_as(r) for r in results):
                    ends.append(index)
        end = max(ends, default=-1)
        if node is not None:
            for index in range(boundary + 1, end + 1):
                owner.setdefault(index, node)
        boundary = max(boundary, end)
    names = [b.var.name for b in bindings]
    return {bindings[i].var.name: (node,) for i, node in owner.items() if names.count(bindings[i].var.name) == 1}


@contextlib.contextmanager
def _pfpc_converters(plan=None, converted=None):
    """Use pfpc's converters for the ONNX operators above while the importer runs. With ``plan``
    (per node of the graph: its name, its OnnxNode or None, and whether it makes a graph output), each
    converted node's result is bound right away (except at the outputs, which the importer binds
    itself) and listed in ``converted`` as (OnnxNode, is an output, result): `_binding_nodes`."""
    original = onnx_frontend._get_convert_map
    original_convert = onnx_frontend.ONNXGraphImporter._convert_operator
    pending = list(plan or [])

    def convert_map():
        return {**original(), **{converter.op_type: converter for converter in (_Clip, _Pad, _Sum, _HardSigmoid, _HardSwish, _Elu, _Selu, _Softplus,
                                                                       _Mul, _Max, _Min, _Split, _Gather, _Tile, _Expand, _Resize, _Upsample,
                                                                       _InstanceNormalization, _GroupNormalization, _LRN)}}

    def convert(importer, op_name, inputs, attrs, opset):
        result = original_convert(importer, op_name, inputs, attrs, opset)
        planned, node, output = pending.pop(0) if pending else ("", None, False)
        if planned != attrs.get("tvm_custom", {}).get("name", planned):  # not the node planned: no provenance
            pending.clear()
            converted.clear()
            node = None
        if isinstance(result, relax.Call) and isinstance(result.ty, (relax.TensorType, relax.TupleType)) and not output:
            result = importer.bb.emit(result)
        converted.append((node, output, result))
        return result

    onnx_frontend._get_convert_map = convert_map
    if converted is not None:
        onnx_frontend.ONNXGraphImporter._convert_operator = convert
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
        onnx_frontend.ONNXGraphImporter._convert_operator = original_convert
