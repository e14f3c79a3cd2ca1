"""Precompute weight second moments at compile time where the linear layer can use them.

    matmul(x: (mean, second_moment), w: (mean, var))
        ->  matmul(x: (mean, second_moment), w: (mean, second_moment = mu^2 + s2))

With both operands as second moments the variance of each product term is q_x t_w - (m_x mu)^2,
sharing m_x mu with the mean: three multiply-adds per MAC. A deterministic input keeps the weight
variance (V = sum s2 m^2, two multiply-adds per MAC).

    conv2d(x: (mean, var), w: (mean, var))     (window rows of several taps at stride 1)
        ->  conv2d[weight_second](x, w: (mean, var), mu^2 + s2)

Such a convolution's Var(x w) is v_x (mu^2 + s2) + m_x^2 s2 (`gaussian.second_of_weights`): the
weights' second moments become a third weight tensor, read where each weight of a register
block formed it (Cortex-M4: a load for a copy and a multiply-add; the seed LeNet-5's conv2
1,225,240 -> 1,160,600 instructions), at 4 bytes of flash per weight. Only for a convolution
with several output positions per channel, where each weight's second moment is formed once per
block of positions: read at one position (a pooled variance), it saves one instruction per 4
bytes (ResNet-8's pooled variances: 17,960 instructions for 335,040 bytes of flash).
"""

from __future__ import annotations

import tvm

from ..ir import GaussianValue, shape_of
from ..ops.gaussian import Moment, conv2d_window, second_of_weights
from ..ops.registry import LINEAR_OPS
from .kernel_rewriter import KernelRewriter


class _Rewriter(KernelRewriter):
    def __init__(self, mod, weight_second: bool):
        super().__init__(mod)
        self.weight_second = weight_second

    def specialize(self, spec, operands, binding):
        if spec.ops[0] not in LINEAR_OPS or len(operands) < 2:
            return spec, operands
        if self.weight_second and self._reads_weight_second(spec, operands):
            weight = operands[1]
            mean, var = self.weights[weight.mean.name], self.weights[weight.moment.name]
            second = self.add_weight(f"{weight.mean.name}.second_moment", mean.astype("float64") ** 2 + var)
            op, attrs = spec.stages[0]
            operands = list(operands[:2]) + [GaussianValue(second)] + list(operands[2:])
            stages = ((op, {**attrs, "weight_second": True}),) + tuple(spec.stages[1:])
            return spec.with_(stages=stages, operands=tuple(o.repr for o in operands)), operands
        first, second = operands[0], operands[1]
        operands = list(operands)
        for index, (this, other) in enumerate(((first, second), (second, first))):
            if this.repr == Moment.VAR and other.repr == Moment.SECOND_MOMENT and self.is_weight(this.mean):
                mean = self.weights[this.mean.name]
                var = self.weights[this.moment.name]
                param = self.add_weight(f"{this.mean.name}.second_moment", mean.astype("float64") ** 2 + var)
                operands[index] = GaussianValue(this.mean, param, Moment.SECOND_MOMENT)
        return spec.with_(operands=tuple(o.repr for o in operands)), operands

    def _reads_weight_second(self, spec, operands) -> bool:
        """A convolution of a Gaussian input (variance) by Gaussian weights whose Var(x w) takes
        each weight's second moment (`gaussian.second_of_weights`), at several output positions."""
        op, attrs = spec.stages[0]
        x, w = operands[0], operands[1]
        if not (op == "conv2d" and "draw_groups" not in attrs and not attrs.get("weight_second")
                and x.repr == Moment.VAR and w.repr == Moment.VAR and self.is_weight(w.mean) and self.is_weight(w.moment)):
            return False
        w_shape = self.weights[w.mean.name].shape
        out_shape, _, _ = conv2d_window(shape_of(x.mean), w_shape, attrs["strides"], attrs["pads"], attrs["dilations"], attrs["groups"])
        return second_of_weights(w_shape, attrs["strides"]) and out_shape[2] * out_shape[3] > 1


@tvm.transform.module_pass(opt_level=0, name="pfpc.FoldWeightMoments")
class FoldWeightMoments:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it
    after = ("pfpc.ChooseMomentRepresentation",)  # run before it when in the pipeline

    def __init__(self, weight_second: bool = True):
        """``weight_second``: fold convolutions' weight second moments into a tensor of their own
        (off for a shared posterior: its codebooks decode a weight's mean and second moment from
        one code read, where a folded array would be a third array stored and gathered beside them)."""
        self.weight_second = weight_second

    def transform_module(self, mod, ctx):
        return _Rewriter(mod, self.weight_second).run()
