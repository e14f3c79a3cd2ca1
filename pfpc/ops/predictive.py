"""Predictive quantities of a classifier's Gaussian logits l ~ N(M, diag(V)), as TE computes over
[N, K] logits: what firmware needs to act on the PFP's output without host code.

Each takes the logits' mean and variance (None when deterministic: V = 0) and the method that
turns them into probabilities, and returns one tensor. Three methods approximate E[softmax(l)]:

- ``meanfield`` (the default; Lu, Ie & Sha 2020, mean-field approximation of the Gaussian-softmax
  integral): writing softmax_k(l) = 1 / sum_j exp(-(l_k - l_j)) and replacing each pairwise
  sigmoid's expectation by the probit rule with the class's own variance,
  q_k = 1 / sum_j exp(-(M_k - M_j) r_k), r_k = 1 / sqrt(1 + pi V_k / 8), then p = q / sum q.
  With Mx = max_j M_j: log q_k = (M_k - Mx) r_k - log sum_j exp((M_j - Mx) r_k), every exponent
  <= 0 (no overflow) and sum_j >= 1; p_k = exp(log q_k) / sum_j exp(log q_j). O(K^2) per row.
- ``sampling``: the Monte Carlo average p = (1/S) sum_s softmax(M + sqrt(V) eps_s) over S draws
  eps_s of K approximately standard normal numbers from a counter-based generator
  (`standard_normal`; the same draws every call, so one input always gives one answer).
- ``probit``: softmax(M r), r as above: kept for comparison (it loses ~1 pp accuracy on the seed
  paper's MNIST networks: it shrinks each logit by its own variance, which reorders classes).

Outputs (per row n):

- ``probs`` [N, K]: the method's probabilities;
- ``entropy`` [N]: their predictive entropy H[p] in nats, in log space (no log of a probability
  for the closed forms: H = log Z - sum_k p_k log q_k);
- ``mutual_information`` [N]: H[mean_s softmax(l_s)] - mean_s H[softmax(l_s)] over the ``sampling``
  draws (whatever the probability method: the closed forms give no expected entropy), computed as
  the mean KL divergence of the draws' softmaxes from their mean (>= 0, accurate near 0);
  epistemic uncertainty alone;
- ``logit_var`` [N]: the mean logit variance (1/K) sum_k V_k; ``ood`` is the same number under its
  old name;
- ``log_entropy`` [N], ``log_mutual_information`` [N]: the natural logs of ``entropy`` and
  ``mutual_information``, computed in log space from the logits (`log_entropy_of_log_weights`,
  `log_mutual_information`): finite for every finite logit gap, where the float32 entropy and MI of a
  confident input underflow to exactly 0 (gaps above ~88) and tie, so ranking inputs by them (OOD
  AUROC, abstain thresholds) gives the float64 order. log 0 (deterministic logits' MI) is the lowest
  float32.

`build_predictive_kernel` turns one of them into a PrimFunc whose loop nest runs row by row, so
every intermediate is a scalar, one row of K values or one value per draw (no [N, K] scratch).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import s_tir, te, tirx

from .moments import f32

#: The outputs ``--outputs`` can ask for, in the order they appear in ``<name>_run``.
PREDICTIVE_OUTPUTS = ("probs", "entropy", "mutual_information", "logit_var", "ood", "log_entropy", "log_mutual_information")
#: what `AppendPredictiveOutputs` appends when not told (the outputs before the log-space scores)
DEFAULT_OUTPUTS = PREDICTIVE_OUTPUTS[:5]
METHODS = ("meanfield", "sampling", "probit")
DEFAULT_METHOD = "meanfield"
DEFAULT_SAMPLES = 64
#: draws per call are at most this many (each [S] row of floats stays on the stack: TVM puts larger ones in a runtime workspace)
MAX_SAMPLES = 128

_METHOD_DOCS = {
    "meanfield": "mean-field approximation of E[softmax(l)] (Lu, Ie & Sha 2020): "
                 "q_k = 1 / sum_j exp(-(mean_k - mean_j) / sqrt(1 + pi*var_k/8)), p = q / sum q",
    "sampling": "Monte Carlo E[softmax(l)]: the average softmax over {samples} draws l = mean + sqrt(var)*eps "
                "(eps from a fixed counter-based generator: the same draws every call)",
    "probit": "probit approximation softmax(mean / sqrt(1 + pi*var/8))",
}


def docs(kind: str, method: str = DEFAULT_METHOD, samples: int = DEFAULT_SAMPLES) -> str:
    """What the output ``kind`` is, for the generated header."""
    if kind == "probs":
        return "predictive class probabilities, " + _METHOD_DOCS[method].format(samples=samples)
    return {
        "entropy": "predictive entropy in nats of those probabilities, -sum_k p_k log p_k: total uncertainty "
                   "(ambiguous inputs and unfamiliar ones); the score to abstain on",
        "mutual_information": f"mutual information in nats, H[mean_s softmax(l_s)] - mean_s H[softmax(l_s)] over {samples} "
                              "draws of the Gaussian logits: the epistemic part of the entropy (unfamiliar inputs)",
        "logit_var": "mean over classes of the logits' variance: a raw spread, not calibrated; check it on your "
                     "own out-of-distribution data before using it as a score",
        "ood": "mean over classes of the logits' variance (the same as logit_var, kept under its old name)",
        "log_entropy": "natural log of the predictive entropy (entropy above), computed in log space: never 0 or tied "
                       "for confident inputs, where the float32 entropy underflows; rank or threshold inputs by it",
        "log_mutual_information": f"natural log of the mutual information ({samples} draws; mutual_information above), "
                                  "computed in log space: never tied for confident inputs; the lowest float for deterministic logits",
    }[kind]


def _row_max(values, rows, classes, name):
    k = te.reduce_axis((0, classes), name="k")
    return te.compute((rows,), lambda n: te.max(values(n, k), axis=k), name=name)


def _row_sum(values, rows, classes, name):
    k = te.reduce_axis((0, classes), name="k")
    return te.compute((rows,), lambda n: te.sum(values(n, k), axis=k), name=name)


def _probit_scale(var, n, k):
    return f32(1.0) / tirx.sqrt(f32(1.0) + f32(math.pi / 8.0) * var[n, k])


def _closed_form_log_q(mean, var, method):
    """(log q [N, K] as a function (n, k), rows, classes) of the closed forms; p = exp(log q) / sum exp(log q)."""
    rows, classes = (int(d) for d in mean.shape)
    if method == "probit" or var is None:
        # log q_k = M_k r_k - max_j M_j r_j (softmax's shift; r = 1 without variance)
        scaled = mean if var is None else te.compute(mean.shape, lambda n, k: mean[n, k] * _probit_scale(var, n, k), name="probit_scaled")
        peak = _row_max(lambda n, k: scaled[n, k], rows, classes, "row_max")
        return (lambda n, k: scaled[n, k] - peak[n]), rows, classes
    peak = _row_max(lambda n, k: mean[n, k], rows, classes, "row_max")
    j = te.reduce_axis((0, classes), name="j")
    pairwise = te.compute(
        mean.shape, lambda n, k: te.sum(tirx.exp((mean[n, j] - peak[n]) * _probit_scale(var, n, k)), axis=j), name="pairwise_sum")
    return (lambda n, k: (mean[n, k] - peak[n]) * _probit_scale(var, n, k) - tirx.log(pairwise[n, k])), rows, classes


def standard_normal(draw, cls, classes: int):
    """eps[draw, cls], approximately N(0, 1): a sum of the 8 bytes of two lowbias32 hashes of the
    counter 2 (draw K + cls) (+1), centred and scaled (Irwin-Hall: exact mean 0 and variance 1,
    tails end at +-4.9; cheaper than Box-Muller, which needs a log, a sqrt and a cosine)."""

    def u32(value):
        return tirx.const(value, "uint32")

    def lowbias32(x):  # Chris Wellons' 32-bit integer hash
        x = tirx.bitwise_xor(x, tirx.shift_right(x, u32(16))) * u32(0x7FEB352D)
        x = tirx.bitwise_xor(x, tirx.shift_right(x, u32(15))) * u32(0x846CA68B)
        return tirx.bitwise_xor(x, tirx.shift_right(x, u32(16)))

    def byte_sum(x):  # four bytes, two at a time
        pairs = tirx.bitwise_and(x, u32(0x00FF00FF)) + tirx.bitwise_and(tirx.shift_right(x, u32(8)), u32(0x00FF00FF))
        return tirx.bitwise_and(pairs, u32(0xFFFF)) + tirx.shift_right(pairs, u32(16))

    counter = (tirx.Cast("uint32", draw) * u32(classes) + tirx.Cast("uint32", cls)) * u32(2)
    total = byte_sum(lowbias32(counter)) + byte_sum(lowbias32(counter + u32(1)))
    return (tirx.Cast("float32", total) - f32(IRWIN_HALL_MEAN)) * f32(1.0 / IRWIN_HALL_STD)


IRWIN_HALL_MEAN = 8 * 127.5
IRWIN_HALL_STD = math.sqrt(8 * (256.0**2 - 1) / 12.0)


def _sampled(mean, var, samples):
    """Per row and draw s: the drawn logits z(n, s, k), their max and softmax denominator."""
    rows, classes = (int(d) for d in mean.shape)

    def z(n, s, k):
        return mean[n, k] + tirx.sqrt(var[n, k]) * standard_normal(s, k, classes)

    k = te.reduce_axis((0, classes), name="k")
    peak = te.compute((rows, samples), lambda n, s: te.max(z(n, s, k), axis=k), name="draw_max")
    k = te.reduce_axis((0, classes), name="k")
    total = te.compute((rows, samples), lambda n, s: te.sum(tirx.exp(z(n, s, k) - peak[n, s]), axis=k), name="draw_sum")
    s = te.reduce_axis((0, samples), name="s")
    probs = te.compute(
        mean.shape, lambda n, c: te.sum(tirx.exp(z(n, s, c) - peak[n, s]) / total[n, s] * f32(1.0 / samples), axis=s), name="mean_softmax")
    return z, peak, total, probs


def predictive_probs(mean, var, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
    """p [N, K] by ``method`` (module docstring)."""
    if method == "sampling" and var is not None:
        probs = _sampled(mean, var, samples)[3]
        return te.compute(mean.shape, lambda n, c: probs[n, c], name="probs")
    log_q, rows, classes = _closed_form_log_q(mean, var, method)
    total = _row_sum(lambda n, k: tirx.exp(log_q(n, k)), rows, classes, "row_sum")
    return te.compute(mean.shape, lambda n, c: tirx.exp(log_q(n, c)) / total[n], name="probs")


def predictive_log_probs(mean, var, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
    """log p [N, K] of `predictive_probs`, in log space (a log-softmax output): log q_k - log sum_j
    exp(log q_j) for the closed forms (exactly log_softmax(M) without variance); for sampling the
    log-mean-exp over the draws of log softmax(z_s), shifted by its maximum over the draws."""
    if method == "sampling" and var is not None:
        z, peak, total, _ = _sampled(mean, var, samples)

        def log_p(n, s, k):
            return z(n, s, k) - peak[n, s] - tirx.log(total[n, s])

        s = te.reduce_axis((0, samples), name="s")
        top = te.compute(mean.shape, lambda n, k: te.max(log_p(n, s, k), axis=s), name="draw_log_max")
        s = te.reduce_axis((0, samples), name="s")
        spread = te.compute(mean.shape, lambda n, k: te.sum(tirx.exp(log_p(n, s, k) - top[n, k]), axis=s), name="draw_log_sum")
        return te.compute(mean.shape, lambda n, k: top[n, k] + tirx.log(spread[n, k] * f32(1.0 / samples)), name="log_probs")
    log_q, rows, classes = _closed_form_log_q(mean, var, method)
    total = _row_sum(lambda n, k: tirx.exp(log_q(n, k)), rows, classes, "row_sum")
    return te.compute(mean.shape, lambda n, c: log_q(n, c) - tirx.log(total[n]), name="log_probs")


def _entropy_of_row(probs, rows, classes, name="entropy"):
    """-sum_k p_k log p_k of a materialised row (p_k = 0 contributes 0)."""
    weighted = _row_sum(lambda n, k: probs[n, k] * tirx.log(tirx.max(probs[n, k], f32(1e-37))), rows, classes, "p_log_p")
    return te.compute((rows,), lambda n: f32(0.0) - weighted[n], name=name)


def predictive_entropy(mean, var, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
    """H[p] of `predictive_probs`: log Z - sum_k p_k log q_k for the closed forms, from the
    averaged row for sampling."""
    rows, classes = (int(d) for d in mean.shape)
    if method == "sampling" and var is not None:
        return _entropy_of_row(_sampled(mean, var, samples)[3], rows, classes)
    log_q, rows, classes = _closed_form_log_q(mean, var, method)
    total = _row_sum(lambda n, k: tirx.exp(log_q(n, k)), rows, classes, "row_sum")
    weighted = _row_sum(lambda n, k: tirx.exp(log_q(n, k)) * log_q(n, k), rows, classes, "weighted")
    return te.compute((rows,), lambda n: tirx.log(total[n]) - weighted[n] / total[n], name="entropy")


def mutual_information(mean, var, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
    """H[mean_s p_s] - mean_s H[p_s], p_s = softmax(z_s), over the sampling draws; 0 without variance.
    Computed as the mean Kullback-Leibler divergence of the draws from their mean (the same number),
    (1/S) sum_s sum_k p_sk (log p_sk - log pbar_k), log p_sk = z_sk - max z_s - log Z_s: every term is
    computed in log space, so confident inputs (MI ~ 1e-7) keep their order in float32, where the
    difference of two entropies near 0 would be rounding noise."""
    rows, classes = (int(d) for d in mean.shape)
    if var is None:
        return te.compute((rows,), lambda n: f32(0.0), name="mutual_information")
    z, peak, total, probs = _sampled(mean, var, samples)
    s, k = te.reduce_axis((0, samples), name="s"), te.reduce_axis((0, classes), name="k")

    def log_p(n, s, k):
        return z(n, s, k) - peak[n, s] - tirx.log(total[n, s])

    divergence = te.compute((rows,), lambda n: te.sum(
        tirx.exp(log_p(n, s, k)) * (log_p(n, s, k) - tirx.log(tirx.max(probs[n, k], f32(1e-37)))) * f32(1.0 / samples), axis=[s, k]),
        name="mean_divergence")
    return te.compute((rows,), lambda n: tirx.max(divergence[n], f32(0.0)), name="mutual_information")


LOWEST = -3.4028234663852886e38  # log 0 in float32 outputs (the lowest finite float)


def _log1p_small(x):
    """(log(1 + x), log(log(1 + x)) - log x) for x >= 0, accurate for tiny x (series below 0.01)."""
    series = f32(1.0) - x * (f32(0.5) - x * (f32(1.0 / 3.0) - x * f32(0.25)))  # log(1 + x) / x
    small = x < f32(0.01)
    return (tirx.Select(small, x * series, tirx.log(f32(1.0) + x)),
            tirx.Select(small, tirx.log(series), tirx.log(tirx.log(f32(1.0) + x) / tirx.max(x, f32(1e-30)))))


def log_entropy_of_log_weights(log_weight, rows, classes, name="log_entropy"):
    """log H[p], p_k = exp(a_k) / sum_j exp(a_j), from the unnormalised log weights a = ``log_weight(n, k)``,
    without forming p. With t the first class of the largest a, b_k = a_k - a_t <= 0 and
    L = log sum_{k != t} exp(b_k) (log-sum-exp over the other classes, shifted by their maximum):
    -log p_t = log(1 + e^L) = lp, log p_k = b_k - lp, and
    log H = log-sum-exp_k of  log p_k + log(-log p_k)  =  b_k - lp + log(lp - b_k)   (k != t)
                             -lp + log(lp)                                        (k = t),
    log(lp) = L + log(log(1 + e^L) / e^L) (`_log1p_small`), finite when e^L underflows."""
    peak = _row_max(log_weight, rows, classes, "weight_max")
    k = te.reduce_axis((0, classes), name="k")
    top = te.compute((rows,), lambda n: te.min(tirx.Select(log_weight(n, k) >= peak[n], k, classes), axis=k), name="top_class")

    def minor(n, k):  # b_k of the other classes, the top class far below them
        return tirx.Select(k == top[n], f32(-1e30), log_weight(n, k) - peak[n])

    minor_max = _row_max(minor, rows, classes, "minor_max")
    minor_sum = _row_sum(lambda n, k: tirx.exp(minor(n, k) - minor_max[n]), rows, classes, "minor_sum")

    def lp_terms(n):  # (lp, log lp)
        log_rest = minor_max[n] + tirx.log(minor_sum[n])
        lp, log_ratio = _log1p_small(tirx.exp(log_rest))
        return lp, log_rest + log_ratio

    def term(n, k):
        lp, log_lp = lp_terms(n)
        b = log_weight(n, k) - peak[n]
        return tirx.Select(k == top[n], log_lp - lp, b - lp + tirx.log(tirx.max(lp - b, f32(1e-30))))

    term_max = _row_max(term, rows, classes, "term_max")
    term_sum = _row_sum(lambda n, k: tirx.exp(term(n, k) - term_max[n]), rows, classes, "term_sum")
    return te.compute((rows,), lambda n: term_max[n] + tirx.log(term_sum[n]), name=name)


def _log_mean_softmax(mean, var, samples):
    """(log pbar [N, K] as a function (n, k), log p_s (n, s, k)) over the sampling draws, in log space:
    log pbar_k = log mean_s exp(log p_sk), shifted by its maximum over the draws."""
    rows, classes = (int(d) for d in mean.shape)
    z, peak, total, _ = _sampled(mean, var, samples)
    # log Z_s once per draw (a reduction over one element: the row schedule keeps it as a row of S
    # values instead of inlining it into every pass over the S x K draws)
    one = te.reduce_axis((0, 1), name="one")
    log_total = te.compute((rows, samples), lambda n, s: te.sum(tirx.log(total[n, s]), axis=one), name="draw_log_total")

    def log_p(n, s, k):
        return z(n, s, k) - peak[n, s] - log_total[n, s]

    s = te.reduce_axis((0, samples), name="s")
    top = te.compute(mean.shape, lambda n, k: te.max(log_p(n, s, k), axis=s), name="draw_log_max")
    s = te.reduce_axis((0, samples), name="s")
    spread = te.compute(mean.shape, lambda n, k: te.sum(tirx.exp(log_p(n, s, k) - top[n, k]), axis=s), name="draw_log_sum")
    one = te.reduce_axis((0, 1), name="one")  # a row of K values, not a log in every use
    log_mean = te.compute(mean.shape, lambda n, k: te.sum(top[n, k] + tirx.log(spread[n, k] * f32(1.0 / samples)), axis=one), name="log_mean_softmax")
    return (lambda n, k: log_mean[n, k]), log_p


def predictive_log_entropy(mean, var, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
    """log H[p] of `predictive_probs` (`log_entropy_of_log_weights` on log q, or log pbar for sampling)."""
    rows, classes = (int(d) for d in mean.shape)
    if method == "sampling" and var is not None:
        return log_entropy_of_log_weights(_log_mean_softmax(mean, var, samples)[0], rows, classes)
    log_q, rows, classes = _closed_form_log_q(mean, var, method)
    return log_entropy_of_log_weights(log_q, rows, classes)


def _log_phi(d, log_p):
    """log(r log r - r + 1) at r = e^d (>= 0, zero only at d = 0): d^2 (1/2 + d/3 + d^2/8 + ...), the
    series sum_n (n - 1) d^n / n!, for |d| < 1/2 (where 1 + e^d (d - 1) cancels); directly above.
    |d| within float32 rounding of log p_sk and log pbar_k (the top class of a confident row, whose
    true term is second order in the other classes' probabilities) counts as 0: log 0 = LOWEST."""
    series = f32(0.5) + d * (f32(1.0 / 3) + d * (f32(1.0 / 8) + d * (f32(1.0 / 30) + d * (f32(1.0 / 144) + d * (f32(1.0 / 840) + d * f32(1.0 / 5760))))))
    size = tirx.max(d, f32(0.0) - d)  # |d| (the C backend has no fabs)
    rounding = f32(4.0 * 2.0**-23) * (f32(1.0) - log_p)
    # if_then_else: C evaluates one branch (a Select computes both): one log per term unless d^2 underflows
    near = tirx.if_then_else(size > f32(1e-15), tirx.log(size * size * series), f32(2.0) * tirx.log(size) + tirx.log(series))
    return tirx.if_then_else(size <= rounding, f32(LOWEST),
                             tirx.if_then_else(size < f32(0.5), near, tirx.log(tirx.max(f32(1.0) + tirx.exp(d) * (d - f32(1.0)), f32(1e-37)))))


def log_mutual_information(mean, var, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
    """log MI over the sampling draws, in log space. MI = (1/S) sum_s sum_k p_sk log(p_sk / pbar_k)
    = (1/S) sum_{s,k} pbar_k phi(p_sk / pbar_k), phi(r) = r log r - r + 1 >= 0 (the added
    sum_s (pbar_k - p_sk) is 0): every term is >= 0, so
    log MI = log-sum-exp_{s,k} [log pbar_k + log phi(exp(d_sk))] - log S,  d_sk = log p_sk - log pbar_k."""
    rows, classes = (int(d) for d in mean.shape)
    if var is None:
        return te.compute((rows,), lambda n: f32(LOWEST), name="log_mutual_information")
    log_mean, log_p = _log_mean_softmax(mean, var, samples)

    def term(n, s, k):
        return log_mean(n, k) + _log_phi(log_p(n, s, k) - log_mean(n, k), log_p(n, s, k))

    s, k = te.reduce_axis((0, samples), name="s"), te.reduce_axis((0, classes), name="k")
    top = te.compute((rows,), lambda n: te.max(term(n, s, k), axis=[s, k]), name="term_max")
    s, k = te.reduce_axis((0, samples), name="s"), te.reduce_axis((0, classes), name="k")
    # every term log 0 (identical draws): the shift stays finite, the sum 0, the result the lowest float
    total = te.compute((rows,), lambda n: te.sum(tirx.exp(term(n, s, k) - tirx.max(top[n], f32(-1e30))), axis=[s, k]), name="term_sum")
    return te.compute((rows,), lambda n: tirx.max(tirx.max(top[n], f32(-1e30)) + tirx.log(total[n] * f32(1.0 / samples)), f32(LOWEST)),
                      name="log_mutual_information")


def mean_logit_variance(mean, var, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
    """(1/K) sum_k V_k; 0 for deterministic logits."""
    rows, classes = (int(d) for d in mean.shape)
    if var is None:
        return te.compute((rows,), lambda n: f32(0.0), name="logit_var")
    var_sum = _row_sum(lambda n, k: var[n, k], rows, classes, "var_sum")
    return te.compute((rows,), lambda n: var_sum[n] * f32(1.0 / classes), name="logit_var")


COMPUTE = {"probs": predictive_probs, "entropy": predictive_entropy, "mutual_information": mutual_information,
           "logit_var": mean_logit_variance, "ood": mean_logit_variance, "log_probs": predictive_log_probs,
           "log_entropy": predictive_log_entropy, "log_mutual_information": log_mutual_information}
#: what a model output computed by a final softmax / log-softmax holds (`output_function_kernel`)
OUTPUT_FUNCTIONS = {"softmax": "probs", "log_softmax": "log_probs"}


def build_predictive_kernel(output: str, shape, with_var: bool, name: str, method: str = DEFAULT_METHOD,
                            samples: int = DEFAULT_SAMPLES):
    """The PrimFunc (mean[, var]) -> ``output`` for logits of ``shape`` [N, K]."""
    mean = te.placeholder([int(d) for d in shape], "float32", name="logits_mean")
    var = te.placeholder([int(d) for d in shape], "float32", name="logits_var") if with_var else None
    result = COMPUTE[output](mean, var, method, samples)
    func = te.create_prim_func([mean] + ([var] if with_var else []) + [result])
    return _schedule_by_row(func).with_attr("global_symbol", name)


def output_function_kernel(function: str, shape, with_var: bool, name: str, method: str = DEFAULT_METHOD,
                           samples: int = DEFAULT_SAMPLES):
    """The PrimFunc (mean[, var]) -> the probabilities (``softmax``) or their logs (``log_softmax``)
    of logits of ``shape`` [O, K] or [O, K, I], class axis 1: a model output that was a softmax of
    its logits (`OUTPUT_FUNCTIONS`). [O, K, I] (a softmax over a middle axis) is taken as rows
    n = o I + i of K classes, the loops run per (o, i) row."""
    if len(shape) == 2:
        return build_predictive_kernel(OUTPUT_FUNCTIONS[function], shape, with_var, name, method, samples)
    outer, classes, inner = (int(d) for d in shape)
    mean = te.placeholder([outer, classes, inner], "float32", name="logits_mean")
    var = te.placeholder([outer, classes, inner], "float32", name="logits_var") if with_var else None

    def rows(tensor, label):  # [O I, K] view, inlined by the schedule
        return te.compute((outer * inner, classes), lambda n, k: tensor[n // inner, k, n % inner], name=label)

    flat = COMPUTE[OUTPUT_FUNCTIONS[function]](rows(mean, "rows_mean"), None if var is None else rows(var, "rows_var"), method, samples)
    result = te.compute((outer, classes, inner), lambda o, k, i: flat[o * inner + i, k], name="values")
    func = te.create_prim_func([mean] + ([var] if with_var else []) + [result])
    return _schedule_by_row(func).with_attr("global_symbol", name)


def _schedule_by_row(func):
    """Everything under the output's row loop: per row, scalars and rows of K (or S) values. A
    [O, K, I] output runs its loops as (o, i, k): rows (o, i)."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    output = sch.get_output_blocks(root)[0]
    for block in sch.get_child_blocks(root):
        if not sch.get(block).same_as(sch.get(output)) and not any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars):
            sch.compute_inline(block)
    loops = sch.get_loops(output)
    depth = 1
    if len(loops) == 3:
        sch.reorder(loops[0], loops[2], loops[1])
        depth = 2
    row = sch.get_loops(output)[depth - 1]
    producers = [sch.get(block).name_hint for block in sch.get_child_blocks(root)][:-1]
    for name in reversed(producers):
        sch.compute_at(sch.get_sblock(name), row)
    for name in producers:  # initialise each accumulator once per row, outside its loop over k
        block = sch.get_sblock(name)
        if len(sch.get_loops(block)) > depth:  # one class: TVM drops the loop of extent 1
            sch.decompose_reduction(block, sch.get_loops(block)[depth])
    return sch.mod["main"]


# ---- float64 NumPy twins of the on-device generator (tests and `pfpc evaluate` use them) ----

def numpy_standard_normal(samples: int, classes: int) -> np.ndarray:
    """eps [S, K] exactly as `standard_normal` computes them."""
    counter = ((np.arange(samples, dtype=np.uint64)[:, None] * classes + np.arange(classes, dtype=np.uint64)[None, :]) * 2) & 0xFFFFFFFF

    def lowbias32(x):
        x = x & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    def byte_sum(x):
        return sum((x >> shift) & 0xFF for shift in (0, 8, 16, 24))

    total = byte_sum(lowbias32(counter)) + byte_sum(lowbias32(counter + 1))
    return (total.astype(np.float64) - IRWIN_HALL_MEAN) / IRWIN_HALL_STD
