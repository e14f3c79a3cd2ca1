"""Shared driver of the passes that re-specialise Gaussian kernels after layer substitution.

It rebuilds ``main`` with every Gaussian tensor tracked as one `GaussianValue` (mean and moment
together), so a pass only decides, per kernel call, the new `KernelSpec` and operands
(`specialize`) and, per weight, its representation (`weight_operand`). Views (reshape) follow
their source; unused parameters are dropped; the result's weights are in ``pfp.params``.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from .. import ir_state
from ..ir import GaussianValue, KernelBuilder, KernelEmitter, kernel_label, operand_names, call_op_name, func_attrs, kernel_of, main_bindings, output_fields, with_attrs
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec


class KernelRewriter:
    def __init__(self, mod):
        self.mod = mod
        self.func = mod["main"]
        self.num_input = int(self.func.attrs["num_input"])
        self.weights = ir_state.means(self.func)
        self.initializer_names = ir_state.onnx_names(self.func)  # read once: decoding it per kernel was quadratic
        self.bb = KernelBuilder()
        self.kernels = KernelEmitter(self.bb)
        self.values = {}  # old var -> (new GaussianValue, "mean" | "moment")
        self.views = {}
        self.new_params = {}
        self.used = set()
        self.results = {}
        self.consumers = self._consumers()

    # --- hooks -------------------------------------------------------------------------------
    def weight_operand(self, mean_param, var_param) -> GaussianValue:
        """The Gaussian a weight with a variance enters the graph as (default: as it is)."""
        return GaussianValue(mean_param, var_param, Moment.VAR)

    def specialize(self, spec: KernelSpec, operands: list, binding) -> tuple[KernelSpec, list]:
        return spec, operands

    # --- helpers for passes ----------------------------------------------------------------
    def add_weight(self, name: str, value: np.ndarray) -> relax.Var:
        if name not in self.new_params:
            self.weights[name] = np.ascontiguousarray(value, np.float32)
            self.new_params[name] = relax.Var(name, relax.TensorType(list(value.shape), "float32"))
        return self.new_params[name]

    def is_weight(self, expr) -> bool:
        return isinstance(expr, relax.Var) and expr.name in self.weights and expr not in self.func.params[: self.num_input]

    def _consumers(self):
        """old kernel-call var -> its consumer bindings (through views), and "output" if it is one.

        Also fills ``item_of``: a TupleGetItem var -> the kernel-call var it takes apart, and
        ``source_of``: a var -> the kernel-call var it is an item or a view (reshape) of.
        """
        users = {}
        source = self.source_of = {}
        self.item_of = {}
        for binding in main_bindings(self.func):
            value = binding.value
            if isinstance(value, relax.TupleGetItem):
                self.item_of[binding.var] = value.tuple_value
                source[binding.var] = source.get(value.tuple_value, value.tuple_value)
            elif call_op_name(value) == "relax.reshape":
                source[binding.var] = source.get(value.args[0], value.args[0])
            elif kernel_of(self.mod, value) is not None:
                source.setdefault(binding.var, binding.var)
                for arg in value.args[1].fields:
                    if arg in source:
                        seen = users.setdefault(source[arg], [])
                        if not any(u.var.same_as(binding.var) for u in seen if not isinstance(u, str)):
                            seen.append(binding)
        for out in output_fields(self.func):
            if out in source and "output" not in users.setdefault(source[out], []):
                users[source[out]].append("output")
        return users

    # --- the walk ------------------------------------------------------------------------------
    def _tensor(self, var):
        """The rewritten tensor of ``var`` (one output of a kernel call, or ``var`` itself)."""
        if var not in self.values:
            return var
        value, component = self.values[var]
        return value.mean if component == "mean" else value.moment

    def _operands(self, spec, args):
        operands, index = [], 0
        for rep in spec.operands:
            mean = args[index]
            index += 1
            moment = None
            if rep != Moment.NONE:
                moment = args[index]
                index += 1
            if mean in self.values:
                value = self.values[mean][0]
                if value.repr != Moment.NONE and rep == Moment.NONE:  # one tensor of a Gaussian, read as deterministic
                    value = GaussianValue(self._tensor(mean))
                elif rep != Moment.NONE and moment in self.values and self.values[moment][0] is not value:
                    value = GaussianValue(self._tensor(mean), self._tensor(moment), rep)  # tensors of two kernels paired
                operands.append(value)
            elif self.is_weight(mean) and rep == Moment.VAR:
                operands.append(self.weight_operand(mean, moment))
            elif self.is_weight(mean):  # deterministic, or a second moment `FoldWeightMoments` made
                operands.append(GaussianValue(mean, moment, rep))
            else:
                operands.append(GaussianValue(mean))
        return operands

    def _visit(self, binding):
        value = binding.value
        found = kernel_of(self.mod, value)
        if found is not None:
            spec, gvar = found
            operands = self._operands(spec, list(value.args[1].fields))
            spec, operands = self.specialize(spec, operands, binding)
            if spec is None:
                return
            self.used.update(arg for operand in operands for arg in operand.args())
            names = self.weights  # membership only (a set of all the names per kernel was quadratic)
            label = kernel_label(spec.ops, operands, names)
            result = self.kernels.emit(spec.with_(operands=tuple(o.repr for o in operands)), operands, label, operand_names(operands, names, self.initializer_names))
            self.values[binding.var] = (result, "mean")
            self.results[binding.var] = result
            return
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.results:
            result = self.results[value.tuple_value]
            self.values[binding.var] = (result, "mean" if value.index == 0 else "moment")
            return
        if call_op_name(value) == "relax.reshape" and value.args[0] in self.values:
            gauss, component = self.values[value.args[0]]
            shape = value.args[1]
            key = (id(gauss), str(shape))
            if key not in self.views:
                mean = self.bb.emit(relax.op.reshape(gauss.mean, shape), f"{binding.var.name}")
                moment = self.bb.emit(relax.op.reshape(gauss.moment, shape)) if gauss.repr != Moment.NONE else None
                self.views[key] = GaussianValue(mean, moment, gauss.repr)
            self.values[binding.var] = (self.views[key], component)
            return
        if call_op_name(value) == "relax.reshape" and value.args[0] in self.func.params[: self.num_input]:
            view = self.bb.emit(relax.op.reshape(value.args[0], value.args[1]), binding.var.name)
            self.values[binding.var] = (GaussianValue(view), "mean")  # a view of a model input
            return
        if isinstance(value, relax.Tuple):
            return  # the output tuple is rebuilt in `_output`
        if isinstance(value, relax.TupleGetItem):
            return  # a component of a kernel the pass absorbed into its consumer
        raise NotImplementedError(f"kernel rewriter: unexpected binding {binding.var.name}")

    def _output(self):
        fields, reprs = [], []
        outputs = output_fields(self.func)
        for repr_ in ir_state.output_moments(self.func):
            mean = outputs.pop(0)
            if repr_ != Moment.NONE:
                outputs.pop(0)
            gauss = self.values[mean][0] if mean in self.values else GaussianValue(mean)
            fields += gauss.args()
            reprs.append(gauss.repr)
        return relax.Tuple(fields), reprs

    def run(self):
        inputs = list(self.func.params[: self.num_input])
        weights_before = list(self.func.params[self.num_input :])
        bb = self.bb
        with bb.function("main", attrs={}):
            with bb.dataflow():
                for binding in main_bindings(self.func):
                    self._visit(binding)
                out, reprs = self._output()
                self.used.update(out.fields)
                out = bb.emit_output(out)
            params = inputs + [p for p in weights_before + list(self.new_params.values()) if p in self.used]
            bb.emit_func_output(out, params=params)
        mod = bb.get()
        func = mod["main"]
        kept = {p.name for p in func.params[self.num_input :]}
        positions = {k: v for k, v in ir_state.weight_positions(self.func).items() if k in kept}
        attrs = func_attrs(self.func, ir_state.encode(means={k: v for k, v in self.weights.items() if k in kept}, outputs=reprs,
                                                      weight_positions=positions))
        mod["main"] = with_attrs(relax.Function(list(func.params), func.body, func.ret_ty, func.is_pure), attrs)
        return mod
