"""Load an ONNX model and bring it into the form the compiler expects.

Checks it (onnx checker, shape inference), turns weights that exporters produce with Constant or
ConstantOfShape nodes into initializers, and fixes a symbolic batch dimension to ``--batch``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import PfpcError

SUPPORTED_OPSETS = range(7, 23)


def load_model(path: str | os.PathLike, batch: int | None = None) -> onnx.ModelProto:
    """Read, check and normalise the ONNX file at ``path``; one-line `PfpcError` on bad input."""
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
    if opset not in SUPPORTED_OPSETS:
        raise PfpcError(f"{path}: ONNX opset {opset} is not supported (supported: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})")
    _load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PfpcError(f"{path}: the ONNX checker rejects the model: {first}") from None
    _read_initializers(model, path)
    model = fold_constants(model)
    _check_float32(model, name)
    model = fix_batch(model, batch, name)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise PfpcError(f"{path}: ONNX shape inference fails: {first}") from None
    return model


def _load_external_data(model, path):
    """Tensors saved in separate files are read from the model's directory (as onnx.load does)."""
    from onnx import external_data_helper

    try:
        if any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
            external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as err:
        raise PfpcError(f"{path}: cannot read the model's external tensor data: {err}") from None


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


def fix_batch(model: onnx.ModelProto, batch: int | None, name: str) -> onnx.ModelProto:
    """Set the leading (batch) dimension of the inputs and outputs to ``batch`` where it is
    symbolic. Any other symbolic input dimension is refused: it is not the batch, and giving it
    the batch's value would compile another network (``["N", 3, "L"]`` with --batch 2 is not
    [2, 3, 2]). Other symbolic output dimensions are left to shape inference."""
    inputs = list(graph_inputs(model))
    for value in inputs + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            label = dim.dim_param or "?"
            if axis > 0:
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
    return model


def input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph_inputs(model)}


def output_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
