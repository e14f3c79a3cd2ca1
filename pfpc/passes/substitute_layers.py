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
dropped here: that output becomes the moments of the logits, and ``pfp.output_softmax`` (JSON: a
list of {"output": index, "function": ..., "axis": ...}) records it; `AppendPredictiveOutputs`
computes the output's own value (the probabilities, or their logs) from those moments.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import ir_state
from ..errors import PfpcError
from ..ir import GaussianValue, constant_value, kernel_label, operand_names, scalar_value, MainRewriter, call_op_name, func_attrs, with_attrs
from ..ops import registry as R
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec, arity

VIEW_OPS = R.relax_ops(R.Kind.VIEW)


class _Substitute(MainRewriter):
    def __init__(self, mod, weight_vars, means, variances):
        super().__init__(mod)
        self.gauss = {}
        self.unsupported = []
        self.means, self.variances = means, variances
        self.constants = {}  # new deterministic weights made from constant operands
        self.softmax = {}  # var -> (function, axis) of a dropped softmax, followed through views
        self.onnx_nodes = {}  # binding name -> the ONNX nodes it computes (`ir_state.onnx_nodes`)
        self.weight_names = {param.name for param in weight_vars}
        self.initializers = ir_state.onnx_names(self.func)
        self.view_nodes = {}  # var -> ONNX nodes of the views (Flatten, Reshape, ...) it went through
        for param, var_param in weight_vars.items():
            self.gauss[param] = GaussianValue(param, var_param, Moment.VAR)

    def value(self, expr):
        if isinstance(expr, relax.Var) and expr in self.gauss:
            return self.gauss[expr]
        value = constant_value(expr)
        if value is not None:
            index = len(self.constants)
            # a name no weight has: an ONNX initializer may be called constant0 too, and the
            # means are merged by name (its values were replaced by this constant's)
            while f"constant{index}" in self.weight_names or f"constant{index}" in self.means:
                index += 1
            name = f"constant{index}"
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
        if op in R.SCALING and self.deterministic_scalar(right) is not None:
            factor = self.deterministic_scalar(right)
            if op in R.STAGES["divide"].relax and factor == 0.0:
                return None  # x / 0 is +-inf or NaN, as ONNX has it: the divide kernel computes it
            return left, R.SCALING[op](factor)
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
        if op in R.OUTPUT_FUNCTIONS:
            rank = len(value.args[0].ty.shape)
            self.gauss[binding.var] = self.value(value.args[0])
            self.softmax[binding.var] = (R.OUTPUT_FUNCTIONS[op], int(value.attrs.axis) % rank)
            return
        if op in VIEW_OPS:
            self.view_nodes[binding.var] = tuple(sorted(set(self.provenance) | set(self.view_nodes.get(value.args[0], ()))))
            if value.args[0] in self.softmax:
                self.softmax[binding.var] = self.softmax[value.args[0]]
            source = self.value(value.args[0])
            shape = relax.ShapeExpr([int(d) for d in binding.var.ty.shape])
            mean = self.bb.emit(relax.op.reshape(source.mean, shape), f"{binding.var.name}_mean")
            moment = None
            if source.repr != Moment.NONE:
                moment = self.bb.emit(relax.op.reshape(source.moment, shape), f"{binding.var.name}_{source.repr}")
            self.gauss[binding.var] = GaussianValue(mean, moment, source.repr)
            return
        scaled = self.scale_stage(value, op) if op in R.SCALING else None
        if scaled is not None:
            args, stage = [scaled[0]], ("scale", {"factor": scaled[1]})
        else:
            nodes = self.onnx_nodes.get(binding.var.name, ())
            where = f" (ONNX node {', '.join(repr(n.name) + ' ' + n.op_type for n in nodes)})" if nodes else ""
            try:
                stage = R.stage_of(value, op) if op else None
            except PfpcError as err:  # a form the registry refuses (e.g. a negative power): name the node
                raise PfpcError(f"{err}{where}") from None
            if stage is None:
                self.unsupported.append(f"{op or type(value).__name__}{where}")
                return
            if stage[0] == "concat":
                args = list(value.args[0].fields)
            elif op == R.MARKER_OP:  # (symbol, x, *params)
                args = [value.args[1]]
            else:
                args = list(value.args[: arity(*stage)])
        for arg in args:
            if arg in self.softmax:
                raise PfpcError(f"a softmax result feeds {op}: softmax is supported only at the model's output")
        position = R.STAGES[stage[0]].deterministic_operand
        if position is not None and self.is_stochastic(args[position]):
            raise PfpcError(f"{op}: operand {position} is a Gaussian tensor; pfpc supports it only deterministic (a constant or a weight without variance)")
        operands = [self.value(arg) for arg in args]
        if position is not None:  # checked deterministic above: its (zero) variance is never read
            operands[position] = GaussianValue(operands[position].mean)
        reprs = tuple(o.repr for o in operands)
        output = Moment.NONE if all(r == Moment.NONE for r in reprs) else Moment.VAR
        nodes = set(self.provenance).union(*(self.view_nodes.get(arg, ()) for arg in args))
        spec = KernelSpec((stage,), reprs, output, nodes=(tuple(sorted(nodes)),) if nodes else ())
        label = kernel_label([stage[0]], operands, self.weight_names)
        result = self.kernels.emit(spec, operands, label, operand_names(operands, self.weight_names, self.initializers))
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
            # an output that is a model input or a constant (through views) has no kernel of its own
            value = self.gauss[out] if out in self.gauss else self.value(out)
            if value.repr == Moment.SECOND_MOMENT:
                raise PfpcError("internal: canonical outputs are variances")
            fields += value.args()
            reprs.append(value.repr)
        self.output_reprs = reprs
        return relax.Tuple(fields)


@tvm.transform.module_pass(opt_level=0, name="pfpc.SubstituteLayers")
class SubstituteLayers:
    after = ("pfpc.Lower1dTo2d", "pfpc.FoldWeightLayout", "pfpc.FoldBatchNorm", "pfpc.PadConvInputs", "pfpc.PoolBeforeRelu", "pfpc.DetachWeightStd")  # run before it when in the pipeline

    def transform_module(self, mod, ctx):
        func = mod["main"]
        num_input = int(func.attrs["num_input"])
        means, variances = ir_state.means(func), ir_state.variances(func)
        weight_vars, var_params, all_params = {}, [], dict(means)
        for param in func.params[num_input:]:
            var_name = f"{param.name}.var"
            var_param = relax.Var(var_name, relax.TensorType([int(d) for d in param.ty.shape], "float32"))
            weight_vars[param] = var_param
            var_params.append(var_param)
            all_params[var_name] = variances.get(param.name, np.zeros_like(means[param.name]))
        rewriter = _Substitute(mod, weight_vars, means, variances)
        rewriter.onnx_nodes = ir_state.onnx_nodes(func)  # to name the node of an operator without a rule
        params = list(func.params) + var_params
        # provenance moves into the kernels' specs
        attrs = func_attrs(func, ir_state.encode(means=all_params, variances=None, onnx_nodes=None))
        new_mod = rewriter.run(params, attrs)
        if rewriter.unsupported:
            names = sorted(set(rewriter.unsupported))
            raise PfpcError(f"no Gaussian counterpart for Relax operator(s): {', '.join(names)}")
        main = new_mod["main"]
        changes = ir_state.encode(outputs=rewriter.output_reprs, output_softmax=rewriter.output_softmax)
        if rewriter.constants:  # constant operands became deterministic weights
            changes.update(ir_state.encode(means={**all_params, **rewriter.constants}))
        new_mod["main"] = with_attrs(main, changes)
        return new_mod
