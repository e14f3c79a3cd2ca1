"""Layer substitution: every deterministic operator becomes its Gaussian counterpart.

    y = R.matmul(x, w)          ->   y = R.call_tir(matmul, (x_mean, x_var, w, w_var))
                                     y_mean = y[0]; y_var = y[1]

Every weight becomes a Gaussian (mean parameter + variance parameter ``<w>.var``; all zeros
when the posterior has no entry for it: `EliminateZeroVariance` removes those); a constant
tensor operand becomes a deterministic weight. Multiplying or dividing by a deterministic
scalar becomes ``scale``. Model inputs are deterministic. The output is canonical, every
Gaussian in the variance representation and one kernel per operator; later passes specialise
it. ``main`` returns (out0_mean, out0_var, out1_mean, ...) and records the representations in
``pfp.outputs``.

A softmax or log-softmax whose result is a model output (directly or through views) is
dropped: that output becomes the moments of the logits, and ``pfp.output_softmax`` (JSON: a
list of {"output": index, "function": ..., "axis": ...}) records it for whoever turns logit
moments into probabilities.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from ..errors import PfpcError
from ..frontends.relax_import import MARKER_PARAMS, _prim_float
from ..ir import GaussianValue, constant_value, kernel_label, operand_names, scalar_value, MainRewriter, call_op_name, func_attrs, to_tensor_map
from ..ops.kernel import KernelSpec, arity

VIEW_OPS = {"relax.reshape", "relax.flatten", "relax.expand_dims", "relax.squeeze"}
OUTPUT_FUNCTIONS = {"relax.nn.softmax": "softmax", "relax.nn.log_softmax": "log_softmax"}
#: Operand positions that must be deterministic (a Gaussian there has no closed-form rule).
DETERMINISTIC_OPERANDS = {"divide": 1, "prelu": 1}


def _ints(values):
    return [int(v) for v in values]


def _pool_attrs(attrs):
    return {
        "kernel": _ints(attrs.pool_size),
        "strides": _ints(attrs.strides),
        "pads": _ints(attrs.padding),
        "dilations": _ints(attrs.dilation),
        "ceil_mode": bool(attrs.ceil_mode),
    }


#: Relax operators of the stages in `pfpc.ops.elementwise` without attributes.
ELEMENTWISE_STAGES = {"relax.exp": "exp", "relax.abs": "abs", "relax.maximum": "maximum", "relax.minimum": "minimum",
                      "relax.nn.silu": "silu", "relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh"}
#: Most positions a ReduceMax reduces over (one Clark step, a loop nest, each).
REDUCE_MAX_POSITIONS = 1024


def _marker_stage(call):
    """(stage, attrs) of a ``call_pure_packed("pfpc.<stage>", x, *params)`` from the importer."""
    stage = str(call.args[0].global_symbol).removeprefix("pfpc.")
    values = [_prim_float(arg) for arg in call.args[2:]]
    return stage, dict(zip(MARKER_PARAMS[stage], values))


def _reduce_axes(call):
    rank = len(call.args[0].ty.shape)
    axes = _ints(call.attrs.axis) if call.attrs.axis is not None else list(range(rank))
    return {"axes": [a % rank for a in axes], "keepdims": bool(call.attrs.keepdims)}


def _spec_of(call, op):
    """(stage, attrs) for a Relax operator, or None when it has no Gaussian counterpart."""
    attrs = call.attrs
    if op in ELEMENTWISE_STAGES:
        return ELEMENTWISE_STAGES[op], {}
    if op == "relax.call_pure_packed" and str(call.args[0].global_symbol).removeprefix("pfpc.") in MARKER_PARAMS:
        return _marker_stage(call)
    if op == "relax.nn.softplus":
        if float(attrs.beta) != 1.0:
            return None
        return "softplus", {}
    if op == "relax.sum":
        return "reduce_sum", _reduce_axes(call)
    if op == "relax.max":
        reduce = _reduce_axes(call)
        positions = int(np.prod([int(call.args[0].ty.shape[a]) for a in reduce["axes"]]))
        if positions > REDUCE_MAX_POSITIONS:
            raise PfpcError(f"{op}: a maximum over {positions} positions (at most {REDUCE_MAX_POSITIONS}: one Clark step each)")
        return "reduce_max", reduce
    if op in ("relax.matmul", "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.sigmoid", "relax.tanh"):
        return op.split(".")[-1], {}
    if op == "relax.nn.relu":
        return "relu", {}
    if op == "relax.clip":
        lower, upper = float(call.args[1].value), float(call.args[2].value)
        return "clip", {"lower": lower if np.isfinite(lower) else None, "upper": upper if np.isfinite(upper) else None}
    if op == "relax.nn.leakyrelu":
        return "leaky_relu", {"alpha": float(attrs.alpha)}
    if op == "relax.nn.prelu":
        return "prelu", {"axis": int(attrs.axis) % len(call.args[0].ty.shape)}
    if op == "relax.concat":
        rank = len(call.args[0].fields[0].ty.shape)
        return "concat", {"axis": int(attrs.axis) % rank, "count": len(call.args[0].fields)}
    if op == "relax.nn.pad":
        if str(attrs.pad_mode) != "constant":
            return None
        return "pad", {"width": _ints(attrs.pad_width), "value": float(attrs.pad_value)}
    if op == "relax.mean":
        rank = len(call.args[0].ty.shape)
        axes = _ints(attrs.axis) if attrs.axis is not None else list(range(rank))
        return "reduce_mean", {"axes": [a % rank for a in axes], "keepdims": bool(attrs.keepdims)}
    if op == "relax.nn.avg_pool2d":
        if attrs.layout != "NCHW":
            return None
        return "avgpool2d", {**_pool_attrs(attrs), "count_include_pad": bool(attrs.count_include_pad)}
    if op == "relax.permute_dims":
        rank = len(call.args[0].ty.shape)
        axes = _ints(attrs.axes) if attrs.axes is not None else list(reversed(range(rank)))
        return "transpose", {"axes": axes}
    if op == "relax.nn.conv2d":
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
            return None
        return "conv2d", {"strides": _ints(attrs.strides), "pads": _ints(attrs.padding), "dilations": _ints(attrs.dilation), "groups": int(attrs.groups)}
    if op == "relax.nn.max_pool2d":
        if attrs.layout != "NCHW":
            return None
        return "maxpool2d", _pool_attrs(attrs)
    return None


class _Substitute(MainRewriter):
    def __init__(self, mod, weight_vars, means, variances):
        super().__init__(mod)
        self.gauss = {}
        self.unsupported = []
        self.means, self.variances = means, variances
        self.constants = {}  # new deterministic weights made from constant operands
        self.softmax = {}  # var -> (function, axis) of a dropped softmax, followed through views
        self.weight_names = {param.name for param in weight_vars}
        for param, var_param in weight_vars.items():
            self.gauss[param] = GaussianValue(param, var_param, "var")

    def value(self, expr):
        if isinstance(expr, relax.Var) and expr in self.gauss:
            return self.gauss[expr]
        value = constant_value(expr)
        if value is not None:
            name = f"constant{len(self.constants)}"
            param = relax.Var(name, relax.TensorType(list(value.shape), "float32"))
            self.constants[name] = value
            self.new_params.append(param)
            self.weight_names.add(name)
            return GaussianValue(param)
        return GaussianValue(self.remap(expr))

    def deterministic_scalar(self, expr):
        """The value of a scalar constant or of a one-element weight without variance, else None."""
        value = scalar_value(expr)
        if value is None and isinstance(expr, relax.Var) and expr.name in self.means and self.means[expr.name].size == 1:
            if not np.any(self.variances.get(expr.name, 0.0)):
                value = float(self.means[expr.name].reshape(-1)[0])
        return value

    def is_stochastic(self, expr):
        """False only for constants and weights without variance (activations count as Gaussian)."""
        if constant_value(expr) is not None:
            return False
        if isinstance(expr, relax.Var) and expr.name in self.means:
            return bool(np.any(self.variances.get(expr.name, 0.0)))
        return True

    def scale_stage(self, value, op):
        """(operand, factor) when ``value`` multiplies or divides by a deterministic scalar."""
        left, right = value.args
        if op in ("relax.multiply", "relax.divide") and self.deterministic_scalar(right) is not None:
            factor = self.deterministic_scalar(right)
            return left, factor if op == "relax.multiply" else 1.0 / factor
        if op == "relax.multiply" and self.deterministic_scalar(left) is not None:
            return right, self.deterministic_scalar(left)
        return None

    def visit_binding(self, binding):
        value = binding.value
        op = call_op_name(value)
        if isinstance(value, relax.Tuple):  # the outputs of a multi-output model
            self.gauss[binding.var] = value
            return
        if isinstance(value, relax.Var):
            self.gauss[binding.var] = self.value(value)
            if value in self.softmax:
                self.softmax[binding.var] = self.softmax[value]
            return
        if op == "relax.nn.dropout":  # inference: identity (the mask output is never used)
            self.gauss[binding.var] = (self.value(value.args[0]), None)
            return
        if isinstance(value, relax.TupleGetItem) and isinstance(self.gauss.get(value.tuple_value), tuple):
            self.gauss[binding.var] = self.gauss[value.tuple_value][value.index]
            return
        if op in OUTPUT_FUNCTIONS:
            rank = len(value.args[0].ty.shape)
            self.gauss[binding.var] = self.value(value.args[0])
            self.softmax[binding.var] = (OUTPUT_FUNCTIONS[op], int(value.attrs.axis) % rank)
            return
        if op in VIEW_OPS:
            if value.args[0] in self.softmax:
                self.softmax[binding.var] = self.softmax[value.args[0]]
            source = self.value(value.args[0])
            shape = relax.ShapeExpr([int(d) for d in binding.var.ty.shape])
            mean = self.bb.emit(relax.op.reshape(source.mean, shape), f"{binding.var.name}_mean")
            moment = None
            if source.repr != "none":
                moment = self.bb.emit(relax.op.reshape(source.moment, shape), f"{binding.var.name}_{source.repr}")
            self.gauss[binding.var] = GaussianValue(mean, moment, source.repr)
            return
        scaled = self.scale_stage(value, op) if op in ("relax.multiply", "relax.divide") else None
        if op == "relax.negative":
            scaled = (value.args[0], -1.0)
        if scaled is not None:
            args, stage = [scaled[0]], ("scale", {"factor": scaled[1]})
        elif op == "relax.call_pure_packed" and _spec_of(value, op) is not None:
            stage, args = _spec_of(value, op), [value.args[1]]
        else:
            stage = _spec_of(value, op) if op else None
            if stage is None:
                self.unsupported.append(op or type(value).__name__)
                return
            args = list(value.args[0].fields) if stage[0] == "concat" else list(value.args[: arity(*stage)])
        for arg in args:
            if arg in self.softmax:
                raise PfpcError(f"a softmax result feeds {op}: softmax is supported only at the model's output")
        position = DETERMINISTIC_OPERANDS.get(stage[0])
        if position is not None and self.is_stochastic(args[position]):
            raise PfpcError(f"{op}: operand {position} is a Gaussian tensor; pfpc supports it only deterministic (a constant or a weight without variance)")
        operands = [self.value(arg) for arg in args]
        reprs = tuple(o.repr for o in operands)
        output = "none" if all(r == "none" for r in reprs) else "var"
        spec = KernelSpec((stage,), reprs, output)
        label = kernel_label([stage[0]], operands, self.weight_names)
        result = self.kernels.emit(spec, operands, label, operand_names(operands, self.weight_names))
        self.gauss[binding.var] = result

    def output(self, body):
        if isinstance(self.gauss.get(body), relax.Tuple):
            body = self.gauss[body]
        outputs = body.fields if isinstance(body, relax.Tuple) else [body]
        fields, reprs = [], []
        self.output_softmax = [
            {"output": index, "function": self.softmax[out][0], "axis": self.softmax[out][1]}
            for index, out in enumerate(outputs)
            if out in self.softmax
        ]
        for out in outputs:
            value = self.gauss[out]
            if value.repr == "second_moment":
                raise PfpcError("internal: canonical outputs are variances")
            fields += value.args()
            reprs.append(value.repr)
        self.output_reprs = reprs
        return relax.Tuple(fields)


@tvm.transform.module_pass(opt_level=0, name="pfpc.SubstituteLayers")
class SubstituteLayers:
    def transform_module(self, mod, ctx):
        func = mod["main"]
        num_input = int(func.attrs["num_input"])
        means = {str(k): v.numpy() for k, v in func.attrs["pfp.params"].items()}
        variances = {str(k): v.numpy() for k, v in func.attrs["pfp.weight_var"].items()}
        weight_vars, var_params, all_params = {}, [], dict(means)
        for param in func.params[num_input:]:
            var_name = f"{param.name}.var"
            var_param = relax.Var(var_name, relax.TensorType([int(d) for d in param.ty.shape], "float32"))
            weight_vars[param] = var_param
            var_params.append(var_param)
            all_params[var_name] = variances.get(param.name, np.zeros_like(means[param.name]))
        rewriter = _Substitute(mod, weight_vars, means, variances)
        params = list(func.params) + var_params
        attrs = func_attrs(func, pfp__params=to_tensor_map(all_params), pfp__weight_var=None)
        new_mod = rewriter.run(params, attrs)
        if rewriter.unsupported:
            names = sorted(set(rewriter.unsupported))
            raise PfpcError(f"no Gaussian counterpart for Relax operator(s): {', '.join(names)}")
        main = new_mod["main"]
        if rewriter.constants:  # constant operands became deterministic weights
            main = main.with_attr("pfp.params", to_tensor_map({**all_params, **rewriter.constants}))
        main = main.with_attr("pfp.outputs", rewriter.output_reprs)
        new_mod["main"] = main.with_attr("pfp.output_softmax", json.dumps(rewriter.output_softmax))
        return new_mod
