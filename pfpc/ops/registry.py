"""The operator registry: every fact about an operator, in one entry.

An entry names the ONNX operator(s) it accepts and their attribute rules, the Relax operator(s)
TVM's importer lowers them to and how their attributes become the stage's, the Gaussian formula
(a function of `pfpc.ops.gaussian` or `pfpc.ops.elementwise`, where the formula is written
down), the moment it computes for free, its Gaussian operands, its fusion class, its cost and the
float64 NumPy function of ``tests/reference.py`` that checks it. The tables the frontend, the passes, the kernel builder and
the footprint report use are derived here; no other module lists operator names.

Adding an operator: one `Operator` entry here, its formula in `gaussian.py` or `elementwise.py`
(moments in `moments.py`), its reference in ``tests/reference.py`` and its tests (docs/operators.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm

from ..errors import PfpcError
from . import channel_covariance as C
from . import elementwise as E
from . import shared_scale as S
from .constants import scalar_value
from . import gaussian as G
from .gaussian import Moment


class Kind(enum.Enum):
    GAUSSIAN = "gaussian"  # a stage of a Gaussian kernel
    VIEW = "view"  # moves no values (a reshape of the same buffer, an identity)
    FOLDED = "folded"  # rewritten into other stages at compile time (batch norm)
    OUTPUT = "output"  # accepted only as a model's last node: the output becomes its input's moments
    SHAPE = "shape"  # computes shapes and constants only, folded by the importer
    UNROLLED = "unrolled"  # a recurrent cell unrolled into other ONNX operators before the import


class Fusion(enum.Enum):
    """How a stage combines with others in one kernel (`passes.fuse_operators`)."""

    LINEAR = "linear"  # reduces over a fan-in; heads a fused chain; consumes second moments cheaply
    POOL = "pool"  # heads a chain too (the ReLU that `PoolBeforeRelu` moved after a max-pool)
    ELEMENTWISE = "elementwise"  # may follow a chain head in its kernel
    NONLINEAR = "nonlinear"  # may follow a chain head and ends the chain (computes both moments)
    NONE = "none"  # a kernel of its own


def _ints(values):
    return [int(v) for v in values]


def _rank(expr) -> int:
    return len(expr.ty.shape)


def _pool_attrs(attrs):
    return {"kernel": _ints(attrs.pool_size), "strides": _ints(attrs.strides), "pads": _ints(attrs.padding),
            "dilations": _ints(attrs.dilation), "ceil_mode": bool(attrs.ceil_mode)}


# --- Relax attributes -> stage attributes (None: no Gaussian counterpart for this form) -------------
def _no_attrs(call):
    return {}


def _clip_attrs(call):
    lower, upper = float(call.args[1].value), float(call.args[2].value)
    return {"lower": lower if np.isfinite(lower) else None, "upper": upper if np.isfinite(upper) else None}


def _concat_attrs(call):
    return {"axis": int(call.attrs.axis) % _rank(call.args[0].fields[0]), "count": len(call.args[0].fields)}


#: ONNX Pad modes and their Relax names: constant fill, or copies of border elements.
PAD_MODES = ("constant", "edge", "reflect")


def _pad_attrs(call):
    mode = str(call.attrs.pad_mode)
    if mode not in PAD_MODES:
        return None
    return {"width": _ints(call.attrs.pad_width), "value": float(call.attrs.pad_value), "mode": mode}


def _pad(inputs, attrs):
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        return G.pad(inputs[0], attrs["width"], attrs["value"])
    return E.border_pad(inputs[0], attrs["width"], mode)


def _prim_ints(values):
    """The integers of a Relax tuple of ``R.prim_value`` (strided_slice's axes, begins, ...)."""
    return [int(field.value) for field in values.fields]


def _slice_attrs(call):
    """Per axis the first source index and the step (Python slicing = ONNX Slice's clamping)."""
    shape = [int(d) for d in call.args[0].ty.shape]
    axes, begins, ends = (_prim_ints(arg) for arg in call.args[1:4])
    steps = _prim_ints(call.args[4]) if len(call.args) > 4 else [1] * len(axes)
    starts, strides, out_shape = [0] * len(shape), [1] * len(shape), list(shape)
    for axis, begin, end, step in zip(axes, begins, ends, steps):
        axis %= len(shape)
        picked = range(shape[axis])[slice(begin, end, step)]
        starts[axis], strides[axis], out_shape[axis] = picked.start, picked.step, len(picked)
    return {"starts": starts, "steps": strides, "shape": out_shape}


#: Relax's names of ONNX Resize's methods pfpc computes -> the formula's.
RESIZE_METHODS = {"nearest_neighbor": "nearest", "linear": "linear"}
RESIZE_COORDINATES = ("half_pixel", "pytorch_half_pixel", "asymmetric", "align_corners")


def _resize_attrs(call):
    attrs = call.attrs
    method = RESIZE_METHODS.get(str(attrs.method))
    if method is None or attrs.layout != "NCHW" or str(attrs.coordinate_transformation_mode) not in RESIZE_COORDINATES:
        return None
    return {"size": [int(v) for v in call.args[1].values], "method": method,
            "mode": str(attrs.coordinate_transformation_mode), "rounding": str(attrs.rounding_method)}


def _reduce_attrs(call):
    rank = _rank(call.args[0])
    axes = _ints(call.attrs.axis) if call.attrs.axis is not None else list(range(rank))
    return {"axes": [a % rank for a in axes], "keepdims": bool(call.attrs.keepdims)}


#: Most positions a ReduceMax reduces over (one Clark step, a loop nest, each).
REDUCE_MAX_POSITIONS = 1024


def _reduce_max_attrs(call):
    reduce = _reduce_attrs(call)
    positions = int(np.prod([int(call.args[0].ty.shape[a]) for a in reduce["axes"]]))
    if positions > REDUCE_MAX_POSITIONS:
        raise PfpcError(f"relax.max: a maximum over {positions} positions (at most {REDUCE_MAX_POSITIONS}: one Clark step each)")
    return reduce


def _softplus_attrs(call):
    return {} if float(call.attrs.beta) == 1.0 else None


def _avgpool_attrs(call):
    if call.attrs.layout != "NCHW":
        return None
    return {**_pool_attrs(call.attrs), "count_include_pad": bool(call.attrs.count_include_pad)}


def _maxpool_attrs(call):
    return _pool_attrs(call.attrs) if call.attrs.layout == "NCHW" else None


def _transpose_attrs(call):
    axes = _ints(call.attrs.axes) if call.attrs.axes is not None else list(reversed(range(_rank(call.args[0]))))
    return {"axes": axes}


def _conv_attrs_in(data_layout: str, kernel_layout: str):
    """The attribute reader of a Relax convolution in the given layouts (None for another layout)."""
    def read(call):
        attrs = call.attrs
        if attrs.data_layout != data_layout or attrs.kernel_layout != kernel_layout:
            return None
        return {"strides": _ints(attrs.strides), "pads": _ints(attrs.padding), "dilations": _ints(attrs.dilation), "groups": int(attrs.groups)}
    return read


_conv_attrs = _conv_attrs_in("NCHW", "OIHW")


# --- ONNX attribute rules: (node, attributes, input rank or None) -> why it is refused, or None ----
def _spatial_1d_to_3d(node, attrs, rank):
    return None if rank in (None, 3, 4, 5) else f"{rank - 2}-D: only 1-D, 2-D and 3-D are supported"


def _padding_mode(node, attrs, rank):
    mode = attrs.get("mode", b"constant").decode()
    return None if mode in PAD_MODES else f"mode {mode}: only {', '.join(PAD_MODES)} padding is supported"


def _resize_rule(node, attrs, rank):
    mode = attrs.get("mode", b"nearest").decode()
    if mode not in RESIZE_METHODS.values():
        return f"mode {mode}: only {' and '.join(RESIZE_METHODS.values())} are supported"
    coordinates = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
    if node.op_type == "Resize" and coordinates not in RESIZE_COORDINATES:
        return f"coordinate_transformation_mode {coordinates}: only {', '.join(RESIZE_COORDINATES)} are supported"
    if attrs.get("antialias", 0):
        return "antialias is not supported"
    return None if rank in (None, 4) else f"a {rank}-D input: only 4-D (NCHW, resizing H and W) is supported"


def _maxpool_rule(node, attrs, rank):
    reason = _spatial_1d_to_3d(node, attrs, rank)
    if reason is None and len(node.output) > 1 and node.output[1]:
        return "the Indices output is not supported"
    return reason


def _pool3d_attrs(call):
    if call.attrs.layout != "NCDHW":
        return None
    return {**_pool_attrs(call.attrs), "count_include_pad": bool(call.attrs.count_include_pad)}


_conv3d_attrs = _conv_attrs_in("NCDHW", "OIDHW")


def _conv_transpose_rule(node, attrs, rank):
    if rank not in (None, 4):
        return f"{rank - 2}-D: only 2-D is supported"
    if "output_shape" in attrs:
        return "output_shape is not supported (give pads and output_padding)"
    return None


def _conv_transpose_attrs(call):
    attrs = call.attrs
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "IOHW":
        return None
    return {"strides": _ints(attrs.strides), "pads": _ints(attrs.padding), "dilations": _ints(attrs.dilation),
            "output_padding": _ints(attrs.output_padding), "groups": int(attrs.groups)}


def _power_attrs(call):
    """The constant exponent (Sqrt: 1/2); a Gaussian or negative exponent has no formula."""
    if call.op.name == "relax.sqrt":
        return {"exponent": 0.5}
    value = scalar_value(call.args[1])
    if value is None:
        raise PfpcError("relax.power: the exponent must be a constant scalar (a Gaussian exponent has no formula here)")
    if value < 0:
        raise PfpcError(f"Pow: exponent {value}: a Gaussian input is 0 with non-zero density, where x^p (p < 0) has no finite moments; "
                        "only non-negative exponents are supported")
    return {"exponent": value}


def _layer_norm_attrs(call):
    attrs = call.attrs
    if not (attrs.center and attrs.scale):
        return None
    return {"axes": [int(a) % _rank(call.args[0]) for a in attrs.axes], "epsilon": float(attrs.epsilon)}


def _group_norm_attrs(call):
    attrs, rank = call.attrs, _rank(call.args[0])
    if not (attrs.center and attrs.scale) or int(attrs.channel_axis) % rank != 1 or sorted(int(a) % rank for a in attrs.axes) != list(range(2, rank)):
        return None
    return {"groups": int(attrs.num_groups), "epsilon": float(attrs.epsilon)}


def _normalization_rule(node, attrs, rank):
    if any(node.output[1:]):
        return "the Mean and InvStdDev outputs are not supported"
    if node.op_type != "LayerNormalization" and rank is not None and rank < 3:
        return f"a {rank}-D input: the normalised positions are the axes after the channels"
    return None


def _recurrent_rule(node, attrs, rank):
    """LSTM/GRU as `frontends.unroll_recurrent` unrolls them: default activations, no
    peepholes, no coupled input/forget gate (sequence_lens and the shapes it checks itself)."""
    defaults = ["Sigmoid", "Tanh", "Tanh"] if node.op_type == "LSTM" else ["Sigmoid", "Tanh"]
    activations = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    if activations and [a.lower() for a in activations] != [a.lower() for a in defaults] * (len(activations) // len(defaults)):
        return f"activations {activations}: only the default ({', '.join(defaults)}) are supported"
    if attrs.get("input_forget", 0):
        return "input_forget=1 (coupled input and forget gates) is not supported"
    if node.op_type == "LSTM" and len(node.input) > 7 and node.input[7]:
        return "peephole weights P are not supported"
    if rank not in (None, 3):
        return f"a {rank}-D input: X is [sequence, batch, features]"
    return None


# --- cost: Gaussian evaluations per output element ---------------------------------------------------
def _per_element(label):
    return lambda attrs, out_size: {label: out_size}


def _clark_steps(attrs, out_size):
    """A k-element window is k - 1 Clark maxima."""
    return {"max": out_size * (int(np.prod(attrs["kernel"])) - 1)}


#: The activations computed by Gauss-Hermite quadrature: op -> attrs -> (f, f(M + h) - f(M) from
#: the step h, or None), shared by the operator (`elementwise.smooth`) and its loading
#: (`channel_covariance.smooth_loading`)
SMOOTH_FUNCTIONS = {
    "silu": lambda attrs: (E.silu, E.silu_difference),
    "gelu": lambda attrs: (E.gelu, E.gelu_difference),
    "gelu_tanh": lambda attrs: (E.gelu_tanh, E.gelu_tanh_difference),
    "softplus": lambda attrs: (E.softplus, E.softplus_difference),
    "elu": lambda attrs: (E.elu(attrs["alpha"]), E.elu_difference(attrs["alpha"])),
    "selu": lambda attrs: (E.elu(attrs["alpha"], attrs["gamma"]), E.elu_difference(attrs["alpha"], attrs["gamma"])),
}


def _smooth(name):
    def build(inputs, attrs):
        function, difference = SMOOTH_FUNCTIONS[name](attrs)
        return E.smooth(inputs[0], function, name, difference)

    return build


def _smooth_loading(name):
    return lambda inputs, attrs: C.smooth_loading(*inputs, SMOOTH_FUNCTIONS[name](attrs)[0])


@dataclass(frozen=True)
class Operator:
    """One operator. ``name`` is the stage name in a `kernel.KernelSpec` (for a Gaussian operator)."""

    name: str
    kind: Kind = Kind.GAUSSIAN
    onnx: tuple = ()  # ONNX op types (domain ai.onnx) whose nodes become this operator
    onnx_rule: Callable | None = None  # (node, attrs, input rank) -> reason it is refused, or None
    constant_inputs: tuple = ()  # ONNX input positions that are compile-time constants, never weights
    legacy_broadcast: tuple = ()  # ONNX op types whose opset < 7 form broadcasts by ``axis`` (`onnx_model.upgrade_opset`)
    relax: tuple = ()  # Relax operators (TVM's lowering of the ONNX ones) this operator replaces
    relax_attrs: Callable = _no_attrs  # Relax call -> stage attributes, or None when unsupported
    lowered_1d: tuple = ()  # 1-D Relax operators `Lower1dTo2d` rewrites into this 2-D one
    build: Callable | None = None  # (Gaussian inputs, attrs) -> Gaussian: the formula in `gaussian.py`
    arity: int = 1  # Gaussian operands (concat: its ``count`` attribute)
    native: Moment | None = Moment.VAR  # the moment it computes for free; None: its first input's
    fusion: Fusion = Fusion.NONE
    deterministic_operand: int | None = None  # operand that must be deterministic (no closed form otherwise)
    gaussian_ops: Callable | None = None  # (attrs, output elements) -> {label: Gaussian evaluations}
    libm_calls: dict = field(default_factory=dict)  # libm calls per Gaussian evaluation
    marker_params: tuple = ()  # scalar parameters of the importer's marker ``pfpc.<name>`` (`MARKER_OP`)
    reference: str | None = None  # the float64 NumPy function in tests/reference.py
    function: str | None = None  # Kind.OUTPUT: the function the dropped node computes
    # how a per-channel loading (`passes.carry_channel_covariance`) goes through: "source" (makes
    # one), "carry" (passes it on, by a rule of the pass), "pool" (a mean over positions, where it
    # adds coherently), "max" (a max over windows, which reads it as the correlation of the
    # window's elements and drops it); None: the loading is dropped
    loading: str | None = None
    # the operators whose ONNX nodes this one computes in another form (`passes.carry_channel_covariance`
    # emits it in their place): the C kernel is named after those nodes as those operators' would be
    variant_of: tuple = ()
    # Cortex-M4 instructions per output element (QEMU profiles), where the covariance budget
    # (`passes.carry_channel_covariance`) needs them; None: a generic element-wise cost
    m4_per_element: float | None = None
    # output element i reads element i of each operand of the output's shape and nothing else of
    # it, though the stage is not fused into others (fusion NONE): a kernel of such stages may write
    # its output over such an operand (`kernel.in_place_operands`); ELEMENTWISE and NONLINEAR are
    # element-wise by definition
    elementwise: bool = False


def _conv2d(inputs, attrs):
    """conv2d's stage: (x, w, [draw groups, draw stds], [the weights' second moments: ``weight_second``, last])."""
    second = inputs[-1] if attrs.get("weight_second") else None
    extra = inputs[2:-1] if second is not None else inputs[2:]
    return G.conv2d(*inputs[:2], attrs["strides"], attrs["pads"], attrs["dilations"], attrs["groups"], *extra,
                    count=attrs.get("draw_groups", 0), weight_second=second)


OPERATORS = (
    # linear: the reduction's multiply-adds per MAC are `moments.FMA_PER_MAC` (by operand moments)
    Operator("matmul", onnx=("MatMul", "Gemm"), relax=("relax.matmul",), arity=2, fusion=Fusion.LINEAR, reference="matmul",
             build=lambda inputs, attrs: G.matmul(*inputs, count=attrs.get("draw_groups", 0))),
    Operator("conv2d", loading="source", onnx=("Conv",), onnx_rule=_spatial_1d_to_3d, relax=("relax.nn.conv2d",), relax_attrs=_conv_attrs,
             lowered_1d=("relax.nn.conv1d",), arity=2, fusion=Fusion.LINEAR, reference="conv2d",
             build=_conv2d),
    Operator("add", loading="carry", legacy_broadcast=("Add",), onnx=("Add", "Sum"), relax=("relax.add",), arity=2, fusion=Fusion.ELEMENTWISE, reference="add",
             build=lambda inputs, attrs: G.add(*inputs)),
    Operator("subtract", legacy_broadcast=("Sub",), onnx=("Sub",), relax=("relax.subtract",), arity=2, fusion=Fusion.ELEMENTWISE, reference="subtract",
             build=lambda inputs, attrs: G.subtract(*inputs)),
    Operator("multiply", loading="carry", legacy_broadcast=("Mul",), onnx=("Mul",), relax=("relax.multiply",), arity=2, fusion=Fusion.ELEMENTWISE, reference="multiply",
             build=lambda inputs, attrs: G.multiply(*inputs)),
    Operator("divide", legacy_broadcast=("Div",), onnx=("Div",), relax=("relax.divide",), arity=2, fusion=Fusion.ELEMENTWISE, deterministic_operand=1,
             reference="divide", build=lambda inputs, attrs: G.divide(*inputs)),
    # Mul/Div by a deterministic scalar (`SubstituteLayers` chooses it over multiply/divide)
    Operator("scale", loading="carry", onnx=("Neg",), relax=("relax.negative",), relax_attrs=lambda call: {"factor": -1.0}, native=None,
             fusion=Fusion.ELEMENTWISE, reference="multiply",
             build=lambda inputs, attrs: G.scale(inputs[0], attrs["factor"])),
    Operator("relu", loading="carry", m4_per_element=98.0, onnx=("Relu",), relax=("relax.nn.relu",), fusion=Fusion.NONLINEAR,
             gaussian_ops=_per_element("relu"), libm_calls={"sqrt": 1}, reference="relu",
             build=lambda inputs, attrs: G.relu(inputs[0])),
    Operator("clip", loading="carry", m4_per_element=600.0, onnx=("Clip",), constant_inputs=(1, 2), relax=("relax.clip",), relax_attrs=_clip_attrs,
             fusion=Fusion.NONLINEAR, gaussian_ops=_per_element("clip"), libm_calls={"sqrt": 1},
             reference="clip", build=lambda inputs, attrs: G.clip(inputs[0], attrs["lower"], attrs["upper"])),
    Operator("leaky_relu", loading="carry", m4_per_element=187.0, onnx=("LeakyRelu",), relax=("relax.nn.leakyrelu",), relax_attrs=lambda call: {"alpha": float(call.attrs.alpha)},
             fusion=Fusion.NONLINEAR, gaussian_ops=_per_element("leaky_relu"), libm_calls={"sqrt": 1},
             reference="leaky_relu", build=lambda inputs, attrs: G.leaky_relu(inputs[0], attrs["alpha"])),
    Operator("prelu", loading="carry", m4_per_element=187.0, onnx=("PRelu",), relax=("relax.nn.prelu",), relax_attrs=lambda call: {"axis": int(call.attrs.axis) % _rank(call.args[0])},
             arity=2, fusion=Fusion.NONLINEAR, deterministic_operand=1,
             gaussian_ops=_per_element("prelu"), libm_calls={"sqrt": 1}, reference="leaky_relu",
             build=lambda inputs, attrs: G.prelu(*inputs, attrs["axis"])),
    Operator("sigmoid", loading="carry", m4_per_element=89.0, onnx=("Sigmoid",), relax=("relax.sigmoid",), fusion=Fusion.NONLINEAR, gaussian_ops=_per_element("sigmoid"),
             libm_calls={"sqrt": 2, "exp": 1}, reference="sigmoid", build=lambda inputs, attrs: G.sigmoid(inputs[0])),
    Operator("tanh", loading="carry", m4_per_element=120.0, onnx=("Tanh",), relax=("relax.tanh",), fusion=Fusion.NONLINEAR, gaussian_ops=_per_element("tanh"),
             libm_calls={"sqrt": 2, "tanh": 1, "exp": 1}, reference="tanh", build=lambda inputs, attrs: G.tanh(inputs[0])),
    Operator("transpose", onnx=("Transpose",), relax=("relax.permute_dims",), relax_attrs=_transpose_attrs, native=None,
             build=lambda inputs, attrs: G.transpose(inputs[0], list(attrs["axes"]))),
    Operator("pad", loading="carry", onnx=("Pad",), onnx_rule=_padding_mode, constant_inputs=(1, 2, 3), relax=("relax.nn.pad",),
             relax_attrs=_pad_attrs, native=None, reference="pad", build=_pad),
    Operator("concat", onnx=("Concat",), relax=("relax.concat",), relax_attrs=_concat_attrs, reference="concat",
             build=lambda inputs, attrs: G.concat(inputs, attrs["axis"])),
    Operator("maxpool2d", loading="max", onnx=("MaxPool",), onnx_rule=_maxpool_rule, relax=("relax.nn.max_pool2d",), relax_attrs=_maxpool_attrs,
             lowered_1d=("relax.nn.max_pool1d",), fusion=Fusion.POOL, gaussian_ops=_clark_steps,
             libm_calls={"sqrt": 1}, reference="maxpool2d",
             build=lambda inputs, attrs: G.maxpool2d(inputs[0], attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"],
                                                     attrs.get("ceil_mode", False))),
    Operator("maxpool2d_correlated", variant_of=("maxpool2d",), arity=2, fusion=Fusion.POOL, gaussian_ops=_clark_steps, libm_calls={"sqrt": 1},
             m4_per_element=80.0, reference="maxpool2d_correlated",  # extra per output of a 2x2 window (QEMU: the seed LeNet-5's 75 / 86)
             build=lambda inputs, attrs: G.maxpool2d(inputs[0], attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"],
                                                     attrs.get("ceil_mode", False), loading=inputs[1])),
    # the loading a max-pool passes on to a mean over positions after it (Clark's steps again)
    Operator("maxpool2d_loading", variant_of=("maxpool2d",), arity=2, native=Moment.NONE, gaussian_ops=_clark_steps, libm_calls={"sqrt": 1},
             m4_per_element=160.0, reference="maxpool2d_loading",
             build=lambda inputs, attrs: G.maxpool2d(inputs[0], attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"],
                                                     attrs.get("ceil_mode", False), loading=inputs[1], loading_out=True)),
    Operator("avgpool2d", loading="pool", onnx=("AveragePool",), onnx_rule=_spatial_1d_to_3d, relax=("relax.nn.avg_pool2d",), relax_attrs=_avgpool_attrs,
             lowered_1d=("relax.nn.avg_pool1d",), reference="avgpool2d",
             build=lambda inputs, attrs: G.avgpool2d(inputs[0], attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"],
                                                     attrs["ceil_mode"], attrs["count_include_pad"])),
    Operator("reduce_mean", loading="pool", onnx=("GlobalAveragePool", "ReduceMean"), relax=("relax.mean",), relax_attrs=_reduce_attrs, reference="reduce_mean",
             build=lambda inputs, attrs: G.reduce_mean(inputs[0], attrs["axes"], attrs["keepdims"])),
    # the per-channel shared-noise PFP (`--covariance`): formulas in `pfpc.ops.channel_covariance`,
    # emitted by `passes.carry_channel_covariance` only (no ONNX or Relax operator of their own)
    Operator("conv2d_split", variant_of=("conv2d",), arity=3, fusion=Fusion.LINEAR, reference="conv2d_split",
             build=lambda inputs, attrs: C.conv2d_split(*inputs, attrs["strides"], attrs["pads"], attrs["dilations"], attrs["groups"])),
    Operator("add_variance", arity=2, fusion=Fusion.ELEMENTWISE, reference="add_variance",
             build=lambda inputs, attrs: C.add_variance(*inputs, attrs["square"])),
    Operator("pooled_variance", variant_of=("reduce_mean", "avgpool2d"), arity=3, reference="pooled_variance",
             build=lambda inputs, attrs: C.pooled_variance(*inputs, attrs["count"])),
    Operator("independent_variance", elementwise=True, arity=2, native=Moment.NONE, reference="independent_variance",
             build=lambda inputs, attrs: C.independent_variance(*inputs)),
    Operator("raw_second_moment", elementwise=True, native=Moment.NONE, reference="raw_second_moment",
             build=lambda inputs, attrs: C.raw_second_moment(inputs[0])),
    Operator("relu_loading", elementwise=True, arity=2, m4_per_element=80.0, native=Moment.NONE, gaussian_ops=_per_element("relu"), libm_calls={"sqrt": 1},
             reference="relu_loading", build=lambda inputs, attrs: C.relu_loading(*inputs)),
    Operator("clip_loading", elementwise=True, arity=2, m4_per_element=125.0, native=Moment.NONE, gaussian_ops=_per_element("clip"), libm_calls={"sqrt": 1},
             reference="clip_loading", build=lambda inputs, attrs: C.clip_loading(*inputs, attrs["lower"], attrs["upper"])),
    # the loadings of the other activations (a E[f'(x)]); Cortex-M4 costs per element from QEMU profiles
    # (tests/test_covariance_activations.py's network, conv2's 800 outputs)
    Operator("leaky_relu_loading", elementwise=True, arity=2, m4_per_element=78.0, native=Moment.NONE, gaussian_ops=_per_element("leaky_relu"),
             libm_calls={"sqrt": 1}, reference="leaky_relu_loading", build=lambda inputs, attrs: C.leaky_relu_loading(*inputs, attrs["alpha"])),
    Operator("prelu_loading", elementwise=True, arity=3, m4_per_element=78.0, native=Moment.NONE, gaussian_ops=_per_element("prelu"),
             libm_calls={"sqrt": 1}, reference="leaky_relu_loading", build=lambda inputs, attrs: C.prelu_loading(*inputs, attrs["axis"])),
    Operator("sigmoid_loading", elementwise=True, arity=2, m4_per_element=83.0, native=Moment.NONE, gaussian_ops=_per_element("sigmoid"),
             libm_calls={"sqrt": 2, "exp": 1}, reference="sigmoid_loading", build=lambda inputs, attrs: C.sigmoid_loading(*inputs)),
    Operator("tanh_loading", elementwise=True, arity=2, m4_per_element=114.0, native=Moment.NONE, gaussian_ops=_per_element("tanh"),
             libm_calls={"sqrt": 2, "tanh": 1}, reference="tanh_loading", build=lambda inputs, attrs: C.tanh_loading(*inputs)),
    Operator("hard_sigmoid_loading", elementwise=True, arity=2, m4_per_element=102.0, native=Moment.NONE, gaussian_ops=_per_element("hard_sigmoid"),
             libm_calls={"sqrt": 1}, reference="hard_sigmoid_loading",
             build=lambda inputs, attrs: C.hard_sigmoid_loading(*inputs, attrs["alpha"], attrs["beta"])),
    Operator("hard_swish_loading", elementwise=True, arity=2, m4_per_element=115.0, native=Moment.NONE, gaussian_ops=_per_element("hard_swish"),
             libm_calls={"sqrt": 1}, reference="hard_swish_loading",
             build=lambda inputs, attrs: C.hard_swish_loading(*inputs, attrs["alpha"], attrs["beta"])),
    Operator("square_add", elementwise=True, arity=2, native=Moment.NONE, reference="square_add",
             build=lambda inputs, attrs: C.square_add(*inputs)),
    Operator("root", elementwise=True, native=Moment.NONE, libm_calls={"sqrt": 1}, reference="root",
             build=lambda inputs, attrs: C.root(inputs[0])),
    Operator("projection_gain", arity=3, native=Moment.NONE, libm_calls={"sqrt": 1}, reference="projection_gain",
             build=lambda inputs, attrs: C.projection_gain(*inputs)),
    # the shared dense-layer scale (`--shared-scale`): formulas in `pfpc.ops.shared_scale`, emitted
    # by `passes.share_dense_scale` only; Cortex-M4 costs per output element from the seed LeNet-5's QEMU profile
    Operator("feature_scale_sums", arity=4, reference="feature_scale_sums",
             build=lambda inputs, attrs: S.feature_scale_sums(*inputs, pool=(attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"],
                                                                              attrs.get("ceil_mode", False)) if "kernel" in attrs else None)),
    Operator("mixture", arity=2, reference="mixture",
             build=lambda inputs, attrs: S.mixture(*inputs, attrs["axis"], attrs.get("mean_of_first", False))),
    Operator("scale_points", native=Moment.NONE, libm_calls={"sqrt": 1}, reference="scale_points",
             build=lambda inputs, attrs: S.scale_points(inputs[0], attrs["part"])),
    Operator("scale_scenarios", arity=2, reference="scale_scenarios", build=lambda inputs, attrs: S.scale_scenarios(*inputs)),
    Operator("inverse_noise", elementwise=True, arity=2, native=Moment.NONE, reference="inverse_noise",
             build=lambda inputs, attrs: S.inverse_noise(*inputs)),
    # formulas in `pfpc.ops.elementwise` (ops real embedded networks use); each a kernel of its own
    Operator("reduce_sum", onnx=("ReduceSum",), relax=("relax.sum",), relax_attrs=_reduce_attrs, reference="reduce_sum",
             build=lambda inputs, attrs: E.reduce_sum(inputs[0], attrs["axes"], attrs["keepdims"])),
    # cost: positions - 1 Clark maxima per output element (the positions are not in the attrs)
    Operator("reduce_max", onnx=("ReduceMax", "GlobalMaxPool"), relax=("relax.max",), relax_attrs=_reduce_max_attrs,
             libm_calls={"sqrt": 1}, reference="reduce_max",
             build=lambda inputs, attrs: E.reduce_max(inputs[0], attrs["axes"], attrs["keepdims"])),
    Operator("exp", onnx=("Exp",), relax=("relax.exp",), gaussian_ops=_per_element("exp"), libm_calls={"exp": 2}, reference="exp",
             build=lambda inputs, attrs: E.exp(inputs[0])),
    Operator("abs", onnx=("Abs",), relax=("relax.abs",), gaussian_ops=_per_element("abs"),
             libm_calls={"sqrt": 1}, reference="abs_", build=lambda inputs, attrs: E.abs_(inputs[0])),
    Operator("maximum", onnx=("Max",), relax=("relax.maximum",), arity=2, gaussian_ops=_per_element("max"), libm_calls={"sqrt": 1}, reference="clark_max",
             build=lambda inputs, attrs: E.maximum(*inputs)),
    Operator("minimum", onnx=("Min",), relax=("relax.minimum",), arity=2, gaussian_ops=_per_element("min"), libm_calls={"sqrt": 1}, reference="clark_min",
             build=lambda inputs, attrs: E.minimum(*inputs)),
    Operator("hard_sigmoid", loading="carry", m4_per_element=540.0, onnx=("HardSigmoid",), marker_params=("alpha", "beta"), gaussian_ops=_per_element("hard_sigmoid"), libm_calls={"sqrt": 1}, reference="hard_sigmoid",
             build=lambda inputs, attrs: E.hard_sigmoid(inputs[0], attrs["alpha"], attrs["beta"])),
    # also x * HardSigmoid(x) (the importer's `_Mul`)
    Operator("hard_swish", loading="carry", m4_per_element=595.0, onnx=("HardSwish",), marker_params=("alpha", "beta"),
             gaussian_ops=_per_element("hard_swish"), libm_calls={"sqrt": 1}, reference="hard_swish",
             build=lambda inputs, attrs: E.hard_swish(inputs[0], attrs["alpha"], attrs["beta"])),
    # Gauss-Hermite quadrature: f at the mean and f(M + h) - f(M) from h at `elementwise.HERMITE_POINTS`
    # (16) nodes (`elementwise.silu_difference` ...); libm calls per element at most (branches pay less)
    # SiLU has no ONNX op of its own: x * Sigmoid(x) (the importer's `_Mul`)
    # Cortex-M4 instructions per element: QEMU profiles (800 outputs) before the difference forms,
    # scaled by their measured cost ratios (benchmarks/tail_forms_cost.md, sessions 10 and 11)
    Operator("silu", loading="carry", m4_per_element=1280.0, relax=("relax.nn.silu",), gaussian_ops=_per_element("silu"), libm_calls={"sqrt": 1, "exp": 18},
             reference="gauss_hermite", build=_smooth("silu")),
    Operator("gelu", loading="carry", m4_per_element=1745.0, onnx=("Gelu",), relax=("relax.nn.gelu",), gaussian_ops=_per_element("gelu"),
             libm_calls={"sqrt": 1, "erf": 18, "exp": 18}, reference="gauss_hermite", build=_smooth("gelu")),
    Operator("gelu_tanh", loading="carry", m4_per_element=1445.0, relax=("relax.nn.gelu_tanh",), gaussian_ops=_per_element("gelu"), libm_calls={"sqrt": 1, "exp": 18},
             reference="gauss_hermite", build=_smooth("gelu_tanh")),
    Operator("softplus", loading="carry", m4_per_element=2880.0, onnx=("Softplus",), relax=("relax.nn.softplus",), relax_attrs=_softplus_attrs,
             gaussian_ops=_per_element("softplus"), libm_calls={"sqrt": 1, "exp": 11, "log": 34}, reference="gauss_hermite",
             build=_smooth("softplus")),
    Operator("elu", loading="carry", m4_per_element=1205.0, onnx=("Elu",), marker_params=("alpha",), gaussian_ops=_per_element("elu"), libm_calls={"sqrt": 1, "exp": 17},
             reference="gauss_hermite", build=_smooth("elu")),
    Operator("selu", loading="carry", m4_per_element=1205.0, onnx=("Selu",), marker_params=("alpha", "gamma"), gaussian_ops=_per_element("selu"),
             libm_calls={"sqrt": 1, "exp": 17}, reference="gauss_hermite",
             build=_smooth("selu")),
    # data movement and interpolation (exact linear maps); Slice of a tensor that is no activation
    # is folded by the importer (the "shape" entry), of an activation becomes relax.strided_slice
    Operator("slice", onnx=("Split",), constant_inputs=(1,), relax=("relax.strided_slice",), relax_attrs=_slice_attrs,
             native=None, reference="slice_",
             build=lambda inputs, attrs: E.slice_(inputs[0], attrs["starts"], attrs["steps"], attrs["shape"])),
    Operator("tile", onnx=("Tile",), constant_inputs=(1,), relax=("relax.tile",),
             relax_attrs=lambda call: {"repeats": _ints(call.attrs.repeats)}, native=None, reference="tile",
             build=lambda inputs, attrs: E.tile(inputs[0], attrs["repeats"])),
    Operator("broadcast", onnx=("Expand",), constant_inputs=(1,), relax=("relax.broadcast_to",),
             relax_attrs=lambda call: {"shape": [int(v) for v in call.args[1].values]}, native=None, reference="expand",
             build=lambda inputs, attrs: E.broadcast(inputs[0], attrs["shape"])),
    Operator("resize2d", onnx=("Resize", "Upsample"), onnx_rule=_resize_rule, constant_inputs=(1, 2, 3),
             relax=("relax.image.resize2d",), relax_attrs=_resize_attrs, reference="resize",
             build=lambda inputs, attrs: E.resize2d(inputs[0], attrs["size"], attrs["method"], attrs["mode"], attrs["rounding"])),
    # a linear map like conv2d, but a kernel of its own: the linear-layer passes (batch-norm folding,
    # shared draws, the MAC count) read conv2d's OIHW layout
    Operator("conv_transpose2d", onnx=("ConvTranspose",), onnx_rule=_conv_transpose_rule, relax=("relax.nn.conv2d_transpose",),
             relax_attrs=_conv_transpose_attrs, arity=2, reference="conv_transpose2d",
             build=lambda inputs, attrs: E.conv_transpose2d(*inputs, attrs["strides"], attrs["pads"], attrs["dilations"],
                                                            attrs["output_padding"], attrs["groups"])),
    # x^p: exact for integer p (polynomial moments), else Gauss-Hermite quadrature of max(x, 0)^p (17 evaluations)
    Operator("power", onnx=("Pow", "Sqrt"), constant_inputs=(1,), relax=("relax.power", "relax.sqrt"), relax_attrs=_power_attrs,
             fusion=Fusion.NONLINEAR, gaussian_ops=_per_element("power"), libm_calls={"sqrt": 1, "pow": 17}, reference="power",
             build=lambda inputs, attrs: E.power(inputs[0], attrs["exponent"])),
    # normalisations over random inputs (a stated approximation; `elementwise.layer_norm`)
    Operator("layer_norm", onnx=("LayerNormalization",), onnx_rule=_normalization_rule, relax=("relax.nn.layer_norm",),
             relax_attrs=_layer_norm_attrs, arity=3, libm_calls={"sqrt": 1}, reference="layer_norm",
             build=lambda inputs, attrs: E.layer_norm(*inputs, attrs["axes"], attrs["epsilon"])),
    # InstanceNormalization is groups = channels (the importer's converter)
    Operator("group_norm", onnx=("GroupNormalization", "InstanceNormalization"), onnx_rule=_normalization_rule,
             relax=("relax.nn.group_norm",), relax_attrs=_group_norm_attrs, arity=3, libm_calls={"sqrt": 1}, reference="group_norm",
             build=lambda inputs, attrs: E.group_norm(*inputs, attrs["groups"], attrs["epsilon"])),
    Operator("lrn", onnx=("LRN",), marker_params=("size", "alpha", "beta", "bias"), gaussian_ops=_per_element("lrn"),
             libm_calls={"pow": 1}, reference="lrn",
             build=lambda inputs, attrs: E.lrn(inputs[0], attrs["size"], attrs["alpha"], attrs["beta"], attrs["bias"])),
    # 3-D (NCDHW) convolution and pooling: the ONNX Conv/MaxPool/AveragePool entries above accept
    # them; kernels of their own (the linear-layer and pooling passes read the 2-D layouts)
    Operator("conv3d", relax=("relax.nn.conv3d",), relax_attrs=_conv3d_attrs, arity=2, reference="conv3d",
             build=lambda inputs, attrs: E.conv3d(*inputs, attrs["strides"], attrs["pads"], attrs["dilations"], attrs["groups"])),
    Operator("maxpool3d", relax=("relax.nn.max_pool3d",), relax_attrs=_pool3d_attrs, gaussian_ops=_clark_steps, libm_calls={"sqrt": 1},
             reference="maxpool3d",
             build=lambda inputs, attrs: E.maxpool3d(inputs[0], attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"],
                                                     attrs["ceil_mode"])),
    Operator("avgpool3d", relax=("relax.nn.avg_pool3d",), relax_attrs=_pool3d_attrs, reference="avgpool3d",
             build=lambda inputs, attrs: E.avgpool3d(inputs[0], attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"],
                                                     attrs["ceil_mode"], attrs["count_include_pad"])),
    # not Gaussian stages
    Operator("view", kind=Kind.VIEW, onnx=("Flatten", "Reshape", "Identity", "Dropout", "Squeeze", "Unsqueeze"),
             relax=("relax.reshape", "relax.flatten", "relax.expand_dims", "relax.squeeze"), reference="reshape"),
    Operator("batch_norm", kind=Kind.FOLDED, onnx=("BatchNormalization",), relax=("relax.nn.batch_norm",), reference="batch_norm"),
    Operator("softmax", kind=Kind.OUTPUT, onnx=("Softmax",), relax=("relax.nn.softmax",), function="softmax"),
    Operator("log_softmax", kind=Kind.OUTPUT, onnx=("LogSoftmax",), relax=("relax.nn.log_softmax",), function="log_softmax"),
    Operator("lstm", kind=Kind.UNROLLED, onnx=("LSTM",), onnx_rule=_recurrent_rule, reference="lstm"),
    Operator("gru", kind=Kind.UNROLLED, onnx=("GRU",), onnx_rule=_recurrent_rule, reference="gru"),
    Operator("shape", kind=Kind.SHAPE, onnx=("Shape", "Gather", "Cast", "Slice", "Constant", "ConstantOfShape")),
)


#: Cortex-M4 instructions per element of the Gauss-Hermite loadings (QEMU profiles, 800 outputs)
_SMOOTH_LOADING_M4 = {"silu": 1340.0, "gelu": 1553.0, "gelu_tanh": 1553.0, "softplus": 2878.0, "elu": 1174.0, "selu": 1174.0}


def _loading_of(op: Operator) -> Operator:
    """The stage of a Gauss-Hermite activation's loading (`channel_covariance.smooth_loading`): 17
    evaluations of the plain f."""
    return Operator(f"{op.name}_loading", elementwise=True, arity=2, m4_per_element=_SMOOTH_LOADING_M4[op.name], native=Moment.NONE,
                    gaussian_ops=op.gaussian_ops, libm_calls=op.libm_calls, reference="smooth_loading",
                    build=_smooth_loading(op.name))


OPERATORS += tuple(_loading_of(op) for op in OPERATORS if op.name in SMOOTH_FUNCTIONS)

BY_NAME = {op.name: op for op in OPERATORS}
#: Gaussian stage name -> its operator.
STAGES = {op.name: op for op in OPERATORS if op.kind is Kind.GAUSSIAN}
#: ONNX op type -> its operator.
BY_ONNX = {onnx_op: op for op in OPERATORS for onnx_op in op.onnx}
#: Relax operator -> the operator that replaces it.
BY_RELAX = {relax_op: op for op in OPERATORS for relax_op in op.relax}


def onnx_ops(*kinds: Kind) -> frozenset:
    """ONNX op types of the operators of the given kinds (all kinds when none is given)."""
    return frozenset(name for op in OPERATORS if not kinds or op.kind in kinds for name in op.onnx)


def relax_ops(*kinds: Kind) -> frozenset:
    return frozenset(name for op in OPERATORS if op.kind in kinds for name in op.relax)


def stages(*fusions: Fusion) -> tuple:
    """Gaussian stage names of the given fusion classes, in registry order."""
    return tuple(op.name for op in STAGES.values() if op.fusion in fusions)


def elementwise_stages() -> frozenset:
    """Stages whose output element i reads only element i of their operands of the output's shape:
    the ELEMENTWISE and NONLINEAR ones and those marked ``elementwise``."""
    return frozenset(stages(Fusion.ELEMENTWISE, Fusion.NONLINEAR)) | {op.name for op in STAGES.values() if op.elementwise}


#: ONNX op types whose opset < 7 form has the legacy ``broadcast``/``axis`` attributes.
LEGACY_BROADCAST = frozenset(name for op in OPERATORS for name in op.legacy_broadcast)
#: ONNX input positions that are compile-time constants (clip bounds, pads), per op type.
CONSTANT_INPUTS = {name: op.constant_inputs for op in OPERATORS if op.constant_inputs for name in op.onnx}
#: Relax operators of a dropped output function -> its name.
OUTPUT_FUNCTIONS = {relax_op: op.function for op in OPERATORS if op.kind is Kind.OUTPUT for relax_op in op.relax}
#: The Relax operator of the importer's markers: ``R.call_pure_packed("pfpc.<stage>", x, *params)``
#: stands for a stage without a Relax counterpart (``marker_params`` names the scalar parameters).
#: Such a module is never run by TVM.
MARKER_OP = "relax.call_pure_packed"
MARKER_PREFIX = "pfpc."
#: Stage name -> its operator, for the stages the importer emits as markers.
MARKERS = {op.name: op for op in OPERATORS if op.marker_params}
#: Relax operators that become a `scale` stage when their second operand is a deterministic
#: scalar c -> the factor: multiply by c, divide by c.
SCALING = {**{name: lambda c: c for name in STAGES["multiply"].relax}, **{name: lambda c: 1.0 / c for name in STAGES["divide"].relax}}
#: Stages a per-channel loading goes through (`passes.carry_channel_covariance`), and those of
#: them that end it: means over positions (where the loadings add coherently) and maxima over
#: windows (`LOADING_MAXIMA`: Clark's max of correlated elements reads it).
LOADING_CARRIERS = tuple(op.name for op in STAGES.values() if op.loading is not None)
LOADING_POOLS = tuple(op.name for op in STAGES.values() if op.loading in ("pool", "max"))
LOADING_MAXIMA = tuple(op.name for op in STAGES.values() if op.loading == "max")
#: an activation's stage -> the stage of its output loading, a E[f'(x)] (Stein's lemma)
LOADING_SLOPES = {op.name: f"{op.name}_loading" for op in STAGES.values() if op.loading == "carry" and f"{op.name}_loading" in STAGES}
#: Stages that reduce over a fan-in.
LINEAR_OPS = stages(Fusion.LINEAR)
#: Relax operators of the linear stages.
LINEAR_RELAX_OPS = tuple(name for stage in LINEAR_OPS for name in STAGES[stage].relax)
#: ONNX windowed operators whose ``auto_pad`` SAME_UPPER/SAME_LOWER/VALID the frontend makes explicit pads.
AUTO_PAD_ONNX = frozenset(name for stage in ("conv2d", "maxpool2d", "avgpool2d") for name in STAGES[stage].onnx)
#: 1-D Relax operators lowered to their 2-D stage.
LOWERED_1D = tuple(name for op in OPERATORS for name in op.lowered_1d)


def unsupported_reason(node, attrs: dict, rank) -> str | None:
    """Why the registry refuses ONNX ``node`` ("" for an unknown op), or None. ``rank``: the rank
    of its first input where known."""
    # onnxruntime's com.microsoft Gelu is ONNX's (opset 20) under another name (`onnx_model.fuse_erf_gelu`)
    contrib = (node.domain, node.op_type) == ("com.microsoft", "Gelu")
    op = BY_ONNX.get(node.op_type) if node.domain in ("", "ai.onnx") or contrib else None
    if op is None:
        return ""
    return op.onnx_rule(node, attrs, rank) if op.onnx_rule is not None else None


def prim_float(value) -> float:
    """The float of a marker's ``R.prim_value`` parameter."""
    inner = value.value
    return float(getattr(inner, "value", inner))


def marker_stage(call):
    """(stage, attrs) of an importer marker ``call_pure_packed("pfpc.<stage>", x, *params)``, or None."""
    if not isinstance(call, tvm.relax.Call) or not isinstance(call.op, tvm.ir.Op) or call.op.name != MARKER_OP:
        return None
    op = MARKERS.get(str(call.args[0].global_symbol).removeprefix(MARKER_PREFIX))
    if op is None:
        return None
    return op.name, dict(zip(op.marker_params, [prim_float(arg) for arg in call.args[2:]]))


def stage_of(call, relax_op: str):
    """(stage, attrs) of a Relax call, or None when it has no Gaussian counterpart."""
    if relax_op == MARKER_OP:
        return marker_stage(call)
    op = BY_RELAX.get(relax_op)
    if op is None or op.kind is not Kind.GAUSSIAN:
        return None
    attrs = op.relax_attrs(call)
    return None if attrs is None else (op.name, attrs)


def gaussian_ops(stage: str, attrs: dict, out_size: int) -> dict:
    """{label: Gaussian nonlinearity evaluations} of one stage producing ``out_size`` elements."""
    count = STAGES[stage].gaussian_ops
    return {} if count is None else count(attrs, out_size)
