"""Predictive quantities of a classifier's Gaussian logits l ~ N(M, diag(V)), as TE computes over
[N, K] logits: what firmware needs to act on the PFP's output without host code.

Each takes the logits' mean and variance (None when deterministic: V = 0) and returns one
tensor. Per row n, with s_k = M_k / sqrt(1 + pi V_k / 8) and Z = sum_k exp(s_k - max s):

- ``probs`` [N, K], the probit approximation of E[softmax(l)]: p_k = exp(s_k - max s) / Z;
- ``entropy`` [N], the predictive entropy H[p] = -sum_k p_k log p_k = log Z - sum_k p_k (s_k - max s)
  (the second form takes no log of a probability, so p_k = 0 is harmless);
- ``ood`` [N], an out-of-distribution score: the mean logit variance (1/K) sum_k V_k.

`build_predictive_kernel` turns one of them into a PrimFunc whose loop nest runs row by row, so
every intermediate is a scalar or one row of K values (no [N, K] scratch buffer).
"""

from __future__ import annotations

import math

from tvm import s_tir, te, tirx

from .moments import f32

#: The outputs ``--outputs`` can ask for, in the order they appear in ``<name>_run``.
PREDICTIVE_OUTPUTS = ("probs", "entropy", "ood")

DOCS = {
    "probs": "predictive class probabilities, probit approximation softmax(mean / sqrt(1 + pi*var/8))",
    "entropy": "predictive entropy in nats of those probabilities, -sum_k p_k log p_k",
    "ood": "out-of-distribution score: mean over classes of the logits' variance (higher = less familiar)",
}


def _softmax_parts(mean: te.Tensor, var: te.Tensor | None):
    """(s, max_k s, Z) of the probit-scaled logits."""
    rows, classes = (int(d) for d in mean.shape)
    if var is None:
        scaled = mean
    else:
        scaled = te.compute(mean.shape, lambda n, k: mean[n, k] / tirx.sqrt(f32(1.0) + f32(math.pi / 8.0) * var[n, k]), name="probit_scaled")
    k = te.reduce_axis((0, classes), name="k")
    row_max = te.compute((rows,), lambda n: te.max(scaled[n, k], axis=k), name="row_max")
    k = te.reduce_axis((0, classes), name="k")
    row_sum = te.compute((rows,), lambda n: te.sum(tirx.exp(scaled[n, k] - row_max[n]), axis=k), name="row_sum")
    return scaled, row_max, row_sum


def probit_probs(mean: te.Tensor, var: te.Tensor | None) -> te.Tensor:
    """p_k = exp(s_k - max s) / Z, s_k = M_k / sqrt(1 + pi V_k / 8)."""
    scaled, row_max, row_sum = _softmax_parts(mean, var)
    return te.compute(mean.shape, lambda n, c: tirx.exp(scaled[n, c] - row_max[n]) / row_sum[n], name="probs")


def predictive_entropy(mean: te.Tensor, var: te.Tensor | None) -> te.Tensor:
    """H[p] = log Z - sum_k p_k (s_k - max s) for the probit probabilities p."""
    scaled, row_max, row_sum = _softmax_parts(mean, var)
    rows, classes = (int(d) for d in mean.shape)
    k = te.reduce_axis((0, classes), name="k")
    weighted = te.compute(
        (rows,), lambda n: te.sum(tirx.exp(scaled[n, k] - row_max[n]) * (scaled[n, k] - row_max[n]), axis=k), name="weighted"
    )
    return te.compute((rows,), lambda n: tirx.log(row_sum[n]) - weighted[n] / row_sum[n], name="entropy")


def mean_logit_variance(mean: te.Tensor, var: te.Tensor | None) -> te.Tensor:
    """(1/K) sum_k V_k; 0 for deterministic logits."""
    rows, classes = (int(d) for d in mean.shape)
    if var is None:
        return te.compute((rows,), lambda n: f32(0.0), name="ood")
    k = te.reduce_axis((0, classes), name="k")
    var_sum = te.compute((rows,), lambda n: te.sum(var[n, k], axis=k), name="var_sum")
    return te.compute((rows,), lambda n: var_sum[n] * f32(1.0 / classes), name="ood")


COMPUTE = {"probs": probit_probs, "entropy": predictive_entropy, "ood": mean_logit_variance}


def build_predictive_kernel(output: str, shape, with_var: bool, name: str):
    """The PrimFunc (mean[, var]) -> ``output`` for logits of ``shape`` [N, K]."""
    mean = te.placeholder([int(d) for d in shape], "float32", name="logits_mean")
    var = te.placeholder([int(d) for d in shape], "float32", name="logits_var") if with_var else None
    result = COMPUTE[output](mean, var)
    func = te.create_prim_func([mean] + ([var] if with_var else []) + [result])
    return _schedule_by_row(func).with_attr("global_symbol", name)


def _schedule_by_row(func):
    """Everything under the output's row loop: per row, scalars and at most one row of K."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    output = sch.get_output_blocks(root)[0]
    for block in sch.get_child_blocks(root):
        if not sch.get(block).same_as(sch.get(output)) and not any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars):
            sch.compute_inline(block)
    row = sch.get_loops(output)[0]
    producers = [sch.get(block).name_hint for block in sch.get_child_blocks(root)][:-1]
    for name in reversed(producers):
        sch.compute_at(sch.get_sblock(name), row)
    for name in producers:  # initialise each accumulator once per row, outside its loop over k
        block = sch.get_sblock(name)
        sch.decompose_reduction(block, sch.get_loops(block)[1])
    return sch.mod["main"]
