"""Layer substitution: every deterministic operator becomes its Gaussian counterpart.

    y = R.matmul(x, w)          ->   y = R.call_tir(matmul, (x_mean, x_var, w, w_var))
                                     y_mean = y[0]; y_var = y[1]

Every weight becomes a Gaussian (mean parameter + variance parameter ``<w>.var``; all zeros
when the posterior has no entry for it: `EliminateZeroVariance` removes those). Model inputs
are deterministic. The output is canonical, every Gaussian in the variance representation
and one kernel per operator; later passes specialise it. ``main`` returns
(out0_mean, out0_var, out1_mean, ...) and records the representations in ``pfp.outputs``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..errors import PfpcError
from ..ir import GaussianValue, constant_value, kernel_label, operand_names, scalar_value, MainRewriter, call_op_name, func_attrs, to_tensor_map
from ..ops.kernel import KernelSpec

VIEW_OPS = {"relax.reshape", "relax.flatten", "relax.expand_dims", "relax.squeeze"}


def _ints(values):
    return [int(v) for v in values]


def _spec_of(call, op):
    """(stage, attrs) for a Relax operator, or None when it has no Gaussian counterpart."""
    attrs = call.attrs
    if op == "relax.matmul":
        return "matmul", {}
    if op == "relax.add":
        return "add", {}
    if op == "relax.nn.relu":
        return "relu", {}
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
        return "maxpool2d", {
            "kernel": _ints(attrs.pool_size),
            "strides": _ints(attrs.strides),
            "pads": _ints(attrs.padding),
            "dilations": _ints(attrs.dilation),
            "ceil_mode": bool(attrs.ceil_mode),
        }
    return None


class _Substitute(MainRewriter):
    def __init__(self, mod, weight_vars):
        super().__init__(mod)
        self.gauss = {}
        self.unsupported = []
        self.weight_names = {param.name for param in weight_vars}
        for param, var_param in weight_vars.items():
            self.gauss[param] = GaussianValue(param, var_param, "var")

    def value(self, expr):
        if isinstance(expr, relax.Var) and expr in self.gauss:
            return self.gauss[expr]
        if constant_value(expr) is not None:
            return GaussianValue(expr)
        return GaussianValue(self.remap(expr))

    def visit_binding(self, binding):
        value = binding.value
        op = call_op_name(value)
        if isinstance(value, relax.Var):
            self.gauss[binding.var] = self.value(value)
            return
        if op == "relax.nn.dropout":  # inference: identity (the mask output is never used)
            self.gauss[binding.var] = (self.value(value.args[0]), None)
            return
        if isinstance(value, relax.TupleGetItem) and isinstance(self.gauss.get(value.tuple_value), tuple):
            self.gauss[binding.var] = self.gauss[value.tuple_value][value.index]
            return
        if op in VIEW_OPS:
            source = self.value(value.args[0])
            shape = relax.ShapeExpr([int(d) for d in binding.var.ty.shape])
            mean = self.bb.emit(relax.op.reshape(source.mean, shape), f"{binding.var.name}_mean")
            moment = None
            if source.repr != "none":
                moment = self.bb.emit(relax.op.reshape(source.moment, shape), f"{binding.var.name}_{source.repr}")
            self.gauss[binding.var] = GaussianValue(mean, moment, source.repr)
            return
        if op in ("relax.multiply", "relax.divide") and scalar_value(value.args[1]) is not None:
            factor = scalar_value(value.args[1])
            factor = factor if op == "relax.multiply" else 1.0 / factor
            operands, stage = [self.value(value.args[0])], ("scale", {"factor": factor})
        else:
            stage = _spec_of(value, op) if op else None
            if stage is None:
                self.unsupported.append(op or type(value).__name__)
                return
            operands = [self.value(arg) for arg in value.args[: 2 if stage[0] in ("matmul", "conv2d", "add") else 1]]
        for operand in operands:
            if constant_value(operand.mean) is not None:
                raise PfpcError(f"a constant tensor operand of {op} is not supported yet")
        reprs = tuple(o.repr for o in operands)
        output = "none" if all(r == "none" for r in reprs) else "var"
        spec = KernelSpec((stage,), reprs, output)
        label = kernel_label([stage[0]], operands, self.weight_names)
        result = self.kernels.emit(spec, operands, label, operand_names(operands, self.weight_names))
        self.gauss[binding.var] = result

    def output(self, body):
        outputs = body.fields if isinstance(body, relax.Tuple) else [body]
        fields, reprs = [], []
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
        rewriter = _Substitute(mod, weight_vars)
        params = list(func.params) + var_params
        attrs = func_attrs(func, pfp__params=to_tensor_map(all_params), pfp__weight_var=None)
        new_mod = rewriter.run(params, attrs)
        if rewriter.unsupported:
            names = sorted(set(rewriter.unsupported))
            raise PfpcError(f"no Gaussian counterpart for Relax operator(s): {', '.join(names)}")
        new_mod["main"] = new_mod["main"].with_attr("pfp.outputs", rewriter.output_reprs)
        return new_mod
