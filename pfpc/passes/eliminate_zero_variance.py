"""Remove variance work where the variance is provably zero.

    R.call_tir(matmul, (x, w, w_var))  with w_var == 0 everywhere
        ->  R.call_tir(matmul_deterministic, (x, w))        (no variance output at all)

A weight whose variance is zero everywhere is deterministic; a kernel whose operands are all
deterministic computes the mean only, and that propagates forward: a network without a posterior
compiles to the deterministic network.
"""

from __future__ import annotations

import numpy as np
import tvm

from ..ir import GaussianValue
from ..ops.gaussian import Moment
from .kernel_rewriter import KernelRewriter


class _Rewriter(KernelRewriter):
    def weight_operand(self, mean_param, var_param):
        if not np.any(self.weights[var_param.name]):
            return GaussianValue(mean_param)
        return GaussianValue(mean_param, var_param, Moment.VAR)

    def specialize(self, spec, operands, binding):
        deterministic = all(o.repr == Moment.NONE for o in operands)
        return spec.with_(output=Moment.NONE if deterministic else spec.output), operands


@tvm.transform.module_pass(opt_level=0, name="pfpc.EliminateZeroVariance")
class EliminateZeroVariance:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it

    def transform_module(self, mod, ctx):
        return _Rewriter(mod).run()
