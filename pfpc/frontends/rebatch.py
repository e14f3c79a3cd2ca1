"""A batch-1 export compiled at another batch size.

Exporters write the batch size they traced with into the graph's inputs (``torch.onnx.export``
without ``dynamic_axes`` gives ``[1, 3, 32, 32]``). ``--batch N`` on such a model sets the inputs'
leading dimension to N and accepts the result only when

- shape inference gives every output the leading dimension N, and
- onnxruntime, run on two items at once, gives each item the outputs the batch-1 model gives it
  alone (the model's own numbers are the reference, nothing of pfpc's).

A Reshape to a constant ``[1, ...]`` (``x.view(x.size(0), -1)`` as exporters fold it) keeps the
input's batch instead. A graph with its batch size written into it otherwise (a Reshape that
drops the batch, ``[2, 3]`` of a ``[1, 2, 3]`` input; a reduction or a Concat over the batch axis)
is refused with the node or output that shows it: never compiled at a batch it does not have, and
never at batch 1 with --batch ignored in silence."""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import PfpcError

#: items run side by side in the check: two are enough to show one item's outputs depend on another's
CHECK_ITEMS = 2


def rebatch(model: onnx.ModelProto, inputs, batch: int, name: str) -> onnx.ModelProto:
    """``model`` (every input of rank >= 1 with the fixed leading dimension 1) at batch ``batch``."""
    flexible = _reshapes_keep_batch(model)
    batched = _with_batch(flexible, inputs, batch, name)
    _check_items_independent(model, _with_batch(flexible, inputs, CHECK_ITEMS, name), inputs, name)
    return batched


def _reshapes_keep_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which a Reshape to a constant ``[1, ...]`` of a tensor whose leading dimension is 1
    reshapes to ``[0, ...]`` (ONNX: the input's own leading dimension) instead: the same at batch 1,
    and what ``x.view(x.size(0), -1)`` meant before the exporter folded the batch into a constant.
    `_check_items_independent` still compares the result with the model as exported."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    shapes = _leading_dims(copy)
    constants = {init.name: init for init in copy.graph.initializer}
    for node in copy.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants or shapes.get(node.input[0]) != 1:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target = onnx.numpy_helper.to_array(constants[node.input[1]])
        if target.ndim != 1 or not len(target) or target[0] != 1:
            continue
        kept = onnx.numpy_helper.from_array(np.concatenate([[0], target[1:]]).astype(target.dtype), f"{node.input[1]}_batch_kept_{len(constants)}")
        constants[kept.name] = kept
        copy.graph.initializer.append(kept)
        node.input[1] = kept.name
    return copy


def _leading_dims(model: onnx.ModelProto) -> dict:
    """{value: its leading dimension} where shape inference at the exported batch knows it."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    dims = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shape = value.type.tensor_type.shape.dim
        if len(shape) and shape[0].HasField("dim_value"):
            dims[value.name] = shape[0].dim_value
    return dims


def _with_batch(model: onnx.ModelProto, inputs, batch: int, name: str) -> onnx.ModelProto:
    """The inputs' leading dimension set to ``batch``, the outputs' left to shape inference; every
    output must come out with the leading dimension ``batch``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = {v.name for v in inputs}
    for value in copy.graph.input:
        if value.name in names and len(value.type.tensor_type.shape.dim):
            value.type.tensor_type.shape.dim[0].dim_value = batch
    for value in copy.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            dim.Clear()
    del copy.graph.value_info[:]
    try:
        copy = onnx.shape_inference.infer_shapes(copy, check_type=True, strict_mode=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise PfpcError(f"{name}: --batch {batch} on a batch-1 export: ONNX shape inference fails at batch {batch} "
                        f"(the graph has the batch size written into it): {first}") from None
    for value in copy.graph.output:
        dims = value.type.tensor_type.shape.dim
        leading = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else None
        if leading != batch:
            raise PfpcError(f"{name}: --batch {batch} on a batch-1 export: output '{value.name}' has leading dimension "
                            f"{leading if leading is not None else 'unknown'} when the inputs take {batch} (the graph has the "
                            "batch size written into it): export the model with a symbolic batch dimension")
    return copy


def _check_items_independent(single: onnx.ModelProto, batched: onnx.ModelProto, inputs, name: str) -> None:
    """Refuse unless ``batched`` (at `CHECK_ITEMS`) gives each of random standard-normal items the
    outputs ``single`` (the model as exported) gives that item alone."""
    from .onnxruntime_session import ort_session

    rng = np.random.default_rng(0)
    feeds = {}
    for value in inputs:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal([CHECK_ITEMS, *shape[1:]] if shape else []).astype(np.float32)
    try:
        together = ort_session(batched).run(None, feeds)
        alone_session = ort_session(single)
        alone = [alone_session.run(None, {k: (v[i:i + 1] if v.ndim else v) for k, v in feeds.items()}) for i in range(CHECK_ITEMS)]
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise PfpcError(f"{name}: --batch on a batch-1 export: onnxruntime cannot run the model to check that its batch "
                        f"items are independent: {first}") from None
    for k, output in enumerate(single.graph.output):
        for i in range(CHECK_ITEMS):
            expected, got = alone[i][k][0], together[k][i]
            scale = float(np.nanmax(np.abs(expected), initial=0.0))
            if expected.shape != got.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                raise PfpcError(f"{name}: --batch on a batch-1 export: output '{output.name}' of item {i} run beside another "
                                "differs from the model run on it alone (the graph mixes its batch items): export the model "
                                "with a symbolic batch dimension")
