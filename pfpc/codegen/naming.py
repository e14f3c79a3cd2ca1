"""Names and comments of the generated C, from the model: the one place that decides them.

- A kernel is named after the ONNX node(s) it computes (`KernelSpec.nodes`, provenance carried
  by the passes): ``k_conv2_Conv`` for ``/conv2/Conv``, ``k_pool1_MaxPool_relu1_Relu`` for a
  max-pool fused with the ReLU before it; its comment lists the nodes with their op and shape
  (``/conv2/Conv (Conv 6->16, 3x3, stride 1)``) and the moments it writes.
- A weight array is named after its ONNX initializer and the moment it holds:
  ``pfp_model_conv2_weight_mean``, ``..._var``, ``..._second_moment`` (the parameter names of
  the IR carry pass names: ``fc1.weight.permute_dims.var``).

Identifiers are made collision-free by the program's `Namer`.
"""

from __future__ import annotations

import re
import textwrap

from ..ops import registry as R
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec, arity

#: The last component of a weight parameter's IR name -> the moment the array holds (else the mean)
MOMENT_SUFFIXES = ("var", "second_moment", "std", "draw_group", "draw_std")
#: Components of a parameter's IR name that say it is derived from its initializer, not a copy
DERIVED_SUFFIXES = ("batch_norm_scale", "batch_norm_shift", "batch_norm_bias")

_MOMENT_TEXT = {Moment.NONE: "mean (deterministic)", Moment.VAR: "mean, variance", Moment.SECOND_MOMENT: "mean, second moment"}


def c_comment(text: str) -> str:
    """Text safe inside /* */ on one line: printable ASCII, no comment delimiter, no trigraph."""
    text = "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in str(text))
    previous = None
    while previous != text:
        previous = text
        text = text.replace("*/", "*_/").replace("/*", "/_*").replace("??", "?_?")
    return text


def wrap_comment(text: str, width: int = 100) -> str:
    """``text`` (any, made `c_comment`-safe) as a /* */ comment on lines of at most ``width`` characters."""
    return "/* " + "\n * ".join(textwrap.wrap(c_comment(text), width, break_on_hyphens=False)) + " */"


def weight_name(initializer: str, param: str) -> tuple[str, str]:
    """(stem, moment) of a weight parameter's C array: the ONNX initializer it comes from (plus
    a batch-norm folding's suffix when it was computed from it) and the moment it holds."""
    parts = param.split(".")
    moment = parts[-1] if len(parts) > 1 and parts[-1] in MOMENT_SUFFIXES else "mean"
    derived = [part for part in parts if part in DERIVED_SUFFIXES]
    return "_".join([initializer] + derived), moment


def _onnx_types(op: str) -> tuple:
    """The ONNX op types whose nodes stage ``op`` computes: its own, and for a variant (the
    max-pool of correlated inputs) those of the operators it is a form of (`Operator.variant_of`)."""
    return R.STAGES[op].onnx + tuple(t for base in R.STAGES[op].variant_of for t in R.STAGES[base].onnx)


def _head(spec: KernelSpec, index: int):
    """The ONNX node stage ``index`` computes: the one whose op the stage implements, else the first."""
    nodes = spec.stage_nodes(index)
    types = _onnx_types(spec.stages[index][0])
    own = [n for n in nodes if n.op_type in types]
    return (own or list(nodes) or [None])[0]


def kernel_name(spec: KernelSpec | None, fallback: str, variant: str = "") -> str:
    """The C function name (before `Namer` sanitises it) of a kernel: its ONNX nodes in order,
    with the stage's op added where it is not the node's own op (the zero padding of a Conv's
    input: ``conv1_Conv_pad``; a variant stage, such as ``--covariance channel``'s max-pool of
    correlated inputs, computes its operator's nodes: ``pool1_MaxPool_relu1_Relu`` either way),
    then ``variant`` (``codebook``: a kernel rebuilt to read codebooks); ``fallback`` (the IR's
    kernel name, which has the variant) without provenance."""
    if spec is None or not spec.nodes:
        return f"k_{fallback}"
    parts, seen = [], set()
    for index, (op, _) in enumerate(spec.stages):
        node = _head(spec, index)
        if node is None or node in seen:
            continue
        seen.add(node)
        parts.append(node.name)
        if node.op_type not in _onnx_types(op):
            parts.append(op)
    return "k_" + "_".join(parts + ([variant] if variant else []))


def _stage_shapes(spec: KernelSpec, operand_shapes: list) -> list:
    """Per stage, the shapes of the operands it reads from outside (the first stage's all)."""
    shapes, rest = [], list(operand_shapes)
    for index, (op, attrs) in enumerate(spec.stages):
        take = arity(op, attrs) - (0 if index == 0 else 1)
        shapes.append(rest[:take])
        rest = rest[take:]
    return shapes


def _details(op: str, attrs: dict, shapes: list) -> str:
    """Shape facts a firmware engineer looks for: channels, window, stride."""
    if op == "conv2d" and len(shapes) > 1 and len(shapes[1]) == 4:
        out_c, in_c, kh, kw = shapes[1]
        groups = int(attrs.get("groups", 1))
        stride = "x".join(str(s) for s in dict.fromkeys(attrs.get("strides", [1])))
        return f" {in_c * groups}->{out_c}, {kh}x{kw}, stride {stride}" + (f", {groups} groups" if groups > 1 else "")
    if op == "matmul" and len(shapes) > 1 and len(shapes[1]) >= 2:
        return f" {shapes[1][-2]}->{shapes[1][-1]}"
    if "kernel" in attrs:  # a pooling window
        stride = "x".join(str(s) for s in dict.fromkeys(attrs.get("strides", [1])))
        return f" {'x'.join(str(k) for k in attrs['kernel'])}, stride {stride}"
    return ""


def kernel_comment(spec: KernelSpec | None, fallback: str, operand_shapes: list, width: int = 100) -> str:
    """The comment above a kernel: its ONNX nodes with op and shape, in order, and what it
    writes (``/* /conv2/Conv (Conv 6->16, 3x3, stride 1) + /relu2/Relu (Relu) -> mean, variance */``).
    ``operand_shapes``: the shape of each Gaussian operand. Wrapped at ``width`` characters."""
    if spec is None:
        return wrap_comment(fallback, width)
    items, placed = [], {}
    shapes = _stage_shapes(spec, operand_shapes)
    for index, (op, attrs) in enumerate(spec.stages):
        head = _head(spec, index)
        for node in spec.stage_nodes(index):
            if node not in placed:
                placed[node] = len(items)
                items.append([node, ""])
        if head is None:
            items.append([None, op])
        elif head.op_type in R.STAGES[op].onnx:
            items[placed[head]][1] += _details(op, attrs, shapes[index])
        elif head.op_type in _onnx_types(op):  # a variant: the node's shape facts, and which form
            base = next(b for b in R.STAGES[op].variant_of if head.op_type in R.STAGES[b].onnx)
            items[placed[head]][1] += _details(base, attrs, shapes[index]) + f"; {op}"
        elif op != "add" or not items[placed[head]][1]:  # a linear node's bias add goes without saying
            items[placed[head]][1] += f"{';' if items[placed[head]][1] else ':'} {op}"
    parts = [f"{node.name} ({node.op_type}{text})" if node is not None else text for node, text in items]
    return wrap_comment(" + ".join(parts) + f" -> {_MOMENT_TEXT[spec.output]}", width)


def output_parameters(spec: KernelSpec | None, params: list) -> dict:
    """{TVM's name: ``out_mean``, ``out_var`` / ``out_second_moment``} for the output parameters of
    a Gaussian kernel (TVM names them after the last stage: ``relu_v0``, ``add_mean``); empty
    when a new name is taken already. ``params``: the kernel's parameter names, in order."""
    if spec is None:
        return {}
    count = 1 if spec.output == Moment.NONE else 2
    new = ["out_mean", f"out_{spec.output}"][:count]
    old = list(params[-count:])
    if len(params) < count or set(new) & set(params[:-count]):
        return {}
    return {o: n for o, n in zip(old, new) if o != n}


def rename_identifiers(text: str, renames: dict) -> str:
    """``text`` (C) with every identifier in ``renames`` replaced by its new name."""
    if not renames:
        return text
    return re.sub(r"\b(" + "|".join(map(re.escape, renames)) + r")\b", lambda m: renames[m.group(1)], text)
