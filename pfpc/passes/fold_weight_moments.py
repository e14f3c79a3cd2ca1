"""Precompute weight second moments at compile time where the linear layer can use them.

    matmul(x: (mean, second_moment), w: (mean, var))
        ->  matmul(x: (mean, second_moment), w: (mean, second_moment = mu^2 + s2))

With both operands as second moments the variance of each product term is q_x t_w - (m_x mu)^2,
sharing m_x mu with the mean: three multiply-adds per MAC. A deterministic input keeps the weight
variance (V = sum s2 m^2, two multiply-adds per MAC).
"""

from __future__ import annotations

import tvm

from ..ir import GaussianValue
from ..ops.gaussian import Moment
from ..ops.registry import LINEAR_OPS
from .kernel_rewriter import KernelRewriter


class _Rewriter(KernelRewriter):
    def specialize(self, spec, operands, binding):
        if spec.ops[0] not in LINEAR_OPS or len(operands) < 2:
            return spec, operands
        first, second = operands[0], operands[1]
        operands = list(operands)
        for index, (this, other) in enumerate(((first, second), (second, first))):
            if this.repr == Moment.VAR and other.repr == Moment.SECOND_MOMENT and self.is_weight(this.mean):
                mean = self.weights[this.mean.name]
                var = self.weights[this.moment.name]
                param = self.add_weight(f"{this.mean.name}.second_moment", mean.astype("float64") ** 2 + var)
                operands[index] = GaussianValue(this.mean, param, Moment.SECOND_MOMENT)
        return spec.with_(operands=tuple(o.repr for o in operands)), operands


@tvm.transform.module_pass(opt_level=0, name="pfpc.FoldWeightMoments")
class FoldWeightMoments:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it
    after = ("pfpc.ChooseMomentRepresentation",)  # run before it when in the pipeline

    def transform_module(self, mod, ctx):
        return _Rewriter(mod).run()
