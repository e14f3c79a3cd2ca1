"""Fold layout operations on weights into the weights themselves (compile time).

    lv = R.permute_dims(fc_weight, axes=[1, 0])    ->   new parameter fc_weight_T (values permuted,
    y  = R.matmul(x, lv)                                variance permuted alike); y = R.matmul(x, fc_weight_T)

Handles permute_dims, reshape, expand_dims, squeeze and multiplication by a scalar constant
(mean scaled by c, variance by c^2) whose operands are weights. A weight used by several nodes
through the same layout operation (tied weights: two Gemm with transB=1 on one initializer) gets
one folded parameter, read by all of them: stored once, and drawn once per sample by `--mode svi`,
as the tying requires. Records where every element of a
new weight comes from in its initializer (``pfp.weight_positions``: the same layout operation
applied to the source's positions; None for a scaled weight, whose values changed). Runs on the
deterministic module.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import ir_state
from ..ir import MainRewriter, scalar_value, call_op_name, func_attrs, main_bindings, shape_of, with_used_weights
from ..ops import registry as R


def _fold(op, call, value, variance):
    """Apply ``call`` to a weight (mean, variance); None when it is not a foldable layout op."""
    if op == "relax.permute_dims":
        axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else None
        return np.transpose(value, axes), None if variance is None else np.transpose(variance, axes)
    if op in R.relax_ops(R.Kind.VIEW):
        shape = shape_of(call)
        return value.reshape(shape), None if variance is None else variance.reshape(shape)
    return None


def _fold_key(call) -> tuple:
    """What makes two folds of one weight the same: the output shape and the operation's arguments
    after the weight (a scaling's factor)."""
    axes = getattr(call.attrs, "axes", None) if call.attrs is not None else None
    return (tuple(int(d) for d in shape_of(call)), None if axes is None else tuple(int(a) for a in axes),
            tuple(scalar_value(arg) for arg in call.args[1:]))


def _unused_name(name: str, taken) -> str:
    """``name``, or ``name.2``, ``name.3``, ... when a different fold of the same weight has it."""
    candidate, index = name, 1
    while candidate in taken:
        index += 1
        candidate = f"{name}.{index}"
    return candidate


@tvm.transform.module_pass(opt_level=0, name="pfpc.FoldWeightLayout")
class FoldWeightLayout:
    after = ("pfpc.Lower1dTo2d",)  # run before it when in the pipeline

    def transform_module(self, mod, ctx):
        func = mod["main"]
        num_input = int(func.attrs["num_input"])
        means, variances, names = ir_state.means(func), ir_state.variances(func), ir_state.onnx_names(func)
        positions = ir_state.weight_positions(func)
        weights = {param: param.name for param in func.params[num_input:]}
        replace, new_params, folded_params = {}, [], {}
        for binding in main_bindings(func):
            call, op = binding.value, call_op_name(binding.value)
            if op is None or not call.args or call.args[0] not in weights:
                continue
            source = weights[call.args[0]]
            folded = _fold(op, call, means[source], variances.get(source))
            source_positions = ir_state.source_positions(positions, source, means[source].shape)
            moved = None if folded is None or source_positions is None else _fold(op, call, source_positions, None)[0]
            if folded is None and op in R.SCALING:
                factor = scalar_value(call.args[1])
                if factor is not None:
                    factor = R.SCALING[op](factor)
                    var = variances.get(source)
                    folded = means[source] * factor, None if var is None else var * factor * factor
            if folded is None:
                continue
            key = (source, op, _fold_key(call))
            if key in folded_params:
                weights[binding.var], replace[binding.var] = folded_params[key]
                continue
            name = _unused_name(f"{source}.{op.split('.')[-1]}", means)
            param = relax.Var(name, relax.TensorType(shape_of(call), "float32"))
            means[name] = folded[0]
            if folded[1] is not None:
                variances[name] = folded[1]
            names[name] = names.get(source, source)
            positions[name] = moved
            weights[binding.var] = name
            replace[binding.var] = param
            folded_params[key] = name, param
            new_params.append(param)
        if not replace:
            return mod
        mod = _Substitute(mod, replace).run(list(func.params) + new_params, func_attrs(func))
        return with_used_weights(mod, means, variances, names, positions)


class _Substitute(MainRewriter):
    """Drops the folded bindings; their uses now read the new weight parameters."""

    def __init__(self, mod, replace):
        super().__init__(mod)
        self.env.update(replace)
        self.folded = set(replace)

    def visit_binding(self, binding):
        if binding.var not in self.folded:
            self.copy_binding(binding)
