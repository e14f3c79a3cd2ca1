"""benchmarks/predictive_closed_forms.py's converged E[softmax(l)] (`tilted_reference`, the number the
session-9 study of docs/seed_mnist.md rests on) against independent references: one-dimensional
quadrature for two classes (exact in the deep tail, where plain draws see nothing) and plain Monte Carlo for three."""

from __future__ import annotations

import os
import sys

import numpy as np
from scipy import integrate
from scipy.special import expit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from predictive_closed_forms import tilted_reference  # noqa: E402


def _sigmoid_expectation(mu, var):
    """(E[sigmoid(d)], E[sigmoid(d) log sigmoid(d)]) for d ~ N(mu, var), by quadrature in the standard normal."""
    s = np.sqrt(var)

    def density(x):
        return np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)

    def log_sig(x):
        return -np.logaddexp(0.0, -(mu + s * x))

    breaks = sorted({-mu / s, (-mu - var) / s if mu < 0 else 0.0, 0.0})
    mean = integrate.quad(lambda x: expit(mu + s * x) * density(x), -40, 40, points=breaks, limit=400, epsabs=0, epsrel=1e-10)[0]
    plogp = integrate.quad(lambda x: expit(mu + s * x) * log_sig(x) * density(x), -40, 40, points=breaks, limit=400,
                           epsabs=0, epsrel=1e-10)[0]
    return mean, plogp


def test_two_classes_match_quadrature_in_the_tail():
    # gaps of 8 to 60 nats, std 1 to 20: minor-class probabilities from 0.07 down to 7e-23
    mean = np.array([[0.0, -8.0], [0.0, -30.0], [0.0, -60.0], [0.0, -30.0], [0.0, -60.0]])
    var = np.array([[0.5, 0.5], [2.0, 2.0], [8.0, 10.0], [200.0, 200.0], [50.0, 150.0]])
    log_p, log_mi = tilted_reference(mean, var, 4000, seed=3)
    for row in range(len(mean)):
        gap = mean[row, 1] - mean[row, 0]
        p_minor, plogp_minor = _sigmoid_expectation(gap, var[row].sum())
        p_top, plogp_top = _sigmoid_expectation(-gap, var[row].sum())
        assert abs(log_p[row, 1] - np.log(p_minor)) < 0.05, (row, log_p[row, 1], np.log(p_minor))
        # MI = sum_k E[p_k log p_k] - pbar_k log pbar_k (the top class's term: second order in p_minor in the tail)
        mi = plogp_minor - p_minor * np.log(p_minor) + max(plogp_top - p_top * np.log(p_top), 0.0)
        assert abs(log_mi[row] - np.log(mi)) < 0.1, (row, log_mi[row], np.log(mi))


def test_three_classes_match_plain_sampling_where_it_converges():
    mean = np.array([[3.0, 0.0, -4.0], [10.0, 2.0, 0.0]])
    var = np.array([[1.0, 2.0, 0.5], [4.0, 3.0, 6.0]])
    log_p, _ = tilted_reference(mean, var, 4000, seed=4)
    z = mean[:, None, :] + np.sqrt(var)[:, None, :] * np.random.default_rng(9).standard_normal((len(mean), 400_000, 3))
    plain = np.exp(z - z.max(2, keepdims=True))
    plain = (plain / plain.sum(2, keepdims=True)).mean(1)
    np.testing.assert_allclose(np.exp(log_p), plain, rtol=0.05, atol=1e-4)
