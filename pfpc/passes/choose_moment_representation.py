"""Per edge, carry the cheaper moment: the variance or the second raw moment.

    relu -> (mean, second_moment) -> matmul     (ReLU computes E[y^2] for free; the linear
                                                 layer's fast path consumes q = E[y^2] directly)
    relu -> (mean, var)           -> maxpool    (Clark's max needs variances)

An edge carries the second moment exactly when its producer computes it natively and every
consumer is a linear operator (matmul, conv2d) as its first stage, or a pad kernel (which passes
either representation through) whose consumers all are; otherwise the variance. Model
outputs are always variances. No edge is converted twice.
"""

from __future__ import annotations

import tvm

from ..ir import kernel_of
from ..ops.gaussian import Moment
from ..ops.kernel import infer_output_repr
from ..ops.registry import LINEAR_OPS
from .kernel_rewriter import KernelRewriter


class _Rewriter(KernelRewriter):
    def specialize(self, spec, operands, binding):
        spec = spec.with_(operands=tuple(o.repr for o in operands))
        native = infer_output_repr(spec)
        if native == Moment.NONE:
            return spec.with_(output=Moment.NONE), operands
        wanted = Moment.SECOND_MOMENT if native == Moment.SECOND_MOMENT and self._linear_users(binding) else Moment.VAR
        return spec.with_(output=wanted), operands

    def _linear_users(self, binding) -> bool:
        """Whether every consumer of ``binding`` reads second moments cheaply (see the module doc)."""
        users = self.consumers.get(binding.var, [])
        if not users or "output" in users:
            return False
        for user in users:
            ops = kernel_of(self.mod, user.value)[0].ops
            if ops[0] not in LINEAR_OPS and not (ops == ["pad"] and self._linear_users(user)):
                return False
        return True


@tvm.transform.module_pass(opt_level=0, name="pfpc.ChooseMomentRepresentation")
class ChooseMomentRepresentation:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it
    after = ("pfpc.EliminateZeroVariance", "pfpc.FuseOperators")  # run before it when in the pipeline

    def transform_module(self, mod, ctx):
        return _Rewriter(mod).run()
