"""The float64 prototypes of tests/reference_nongauss.py against Monte Carlo / numerical
integration (benchmarks/nongauss_lenet.py measures them on the seed LeNet-5)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import integrate, stats

import reference_nongauss as NG

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.mark.parametrize("mean,var", [(0.3, 1.0), (-2.5, 0.7), (-6.0, 1.0), (4.0, 2.0), (1.0, 0.0)])
def test_relu_raw_moments_equal_integrals(mean, var):
    got = NG.relu_raw_moments(np.array(mean), np.array(var))
    for k, value in enumerate(got, 1):
        if var == 0:
            expected = max(mean, 0.0) ** k
        else:
            density = stats.norm(mean, np.sqrt(var)).pdf
            expected = integrate.quad(lambda x: x**k * density(x), 0, np.inf, epsabs=1e-14, epsrel=1e-12)[0]
        assert value == pytest.approx(expected, rel=1e-7, abs=1e-14), k


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0, 4.0])
def test_two_point_scale_has_mean_one_and_variance_kappa(kappa):
    (p1, lam1), (p2, lam2) = NG.two_point_scale(np.array(kappa))
    assert p1 + p2 == pytest.approx(1.0)
    assert p1 * lam1 + p2 * lam2 == pytest.approx(1.0)
    assert p1 * lam1**2 + p2 * lam2**2 - 1.0 == pytest.approx(kappa, abs=1e-12)
    assert lam1 >= 0


def test_relu_of_the_scale_mixture_equals_monte_carlo():
    """u sampled from the two-component mixture that `mixture` builds for a kurtosis of 9: the
    ReLU's raw moments of `relu_fourth` are the sample's."""
    rng = np.random.default_rng(0)
    mean, var, fourth = -1.5, 2.0, 9.0 * 4.0
    p, var1, var2 = NG.mixture(np.array(var), np.array(fourth))
    n = 2_000_000
    first = rng.random(n) < p
    u = mean + np.sqrt(np.where(first, var1, var2)) * rng.standard_normal(n)
    assert np.var(u) == pytest.approx(var, rel=0.01)
    assert np.mean((u - u.mean()) ** 4) == pytest.approx(fourth, rel=0.05)
    h = np.maximum(u, 0.0)
    for k, value in enumerate(NG.relu_fourth(np.array(mean), np.array(var), np.array(fourth)), 1):
        sample = h**k
        assert abs(value - sample.mean()) < 4 * sample.std() / np.sqrt(n), k


def test_dense_fourth_equals_monte_carlo():
    """Independent heavy-tailed inputs (ReLU of Gaussians far below the kink) times Gaussian
    weights: mean, variance and fourth central moment of u = W h + b as sampled."""
    rng = np.random.default_rng(1)
    n_in, n_out, n = 6, 3, 400_000
    in_mean, in_std = rng.normal(-1.0, 1.0, n_in), rng.uniform(0.5, 2.0, n_in)
    w_mean, w_var = rng.normal(0, 0.5, (n_out, n_in)), rng.uniform(0.1, 1.0, (n_out, n_in))
    b_mean, b_var = rng.normal(0, 1, n_out), rng.uniform(0.0, 0.5, n_out)
    raw = [r[None] for r in NG.relu_raw_moments(in_mean, in_std**2)]
    mean, var, fourth = NG.dense_fourth(raw, w_mean, w_var, b_mean, b_var)
    h = np.maximum(in_mean + in_std * rng.standard_normal((n, n_in)), 0.0)
    w = w_mean + np.sqrt(w_var) * rng.standard_normal((n, n_out, n_in))
    u = np.einsum("noi,ni->no", w, h) + b_mean + np.sqrt(b_var) * rng.standard_normal((n, n_out))
    centred = u - u.mean(0)
    np.testing.assert_allclose(mean[0], u.mean(0), atol=4 * u.std(0).max() / np.sqrt(n))
    np.testing.assert_allclose(var[0], u.var(0), rtol=0.02)
    np.testing.assert_allclose(fourth[0], (centred**4).mean(0), rtol=0.06)
    assert np.all(fourth[0] / var[0] ** 2 > 3.3)  # heavy-tailed: the Gaussian's 3 would be wrong


def test_feature_scale_variance_equals_monte_carlo():
    """Var(sum_i alpha_i relu(y_i)^2) of the per-channel latent model, sampled."""
    rng = np.random.default_rng(2)
    shape = (2, 3, 2, 2)  # batch, channels, positions
    mean = rng.normal(-0.5, 1.0, shape)
    var = rng.uniform(0.5, 2.0, shape)
    loading = rng.uniform(0.6, 0.95, shape) * np.sqrt(var)
    alpha = rng.uniform(0.1, 1.0, (shape[0], 12))
    got = NG.feature_scale_variance(mean, var, loading, alpha, nodes=12)
    n = 400_000
    z = rng.standard_normal((n, shape[0], shape[1], 1, 1))
    y = mean + loading * z + np.sqrt(var - loading**2) * rng.standard_normal((n,) + shape)
    scale = (alpha * np.maximum(y, 0.0).reshape(n, shape[0], -1) ** 2).sum(-1)
    np.testing.assert_allclose(got, scale.var(0), rtol=0.03)
    shared_dropped = NG.feature_scale_variance(mean, var, np.zeros(shape), alpha, nodes=12)
    assert np.all(shared_dropped < 0.8 * scale.var(0))  # the latents matter: the test can fail


@pytest.mark.slow  # ~20 s: 2 x 2000 onnxruntime runs
@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "seed-checkpoints")), reason=f"{DATA}/seed-checkpoints is absent")
def test_seed_lenet_fashion_shared_scale_recovers_the_variance():
    """The seed LeNet-5 on 8 Fashion-MNIST images, 2000 whole weight draws (onnxruntime, the images
    batched): the diagonal PFP keeps below 0.8 of MC's median logit variance, the shared-scale
    prototype is within [0.8, 1.25]; on MNIST both are, and the prototype's means stay as close."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import covariance as B
    import nongauss_lenet as N
    import reference_covariance as RC

    model, variances = B.seed_model("seed_lenet")
    for kind, diagonal_low in (("fashion", True), ("mnist", False)):
        images = B.mnist(kind, 8)
        names, moments, logits, _ = N.monte_carlo(model, variances, images, 2000, seed=3, oracles={})
        mc_mean, mc_var = logits.astype(np.float64).mean(0), logits.astype(np.float64).var(0, ddof=1)
        diagonal = RC.pfp_covariance(model, variances, {model.graph.input[0].name: images}, "none")["y"]
        mean, var, _ = NG.lenet_scale_mixture(model, variances, images)
        assert 0.8 <= np.median(var / mc_var) <= 1.25, kind
        assert (np.median(diagonal[1] / mc_var) < 0.8) == diagonal_low, kind
        error = lambda m: np.median(np.abs(m - mc_mean) / np.sqrt(mc_var))  # noqa: E731
        assert error(mean) < 0.15, kind
        assert np.mean(np.argmax(mean, 1) == np.argmax(diagonal[0], 1)) >= 0.85, kind
