"""For sampling (SVI) code generation: take the posterior out of the network, in the layout the
kernels read, and leave the deterministic network.

    pfp.weight_var = {"fc.weight.permute_dims": s2}   ->   pfp.weight_var = {}
                                                           pfp.sampled_std = {"fc.weight.permute_dims": sqrt(s2)}

Runs after the passes that rewrite weights, `fold_weight_layout` and `fold_batch_norm` (its
``after``; `pipeline.svi_passes` puts it right after them), before `substitute_layers`, so the std
has had the same transposes, reshapes and scalings as the mean: for a permutation or reshape T, T(mu + sigma*eps) = T(mu) + T(sigma)*T(eps)
with T(eps) again independent N(0, 1); for a scaling by c, c*mu + |c|*sigma*eps' has the same
distribution (eps' = sign(c)*eps). The passes after it compile the deterministic network; the
generated code draws every weight named in ``pfp.sampled_std`` as mean + std * N(0, 1) per sample
(a weight the posterior names is drawn even where its std is zero). An initializer read in
several layouts is drawn once and gathered into the others (`codegen.emit_svi.tie_layouts`).
"""

from __future__ import annotations

import numpy as np
import tvm

from .. import ir_state
from ..ir import func_attrs, with_attrs


@tvm.transform.module_pass(opt_level=0, name="pfpc.DetachWeightStd")
class DetachWeightStd:
    after = ("pfpc.FoldWeightLayout", "pfpc.FoldBatchNorm")  # run before it when in the pipeline

    def transform_module(self, mod, ctx):
        func = mod["main"]
        variances = ir_state.variances(func)
        stds = {name: np.sqrt(np.asarray(var, np.float64)) for name, var in variances.items()}
        attrs = func_attrs(func, ir_state.encode(variances={}, sampled_std=stds))
        mod["main"] = with_attrs(func, attrs)
        return mod
