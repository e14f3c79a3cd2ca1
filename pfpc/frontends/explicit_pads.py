"""auto_pad made explicit before TVM's importer sees the model.

    Conv(x, w, auto_pad="SAME_LOWER", kernel_shape=[3, 3], strides=[2, 2])   x: [1, 1, 7, 7]
        ->  Conv(x, w, pads=[1, 1, 1, 1], kernel_shape=[3, 3], strides=[2, 2])

TVM's converters get SAME_LOWER pools wrong (a 7x7 input, kernel 3, stride 2 pooled to 3x3
instead of ONNX's 4x4) and turn a SAME convolution into an opaque kernel with no Gaussian
counterpart. ONNX defines the padding from the static input size alone: output = ceil(in / s),
total = max((output - 1) s + (k - 1) d + 1 - in, 0), the odd element at the end (SAME_UPPER) or
the beginning (SAME_LOWER); VALID is no padding. Nodes whose input size is not known statically
keep their auto_pad (the importer then reports them).
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..ops.registry import AUTO_PAD_ONNX


def _same_pads(sizes, kernel, strides, dilations, lower):
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(large if lower else small)
        ends.append(small if lower else large)
    return begins + ends


def make_pads_explicit(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every auto_pad of Conv/MaxPool/AveragePool turned into pads (or
    ``model`` itself when none has one)."""
    if not any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for n in model.graph.node
               if n.op_type in AUTO_PAD_ONNX for a in n.attribute):
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type not in AUTO_PAD_ONNX:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode in ("", "NOTSET"):
            continue
        shape = shapes.get(node.input[0])
        if shape is None:
            continue
        sizes = shape[2:]
        if None in sizes:
            continue
        if node.op_type == "Conv":
            kernel = attrs.get("kernel_shape") or shapes.get(node.input[1], [None, None] + [None] * len(sizes))[2:]
        else:
            kernel = attrs.get("kernel_shape")
        if not kernel or None in kernel:
            continue
        strides = attrs.get("strides") or [1] * len(sizes)
        dilations = attrs.get("dilations") or [1] * len(sizes)
        pads = [0] * (2 * len(sizes)) if mode == "VALID" else _same_pads(sizes, kernel, strides, dilations, mode == "SAME_LOWER")
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("pads", pads)])
    return copy
