"""Shared draws (a shared posterior with semantics ``shared_draw``): one noise draw per component,
propagated by the linear kernels.

    matmul(x, w: (mean, var))   ->   matmul[draw_groups=K](x, w: (mean, var), w.draw_group, w.draw_std)

Every weight of a component uses the same standard normal draw: w_i = mu_i + a_i eps_c(i), a_i its
(signed) std. A linear output then needs, besides the usual per-weight sums, one grouped sum per
component (`ops.gaussian._reduce_shared_draw`), so every linear kernel whose weight operand comes
from a covered initializer gets two deterministic operands after the weight, in the weight's final
layout: the component of every weight (-1 for weights drawn on their own: blends and exceptions)
and a_i. The layout comes from the weights' provenance (``pfp.weight_positions``, recorded by the
passes that move weights); a weight whose values a pass changed (batch-norm folding, a constant
factor) is refused with one line: its draws would need the scale as well.

The outputs of a layer become correlated through the shared draws (every output unit reads the
same eps); the PFP keeps only per-unit variances, as it ignores the other correlations between
units. Elementwise uses of a covered weight need nothing: each output reads one weight, whose
marginal is unchanged; other kernels that read a covered weight (ConvTranspose, 3-D
convolutions, normalisations) are refused. Runs after the kernel-rewriting passes, before the predictive outputs.
"""

from __future__ import annotations

import numpy as np
import tvm

from .. import ir_state
from ..errors import PfpcError
from ..ir import GaussianValue, func_attrs, with_attrs
from ..ops.registry import LINEAR_OPS, STAGES, Fusion
from .kernel_rewriter import KernelRewriter

#: Components per covered initializer a shared-draw kernel accumulates separately (one register each).
MAX_DRAW_GROUPS = 64


class _Rewriter(KernelRewriter):
    def __init__(self, mod, draws):
        super().__init__(mod)
        self.draws = draws
        self.names = ir_state.onnx_names(self.func)
        self.positions = ir_state.weight_positions(self.func)
        self.new_names = {}

    def _source(self, operand):
        return ir_state.onnx_name(self.names, operand.mean.name) if self.is_weight(operand.mean) else None

    def specialize(self, spec, operands, binding):
        if spec.ops[0] not in LINEAR_OPS:
            # a kernel of its own (ConvTranspose, 3-D conv, normalisations, ...) may read one weight at many
            # outputs, which the per-weight marginals do not describe: refuse rather than drop the correlation
            covered = [self._source(operand) for operand in operands if self._source(operand) in self.draws]
            if covered and STAGES[spec.ops[0]].fusion is Fusion.NONE:
                raise PfpcError(f"shared posterior (semantics 'shared_draw'): weight '{covered[0]}' feeds a {spec.ops[0]}; "
                                "shared draws are propagated through Gemm/MatMul/Conv layers and element-wise operators only")
            return spec, operands
        first, weight = operands[0], operands[1]
        if self._source(first) in self.draws:
            raise PfpcError(f"shared posterior (semantics 'shared_draw'): weight '{self._source(first)}' is the first "
                            f"operand of a {spec.ops[0]}; only the weight operand of a layer can share draws")
        source = self._source(weight)
        if source not in self.draws:
            return spec, operands
        components, groups, stds = self.draws[source]
        positions = ir_state.source_positions(self.positions, weight.mean.name, self.weights[weight.mean.name].shape)
        if positions is None:
            raise PfpcError(f"shared posterior (semantics 'shared_draw'): weight '{source}' is scaled at compile time "
                            "(batch-norm folding or a constant factor); its shared draws cannot be propagated")
        if components > MAX_DRAW_GROUPS:
            raise PfpcError(f"shared posterior (semantics 'shared_draw'): weight '{source}' has {components} components; "
                            f"shared draws are propagated for at most {MAX_DRAW_GROUPS} per tensor")
        extra = []
        for suffix, values in (("draw_group", groups), ("draw_std", stds)):
            name = f"{weight.mean.name}.{suffix}"
            extra.append(GaussianValue(self.add_weight(name, values[positions].astype(np.float32))))
            self.new_names[name] = source  # stored as a codebook too (few distinct values)
        attrs = {key: value for key, value in spec.stages[0][1].items() if key != "weight_second"}
        rest = list(operands[3:] if spec.stages[0][1].get("weight_second") else operands[2:])  # the draws' sums form their own second moments
        stages = ((spec.stages[0][0], {**attrs, "draw_groups": components}),) + spec.stages[1:]
        operands = list(operands[:2]) + extra + rest
        return spec.with_(stages=stages, operands=tuple(o.repr for o in operands)), operands


@tvm.transform.module_pass(opt_level=0, name="pfpc.ApplySharedDraws")
class ApplySharedDraws:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it
    after = ("pfpc.EliminateZeroVariance", "pfpc.FuseOperators", "pfpc.ChooseMomentRepresentation", "pfpc.FoldWeightMoments")

    def __init__(self, draws: dict):
        """``draws``: initializer -> (components, group per weight, signed std per weight), flat in
        the initializer's layout (`frontends.shared_posterior.draws`)."""
        self.draws = draws

    def transform_module(self, mod, ctx):
        rewriter = _Rewriter(mod, self.draws)
        mod = rewriter.run()
        if rewriter.new_names:
            main = mod["main"]
            mod["main"] = with_attrs(main, func_attrs(main, ir_state.encode(onnx_names={**rewriter.names, **rewriter.new_names})))
        return mod
