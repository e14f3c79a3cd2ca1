"""Inference batch normalisation folded into the preceding linear layer, else an affine map.

With g = gamma / sqrt(running_var + eps) per channel c:

    y = conv2d(x, W) [+ B]; z = batch_norm(y)    ->   z = conv2d(x, W') + B'
        W'[c] = g[c] W[c]          (posterior std scaled by |g[c]|, variance by g[c]^2)
        B'[c] = g[c] (B[c] - running_mean[c]) + beta[c]   (variance g^2 var(B) + var(beta))

for conv2d (output channel = weight axis 0) and matmul with a 2-D weight (channel = last
axis), when W and the intermediate results have no other consumer. Otherwise

    z = batch_norm(y)    ->   z = y * S + T,   S = g,  T = beta - running_mean * g

(per-channel constants broadcast along the batch-norm axis; T carries var(beta)). Both are exact.
gamma, running mean and running variance must be deterministic; beta may be stochastic.
Runs on the deterministic module after `FoldWeightLayout`, whose weight parameters it edits; the
weights whose values it changes or makes are recorded in ``pfp.weight_positions`` as None (their
elements are no longer the initializer's).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..errors import PfpcError
from .. import ir_state
from ..ir import MainRewriter, call_op_name, func_attrs, main_bindings, used_vars, with_used_weights
from ..ops.registry import LINEAR_RELAX_OPS

LINEAR = LINEAR_RELAX_OPS


class _Fold(MainRewriter):
    def __init__(self, mod, means, variances, names, positions):
        super().__init__(mod)
        self.means, self.variances, self.names, self.positions = means, variances, names, positions
        self.num_input = int(self.func.attrs["num_input"])
        self.bindings = {b.var: b for b in main_bindings(self.func)}
        self.uses = self._count_uses()
        self.norms = {}  # batch_norm var -> its replacement (the normalised tensor)
        self.folds = {b.var: self._foldable(b.value) for b in self.bindings.values() if call_op_name(b.value) == "relax.nn.batch_norm"}
        # bias additions absorbed into a fold (the folded bias replaces them)
        self.skip = {fold[2].var for fold in self.folds.values() if fold is not None and fold[2] is not None}

    def _count_uses(self):
        uses = {}
        for binding in self.bindings.values():
            for var in used_vars(binding.value):
                uses[var] = uses.get(var, 0) + 1
        for var in used_vars(self.func.body.body):
            uses[var] = uses.get(var, 0) + 1
        return uses

    def _weight(self, expr):
        return expr.name if isinstance(expr, relax.Var) and expr in self.func.params[self.num_input :] else None

    def _add_param(self, name, mean, var):
        param = relax.Var(name, relax.TensorType(list(mean.shape), "float32"))
        self.means[name] = mean.astype(np.float32)
        self.positions[name] = None
        if var is not None and np.any(var):
            self.variances[name] = var.astype(np.float32)
        self.new_params.append(param)
        return param

    def _statistics(self, call):
        """(g, beta mean, beta variance, running mean) as float64 arrays of shape [C]."""
        gamma, beta, running_mean, running_var = call.args[1:5]
        attrs = call.attrs
        names = [self._weight(arg) for arg in (gamma, beta, running_mean, running_var)]
        if None in names:
            raise PfpcError("batch_norm: gamma, beta, mean and variance must be initializers")
        for name in (names[0], names[2], names[3]):
            if np.any(self.variances.get(name, 0.0)):
                raise PfpcError(f"BatchNormalization parameter '{self.names.get(name, name)}' has a posterior variance; only beta may be stochastic")
        value = {name: self.means[name].astype(np.float64) for name in names}
        scale = value[names[0]] if attrs.scale else np.ones_like(value[names[0]])
        g = scale / np.sqrt(value[names[3]] + float(attrs.epsilon))
        beta_mean = value[names[1]] if attrs.center else np.zeros_like(g)
        beta_var = self.variances.get(names[1]) if attrs.center else None
        beta_var = np.zeros_like(g) if beta_var is None else beta_var.astype(np.float64)
        return g, beta_mean, beta_var, value[names[2]]

    def _foldable(self, call):
        """(linear binding, weight name, bias binding or None) when the fold applies, else None."""
        data, rank, axis = call.args[0], len(call.args[0].ty.shape), int(call.attrs.axis) % len(call.args[0].ty.shape)
        if self.uses.get(data, 0) != 1 or data not in self.bindings:
            return None
        producer, bias = self.bindings[data], None
        if call_op_name(producer.value) == "relax.add" and self._weight(producer.value.args[1]) is not None:
            bias = producer
            if self.uses.get(producer.value.args[0], 0) != 1 or producer.value.args[0] not in self.bindings:
                return None
            producer = self.bindings[producer.value.args[0]]
        op = call_op_name(producer.value)
        if op not in LINEAR:
            return None
        weight = self._weight(producer.value.args[1])
        if weight is None or self.uses.get(producer.value.args[1], 0) != 1:
            return None
        if op == "relax.nn.conv2d" and (axis != 1 or producer.value.attrs.kernel_layout != "OIHW"):
            return None
        if op == "relax.matmul" and (axis != rank - 1 or self.means[weight].ndim != 2):
            return None
        return producer, weight, bias

    def visit_binding(self, binding):
        value = binding.value
        if binding.var in self.skip:
            return
        if call_op_name(value) != "relax.nn.batch_norm":
            if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.norms:
                if value.index == 0:
                    self.env[binding.var] = self.norms[value.tuple_value]
                elif self.uses.get(binding.var, 0):
                    raise PfpcError("batch_norm: the running statistics outputs are used; inference uses only the normalised tensor")
                return
            self.copy_binding(binding)
            return
        g, beta_mean, beta_var, running_mean = self._statistics(value)
        data = value.args[0]
        rank = len(data.ty.shape)
        axis = int(value.attrs.axis) % rank
        found = self.folds[binding.var]
        if found is not None:
            linear, weight, bias = found
            channel_axis = 0 if call_op_name(linear.value) == "relax.nn.conv2d" else 1
            along = [1] * self.means[weight].ndim
            along[channel_axis] = -1
            self.means[weight] = (self.means[weight] * g.reshape(along)).astype(np.float32)
            self.positions[weight] = None
            if weight in self.variances:
                self.variances[weight] = (self.variances[weight] * (g * g).reshape(along)).astype(np.float32)
            bias_mean, bias_var = np.zeros_like(g), np.zeros_like(g)
            if bias is not None:
                name = self._weight(bias.value.args[1])
                bias_mean = self._per_channel(self.means[name], rank, axis, g.size)
                bias_var = self._per_channel(self.variances.get(name, np.zeros_like(self.means[name])), rank, axis, g.size)
            shape = [1] * (rank - axis)
            shape[0] = -1
            new_bias = self._add_param(
                f"{weight}.batch_norm_bias",
                (g * (bias_mean - running_mean) + beta_mean).reshape(shape),
                (g * g * bias_var + beta_var).reshape(shape),
            )
            # named after the weight, made from the bias and beta: its provenance is beta (its name
            # alone would make it a second form of the weight, which `--mode svi` must draw once)
            beta = self._weight(value.args[2])
            self.names[f"{weight}.batch_norm_bias"] = self.names.get(beta, beta)
            # the linear binding is copied when visited (before this one); only the bias changes
            self.norms[binding.var] = self.bb.emit(relax.op.add(self.env.get(linear.var, linear.var), new_bias), f"{binding.var.name}_folded")
            return
        shape = [1] * (rank - axis)
        shape[0] = -1
        stem = self._weight(value.args[1])
        scale = self._add_param(f"{stem}.batch_norm_scale", g.reshape(shape), None)
        shift = self._add_param(f"{stem}.batch_norm_shift", (beta_mean - running_mean * g).reshape(shape), beta_var.reshape(shape))
        scaled = self.bb.emit(relax.op.multiply(self.remap(data), scale), f"{binding.var.name}_scaled")
        self.norms[binding.var] = self.bb.emit(relax.op.add(scaled, shift), f"{binding.var.name}_affine")

    @staticmethod
    def _per_channel(values, rank, axis, channels):
        """A bias broadcastable to the rank-``rank`` output, as its [C] values along ``axis``."""
        full = np.broadcast_to(values, np.broadcast_shapes(values.shape, (1,) * rank))
        index = [0] * full.ndim
        index[axis] = slice(None)
        return np.broadcast_to(full[tuple(index)].astype(np.float64), (channels,))


@tvm.transform.module_pass(opt_level=0, name="pfpc.FoldBatchNorm")
class FoldBatchNorm:
    after = ("pfpc.Lower1dTo2d", "pfpc.FoldWeightLayout")  # run before it when in the pipeline

    def transform_module(self, mod, ctx):
        func = mod["main"]
        if not any(call_op_name(b.value) == "relax.nn.batch_norm" for b in main_bindings(func)):
            return mod
        means, variances, names = ir_state.means(func), ir_state.variances(func), ir_state.onnx_names(func)
        positions = ir_state.weight_positions(func)
        mod = _Fold(mod, means, variances, names, positions).run(list(func.params), func_attrs(func))
        return with_used_weights(mod, means, variances, names, positions)
