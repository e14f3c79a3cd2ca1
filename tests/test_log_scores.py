"""The log-space scores of the output stage (`log_entropy`, `log_mutual_information`,
`pfpc.ops.predictive`) in the generated C against float64 NumPy written here, on moderate logits
and on logits whose gaps
(up to ~400) make the float32 entropy and MI exactly 0: the log scores stay finite, match float64
to rtol 1e-5 and keep the float64 order (no ties)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import pfpc.compiler as compiler
from helpers import make_model
from test_predictive_methods import device_normals

OUTPUTS = ("entropy", "mutual_information", "log_entropy", "log_mutual_information")


def _compiled(tmp_path, mean, var, method, samples=32):
    """The identity network y = x + b (b ~ N(0, var)): its logits are N(mean, var) exactly."""
    rows, classes = mean.shape
    model = make_model([helper.make_node("Add", ["x", "b"], ["y"])], [("x", [rows, classes])], ["y"], {"b": np.zeros((1, classes), np.float32)})
    post = {"b.std": np.sqrt(var[:1]).astype(np.float32)}
    out = str(tmp_path / f"{method}{samples}")
    compiler.compile(model, post, out_dir=out, outputs=OUTPUTS, probs_method=method, logit_samples=samples, covariance="none")
    ((m, v),), extras = compiler.run_host(out, [mean.astype(np.float32)], extras=True)
    return m.astype(np.float64), v.astype(np.float64), extras


def _logsumexp(a, axis):
    peak = a.max(axis=axis, keepdims=True)
    return np.squeeze(peak, axis) + np.log(np.exp(a - peak).sum(axis=axis))


def numpy_log_entropy(log_w):
    """log H of p = softmax(log_w), float64: log p from log-sum-exp, -log p_top by log1p, terms summed in log space."""
    log_w = log_w - log_w.max(axis=1, keepdims=True)
    top = log_w.argmax(axis=1)
    others = np.where(np.arange(log_w.shape[1])[None] == top[:, None], -np.inf, log_w)
    lp = np.log1p(np.exp(_logsumexp(others, 1)))  # -log p_top
    log_p = log_w - lp[:, None]
    neg_log_p = np.where(np.arange(log_w.shape[1])[None] == top[:, None], lp[:, None], -log_p)
    return _logsumexp(log_p + np.log(neg_log_p), 1)


def numpy_meanfield_log_q(mean, var):
    r = 1.0 / np.sqrt(1.0 + np.pi * var / 8.0)
    return -_logsumexp(-(mean[:, :, None] - mean[:, None, :]) * r[:, :, None], 2)


def numpy_sampled(mean, var, eps):
    """(log pbar [N, K], log MI [N]) over the draws: MI = (1/S) sum_{s,k} [p log(p / pbar) - p + pbar]
    (each term >= 0; the added terms sum to 0), summed in log space."""
    z = mean[None] + np.sqrt(var)[None] * eps[:, None, :]
    log_p = z - _logsumexp(z, 2)[:, :, None]
    log_pbar = _logsumexp(log_p, 0) - np.log(len(eps))
    d = log_p - log_pbar[None]
    phi = np.where(np.abs(d) < 1e-3, d * d / 2 + d ** 3 / 3 + d ** 4 / 8, np.exp(d) * d - np.expm1(d))  # r log r - r + 1, r = e^d
    with np.errstate(divide="ignore"):
        log_terms = log_pbar[None] + np.log(phi)
    return log_pbar, _logsumexp(np.moveaxis(log_terms, 0, 1).reshape(len(mean), -1), 1) - np.log(len(eps))


def _moments(extreme):
    rng = np.random.default_rng(5 if extreme else 4)
    mean = rng.normal(0, 3, (8, 10))
    if extreme:  # one class far ahead: gaps of 100-400, float32 probabilities of the others underflow
        mean[np.arange(8), rng.integers(0, 10, 8)] += np.linspace(100, 400, 8)
    var = np.repeat(rng.uniform(0.2, 4.0, (1, 10)), 8, axis=0)
    return mean, var


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("method", ["meanfield", "sampling", "probit"])
def test_log_scores_match_float64(tmp_path, method, extreme):
    mean, var = _moments(extreme)
    m, v, extras = _compiled(tmp_path, mean, var, method)
    eps = device_normals(32, 10)
    log_pbar, log_mi = numpy_sampled(m, v, eps)
    if method == "meanfield":
        log_w = numpy_meanfield_log_q(m, v)
    elif method == "probit":
        log_w = m / np.sqrt(1.0 + np.pi * v / 8.0)
    else:
        log_w = log_pbar
    log_h = numpy_log_entropy(log_w)
    assert np.all(np.isfinite(extras["log_entropy"])) and np.all(np.isfinite(extras["log_mutual_information"]))
    np.testing.assert_allclose(extras["log_entropy"], log_h, rtol=1e-5, err_msg=method)
    np.testing.assert_allclose(extras["log_mutual_information"], log_mi, rtol=1e-5, err_msg=method)
    if extreme:  # the float32 scores underflow and tie; the log scores keep float64's order
        assert np.sum(extras["entropy"] == 0) >= 4 and np.sum(extras["mutual_information"] == 0) >= 4
        assert np.array_equal(np.argsort(extras["log_entropy"]), np.argsort(log_h))
        assert np.array_equal(np.argsort(extras["log_mutual_information"]), np.argsort(log_mi))
    else:  # where float32 represents them, exp of the log scores is the entropy and the MI
        np.testing.assert_allclose(np.exp(extras["log_entropy"]), extras["entropy"], rtol=1e-4)
        np.testing.assert_allclose(np.exp(extras["log_mutual_information"]), extras["mutual_information"], rtol=2e-3, atol=1e-6)


def test_log_scores_against_monte_carlo(tmp_path):
    """The sampled log MI with 128 draws vs Monte Carlo over the logit Gaussian (50,000 NumPy draws)."""
    mean, var = _moments(False)
    m, v, extras = _compiled(tmp_path, mean, var, "sampling", samples=128)
    z = m[None] + np.sqrt(v)[None] * np.random.default_rng(0).standard_normal((50_000,) + m.shape)
    log_p = z - _logsumexp(z, 2)[:, :, None]
    p = np.exp(log_p)
    pbar = p.mean(0)
    mi = -(pbar * np.log(pbar)).sum(1) + (p * log_p).sum(2).mean(0)
    np.testing.assert_allclose(extras["log_mutual_information"], np.log(mi), atol=0.25)


def test_host_log_scores():
    """`pfpc.evaluate.metrics.log_entropy` / `log_mutual_information` (what `run.py` and the benchmark
    rank by): exp of them is -sum p log p and H[pbar] - mean H[p_s] on moderate logits; on a row
    whose gap is 1000 (float64 underflow) they stay finite and below the moderate rows."""
    from pfpc.evaluate import metrics

    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, (6, 5))
    p = np.exp(logits - _logsumexp(logits, 1)[:, None])
    np.testing.assert_allclose(np.exp(metrics.log_entropy(logits)), -(p * np.log(p)).sum(1), rtol=1e-12)
    draws = logits[None] + rng.normal(0, 1, (40, 6, 5))
    log_p = draws - _logsumexp(draws, 2)[:, :, None]
    pbar = np.exp(log_p).mean(0)
    mi = -(pbar * np.log(pbar)).sum(1) + (np.exp(log_p) * log_p).sum(2).mean(0)
    np.testing.assert_allclose(np.exp(metrics.log_mutual_information(log_p)), mi, rtol=1e-9)
    extreme = np.array([[1000.0, 0.0, -3.0]])
    assert np.isfinite(metrics.log_entropy(extreme)).all() and metrics.log_entropy(extreme)[0] < metrics.log_entropy(logits).min()
    # H = sum_minor p_k (1 - log p_k) to first order: e^-1000 (1 + 1000) + e^-1003 (1 + 1003)
    assert abs(metrics.log_entropy(extreme)[0] - np.logaddexp(-1000 + np.log(1001), -1003 + np.log(1004))) < 1e-9
