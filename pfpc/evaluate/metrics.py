"""Metrics of predictive distributions over K classes, and the predictive summaries they need.

Probabilities are [N, K] rows that sum to one; entropies are in nats. scikit-learn computes
NLL (``log_loss``), the multi-class Brier score (``brier_score_loss``: mean over examples of
sum_k (p_k - y_k)^2) and AUROC (``roc_auc_score``); ECE has no scikit-learn function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15


def _rows(probs) -> np.ndarray:
    probs = np.asarray(probs, np.float64)
    return probs / probs.sum(axis=1, keepdims=True)  # float32 rows sum to 1 only within ~1e-7


def accuracy(probs, labels) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def nll(probs, labels, log_probs=None) -> float:
    """Mean negative log-likelihood of the labels (natural log). From ``log_probs`` (computed in
    log space, e.g. `log_softmax`, `meanfield_log_probs`) when given: a probability that underflows
    keeps its true log; else from the rows of ``probs`` with no floor but float64's smallest
    positive number (a float32 probability of exactly 0 says only that its log is below -104)."""
    labels = np.asarray(labels)
    if log_probs is not None:
        log_probs = np.asarray(log_probs, np.float64)
        return float(-np.mean(log_probs[np.arange(len(labels)), labels]))
    probs = _rows(probs)
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], np.finfo(np.float64).tiny))))


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - [y = k])^2, in [0, 2]."""
    from sklearn.metrics import brier_score_loss

    probs = _rows(probs)
    return float(brier_score_loss(labels, probs, labels=np.arange(probs.shape[1])))


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (Guo et al. 2017):
    sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|, confidence = max_k p_k, bin b
    holding confidences in ((b - 1) / bins, b / bins] (the first bin also holds 0)."""
    _, acc, conf, count = reliability(probs, labels, bins)
    filled = count > 0
    return float(np.sum(count[filled] * np.abs(acc[filled] - conf[filled])) / np.sum(count))


def reliability(probs, labels, bins: int = ECE_BINS):
    """Per bin (as in `ece`): (bin centres, accuracy, mean confidence, count); NaN for empty bins."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(index, weights=correct, minlength=bins) / count
        conf = np.bincount(index, weights=confidence, minlength=bins) / count
    return (np.arange(bins) + 0.5) / bins, acc, conf, count


def entropy(probs) -> np.ndarray:
    """H[p] = -sum_k p_k log p_k per row (0 log 0 = 0)."""
    probs = np.asarray(probs, np.float64)
    return -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=-1)


def _logsumexp(a, axis):
    peak = np.max(a, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(peak, axis) + np.log(np.exp(a - peak).sum(axis=axis))


def log_entropy(log_probs) -> np.ndarray:
    """log H[p] per row from log p (any shift), in float64 log space: the ranking of confident
    inputs, whose entropy -sum p log p is lost to rounding (p_top rounds to 1 when the other
    classes' mass is below 1e-16: float64's own ties). With t the top class and L the log of the
    others' mass relative to it, -log p_t = log1p(e^L) and log H = log-sum-exp of
    log p_k + log(-log p_k) (the same formula as the on-device ``log_entropy``)."""
    a = np.asarray(log_probs, np.float64)
    a = a - a.max(axis=-1, keepdims=True)
    top = a.argmax(axis=-1)
    is_top = np.arange(a.shape[-1]) == top[..., None]
    rest = _logsumexp(np.where(is_top, -np.inf, a), -1)
    neg_log_top = np.log1p(np.exp(rest))
    log_neg_log_top = np.where(rest < -30, rest - np.exp(rest) / 2, np.log(np.maximum(neg_log_top, 1e-300)))
    terms = np.where(is_top, log_neg_log_top[..., None] - neg_log_top[..., None],
                     a - neg_log_top[..., None] + np.log(np.maximum(neg_log_top[..., None] - a, 1e-300)))
    return _logsumexp(terms, -1)


def log_mutual_information(log_p_draws, axis=0) -> np.ndarray:
    """log MI over draws (``axis``) of per-draw log probabilities [.., K], float64 log space:
    MI = mean_s sum_k pbar_k phi(p_sk / pbar_k), phi(r) = r log r - r + 1 >= 0 (no difference of two
    entropies, which float64 rounding swamps on confident inputs)."""
    log_p = np.moveaxis(np.asarray(log_p_draws, np.float64), axis, 0)
    log_pbar = _logsumexp(log_p, 0) - np.log(len(log_p))
    d = log_p - log_pbar[None]
    phi = np.where(np.abs(d) < 1e-3, d * d / 2 + d ** 3 / 3 + d ** 4 / 8, np.exp(d) * d - np.expm1(d))
    with np.errstate(divide="ignore"):
        terms = log_pbar[None] + np.log(np.maximum(phi, 0.0))
    return _logsumexp(np.moveaxis(terms, 0, -2).reshape(terms.shape[1:-1] + (-1,)), -1) - np.log(len(log_p))


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve separating out-of-distribution (positive) from in-distribution
    inputs by ``score`` (higher = more likely OOD); 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)])
    truth = np.concatenate([np.zeros(len(scores_in)), np.ones(len(scores_out))])
    return float(roc_auc_score(truth, scores))


#: the shares of in-distribution inputs to accept in the threshold table
COVERAGES = (0.99, 0.95, 0.90)
RISK_COVERAGES = (1.0, 0.99, 0.95, 0.90, 0.80, 0.70, 0.50)


def coverage_threshold(scores_in, coverage: float) -> float:
    """The score at or below which ``coverage`` of the in-distribution inputs fall (accept when
    score <= threshold): the ceil(coverage N)-th smallest score."""
    ordered = np.sort(np.asarray(scores_in, np.float64))
    return float(ordered[max(int(np.ceil(coverage * len(ordered))), 1) - 1])


def risk_coverage(probs, labels, scores, coverages=RISK_COVERAGES) -> list[tuple[float, float]]:
    """[(coverage, risk)]: keep the ceil(c N) inputs of lowest score, risk = their error rate
    (selective classification, Geifman & El-Yaniv 2017; ties broken by input order)."""
    wrong = (np.argmax(probs, axis=1) != np.asarray(labels)).astype(np.float64)
    order = np.argsort(np.asarray(scores, np.float64), kind="stable")
    rows = []
    for coverage in coverages:
        kept = max(int(np.ceil(coverage * len(order))), 1)
        rows.append((float(coverage), float(wrong[order[:kept]].mean())))
    return rows


def softmax(logits, axis=-1) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def log_softmax(logits, axis=-1) -> np.ndarray:
    """log softmax in float64: l - max l - log sum exp(l - max l)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.expand_dims(_logsumexp(shifted, axis), axis)


def meanfield_log_probs(mean, var) -> np.ndarray:
    """log p of the mean-field approximation of E[softmax(l)] (Lu, Ie & Sha 2020), the on-device
    default (`pfpc.ops.predictive`): log q_k = -log sum_j exp(-(M_k - M_j) / sqrt(1 + pi V_k / 8)),
    p = q / sum q; in log space (log-sum-exp), [N, K] at a time with a [N, K, K] intermediate."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    exponent = -(mean[:, :, None] - mean[:, None, :]) / np.sqrt(1.0 + np.pi / 8.0 * var)[:, :, None]
    return log_softmax(-_logsumexp(exponent, 2))


def probit_log_probs(mean, var) -> np.ndarray:
    return log_softmax(np.asarray(mean, np.float64) / np.sqrt(1.0 + np.pi / 8.0 * np.asarray(var, np.float64)))


def sampled_log_probs(mean, var, eps) -> tuple[np.ndarray, np.ndarray]:
    """(log mean_s softmax(M + sqrt(V) eps_s), mean_s H[softmax(...)]) for fixed draws ``eps`` [S, K]
    (the device's, `pfpc.ops.predictive.numpy_standard_normal`), in log space."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    log_p = log_softmax(mean[None] + np.sqrt(np.maximum(var, 0.0))[None] * np.asarray(eps, np.float64)[:, None, :])
    peak = log_p.max(axis=0)
    log_mean = peak + np.log(np.exp(log_p - peak).mean(axis=0))
    return log_mean, -(np.exp(log_p) * log_p).sum(axis=-1).mean(axis=0)


def probit_probs(mean, var) -> np.ndarray:
    """Probit approximation of E[softmax(l)] for l ~ N(mean, diag(var)):
    softmax(mean / sqrt(1 + pi var / 8))."""
    return softmax(np.asarray(mean, np.float64) / np.sqrt(1.0 + np.pi / 8.0 * np.asarray(var, np.float64)))


@dataclass
class Prediction:
    """What a predictor says about N inputs. ``expected_entropy`` E_w H[p(y|x,w)],
    ``mutual_information`` H[p] - E_w H[p(y|x,w)] and ``logit_var`` (mean over classes of the
    logits' variance) are None for a predictor without weight uncertainty. ``gaussian_probs``:
    mean softmax over draws of independent Gaussian logits with the predictor's logit means and
    variances (a diagnostic: it separates the Gaussian-logit assumption and the probit
    approximation from errors in the moments)."""

    probs: np.ndarray
    entropy: np.ndarray
    expected_entropy: np.ndarray | None = None
    mutual_information: np.ndarray | None = None
    logit_var: np.ndarray | None = None
    gaussian_probs: np.ndarray | None = None
    #: log p in float64 computed in log space (NLL without underflow), when the predictor gives it
    log_probs: np.ndarray | None = None
    #: log H[p] and log MI in float64 log space (`log_entropy`, `log_mutual_information`): the
    #: order of confident inputs, whose float64 entropy and MI round to ties (0 or equal values)
    log_entropy: np.ndarray | None = None
    log_mutual_information: np.ndarray | None = None

    def score(self, name):
        return {"entropy": self.entropy, "mutual_information": self.mutual_information, "logit_var": self.logit_var}[name]

    def ranking(self, name):
        """The score to rank and threshold inputs by: its log-space twin when there is one (the same
        order as the exact score, without rounding's ties), else the score itself."""
        log_space = {"entropy": self.log_entropy, "mutual_information": self.log_mutual_information}.get(name)
        # log 0 (no uncertainty at all) as the lowest float: scikit-learn takes no infinities
        return self.score(name) if log_space is None else np.maximum(log_space, -np.finfo(np.float64).max)

    def subset(self, rows):
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return Prediction(self.probs[rows], self.entropy[rows], pick(self.expected_entropy), pick(self.mutual_information),
                          pick(self.logit_var), pick(self.gaussian_probs), pick(self.log_probs), pick(self.log_entropy),
                          pick(self.log_mutual_information))


def from_logits(logits) -> Prediction:
    """A deterministic network: p = softmax(logits)."""
    probs = softmax(logits)
    log_probs = log_softmax(logits)
    return Prediction(probs, entropy(probs), log_probs=log_probs, log_entropy=log_entropy(log_probs))


def gaussian_logits(mean, var, samples: int = 1000, seed: int = 0, chunk: int = 256, log_mi: bool = False):
    """Draws l_s ~ N(mean, diag(var)) per row: (mean_s softmax(l_s), mean_s H[softmax(l_s)]), and with
    ``log_mi`` the draws' log MI in log space (`log_mutual_information`) third."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    rng = np.random.default_rng(seed)
    probs, expected, log_information = np.empty(mean.shape), np.empty(len(mean)), np.empty(len(mean))
    std = np.sqrt(np.maximum(var, 0.0))
    for start in range(0, len(mean), chunk):
        rows = slice(start, start + chunk)
        logits = mean[rows] + std[rows] * rng.standard_normal((samples,) + mean[rows].shape)
        per_sample = softmax(logits)
        probs[rows] = per_sample.mean(axis=0)
        expected[rows] = entropy(per_sample).mean(axis=0)
        if log_mi:
            log_information[rows] = log_mutual_information(log_softmax(logits))
    return (probs, expected, log_information) if log_mi else (probs, expected)


def from_logit_samples(samples, gaussian_samples: int = 1000, seed: int = 0) -> Prediction:
    """Monte Carlo over S weight samples, ``samples`` [S, N, K]: p = mean_s softmax(l_s),
    expected entropy mean_s H[softmax(l_s)], MI = H[p] - expected entropy, logit variance the
    unbiased sample variance averaged over classes; ``gaussian_probs`` from the logits' sample
    means and variances (`gaussian_logits`)."""
    samples = np.asarray(samples, np.float64)
    log_per_sample = log_softmax(samples)
    peak = log_per_sample.max(axis=0)
    log_probs = peak + np.log(np.exp(log_per_sample - peak).mean(axis=0))
    per_sample = softmax(samples)
    probs = per_sample.mean(axis=0)
    predictive = entropy(probs)
    expected = entropy(per_sample).mean(axis=0)
    var = samples.var(axis=0, ddof=1)
    gaussian, _ = gaussian_logits(samples.mean(axis=0), var, gaussian_samples, seed)
    return Prediction(probs, predictive, expected, np.maximum(predictive - expected, 0.0), var.mean(axis=-1), gaussian, log_probs,
                      log_entropy(log_probs), log_mutual_information(log_per_sample))


def from_logit_moments(mean, var, samples: int = 1000, seed: int = 0, probs=None, method: str = "probit") -> Prediction:
    """The PFP's Gaussian logits N(mean, diag(var)): p by ``method`` (probit `probit_probs`, or
    meanfield `meanfield_log_probs`; ``probs`` as the generated C computed them if given; the log
    probabilities for the NLL always in float64 log space), predictive entropy H[p]; expected entropy and
    MI from ``samples`` draws of the logits' Gaussian (`gaussian_logits`, cheap, on the host):
    MI = H[mean_s softmax(l_s)] - mean_s H[softmax(l_s)] (both terms from the same draws, so
    MI >= 0); logit variance = mean over classes of var. Log entropy from the float64 log
    probabilities, log MI from the same draws, both in log space (the scores to rank by)."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    log_probs = (meanfield_log_probs if method == "meanfield" else probit_log_probs)(mean, var)
    if probs is None:
        probs = probit_probs(mean, var) if method == "probit" else np.exp(log_probs)
    probs = _rows(probs)
    gaussian, expected, log_information = gaussian_logits(mean, var, samples, seed, log_mi=True)
    mutual_information = np.maximum(entropy(gaussian) - expected, 0.0)
    return Prediction(probs, entropy(probs), expected, mutual_information, var.mean(axis=-1), gaussian, log_probs,
                      log_entropy(log_probs), log_information)
