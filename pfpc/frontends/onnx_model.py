"""Load an ONNX model and bring it into the form the compiler expects.

Accepts what exporters of every age write: opsets below 7 are upgraded with onnx's version
converter, initializers listed as graph inputs (IR version 3) are weights, nodes out of
topological order are sorted, float64/float16 models become float32 (each change announced in
one line on stderr). Then checks it (onnx checker, shape inference), turns weights that
exporters produce with Constant or ConstantOfShape nodes into initializers, and fixes a
symbolic batch dimension to ``--batch``.
"""

from __future__ import annotations

import heapq
import math
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import PfpcError
from ..ops import registry

SUPPORTED_OPSETS = range(7, 23)
#: The opset older models are upgraded to (onnx's version converter has adapters up to it for
#: every operator pfpc compiles).
UPGRADE_OPSET = 13


def notice(message: str) -> None:
    """One line on stderr about a change made to the user's model."""
    print(f"pfpc: note: {message}", file=sys.stderr)


def load_model(path: str | os.PathLike, batch: int | None = None, *, shapes_only: bool = False) -> onnx.ModelProto:
    """Read, check and normalise the ONNX file at ``path``; one-line `PfpcError` on bad input.
    ``batch``: the batch to compile at (`fix_batch`); ``shapes_only``: the caller reads the weights'
    shapes alone, so a fixed batch is kept whatever it is and ``batch`` only fills a symbolic one."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1):
        raise PfpcError(f"--batch {batch}: the batch size must be a positive integer")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise PfpcError(f"{path}: cannot read the model: {err.strerror}") from None
    if not data:
        raise PfpcError(f"{path}: the file is empty, not an ONNX model")
    try:
        model = onnx.load_from_string(data)
    except Exception:
        raise PfpcError(f"{path}: not a valid ONNX file (truncated or another format)") from None
    if not model.graph.node and not model.graph.output:
        raise PfpcError(f"{path}: not a valid ONNX file (no graph)")
    opset = _default_opset(model)
    if opset is None:
        raise PfpcError(f"{path}: the model imports no default-domain ONNX opset (ai.onnx); cannot tell which operator versions it uses")
    if not 1 <= opset < SUPPORTED_OPSETS.stop:
        raise PfpcError(f"{path}: ONNX opset {opset} is not supported (supported: 1..{SUPPORTED_OPSETS.stop - 1})")
    _load_external_data(model, path)
    sort_nodes(model, name)
    initializers_as_weights(model)
    if opset < SUPPORTED_OPSETS.start:
        model = upgrade_opset(model, opset, name)
    model = to_float32(model, name)
    group_norm_per_group(model, name)
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PfpcError(f"{path}: the ONNX checker rejects the model: {first}") from None
    _read_initializers(model, path)
    model = fold_constants(model)
    fuse_erf_gelu(model, name)
    _check_float32(model, name)
    model = fix_batch(model, batch, name, shapes_only)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise PfpcError(f"{path}: ONNX shape inference fails: {first}") from None
    if fold_static_shapes(model):  # Expand/Reshape to a shape computed from Shape(x): constants now
        model = onnx.shape_inference.infer_shapes(fold_constants(model), check_type=True, strict_mode=True)
    softmax_after_views(model, name)
    return model


def value_shapes(graph) -> dict:
    """The shape shape inference recorded for every graph input, intermediate and output value
    (None for a dimension it does not know)."""
    return {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            for value in list(graph.input) + list(graph.value_info) + list(graph.output) if value.type.tensor_type.HasField("shape")}


def softmax_after_views(model: onnx.ModelProto, name: str) -> None:
    """Softmax/LogSoftmax -> Reshape/Flatten/Squeeze/Unsqueeze/Identity... -> output becomes
    views -> Softmax over the output's matching axis, where the views keep each softmax group
    (the elements normalised together) one axis of the output: the softmax is then the last
    node, and the output keeps its probabilities (`final_softmax`)."""
    graph = model.graph
    shapes = value_shapes(graph)
    views = registry.onnx_ops(registry.Kind.VIEW)
    opset = _default_opset(model)
    outputs = {value.name for value in graph.output}
    for output in graph.output:
        nodes = list(graph.node)
        producer = {out: index for index, node in enumerate(nodes) for out in node.output}
        readers = {}
        for node in nodes:
            for tensor in node.input:
                readers[tensor] = readers.get(tensor, 0) + 1
        chain, index = [], producer.get(output.name)  # node indices, from the output back
        while index is not None and nodes[index].op_type in views and nodes[index].domain in ("", "ai.onnx") \
                and readers.get(nodes[index].input[0]) == 1 and nodes[index].input[0] not in outputs:
            chain.append(index)
            index = producer.get(nodes[index].input[0])
        if not chain or index is None or nodes[index].op_type not in registry.onnx_ops(registry.Kind.OUTPUT) \
                or all(nodes[i].op_type == "Identity" for i in chain):
            continue
        softmax, before, after = nodes[index], shapes.get(nodes[index].input[0]), shapes.get(output.name)
        if not before or not after or any(d in (0, None) for d in before + after):  # unknown or empty
            continue
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1 if opset >= 13 else 1) % len(before)
        # the group: `outer` groups of `size` elements, `inner` apart (opset < 13: the trailing axes flattened)
        outer = int(np.prod(before[:axis]))
        size = int(np.prod(before[axis:])) if opset < 13 else before[axis]
        matching = [k for k in range(len(after)) if int(np.prod(after[:k])) == outer
                    and (int(np.prod(after[k:])) == size if opset < 13 else after[k] == size)]
        if not matching:
            continue
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, original in zip(copies, nodes):
            copy.CopyFrom(original)
        first, last, moved = copies[chain[-1]], copies[chain[0]], copies[index]
        nodes = copies
        stale = moved.output[0]
        logits = stale + "_logits_view"
        first.input[0] = moved.input[0]  # the views read the logits
        last.output[0] = logits
        moved.input[0], moved.output[0] = logits, output.name
        for attribute in list(moved.attribute):
            if attribute.name == "axis":
                moved.attribute.remove(attribute)
        moved.attribute.append(onnx.helper.make_attribute("axis", matching[0]))
        nodes = [n for i, n in enumerate(nodes) if i != index]
        nodes.insert(next(i for i, n in enumerate(nodes) if n is last) + 1, moved)
        del graph.node[:]
        graph.node.extend(nodes)
        kept = [value for value in graph.value_info if value.name != stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        notice(f"{name}: {moved.op_type} '{moved.name or stale}' moved after the {', '.join(copies[i].op_type for i in reversed(chain))} "
               f"that followed it: output '{output.name}' holds its probabilities")


def group_norm_per_group(model: onnx.ModelProto, name: str) -> None:
    """GroupNormalization of opsets 18-20 (scale and bias per group, a form the ONNX checker
    refuses as deprecated) as the same normalisation of x reshaped to [N, groups, -1]:
    InstanceNormalization with the per-group scale and bias, reshaped back. The scale and bias
    stay the user's initializers (a posterior on them applies)."""
    if not 18 <= (_default_opset(model) or 0) < 21:
        return
    nodes, changed = [], []
    for node in model.graph.node:
        if node.op_type != "GroupNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        label = node.name or node.output[0]
        grouped, shape, normalised = (f"{label}/per_group_{part}" for part in ("input", "shape", "output"))
        groups = np.array([0, int(attrs["num_groups"]), -1], np.int64)
        model.graph.initializer.append(numpy_helper.from_array(groups, f"{label}/per_group_groups"))
        nodes += [onnx.helper.make_node("Reshape", [node.input[0], f"{label}/per_group_groups"], [grouped], name=f"{label}/reshape"),
                  onnx.helper.make_node("InstanceNormalization", [grouped, node.input[1], node.input[2]], [normalised], name=label,
                                        epsilon=float(attrs.get("epsilon", 1e-5))),
                  onnx.helper.make_node("Shape", [node.input[0]], [shape], name=f"{label}/shape"),
                  onnx.helper.make_node("Reshape", [normalised, shape], [node.output[0]], name=f"{label}/reshape_back")]
        changed.append(label)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        notice(f"{name}: GroupNormalization {', '.join(repr(c) for c in changed)} (opset {_default_opset(model)}: a scale and bias per group) "
               "computed as InstanceNormalization of the input grouped to [N, groups, -1]")


def fuse_erf_gelu(model: onnx.ModelProto, name: str) -> None:
    """GELU written out with Erf, x * 0.5 * (1 + Erf(x / sqrt(2))) in either grouping of its two
    products (PyTorch's exporter writes nn.GELU so before opset 20), as one Gelu node of x: Erf
    has no Gaussian counterpart of its own, and x and Erf(x / sqrt(2)) are not independent. The
    node is ONNX's Gelu from opset 20, else onnxruntime's com.microsoft Gelu (the same function)."""
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    outputs = {value.name for value in graph.output}

    def only_consumer(tensor, op_type):
        found = consumers.get(tensor, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type and tensor not in outputs else None

    def is_constant(tensor, value):
        array = constants.get(tensor)
        return array is not None and array.size == 1 and abs(float(array.reshape(-1)[0]) - value) <= 1e-6 * abs(value)

    def other(node, tensor):
        return node.input[1] if node.input[0] == tensor else node.input[0]

    def match(erf):
        scale = producer.get(erf.input[0])
        if scale is None or only_consumer(scale.output[0], "Erf") is not erf:
            return None
        if scale.op_type == "Div" and is_constant(scale.input[1], math.sqrt(2.0)):
            x = scale.input[0]
        elif scale.op_type == "Mul" and any(is_constant(t, 1 / math.sqrt(2.0)) for t in scale.input):
            x = scale.input[1] if is_constant(scale.input[0], 1 / math.sqrt(2.0)) else scale.input[0]
        else:
            return None
        add = only_consumer(erf.output[0], "Add")
        inner = add is not None and is_constant(other(add, erf.output[0]), 1.0) and only_consumer(add.output[0], "Mul")
        if not inner:
            return None
        factor = other(inner, add.output[0])
        half = producer.get(factor)
        if factor == x:  # Mul(Mul(x, 1 + erf), 0.5)
            outer = only_consumer(inner.output[0], "Mul")
            if outer is not None and is_constant(other(outer, inner.output[0]), 0.5):
                return x, [scale, erf, add, inner, outer]
        elif is_constant(factor, 0.5):  # Mul(Mul(1 + erf, 0.5), x)
            outer = only_consumer(inner.output[0], "Mul")
            if outer is not None and other(outer, inner.output[0]) == x:
                return x, [scale, erf, add, inner, outer]
        elif half is not None and half.op_type == "Mul" and only_consumer(factor, "Mul") is inner \
                and x in half.input and is_constant(other(half, x), 0.5):  # Mul(Mul(x, 0.5), 1 + erf)
            return x, [half, scale, erf, add, inner]
        return None

    replaced, dropped, fused = {}, set(), []
    for erf in [node for node in graph.node if node.op_type == "Erf" and node.domain in ("", "ai.onnx")]:
        found = match(erf)
        if found is None or any(id(node) in dropped for node in found[1]):
            continue
        x, nodes = found
        last = nodes[-1]
        label = last.name or last.output[0]
        domain = "" if (_default_opset(model) or 0) >= 20 else "com.microsoft"
        replaced[id(last)] = onnx.helper.make_node("Gelu", [x], [last.output[0]], name=label, domain=domain)
        dropped.update(id(node) for node in nodes)
        fused.append(label)
    if not fused:
        return
    kept = [replaced.get(id(node), node) for node in graph.node if id(node) not in dropped or id(node) in replaced]
    del graph.node[:]
    graph.node.extend(kept)
    if any(node.domain == "com.microsoft" for node in kept) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    notice(f"{name}: GELU written out with Erf computed as one Gelu node: {', '.join(repr(label) for label in fused)}")


def fold_static_shapes(model: onnx.ModelProto) -> bool:
    """Replace every Shape node of a tensor whose shape is static (after shape inference) by an
    initializer, for `fold_constants` to fold the integer arithmetic that uses it. Whether any was."""
    graph = model.graph
    shapes = value_shapes(graph)
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    kept, folded = [], False
    for node in graph.node:
        shape = shapes.get(node.input[0]) if node.op_type == "Shape" and node.domain in ("", "ai.onnx") else None
        if shape is None or None in shape:
            kept.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        value = np.array(shape[attrs.get("start", 0):attrs["end"] if "end" in attrs else None], np.int64)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded = True
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _load_external_data(model, path):
    """Tensors saved in separate files are read from the model's directory (as onnx.load does)."""
    from onnx import external_data_helper

    try:
        if any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
            external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as err:
        raise PfpcError(f"{path}: cannot read the model's external tensor data: {err}") from None


def sort_nodes(model: onnx.ModelProto, name: str) -> None:
    """Put the nodes in topological order (keras2onnx writes them reversed; onnxruntime runs
    such graphs, the ONNX checker rejects them), keeping the file's order where it is valid
    (Kahn's algorithm taking the earliest ready node of the file; linear in the graph's size).
    A graph already in order is left as it is. A cycle or an input nothing defines is one error
    naming the node."""
    graph = model.graph
    nodes = list(graph.node)
    initial = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    defined = set(initial)
    for node in nodes:
        if not all(t in defined for t in node.input):
            break
        defined.update(node.output)
    else:
        return
    producers = {out for node in nodes for out in node.output}
    consumers, waiting = {}, []
    for index, node in enumerate(nodes):
        missing = [t for t in node.input if t not in initial and t not in producers]
        if missing:
            raise PfpcError(f"{name}: node '{_node_label(node)}' reads '{missing[0]}', which no node, graph input or initializer defines")
        needed = {t for t in node.input if t not in initial}
        for tensor in needed:
            consumers.setdefault(tensor, []).append(index)
        waiting.append(len(needed))
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    defined, ordered = set(initial), []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for tensor in nodes[index].output:
            if tensor in defined:
                continue
            defined.add(tensor)
            for consumer in consumers.get(tensor, ()):
                waiting[consumer] -= 1
                if waiting[consumer] == 0:
                    heapq.heappush(ready, consumer)
    if len(ordered) < len(nodes):
        first = next(node for node, count in zip(nodes, waiting) if count > 0)
        raise PfpcError(f"{name}: the graph has a cycle through node '{_node_label(first)}'")
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
    notice(f"{name}: the nodes were not in topological order; sorted")


def _node_label(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def initializers_as_weights(model: onnx.ModelProto) -> None:
    """A graph input that has an initializer (IR version 3 lists every weight as an input) is a
    weight: it is removed from the inputs (IR version 4 allows that)."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(inputs)
        model.ir_version = max(model.ir_version, 4)


def upgrade_opset(model: onnx.ModelProto, opset: int, name: str) -> onnx.ModelProto:
    """The model converted to `UPGRADE_OPSET` by onnx's version converter, announced in one line;
    if the converter cannot, one error naming the first node it fails on."""
    try:
        upgraded = _convert(model, opset)
    except Exception as err:
        raise PfpcError(f"{name}: ONNX opset {opset} cannot be upgraded to {UPGRADE_OPSET}: {_failing_node(model, opset)}{_first_line(err)}") from None
    notice(f"{name}: ONNX opset {opset} upgraded to {UPGRADE_OPSET} with onnx's version converter")
    return upgraded


def _explicit_legacy_broadcast(model):
    """Before opset 7, ``Add(A, B, broadcast=1, axis=k)`` aligned B with A's axes from k on; onnx's
    converter misreads the axis (it checks B against A's leading axes). Make it explicit: B goes
    through an Unsqueeze that appends the trailing unit axes, after which NumPy broadcasting means
    the same. The weight keeps its name and shape, so a posterior for it still applies."""
    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.input) + list(graph.value_info)
             if v.type.tensor_type.HasField("shape")}
    ranks.update({init.name: len(init.dims) for init in graph.initializer})
    nodes = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type in registry.LEGACY_BROADCAST and "axis" in attrs and len(node.input) == 2:
            rank_a, rank_b = ranks.get(node.input[0]), ranks.get(node.input[1])
            if rank_a is None or rank_b is None:
                raise PfpcError(f"node '{_node_label(node)}' ({node.op_type}): a legacy broadcast of unknown rank")
            trailing = rank_a - attrs["axis"].i % max(rank_a, 1) - rank_b
            kept = [a for a in node.attribute if a.name != "axis"]
            del node.attribute[:]
            node.attribute.extend(kept)
            if trailing > 0:
                aligned = f"{node.input[1]}_aligned_{len(nodes)}"
                nodes.append(onnx.helper.make_node("Unsqueeze", [node.input[1]], [aligned], axes=list(range(rank_b, rank_b + trailing))))
                node.input[1] = aligned
        nodes.append(node)
    if len(nodes) != len(graph.node):
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
    return model


def _convert(model, opset):
    """Opset 6 first (several operators before it have no shape inference, which some of the
    converter's adapters need), then shapes again, then `UPGRADE_OPSET`."""
    from onnx import version_converter

    model = _explicit_legacy_broadcast(onnx.shape_inference.infer_shapes(model))
    if opset < 6:
        model = version_converter.convert_version(model, 6)
    return version_converter.convert_version(onnx.shape_inference.infer_shapes(model), UPGRADE_OPSET)


def _failing_node(model, opset) -> str:
    """'node 'n' (Op): ' for the first node at which the converter fails on the graph cut after
    it, else ''."""
    for cut, node in enumerate(model.graph.node, 1):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.node[cut:]
        del probe.graph.output[:]
        probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(out) for out in node.output if out])
        try:
            _convert(probe, opset)
        except Exception:
            return f"node '{_node_label(node)}' ({node.op_type}): "
    return ""


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


_OTHER_FLOATS = {onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.FLOAT16: "float16"}


def to_float32(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A float64 or float16 model as float32: initializers, Constant values, graph inputs, outputs
    and Cast targets; announced in one line. bfloat16 and other float types are refused."""
    graph = model.graph
    found = set()

    def convert_tensor(tensor):
        if tensor.data_type in _OTHER_FLOATS:
            found.add(_OTHER_FLOATS[tensor.data_type])
            value = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))

    def convert_value(value):
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type in _OTHER_FLOATS:
            found.add(_OTHER_FLOATS[tensor_type.elem_type])
            tensor_type.elem_type = onnx.TensorProto.FLOAT

    if not any(init.data_type in _OTHER_FLOATS for init in graph.initializer) and not any(
        v.type.tensor_type.elem_type in _OTHER_FLOATS for v in list(graph.input) + list(graph.output)
    ) and not any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _OTHER_FLOATS for n in graph.node for a in n.attribute):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for init in graph.initializer:
        try:
            convert_tensor(init)
        except Exception as err:
            raise PfpcError(f"{name}: initializer '{init.name}' cannot be converted to float32: {_first_line(err)}") from None
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        convert_value(value)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                convert_tensor(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in _OTHER_FLOATS:
                found.add(_OTHER_FLOATS[attr.i])
                attr.i = onnx.TensorProto.FLOAT
    if found:
        notice(f"{name}: {' and '.join(sorted(found))} tensors converted to float32")
    return copy


def _read_initializers(model, path):
    """Check that every initializer's data matches its type and dims (the checker does not)."""
    for tensor in model.graph.initializer:
        try:
            value = numpy_helper.to_array(tensor)
        except Exception as err:
            raise PfpcError(f"{path}: initializer '{tensor.name}' cannot be read: {err}") from None
        if list(value.shape) != list(tensor.dims):
            raise PfpcError(f"{path}: initializer '{tensor.name}' holds {value.size} values for dims {list(tensor.dims)}")


def _default_opset(model):
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant and ConstantOfShape nodes with constant inputs become initializers, and so does
    every node computed from integer constants alone (shape arithmetic: exporters compute pads
    and shapes with Concat/Slice/Reshape/Cast chains that TVM's importer cannot fold)."""
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    kept = []
    for node in graph.node:
        value = None
        if node.op_type == "Constant" and len(node.output) == 1:
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                value = numpy_helper.to_array(attr["value"].t)
            elif "value_float" in attr:
                value = np.array(attr["value_float"].f, np.float32)
            elif "value_floats" in attr:
                value = np.array(list(attr["value_floats"].floats), np.float32)
            elif "value_int" in attr:
                value = np.array(attr["value_int"].i, np.int64)
            elif "value_ints" in attr:
                value = np.array(list(attr["value_ints"].ints), np.int64)
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in constants:
            attr = {a.name: a for a in node.attribute}
            fill = numpy_helper.to_array(attr["value"].t) if "value" in attr else np.zeros(1, np.float32)
            value = np.full(constants[node.input[0]].astype(np.int64), fill.reshape(-1)[0], dtype=fill.dtype)
        elif _integer_only(node, constants):
            value = _evaluate(node, constants)
        if value is None:
            kept.append(node)
            continue
        constants[node.output[0]] = value
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _integer_only(node, constants) -> bool:
    inputs = [name for name in node.input if name]
    return (
        node.domain in ("", "ai.onnx")
        and len(node.output) == 1
        and bool(inputs)
        and all(name in constants and constants[name].dtype.kind in "iub" for name in inputs)
    )


def _evaluate(node, constants):
    """The value of ``node`` on constant inputs (onnx's reference evaluator), None if it fails."""
    from onnx.reference import ReferenceEvaluator

    try:
        (value,) = ReferenceEvaluator(node).run(None, {name: constants[name] for name in node.input if name})
    except Exception:
        return None
    return np.asarray(value)


def _check_float32(model, name):
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue  # shapes, axes, indices
        if init.data_type != onnx.TensorProto.FLOAT:
            dtype = _type_name(init.data_type)
            raise PfpcError(f"{name}: initializer '{init.name}' is {dtype}; pfpc compiles float32 models only")
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT and value.name not in {i.name for i in model.graph.initializer}:
            dtype = _type_name(elem)
            raise PfpcError(f"{name}: input '{value.name}' is {dtype}; pfpc compiles float32 models only")


def _type_name(data_type: int) -> str:
    """'float16' for TensorProto.FLOAT16; a number ONNX does not define stays a number."""
    try:
        return onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"unknown type {data_type}"


def graph_inputs(model: onnx.ModelProto):
    """The graph inputs that are not initializers (old exporters list weights as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def fix_batch(model: onnx.ModelProto, batch: int | None, name: str, shapes_only: bool = False) -> onnx.ModelProto:
    """Set the leading (batch) dimension of the inputs and outputs to ``batch`` where it is
    symbolic. Any other symbolic input dimension is refused: it is not the batch, and giving it
    the batch's value would compile another network (``["N", 3, "L"]`` with --batch 2 is not
    [2, 3, 2]). Other symbolic output dimensions are left to shape inference.

    A model whose inputs all have a fixed leading dimension (a batch-1 export) keeps it, or with
    ``--batch N`` is re-batched where that is shown sound (`rebatch`); its symbolic output batch
    dimensions are left to shape inference."""
    inputs = list(graph_inputs(model))
    fixed_batch = _fixed_input_batch(inputs)
    rebatched = fixed_batch is not None and batch is not None and batch != fixed_batch[1] and not shapes_only
    if rebatched:
        value, size = fixed_batch
        if any(len(v.type.tensor_type.shape.dim) and v.type.tensor_type.shape.dim[0].dim_value != 1 for v in inputs):
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            raise PfpcError(
                f"{name}: --batch {batch}, but input '{value.name}' has the fixed batch dimension {size} ({shape}): export "
                f"the model with a symbolic batch dimension (torch.onnx.export(..., dynamic_axes={{'{value.name}': {{0: 'N'}}}})) "
                "or compile without --batch"
            )
    for value in inputs + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            label = dim.dim_param or "?"
            if axis > 0 or (fixed_batch is not None and value not in inputs):
                if value in inputs:
                    raise PfpcError(
                        f"{name}: dimension {axis} ('{label}') of '{value.name}' is symbolic; --batch N sets only the leading "
                        "(batch) dimension: export the model with a fixed size for this one"
                    )
                dim.Clear()
                continue
            if batch is None:
                raise PfpcError(
                    f"{name}: dimension {axis} ('{label}') of '{value.name}' is symbolic; give a fixed size with --batch N"
                )
            dim.Clear()
            dim.dim_value = batch
    # intermediate value_info would keep the old symbols; shape inference recomputes it
    del model.graph.value_info[:]
    if rebatched:
        from .rebatch import rebatch

        return rebatch(model, inputs, batch, name)
    return model


def fixed_batch(path: str | os.PathLike) -> int | None:
    """The fixed leading dimension of the inputs of the model at ``path``; None for a symbolic batch
    or a file that `load_model` will report on."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return None
    fixed = _fixed_input_batch(list(graph_inputs(model)))
    return fixed[1] if fixed is not None else None


def batch_or_default(path: str | os.PathLike, default: int = 1) -> int:
    """The batch a model at ``path`` is compiled at by callers that run rows in batches of any size
    (`pfpc evaluate`'s PFP, `pfpc compress`'s flash measure): its inputs' fixed leading dimension,
    else ``default``."""
    return fixed_batch(path) or default


def _fixed_input_batch(inputs) -> tuple | None:
    """(the first input, its leading dimension) when every input of rank >= 1 has a fixed leading
    dimension, else None (some input's batch is symbolic: --batch sets it)."""
    ranked = [v for v in inputs if len(v.type.tensor_type.shape.dim)]
    if not ranked or any(not (d := v.type.tensor_type.shape.dim[0]).HasField("dim_value") or d.dim_value <= 0 for v in ranked):
        return None
    return ranked[0], ranked[0].type.tensor_type.shape.dim[0].dim_value


def input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph_inputs(model)}


def output_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}


def final_softmax(graph, output: str):
    """The Softmax/LogSoftmax node that computes model output ``output`` (directly or through
    Identity nodes), or None."""
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(output)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type in registry.onnx_ops(registry.Kind.OUTPUT) else None
