"""Differential fuzzing of pfpc: random valid ONNX graphs over the supported operator set,
compiled to C (-Wall -Wextra -Werror), built, run, and checked against two independent
references: onnxruntime for a zero-variance copy of each graph, the float64 NumPy PFP
(tests/reference.py) with a random posterior. Failures shrink to a minimal graph and can be
saved as regression cases (tests/fuzz_cases/, run by tests/test_fuzz.py).

    python tests/fuzz_graphs.py --count 2000 --seed 0            # the long run
    python tests/fuzz_graphs.py --count 20 --seed 7 --save-failures tests/fuzz_cases

One compile checks a batch of graphs: every graph appears twice in one model, as generated
(its weights with a posterior) and renamed with a ``_d`` suffix without one, so the
deterministic copy must equal onnxruntime and the stochastic one the reference. A batch
that fails is split into its graphs, and each failing graph is shrunk.

Coverage (`OPS`): MatMul (batched, constant on either side), Gemm (transA/B, alpha, beta, bias
shapes), Conv 1-D/2-D (pads, strides, dilations, groups, auto_pad, bias), MaxPool and
AveragePool 1-D/2-D (pads, strides, ceil_mode, count_include_pad, dilations, auto_pad),
GlobalAveragePool, BatchNormalization, Add/Sub/Mul (broadcasting, activation x activation,
scalar and one-element constants), Div by a constant, Sum, Relu, Clip (one or two bounds,
opset 11 inputs), LeakyRelu, PRelu (one-element, per-channel and last-axis slopes), Sigmoid,
Tanh, Identity, Dropout, Flatten, Reshape (0 and -1), Transpose, Squeeze, Unsqueeze, Concat,
Pad (constant), Softmax/LogSoftmax as last node; size-1 dimensions, several inputs and outputs,
deterministic and stochastic branches meeting, wide, concentrated and absent posteriors,
inputs far from zero, and names like the ones pfpc generates (``relu_2``, ``y_var``). Since
session 7 also Slice, Split, Tile, Expand, Pad edge/reflect, Resize, ConvTranspose, Pow, Sqrt,
LayerNormalization, InstanceNormalization, LRN, 3-D Conv/MaxPool/AveragePool, Abs, Neg, Max, Min,
ReduceMean/Sum/Max, GlobalMaxPool, HardSigmoid, HardSwish, Elu, Selu, Softplus; since session 11
SiLU written as x * Sigmoid(x) (`PATTERNS`: pfpc fuses it into one SiLU); with ``--opset 21``
also Gelu (exact and tanh) and GroupNormalization. ``--covariance auto --pooled 0.5``: half the
graphs are convolution stacks ending in a global pool and a dense layer, compiled with pfpc's
covariance form and checked against tests/reference_covariance.py where loadings reach an output.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference  # noqa: E402

OPSET = 17
MEAN_RTOL = 2e-4
VAR_RTOL = 2e-3
GENERATED_LOOKING = ["relu_2", "y_var", "x_mean", "mean0", "out0_var", "matmul", "conv2d_1", "var", "in0", "x0",
                     "constant0", "maxpool_0", "prelu", "relu", "relu_1", "pfp_model", "arena", "y_mean", "scale_moment"]

OPS = ["Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Identity", "Dropout", "Add", "Sub", "Mul", "Div", "Sum",
       "MatMul", "Gemm", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization", "Pad", "Flatten",
       "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat",
       # the operators added after the generator was first written
       "Slice", "Split", "Tile", "Expand", "Resize", "ConvTranspose", "Pow", "Sqrt", "LayerNormalization",
       "InstanceNormalization", "LRN", "Abs", "Neg", "Max", "Min", "ReduceMean", "ReduceSum", "ReduceMax", "GlobalMaxPool",
       "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus"]
#: Activations that ONNX writes as several nodes, generated as such: SiLU = Mul(x, Sigmoid(x)),
#: either operand order (PyTorch's nn.SiLU exported before opset 20, Keras' swish).
PATTERNS = ["SiLU"]
#: Opset of the models written by default, and of the variant (``--opset 21``) that adds
#: `NEWER_OPSET_OPS`: Gelu (opset 20) and GroupNormalization with one scale per channel (21; its
#: opset 18-20 form is deprecated and the ONNX checker refuses it); there ReduceMean/ReduceMax
#: take their axes as an input (18).
NEWER_OPSET, NEWER_OPSET_OPS = 21, ["Gelu", "GroupNormalization"]
#: Operators whose output is never negative (a Sqrt or a fractional Pow may follow: onnxruntime
#: gives NaN for a negative base, pfpc's max(x, 0)^p does not).
NON_NEGATIVE = {"Relu", "Sigmoid", "Abs", "Softplus", "HardSigmoid", "Sqrt"}
SOURCES = ["Add", "Mul", "Sub", "Conv", "MatMul", "Gemm", "BatchNormalization", "Sum"]
SPATIAL_OPS = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool"}


class Names:
    """Tensor names unique in one model: mostly ``t<k>``, sometimes one that looks like a name
    pfpc generates itself."""

    def __init__(self, rng):
        self.rng, self.used, self.count = rng, set(), 0

    def __call__(self, hint="t"):
        if self.rng.random() < 0.15:
            for _ in range(3):
                name = str(self.rng.choice(GENERATED_LOOKING))
                if name not in self.used:
                    self.used.add(name)
                    return name
        while True:
            self.count += 1
            name = f"{hint}{self.count}"
            if name not in self.used:
                self.used.add(name)
                return name


@dataclass
class Graph:
    """One random graph under construction."""

    rng: np.random.Generator
    names: Names
    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # (name, shape)
    inits: dict = field(default_factory=dict)  # name -> array
    constants: set = field(default_factory=set)  # initializers that must stay deterministic
    pool: dict = field(default_factory=dict)  # activation name -> shape
    outputs: list = field(default_factory=list)
    feeds: dict = field(default_factory=dict)
    opset: int = OPSET

    def operators(self):
        return OPS + PATTERNS + NEWER_OPSET_OPS if self.opset >= NEWER_OPSET else OPS + PATTERNS

    def weight(self, shape, hint="w", scale=None, deterministic=False):
        scale = scale if scale is not None else float(self.rng.choice([0.3, 0.7, 1.0]))
        name = self.names(hint)
        self.inits[name] = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        if deterministic:
            self.constants.add(name)
        return name

    def const(self, value, hint="k"):
        name = self.names(hint)
        self.inits[name] = np.asarray(value)
        self.constants.add(name)
        return name

    def add(self, op, inputs, shape, **attrs):
        out = self.names(op.lower()[:4])
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.names("n") if self.rng.random() < 0.5 else "", **attrs))
        self.pool[out] = list(shape)
        return out


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _broadcast_shape_of(rng, shape):
    """A shape that broadcasts to ``shape``: each dim kept or 1, leading dims maybe dropped."""
    out = [d if rng.random() < 0.5 else 1 for d in shape]
    drop = int(rng.integers(0, len(shape) + 1)) if rng.random() < 0.3 else 0
    return out[drop:]


def _pool_out(size, k, s, d, pb, pe, ceil):
    span = size + pb + pe - d * (k - 1) - 1
    if span < 0:
        return 0
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + pb:
        out -= 1
    return out


def _same_out(size, s):
    return -(-size // s)


def _spatial_attrs(g, spatial, kernel, op):
    """pads/strides/dilations/auto_pad/ceil_mode for a conv or pool; None if the output is empty."""
    rng, n = g.rng, len(spatial)
    strides = [int(rng.integers(1, 3)) for _ in range(n)]
    dilations = [int(rng.integers(1, 3)) if rng.random() < 0.3 else 1 for _ in range(n)] if op != "AveragePool" else [1] * n
    attrs = {}
    if rng.random() < 0.7:
        attrs["strides"] = strides
    else:
        strides = [1] * n
    if any(d != 1 for d in dilations):
        attrs["dilations"] = dilations
    ceil = op != "Conv" and rng.random() < 0.25
    if rng.random() < 0.2:
        mode = _pick(rng, ["SAME_UPPER", "SAME_LOWER", "VALID"])
        attrs["auto_pad"] = mode
        if mode != "VALID":  # onnxruntime refuses dilated SAME convolutions and sizes dilated SAME pools unlike ONNX
            attrs.pop("dilations", None)
            dilations = [1] * n
        if mode == "VALID":
            out = [_pool_out(size, k, s, d, 0, 0, False) for size, k, s, d in zip(spatial, kernel, strides, dilations)]
        else:
            out = [_same_out(size, s) for size, s in zip(spatial, strides)]
        return (attrs, out) if min(out) > 0 else None
    pads = [int(rng.integers(0, k)) if rng.random() < 0.6 else 0 for k in kernel * 2] if op != "Conv" else \
        [int(rng.integers(0, 3)) if rng.random() < 0.6 else 0 for _ in range(2 * n)]
    if any(pads):
        attrs["pads"] = pads
    if ceil:
        attrs["ceil_mode"] = 1
    out = [_pool_out(size, k, s, d, pads[i], pads[i + n], ceil) for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations))]
    return (attrs, out) if min(out) > 0 else None


def _try_op(g: Graph, op: str, x: str) -> str | None:
    """Append ``op`` applied to activation ``x`` (and whatever operands it needs); None when the
    op does not apply to x's shape."""
    rng, shape = g.rng, g.pool[x]
    rank = len(shape)
    if op in ("Relu", "Sigmoid", "Tanh", "Identity", "Dropout"):
        return g.add(op, [x], shape)
    if op == "LeakyRelu":
        return g.add(op, [x], shape, alpha=float(_pick(rng, [0.0, 0.01, 0.2, 1.0, 0.5])))
    if op == "Clip":
        lo = float(_pick(rng, [-1.0, 0.0, -0.3]))
        hi = lo + float(_pick(rng, [0.0, 0.5, 6.0]))
        which = int(rng.integers(3))
        ins = [x, g.const(np.float32(lo), "lo")] if which != 1 else [x, ""]
        if which != 0:
            ins.append(g.const(np.float32(hi), "hi"))
        return g.add(op, ins, shape)
    if op == "PRelu":
        kind = int(rng.integers(3))
        slope_shape = [1] if kind == 0 else ([shape[1]] + [1] * (rank - 2) if kind == 1 and rank >= 2 else [shape[-1]])
        name = g.names("slope")
        g.inits[name] = rng.uniform(-0.5, 1.5, slope_shape).astype(np.float32)
        g.constants.add(name)
        return g.add(op, [x, name], shape)
    if op in ("Add", "Sub", "Mul"):
        others = [n for n, s in g.pool.items() if n != x and _broadcastable(s, shape)]
        if others and rng.random() < 0.5:
            other = _pick(rng, others)
        elif rng.random() < 0.1:
            other = x
        else:
            bshape = _broadcast_shape_of(rng, shape) if rng.random() < 0.8 else []
            other = g.weight(bshape, "b", deterministic=rng.random() < 0.3)
        out_shape = list(np.broadcast_shapes(tuple(shape), tuple(g.pool.get(other, np.shape(g.inits.get(other, np.zeros(shape)))))))
        ins = [x, other] if rng.random() < 0.7 else [other, x]
        return g.add(op, ins, out_shape)
    if op == "Div":
        bshape = _broadcast_shape_of(rng, shape) if rng.random() < 0.7 else []
        name = g.names("d")
        g.inits[name] = (rng.uniform(0.5, 2.0, bshape) * rng.choice([-1, 1], bshape)).astype(np.float32)
        g.constants.add(name)
        return g.add(op, [x, name], shape)
    if op == "Sum":
        others = [n for n, s in g.pool.items() if n != x and list(s) == list(shape)]
        ins = [x] + ([_pick(rng, others)] if others else [g.weight(shape, "s")])
        if rng.random() < 0.3:
            ins.append(g.weight(_broadcast_shape_of(rng, shape), "s"))
        return g.add(op, ins, shape)
    if op == "MatMul":
        if rank < 2:
            return None
        n = int(_pick(rng, [1, 2, 3, 5]))
        if rng.random() < 0.15 and rank == 2:  # constant on the left
            w = g.weight([n, shape[0]], "w", scale=0.5)
            return g.add(op, [w, x], [n, shape[1]])
        wshape = [shape[-1], n] if rng.random() < 0.8 or rank < 3 else [shape[-3] if rank >= 3 else 1, shape[-1], n]
        w = g.weight(wshape, "w", scale=0.5)
        return g.add(op, [x, w], list(shape[:-1]) + [n])
    if op == "Gemm":
        if rank != 2:
            return None
        trans_a, trans_b = int(rng.random() < 0.2), int(rng.random() < 0.5)
        m, k = (shape[1], shape[0]) if trans_a else shape
        n = int(_pick(rng, [1, 3, 4]))
        w = g.weight([n, k] if trans_b else [k, n], "w", scale=0.5)
        ins = [x, w]
        attrs = {}
        if trans_a:
            attrs["transA"] = 1
        if trans_b:
            attrs["transB"] = 1
        if rng.random() < 0.3:
            attrs["alpha"] = float(_pick(rng, [0.5, -1.0, 2.0]))
        if rng.random() < 0.7:
            ins.append(g.weight(_pick(rng, [[n], [1, n], [m, n], [1], []]), "c"))
            if rng.random() < 0.3:
                attrs["beta"] = float(_pick(rng, [0.5, -1.0]))
        return g.add(op, ins, [m, n], **attrs)
    new = _try_newer_op(g, op, x)
    if new is not NotImplemented:
        return new
    if op in SPATIAL_OPS and rank not in (3, 4, 5):
        return None
    if op in SPATIAL_OPS and rank == 5 and op != "GlobalAveragePool":
        return _try_3d(g, op, x)
    if op == "Conv":
        spatial = shape[2:]
        channels = shape[1]
        groups = int(_pick(rng, [d for d in (1, 2, 3, channels) if channels % d == 0]))
        out_ch = groups * int(rng.integers(1, 3))
        kernel = [int(rng.integers(1, min(3, s + 2) + 1)) for s in spatial]
        geometry = _spatial_attrs(g, spatial, kernel, op)
        if geometry is None:
            return None
        attrs, out = geometry
        if groups > 1:
            attrs["group"] = groups
        if rng.random() < 0.3:
            attrs["kernel_shape"] = kernel
        ins = [x, g.weight([out_ch, channels // groups] + kernel, "w", scale=0.5)]
        if rng.random() < 0.6:
            ins.append(g.weight([out_ch], "b"))
        return g.add(op, ins, [shape[0], out_ch] + out, **attrs)
    if op in ("MaxPool", "AveragePool"):
        spatial = shape[2:]
        kernel = [int(rng.integers(1, min(3, s + 1) + 1)) for s in spatial]
        geometry = _spatial_attrs(g, spatial, kernel, op)
        if geometry is None:
            return None
        attrs, out = geometry
        if op == "AveragePool" and rng.random() < 0.4 and "auto_pad" not in attrs:
            attrs["count_include_pad"] = 1
        return g.add(op, [x], shape[:2] + out, kernel_shape=kernel, **attrs)
    if op == "GlobalAveragePool":
        return g.add(op, [x], shape[:2] + [1] * (rank - 2))
    if op == "BatchNormalization":
        if rank < 2:
            return None
        c = shape[1]
        gamma = g.const(rng.uniform(0.5, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c).astype(np.float32), "gamma")
        beta = g.weight([c], "beta")
        mean = g.const(rng.standard_normal(c).astype(np.float32), "rmean")
        var = g.const(rng.uniform(0.2, 2.0, c).astype(np.float32), "rvar")
        return g.add(op, [x, gamma, beta, mean, var], shape, epsilon=float(_pick(rng, [1e-5, 1e-3])))
    if op == "Pad":
        pads = [int(rng.integers(0, 3)) if rng.random() < 0.4 else 0 for _ in range(2 * rank)]
        ins = [x, g.const(np.array(pads, np.int64), "pads")]
        if rng.random() < 0.5:
            ins.append(g.const(np.float32(_pick(rng, [0.0, 0.5, -1.0])), "pv"))
        return g.add(op, ins, [s + pads[i] + pads[i + rank] for i, s in enumerate(shape)])
    if op == "Flatten":
        axis = int(rng.integers(0, rank + 1))
        return g.add(op, [x], [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))], axis=axis)
    if op == "Reshape":
        if rank >= 2 and rng.random() < 0.5:  # merge two neighbours
            i = int(rng.integers(0, rank - 1))
            new = list(shape[:i]) + [shape[i] * shape[i + 1]] + list(shape[i + 2:])
        else:  # split off a 1 or a factor
            i = int(rng.integers(0, rank))
            factor = next((f for f in (2, 3) if shape[i] % f == 0), 1)
            new = list(shape[:i]) + [factor, shape[i] // factor] + list(shape[i + 1:])
        if len(new) > 5:
            return None
        spec = list(new)
        if rng.random() < 0.4:
            spec[int(rng.integers(len(spec)))] = -1
        if rng.random() < 0.3 and len(spec) > 0 and len(spec) <= rank and spec[0] == shape[0]:
            spec[0] = 0
        return g.add(op, [x, g.const(np.array(spec, np.int64), "shape")], new)
    if op == "Transpose":
        perm = [int(p) for p in rng.permutation(rank)]
        return g.add(op, [x], [shape[p] for p in perm], perm=perm)
    if op == "Squeeze":
        ones = [i for i, s in enumerate(shape) if s == 1]
        if not ones or rank <= 2:
            return None
        axis = _pick(rng, ones)
        return g.add(op, [x, g.const(np.array([axis - rank if rng.random() < 0.5 else axis], np.int64), "axes")],
                     [s for i, s in enumerate(shape) if i != axis])
    if op == "Unsqueeze":
        if rank >= 5:
            return None
        axis = int(rng.integers(0, rank + 1))
        new = list(shape[:axis]) + [1] + list(shape[axis:])
        return g.add(op, [x, g.const(np.array([axis - rank - 1 if rng.random() < 0.5 else axis], np.int64), "axes")], new)
    if op == "Concat":
        axis = int(rng.integers(0, rank))
        others = [n for n, s in g.pool.items() if len(s) == rank and all(a == b for i, (a, b) in enumerate(zip(s, shape)) if i != axis)]
        ins = [x] + [_pick(rng, others) for _ in range(int(rng.integers(1, 3)))]
        total = sum(g.pool[n][axis] for n in ins)
        return g.add(op, ins, [total if i == axis else s for i, s in enumerate(shape)], axis=axis - rank if rng.random() < 0.3 else axis)
    raise ValueError(op)


def _producer(g: Graph, x: str):
    return next((n.op_type for n in g.nodes if x in n.output), None)


def _try_3d(g: Graph, op: str, x: str) -> str | None:
    """3-D Conv, MaxPool, AveragePool (explicit pads only: the reference has no 3-D auto_pad)."""
    rng, shape = g.rng, g.pool[x]
    spatial = shape[2:]
    kernel = [int(rng.integers(1, min(2, s) + 1)) for s in spatial]
    strides = [int(rng.integers(1, 3)) for _ in spatial]
    pads = [int(rng.integers(0, k)) if op != "Conv" else int(rng.integers(0, 2)) for k in kernel * 2]
    out = [_pool_out(size, k, st, 1, pads[i], pads[i + 3], False) for i, (size, k, st) in enumerate(zip(spatial, kernel, strides))]
    if min(out) <= 0:
        return None
    attrs = {"strides": strides, "pads": pads}
    if op == "Conv":
        channels = shape[1]
        out_ch = int(rng.integers(1, 3))
        ins = [x, g.weight([out_ch, channels] + kernel, "w", scale=0.5)]
        if rng.random() < 0.5:
            ins.append(g.weight([out_ch], "b"))
        return g.add(op, ins, [shape[0], out_ch] + out, **attrs)
    return g.add(op, [x], shape[:2] + out, kernel_shape=kernel, **attrs)


def _try_newer_op(g: Graph, op: str, x: str):
    """The operators added since the generator was first written; NotImplemented for the others."""
    rng, shape = g.rng, g.pool[x]
    rank = len(shape)
    if op in ("Abs", "Neg", "Softplus", "HardSwish"):
        return g.add(op, [x], shape)
    if op == "Elu":
        return g.add(op, [x], shape, alpha=float(_pick(rng, [1.0, 0.5, 2.0])))
    if op == "Selu":
        return g.add(op, [x], shape)
    if op == "HardSigmoid":
        return g.add(op, [x], shape, alpha=float(_pick(rng, [0.2, 1 / 6, 0.5])), beta=float(_pick(rng, [0.5, 0.3])))
    if op in ("Max", "Min"):
        others = [n for n, s in g.pool.items() if n != x and _broadcastable(s, shape)]
        other = _pick(rng, others) if others and rng.random() < 0.5 else g.weight(_broadcast_shape_of(rng, shape), "m")
        return g.add(op, [x, other], shape)
    if op == "Sqrt":
        return g.add(op, [x], shape) if _producer(g, x) in NON_NEGATIVE else None
    if op == "Pow":
        exponent = float(_pick(rng, [2.0, 3.0, 1.0, 0.5, 1.5]))
        if not exponent.is_integer() and _producer(g, x) not in NON_NEGATIVE:
            return None
        return g.add(op, [x, g.const(np.float32(exponent), "p")], shape)
    if op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        axes = sorted({int(a) for a in rng.choice(rank, size=int(rng.integers(1, rank + 1)), replace=False)})
        keep = int(rng.random() < 0.6)
        out = [1 if i in axes else d for i, d in enumerate(shape)] if keep else [d for i, d in enumerate(shape) if i not in axes]
        if not out:
            return None
        if op == "ReduceMax" and int(np.prod([shape[i] for i in axes])) > 64:
            return None
        axes_given = [a - rank if rng.random() < 0.3 else a for a in axes]
        if op == "ReduceSum" or g.opset >= 18:  # opset 13: axes as an input; ReduceMean/ReduceMax as an attribute until 18
            return g.add(op, [x, g.const(np.array(axes_given, np.int64), "axes")], out, keepdims=keep)
        return g.add(op, [x], out, axes=axes_given, keepdims=keep)
    if op == "GlobalMaxPool":
        return g.add(op, [x], shape[:2] + [1] * (rank - 2)) if rank in (3, 4) else None
    if op == "Slice":
        axes = sorted({int(a) for a in rng.choice(rank, size=int(rng.integers(1, rank + 1)), replace=False)})
        starts, ends, steps, out = [], [], [], list(shape)
        for axis in axes:
            size = shape[axis]
            step = int(_pick(rng, [1, 1, 2, -1]))
            if step > 0:
                start, end = int(rng.integers(0, size)), int(rng.integers(1, size + 1))
                start, end = min(start, end - 1), max(end, start + 1)
                length = len(range(start, end, step))
                end = _pick(rng, [end, end + 100 if end == size else end, end - size - 0 if end < size else end])
            else:
                start, end = int(rng.integers(0, size)), -size - 1
                length = len(range(start, -1, step))
            start = start - size if rng.random() < 0.3 else start
            starts.append(start)
            ends.append(int(end))
            steps.append(step)
            out[axis] = length
        if 0 in out:
            return None
        ins = [x, g.const(np.array(starts, np.int64), "st"), g.const(np.array(ends, np.int64), "en"),
               g.const(np.array([a - rank if rng.random() < 0.3 else a for a in axes], np.int64), "ax")]
        if any(st != 1 for st in steps) or rng.random() < 0.3:
            ins.append(g.const(np.array(steps, np.int64), "sp"))
        return g.add(op, ins, out)
    if op == "Split":
        axis = int(rng.integers(0, rank))
        size = shape[axis]
        if size < 2:
            return None
        parts = int(rng.integers(2, min(3, size) + 1))
        if rng.random() < 0.5:
            cut = sorted(int(c) for c in rng.choice(np.arange(1, size), size=parts - 1, replace=False))
            sizes = [b - a for a, b in zip([0] + cut, cut + [size])]
            ins = [x, g.const(np.array(sizes, np.int64), "split")]
        else:
            part = -(-size // parts)
            sizes = [min(part, size - k * part) for k in range(parts)]
            if min(sizes) <= 0:
                return None
            ins = [x]
        outs = [g.names("spli") for _ in sizes]
        g.nodes.append(helper.make_node(op, ins, outs, axis=axis - rank if rng.random() < 0.3 else axis))
        for name, length in zip(outs, sizes):
            g.pool[name] = [length if i == axis else d for i, d in enumerate(shape)]
        return outs[int(rng.integers(len(outs)))]
    if op == "Tile":
        repeats = [int(_pick(rng, [1, 1, 2, 3])) for _ in shape]
        return g.add(op, [x, g.const(np.array(repeats, np.int64), "rep")], [d * r for d, r in zip(shape, repeats)])
    if op == "Expand":
        ones = [i for i, d in enumerate(shape) if d == 1]
        target = [int(_pick(rng, [1, 2, 3])) if i in ones else d for i, d in enumerate(shape)]
        if rng.random() < 0.3 and rank < 5:
            target = [2] + target
        spec = [1 if d == t and rng.random() < 0.3 else t for d, t in zip([None] * (len(target) - rank) + shape, target)]
        return g.add(op, [x, g.const(np.array(spec, np.int64), "shp")], target)
    if op == "Pad" and rng.random() < 0.5:  # edge and reflect (constant below)
        mode = _pick(rng, ["edge", "reflect"])
        pads = [int(rng.integers(0, 3)) if rng.random() < 0.4 else 0 for _ in range(2 * rank)]
        if mode == "reflect":
            pads = [min(p, shape[i % rank] - 1) for i, p in enumerate(pads)]
        return g.add(op, [x, g.const(np.array(pads, np.int64), "pads")], [s + pads[i] + pads[i + rank] for i, s in enumerate(shape)], mode=mode)
    if op == "Resize":
        if rank != 4:
            return None
        method = _pick(rng, ["nearest", "linear"])
        coordinate = _pick(rng, ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
        attrs = {"mode": method, "coordinate_transformation_mode": coordinate}
        if method == "nearest":
            attrs["nearest_mode"] = _pick(rng, ["round_prefer_floor", "floor", "ceil", "round_prefer_ceil"])
        if rng.random() < 0.5:
            scales = [1.0, 1.0] + [float(_pick(rng, [1.0, 2.0, 3.0, 0.5])) for _ in range(2)]
            out = [int(np.floor(d * sc)) for d, sc in zip(shape, scales)]
            if min(out) <= 0 or any(o != d * sc for o, d, sc in zip(out, shape, scales)):
                return None  # a scale that rounds the size down is refused (test_fuzz_regressions)
            return g.add(op, [x, "", g.const(np.array(scales, np.float32), "sc")], out, **attrs)
        out = shape[:2] + [int(_pick(rng, [1, 2, 3, 5])) for _ in range(2)]
        return g.add(op, [x, "", "", g.const(np.array(out, np.int64), "sz")], out, **attrs)
    if op == "ConvTranspose":
        if rank != 4:
            return None
        channels = shape[1]
        groups = int(_pick(rng, [d for d in (1, channels) if channels % d == 0]))
        out_per_group = int(rng.integers(1, 3))
        kernel = [int(rng.integers(1, 4)) for _ in range(2)]
        strides = [int(rng.integers(1, 3)) for _ in range(2)]
        pads = [int(rng.integers(0, k)) for k in kernel * 2]
        output_padding = [int(rng.integers(0, s)) for s in strides] if rng.random() < 0.3 else [0, 0]
        out = [(d - 1) * s + k - pads[i] - pads[i + 2] + op_ for i, (d, s, k, op_) in enumerate(zip(shape[2:], strides, kernel, output_padding))]
        if min(out) <= 0:
            return None
        attrs = {"strides": strides, "pads": pads}
        if any(output_padding):
            attrs["output_padding"] = output_padding
        if groups > 1:
            attrs["group"] = groups
        ins = [x, g.weight([channels, out_per_group] + kernel, "w", scale=0.5)]
        if rng.random() < 0.5:
            ins.append(g.weight([out_per_group * groups], "b"))
        return g.add(op, ins, [shape[0], out_per_group * groups] + out, **attrs)
    if op in ("LayerNormalization", "InstanceNormalization"):
        if rank < 3 and op != "LayerNormalization" or op == "InstanceNormalization" and int(np.prod(shape[2:])) < 2:
            return None  # one element normalised: onnxruntime's x - mean is a rounding error over sqrt(eps)
        channels = shape[1] if rank >= 2 else shape[0]
        epsilon = float(_pick(rng, [1e-5, 1e-3]))
        if op == "LayerNormalization":
            axis = int(rng.integers(1, rank)) if rank > 1 else 0
            normalized = shape[axis:]
            if int(np.prod(normalized)) < 2:
                return None
            scale = g.weight(normalized, "gam", deterministic=rng.random() < 0.5)
            ins = [x, scale] + ([g.weight(normalized, "bet")] if rng.random() < 0.7 else [])
            return g.add(op, ins, shape, axis=axis - rank if rng.random() < 0.3 else axis, epsilon=epsilon)
        return g.add(op, [x, g.weight([channels], "gam", deterministic=rng.random() < 0.5), g.weight([channels], "bet")], shape, epsilon=epsilon)
    if op == "Gelu":
        approximate = _pick(rng, [None, "none", "tanh"])
        return g.add(op, [x], shape, **({} if approximate is None else {"approximate": approximate}))
    if op == "SiLU":
        gate = g.add("Sigmoid", [x], shape)
        return g.add("Mul", [x, gate] if rng.random() < 0.5 else [gate, x], shape)
    if op == "GroupNormalization":
        channels = shape[1] if rank >= 3 else 0
        groups = [d for d in (1, 2, 3, channels) if channels and channels % d == 0 and channels // d * int(np.prod(shape[2:])) >= 2]
        if not groups:
            return None  # one element per group: onnxruntime's x - mean is a rounding error over sqrt(eps)
        scale = g.weight([channels], "gam", deterministic=rng.random() < 0.5)
        return g.add(op, [x, scale, g.weight([channels], "bet")], shape, num_groups=int(_pick(rng, groups)),
                     epsilon=float(_pick(rng, [1e-5, 1e-3])))
    if op == "LRN":
        if rank != 4:
            return None
        return g.add(op, [x], shape, size=int(_pick(rng, [1, 3, 5])), alpha=float(_pick(rng, [1e-4, 1e-2])),
                     beta=float(_pick(rng, [0.75, 0.5])), bias=float(_pick(rng, [1.0, 2.0])))
    return NotImplemented


def _broadcastable(small, big):
    try:
        return list(np.broadcast_shapes(tuple(small), tuple(big))) == list(big)
    except ValueError:
        return False


def _new_input(g: Graph, rank=None):
    rng = g.rng
    rank = rank or int(_pick(rng, [2, 3, 4, 4, 4, 5]))
    shape = [int(_pick(rng, [1, 1, 2]))] + [int(_pick(rng, [1, 2, 3, 4, 5, 7])) for _ in range(rank - 1)]
    name = g.names("x")
    g.inputs.append((name, shape))
    g.pool[name] = shape
    scale = float(_pick(rng, [1.0, 1.0, 3.0, 0.1]))
    offset = float(_pick(rng, [0.0, 0.0, 0.0, 50.0, -2.0]))
    g.feeds[name] = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    return name


def generate_graph(g: Graph, size: int):
    """Add one random connected graph of about ``size`` nodes to ``g`` (shared names)."""
    rng = g.rng
    first = _new_input(g)
    inputs = [first]
    if rng.random() < 0.25:
        inputs.append(_new_input(g, len(g.pool[first])))
    local = set(inputs)
    tries = 0
    while len([n for n in g.nodes if n.output[0] in local]) < size and tries < 200:
        tries += 1
        x = _pick(rng, sorted(local))
        # mostly start with an operator that reads a weight, so that what follows sees Gaussians
        op = _pick(rng, SOURCES) if len(local) == len(inputs) and rng.random() < 0.8 else _pick(rng, g.operators())
        pool_before = dict(g.pool)
        g.pool = {k: v for k, v in g.pool.items() if k in local}
        try:
            out = _try_op(g, op, x)
        finally:
            g.pool = {**pool_before, **g.pool}
        if out is None:
            continue
        if int(np.prod(g.pool[out])) > 4096 or 0 in g.pool[out]:
            g.nodes.pop()
            del g.pool[out]
            continue
        local.add(out)
    produced = [n.output[0] for n in g.nodes if n.output[0] in local]
    last = produced[-1] if produced else _try_op(g, "Relu", first)
    outputs = [last]
    if rng.random() < 0.3 and len(produced) > 2:
        extra = _pick(rng, produced[:-1])
        outputs.append(extra)
    if rng.random() < 0.1:
        out = g.names("p")
        fn = _pick(rng, ["Softmax", "LogSoftmax"])
        g.nodes.append(helper.make_node(fn, [last], [out], axis=int(rng.integers(-1, 1)) if len(g.pool[last]) > 1 else -1))
        g.pool[out] = g.pool[last]
        outputs[0] = out
    g.outputs.extend(outputs)


def generate_pooled_graph(g: Graph):
    """Add one random convolution stack that ends in a global average pool and a dense layer
    (the shape ``--covariance`` acts on: a channel's loadings reach a mean over positions):
    1 or 2 convolutions (3x3 padded, 1x1, depthwise, strided, with and without bias) each
    followed by Relu, Clip (ReLU6) or nothing, sometimes a batch norm with fixed statistics or
    a residual Add, then GlobalAveragePool, Flatten and Gemm (x W^T + b)."""
    rng = g.rng
    x = _new_input(g, 4)
    shape = g.pool[x]
    for depth in range(int(rng.integers(1, 3))):
        channels = shape[1]
        kind = _pick(rng, ["3x3", "3x3", "1x1", "depthwise", "strided"])
        kernel = 1 if kind == "1x1" else 3
        groups = channels if kind == "depthwise" else 1
        out_ch = channels if kind == "depthwise" else int(_pick(rng, [2, 3, 4]))
        stride = 2 if kind == "strided" and min(shape[2:]) > 2 else 1
        pad = kernel // 2
        out = [(s + 2 * pad - kernel) // stride + 1 for s in shape[2:]]
        attrs = {"pads": [pad] * 4, "strides": [stride] * 2}
        if groups > 1:
            attrs["group"] = groups
        ins = [x, g.weight([out_ch, channels // groups, kernel, kernel], "w", scale=0.5)]
        if rng.random() < 0.5:
            ins.append(g.weight([out_ch], "b"))
        y = g.add("Conv", ins, [shape[0], out_ch] + out, **attrs)
        if rng.random() < 0.3:
            c = out_ch
            params = [g.const(rng.uniform(0.5, 2.0, c).astype(np.float32), "gamma"), g.const(rng.standard_normal(c).astype(np.float32) * 0.1, "beta"),
                      g.const(rng.standard_normal(c).astype(np.float32) * 0.1, "rmean"), g.const(rng.uniform(0.5, 2.0, c).astype(np.float32), "rvar")]
            y = g.add("BatchNormalization", [y] + params, g.pool[y])
        if depth and g.pool[y] == shape and rng.random() < 0.5:
            y = g.add("Add", [y, x], shape)
        activation = _pick(rng, ["Relu", "Relu", "Clip", None])
        if activation == "Relu":
            y = g.add("Relu", [y], g.pool[y])
        elif activation == "Clip":
            y = g.add("Clip", [y, g.const(np.array(0.0, np.float32), "lo"), g.const(np.array(6.0, np.float32), "hi")], g.pool[y])
        x, shape = y, g.pool[y]
    pooled = g.add("GlobalAveragePool", [x], shape[:2] + [1, 1])
    flat = g.add("Flatten", [pooled], [shape[0], shape[1]])
    classes = int(_pick(rng, [2, 3, 5]))
    dense = g.add("Gemm", [flat, g.weight([classes, shape[1]], "fc"), g.weight([classes], "fcb")], [shape[0], classes], transB=1)
    g.outputs.append(dense)


@dataclass
class Case:
    """One model with its posterior, inputs and the subgraphs it holds (their output names)."""

    model: onnx.ModelProto
    stds: dict  # initializer -> std (float32)
    feeds: dict  # input -> array
    groups: list  # per subgraph: {"inputs": [...], "outputs": [...]}
    seed: int = -1


def _model_of(g: Graph, groups) -> onnx.ModelProto:
    graph = helper.make_graph(
        g.nodes, "fuzz",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in g.inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, g.pool[n]) for n in g.outputs],
        [numpy_helper.from_array(v, n) for n, v in g.inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)])
    model.ir_version = 8
    return model


def _posterior(g: Graph):
    """Per graph one style: wide, concentrated (std = r |w|, r down to 1e-4), none; some weights
    keep no std at all (deterministic branches meeting stochastic ones)."""
    rng = g.rng
    stds = {}
    style = _pick(rng, ["wide", "wide", "concentrated", "mixed"])
    for name, value in g.inits.items():
        if name in g.constants or value.dtype != np.float32 or rng.random() < 0.2:
            continue
        if style == "wide" or (style == "mixed" and rng.random() < 0.5):
            std = 0.3 * (np.abs(value) + 0.05) * rng.uniform(0.2, 1.0, value.shape)
        else:
            std = float(_pick(rng, [1e-3, 3e-4, 1e-4])) * (np.abs(value) + 1e-3)
        stds[name] = std.astype(np.float32)
    return stds


def _references(model, stds, feeds):
    """(onnxruntime outputs, reference PFP outputs) of a model, or an exception if the
    generator made something the references do not take."""
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its own refusals are the generator's business, not output
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected_ort = dict(zip([o.name for o in model.graph.output], session.run(None, feeds)))
    expected_pfp = reference.pfp_onnx(model, {k: v.astype(np.float64) ** 2 for k, v in stds.items()}, feeds)
    return expected_ort, expected_pfp


def generate(seed: int, graphs: int = 1, size: int | None = None, pooled: float = 0.0, opset: int = OPSET) -> Case:
    """``graphs`` random graphs in one model (seeded); each one valid (checker, onnxruntime and
    the reference take it: graphs they refuse, such as onnxruntime's dilated SAME convolutions,
    are drawn again). ``pooled``: the fraction of them drawn as convolution stacks ending in a
    global pool and a dense layer (`generate_pooled_graph`, for ``--covariance``). ``opset``:
    `OPSET`, or `NEWER_OPSET` with its operators."""
    rng = np.random.default_rng(seed)
    names = Names(rng)
    merged = Graph(rng, names, opset=opset)
    groups, stds = [], {}
    for _ in range(graphs):
        for _attempt in range(50):
            g = Graph(rng, names, opset=opset)
            if pooled and rng.random() < pooled:
                generate_pooled_graph(g)
            else:
                generate_graph(g, size or int(rng.integers(1, 9)))
            sub_stds = _posterior(g)
            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _references(_model_of(g, None), sub_stds, g.feeds)
                break
            except Exception:
                continue
        merged.nodes += g.nodes
        merged.inputs += g.inputs
        merged.inits.update(g.inits)
        merged.constants |= g.constants
        merged.pool.update(g.pool)
        merged.outputs += g.outputs
        merged.feeds.update(g.feeds)
        stds.update(sub_stds)
        groups.append({"inputs": [n for n, _ in g.inputs], "outputs": list(g.outputs)})
    return Case(_model_of(merged, groups), stds, dict(merged.feeds), groups, seed)


# ----------------------------------------------------------------------------------------------
# checking


def with_deterministic_copy(case: Case) -> tuple[onnx.ModelProto, dict]:
    """The model plus a renamed copy of every node, input and initializer (suffix ``_d``) that
    gets no posterior: its outputs must equal onnxruntime's. Returns (model, feeds)."""
    model = copy.deepcopy(case.model)
    graph = model.graph

    def renamed(name):
        return f"{name}_d" if name else name

    taken = {t for n in graph.node for t in list(n.input) + list(n.output)} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    assert not any(renamed(t) in taken for t in taken if t), "a name ends in _d"
    for node in list(graph.node):
        clone = copy.deepcopy(node)
        clone.input[:] = [renamed(t) for t in clone.input]
        clone.output[:] = [renamed(t) for t in clone.output]
        if clone.name:
            clone.name = renamed(clone.name)
        graph.node.append(clone)
    for field in (graph.input, graph.initializer, graph.output):
        for value in list(field):
            clone = copy.deepcopy(value)
            clone.name = renamed(value.name)
            field.append(clone)
    feeds = dict(case.feeds)
    feeds.update({renamed(k): v for k, v in case.feeds.items()})
    return model, feeds


@dataclass
class Outcome:
    ok: bool
    kind: str = ""  # invalid | refused | internal | build | wrong | crash
    message: str = ""

    def __str__(self):
        return "ok" if self.ok else f"{self.kind}: {self.message}"


def _meanfield(mean, var, axis, log):
    """The mean-field probabilities (Lu, Ie & Sha 2020) of Gaussian logits over ``axis``, float64 in
    log space: log q_k = -log sum_j exp(-(M_k - M_j) r_k), r_k = 1 / sqrt(1 + pi V_k / 8),
    log p = log q - log sum_k q_k (their logs for a log-softmax output)."""
    m, v = np.moveaxis(np.asarray(mean, np.float64), axis, -1), np.moveaxis(np.asarray(var, np.float64), axis, -1)
    r = 1.0 / np.sqrt(1.0 + np.pi * v / 8.0)
    exponent = -(m[..., :, None] - m[..., None, :]) * r[..., :, None]
    top = exponent.max(axis=-1)
    log_q = -(top + np.log(np.exp(exponent - top[..., None]).sum(axis=-1)))
    peak = log_q.max(axis=-1, keepdims=True)
    log_p = log_q - peak - np.log(np.exp(log_q - peak).sum(axis=-1, keepdims=True))
    return np.moveaxis(log_p if log else np.exp(log_p), -1, axis)


def _close(actual, expected, rtol, floor=1e-12):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} != {list(expected.shape)}"
    if not np.all(np.isfinite(actual)):
        return "not finite"
    # relative to the element and to the tensor's scale; 1e-12 absorbs the float64 reference's
    # own rounding where the exact value is 0 (a clip to [0, 0])
    atol = rtol * (np.max(np.abs(expected)) if expected.size else 0.0) + floor
    bad = np.abs(actual - expected) > atol + rtol * np.abs(expected)
    if bad.any():
        index = np.unravel_index(np.argmax(np.abs(actual - expected) - atol - rtol * np.abs(expected)), actual.shape)
        return f"{int(bad.sum())}/{bad.size} differ, at {list(map(int, index))}: {actual[index]:.6g} vs {expected[index]:.6g}"
    return None


#: Operators on which pfpc's ``--covariance`` and tests/reference_covariance.py treat a channel's
#: loading alike (both carry it: Relu, Clip, Add, views before a dense layer; both pool it:
#: GlobalAveragePool; or both drop it: the rest). A stochastic output whose ancestors are all
#: here is compared with that reference when pfpc's plan gives some convolution a loading; one
#: with another ancestor (MaxPool: the reference carries, pfpc drops; Mul, Sum, Neg, ReduceMean,
#: AveragePool, Pad, Reshape and the other views: pfpc carries or pools, the reference does not)
#: is not compared ("uncovered").
COVARIANCE_COVERED = {"Conv", "Relu", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Identity", "Dropout",
                      "BatchNormalization", "Sigmoid", "Tanh", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Elu",
                      "Selu", "Softplus", "Abs", "Sqrt", "Sub", "Div", "MatMul", "Softmax", "LogSoftmax", "GlobalMaxPool",
                      "ReduceMax", "LayerNormalization", "InstanceNormalization", "LRN", "Max", "Min"}


def _covariance_references(case: Case, record) -> tuple[dict, list]:
    """The float64 reference of pfpc's covariance form (tests/reference_covariance.py in its
    "channel_box" mode with the loadings spread by the output variance, as pfpc compiles it),
    the loadings made by the convolutions ``record`` (the compiled plan) names, for the outputs
    it covers (`COVARIANCE_COVERED`). Returns ({output: (mean, var)}, [uncovered outputs])."""
    import reference_covariance

    from pfpc.frontends.relax_import import tame_names

    planned = record.get("convolutions", []) if record else []
    nodes = list(case.model.graph.node)
    # the plan names a convolution after its weight as pfpc renamed it (``x0`` -> ``t_x0``: a name
    # like its own kernels' operands), in the model it compiled (`with_deterministic_copy`)
    tamed = list(tame_names(with_deterministic_copy(case)[0])[0].graph.node)
    loaded = {n.output[0] for n, t in zip(nodes, tamed) if n.op_type == "Conv" and any(name.startswith(t.input[1] + "_") for name in planned)}
    names = [o.name for o in case.model.graph.output]
    if not loaded:
        return {}, []
    producer = {out: n for n in nodes for out in n.output}

    def ancestors(name, seen):
        node = producer.get(name)
        if node is None or id(node) in seen:
            return
        seen[id(node)] = node
        for source in node.input:
            ancestors(source, seen)

    covered, uncovered, reached_by_loadings = [], [], set()
    for name in names:
        seen = {}
        ancestors(name, seen)
        ops = {n.op_type for n in seen.values()}
        if any(n.output[0] in loaded for n in seen.values()):
            reached_by_loadings.add(name)
        (covered if name not in reached_by_loadings or ops <= COVARIANCE_COVERED else uncovered).append(name)
    compared = [name for name in covered if name in reached_by_loadings]
    if not compared:
        return {}, uncovered
    sub = subgraph(case, compared)  # only their ancestors: the reference need not take the rest
    variances = {k: v.astype(np.float64) ** 2 for k, v in sub.stds.items()}
    try:
        moments = reference_covariance.pfp_covariance(sub.model, variances, sub.feeds, "channel_box",
                                                      spread_variance=True, loaded=loaded)
    except (NotImplementedError, KeyError, ValueError):  # a Gemm form the reference does not take
        return {}, uncovered + compared
    return {name: moments[name] for name in compared}, uncovered


def _onnxruntime_is_the_farther(case: Case, name, det, expected_ort) -> bool:
    """Whether pfpc's zero-variance output ``det`` equals the float64 evaluation of the graph
    (tests/reference.py without a posterior) to 1e-4 while onnxruntime's is farther from it:
    onnxruntime's float32 InstanceNormalization of inputs far from 0 loses digits that pfpc
    keeps (the long run's seed 100029, inputs near 50: onnxruntime 2.4e-4 off, pfpc 3e-7)."""
    exact = reference.pfp_onnx(case.model, {}, case.feeds)[name][0]
    det = det.reshape(exact.shape) if det.size == exact.size else det
    if _close(det, exact, 1e-4, floor=1e-9):
        return False
    scale = max(float(np.max(np.abs(exact))), 1e-9)
    return float(np.max(np.abs(np.asarray(expected_ort, np.float64).reshape(exact.shape) - exact))) > float(np.max(np.abs(det - exact))) + 1e-7 * scale


def check(case: Case, workdir: str, sanitize: bool = False, covariance: str = "none") -> Outcome:
    """Compile the case (with its deterministic copy), build with -Werror, run, compare.
    ``covariance``: pfpc's option; with "auto", outputs that a convolution's loadings reach are
    compared with the covariance form's reference (`_covariance_references`), the others with
    the diagonal one."""
    import pfpc.compiler as compiler
    from pfpc.errors import PfpcError

    try:
        expected_ort, expected_pfp = _references(case.model, case.stds, case.feeds)
    except Exception as err:  # the generator made something the references do not take
        return Outcome(False, "invalid", f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300])
    model, feeds = with_deterministic_copy(case)
    out_dir = os.path.join(workdir, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        compiler.compile(model, {f"{k}.std": v for k, v in case.stds.items()}, out_dir=out_dir, covariance=covariance)
    except PfpcError as err:
        return Outcome(False, "refused", str(err).splitlines()[0][:400])
    except Exception as err:
        last = traceback.extract_tb(err.__traceback__)[-1]
        return Outcome(False, "internal", f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''} "
                       f"({os.path.basename(last.filename)}:{last.lineno})"[:400])
    meta = compiler.read_metadata(out_dir)
    uncovered = []
    if covariance != "none" and meta.get("covariance"):
        try:
            with_loadings, uncovered = _covariance_references(case, meta["covariance"])
        except Exception as err:
            return Outcome(False, "invalid", f"covariance reference: {type(err).__name__}: {str(err)[:200]}")
        expected_pfp = {**expected_pfp, **with_loadings}
    try:
        if sanitize:
            results, logits = _run_sanitized(out_dir, meta, [feeds[name] for name, _ in meta["inputs"]])
        else:
            ran = compiler.run(out_dir, [feeds[name] for name, _ in meta["inputs"]])
            results, logits = ran.outputs, ran.logits
    except PfpcError as err:
        text = str(err)
        kind = "build" if "error:" in text or "make" in text else "crash"
        return Outcome(False, kind, text.strip().replace("\n", " ")[:400])
    softmax = {entry["output"]: entry for entry in meta.get("output_softmax", [])}
    names = [o.name for o in case.model.graph.output]
    for position, name in enumerate(names):
        # a softmax output: its value, and its logits' moments beside it (the reference's moments)
        (mean, var), (det_mean, det_var) = (logits.get(index, results[index]) for index in (position, len(names) + position))
        ref_mean, ref_var = expected_pfp[name]
        for what, actual, expected, rtol in ((("mean", mean, ref_mean, MEAN_RTOL), ("variance", var, ref_var, VAR_RTOL))
                                             if name not in uncovered else ()):
            problem = _close(actual.reshape(expected.shape) if actual.size == expected.size else actual, expected, rtol)
            if problem:
                return Outcome(False, "wrong", f"output {name} {what} vs reference: {problem}")
        entry = softmax.get(position) if name not in uncovered else None
        if entry is not None:  # the value: the mean-field probabilities of the reference's logit moments
            value = results[position][0]
            expected = _meanfield(ref_mean, ref_var, entry["axis"], entry["function"] == "log_softmax")
            problem = _close(value.reshape(expected.shape) if value.size == expected.size else value, expected, MEAN_RTOL)
            if problem:
                return Outcome(False, "wrong", f"output {name} value ({entry['function']}) vs reference: {problem}")
        expected = expected_ort[name]
        if len(names) + position in softmax:  # with zero variance the value is the model's own output
            det_mean = results[len(names) + position][0]
        det = det_mean.reshape(expected.shape) if det_mean.size == expected.size else det_mean
        # floor 1e-9: onnxruntime's float32 Sigmoid of -26 is 0 where pfpc's is 4e-12 (the long run's seed 100051)
        problem = _close(det, expected, 1e-4, floor=1e-9)
        if problem and not _onnxruntime_is_the_farther(case, name, det, expected):
            return Outcome(False, "wrong", f"output {name}_d (no posterior) vs onnxruntime: {problem}")
        if np.any(det_var != 0):
            return Outcome(False, "wrong", f"output {name}_d (no posterior) has a nonzero variance")
    return Outcome(True)


def _run_sanitized(out_dir, meta, inputs):
    """Build the runner with -fsanitize=address,undefined (and -Werror) and run it once."""
    import subprocess

    import pfpc.runner as pfpc_runner
    from pfpc.errors import PfpcError

    runner = meta["name"] + "_main"
    flags = "TARGET_FLAGS=-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
    pfpc_runner._make(out_dir, runner, "CC=gcc", "AR=ar", flags)
    with tempfile.TemporaryDirectory() as tmp:
        np.concatenate([np.ascontiguousarray(x, np.float32).reshape(-1) for x in inputs]).tofile(os.path.join(tmp, "in.f32"))
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:exitcode=99", "UBSAN_OPTIONS": "print_stacktrace=1:exitcode=98"}
        result = subprocess.run([os.path.join(out_dir, runner), "in.f32", "out.f32"], cwd=tmp, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise PfpcError(f"sanitizer: exit {result.returncode}: {result.stderr.strip()[-400:]}")
        raw = np.fromfile(os.path.join(tmp, "out.f32"), np.float32)
    outputs, logits, _ = pfpc_runner.split_output_buffers(meta, raw)
    return outputs, logits


# ----------------------------------------------------------------------------------------------
# splitting and shrinking


def subgraph(case: Case, keep_outputs) -> Case:
    """The part of ``case`` that computes ``keep_outputs``: unused nodes, inputs, initializers dropped."""
    model = copy.deepcopy(case.model)
    graph = model.graph
    needed = set(keep_outputs)
    nodes = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(t for t in node.input if t)
    nodes.reverse()
    del graph.node[:]
    graph.node.extend(nodes)
    outputs = [o for o in graph.output if o.name in keep_outputs]
    known = {o.name for o in outputs}
    if any(n not in known for n in keep_outputs):
        inferred = onnx.shape_inference.infer_shapes(case.model)
        infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
        outputs += [copy.deepcopy(infos[n]) if n in infos else helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                    for n in keep_outputs if n not in known]
    del graph.output[:]
    graph.output.extend(outputs)
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return Case(model, {k: v for k, v in case.stds.items() if k in needed}, {k: v for k, v in case.feeds.items() if k in needed},
                [{"inputs": [i.name for i in inputs], "outputs": list(keep_outputs)}], case.seed)


def _bypassed(case: Case, index: int) -> Case | None:
    """``case`` with node ``index`` removed, its consumers reading its first input instead
    (only when that has the same shape)."""
    model = copy.deepcopy(case.model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
              list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    node = model.graph.node[index]
    if not node.input or not node.input[0] or shapes.get(node.input[0]) != shapes.get(node.output[0]) or node.input[0] not in shapes:
        return None
    if node.input[0] in {i.name for i in model.graph.initializer}:
        return None
    old, new = node.output[0], node.input[0]
    del model.graph.node[index]
    for other in model.graph.node:
        other.input[:] = [new if t == old else t for t in other.input]
    outputs = [o.name for o in model.graph.output]
    if new in outputs and old in outputs:
        return None
    for o in model.graph.output:
        if o.name == old:
            o.name = new
    trial = Case(model, case.stds, case.feeds, case.groups, case.seed)
    return subgraph(trial, [o.name for o in model.graph.output])


def _cut(case: Case, index: int) -> Case | None:
    """``case`` with node ``index`` replaced by a new graph input (random values) of its output's
    shape: everything upstream of it goes."""
    model = copy.deepcopy(case.model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    node = model.graph.node[index]
    out = node.output[0]
    info = infos.get(out)
    if info is None or info.type.tensor_type.elem_type != TensorProto.FLOAT or out in {o.name for o in model.graph.output}:
        return None
    shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
    if any(d <= 0 for d in shape):
        return None
    del model.graph.node[index]
    model.graph.input.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
    feeds = dict(case.feeds)
    feeds[out] = np.random.default_rng(index).standard_normal(shape).astype(np.float32)
    trial = Case(model, case.stds, feeds, case.groups, case.seed)
    return subgraph(trial, [o.name for o in model.graph.output])


def shrink(case: Case, fails, log=print) -> Case:
    """Delta debugging: keep any one-step reduction (fewer outputs, an earlier tensor as the
    output, a node bypassed, a weight made deterministic) under which ``fails(case)`` holds."""
    changed = True
    while changed:
        changed = False
        outputs = [o.name for o in case.model.graph.output]
        candidates = []
        if len(outputs) > 1:
            candidates += [subgraph(case, [o]) for o in outputs]
        produced = [n.output[0] for n in case.model.graph.node]
        candidates += [subgraph(case, [t]) for t in produced if t not in outputs]
        candidates += [c for c in (_bypassed(case, i) for i in range(len(case.model.graph.node))) if c is not None]
        candidates += [c for c in (_cut(case, i) for i in range(len(case.model.graph.node))) if c is not None]
        candidates += [Case(case.model, {k: v for k, v in case.stds.items() if k != name}, case.feeds, case.groups, case.seed)
                       for name in case.stds]
        for candidate in sorted(candidates, key=lambda c: (len(c.model.graph.node), len(c.stds))):
            if (len(candidate.model.graph.node), len(candidate.stds)) >= (len(case.model.graph.node), len(case.stds)):
                continue
            if fails(candidate):
                case, changed = candidate, True
                log(f"    shrunk to {len(case.model.graph.node)} node(s), {len(case.stds)} stochastic weight(s)")
                break
    return case


def save_case(case: Case, directory: str, name: str, outcome: Outcome):
    """A regression case: model.onnx, post.npz (``<w>.std``), inputs.npz, and what failed."""
    path = os.path.join(directory, name)
    os.makedirs(path, exist_ok=True)
    onnx.save(case.model, os.path.join(path, "model.onnx"))
    np.savez(os.path.join(path, "post.npz"), **{f"{k}.std": v for k, v in case.stds.items()})
    np.savez(os.path.join(path, "inputs.npz"), **case.feeds)
    with open(os.path.join(path, "failure.txt"), "w") as handle:
        handle.write(f"seed {case.seed}\n{outcome}\n")
    return path


def load_case(path: str) -> Case:
    model = onnx.load(os.path.join(path, "model.onnx"))
    post = dict(np.load(os.path.join(path, "post.npz")))
    feeds = dict(np.load(os.path.join(path, "inputs.npz")))
    return Case(model, {k[: -len(".std")]: v for k, v in post.items()}, feeds,
                [{"inputs": list(feeds), "outputs": [o.name for o in model.graph.output]}])


# ----------------------------------------------------------------------------------------------
# batches


def run_batch(seed: int, graphs: int, workdir: str, sanitize=False, log=print, save=None, shrink_failures=True, covariance="none",
              pooled=0.0, opset=OPSET):
    """Generate ``graphs`` graphs from ``seed`` in one model, check it; on failure check each
    graph alone and shrink the failing ones. Returns [(seed, graph index, Outcome, shrunk Case)]."""
    case = generate(seed, graphs, pooled=pooled, opset=opset)
    outcome = check(case, workdir, sanitize, covariance)
    if outcome.ok:
        return []
    failures = []
    for index, group in enumerate(case.groups):
        single = subgraph(case, group["outputs"])
        single_outcome = check(single, workdir, sanitize, covariance) if len(case.groups) > 1 else outcome
        if single_outcome.ok:
            continue
        if single_outcome.kind != "invalid" and shrink_failures:
            kind = single_outcome.kind

            def fails(candidate, kind=kind):
                result = check(candidate, workdir, sanitize, covariance)
                return not result.ok and result.kind == kind

            single = shrink(single, fails, log)
            single_outcome = check(single, workdir, sanitize, covariance)
        failures.append((seed, index, single_outcome, single))
        if save and single_outcome.kind != "invalid":
            save_case(single, save, f"seed{seed}_g{index}", single_outcome)
    if not failures:  # only the combination fails
        failures.append((seed, -1, outcome, case))
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=150, help="number of random graphs")
    parser.add_argument("--seed", type=int, default=0, help="first seed (batch k uses seed + k)")
    parser.add_argument("--per-model", type=int, default=10, help="graphs compiled together in one model")
    parser.add_argument("--sanitize-every", type=int, default=0, help="every k-th batch built with ASan+UBSan (0: none)")
    parser.add_argument("--save-failures", help="directory for shrunk failing cases")
    parser.add_argument("--no-shrink", action="store_true")
    parser.add_argument("--covariance", choices=("none", "auto"), default="none",
                        help="pfpc's --covariance; auto: outputs a convolution's loadings reach are checked against "
                             "tests/reference_covariance.py where it covers them")
    parser.add_argument("--opset", type=int, choices=(OPSET, NEWER_OPSET), default=OPSET,
                        help=f"opset of the models; {NEWER_OPSET} adds {', '.join(NEWER_OPSET_OPS)}")
    parser.add_argument("--pooled", type=float, default=0.0,
                        help="fraction of the graphs drawn as convolution stacks -> global pool -> dense (for --covariance auto)")
    args = parser.parse_args(argv)
    batches = -(-args.count // args.per_model)
    started = time.time()
    failures, invalid = [], 0
    with tempfile.TemporaryDirectory(prefix="pfpc-fuzz-") as workdir:
        for batch in range(batches):
            seed = args.seed + batch
            graphs = min(args.per_model, args.count - batch * args.per_model)
            sanitize = bool(args.sanitize_every) and batch % args.sanitize_every == 0
            found = run_batch(seed, graphs, workdir, sanitize, save=args.save_failures, shrink_failures=not args.no_shrink,
                              covariance=args.covariance, pooled=args.pooled, opset=args.opset)
            for seed_, index, outcome, case in found:
                if outcome.kind == "invalid":
                    invalid += 1
                    continue
                failures.append((seed_, index, outcome, case))
                print(f"seed {seed_} graph {index}: {outcome} ({len(case.model.graph.node)} nodes)", flush=True)
            print(f"batch {batch + 1}/{batches} (seed {seed}{', sanitized' if sanitize else ''}): "
                  f"{len(failures)} failure(s) so far, {time.time() - started:.0f} s", flush=True)
    kinds = {}
    for _, _, outcome, _ in failures:
        kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
    print(f"{args.count} graphs, {len(failures)} failing ({kinds}), {invalid} invalid generated, {time.time() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
