"""The probability methods of the output stage (`pfpc.ops.predictive`: meanfield, sampling,
probit) in the generated C against NumPy implementations written here independently (float64,
rtol 1e-5), and against Monte Carlo over the logit Gaussian (many draws) for what they approximate."""

from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import helper

import pfpc.compiler as compiler
from helpers import make_model
from pfpc.cli import main

OUTPUTS = ("probs", "entropy", "mutual_information", "logit_var")


def _gemm(classes, seed, scale=1.5):
    """y = x w + b with stds that give the logits unequal, sizeable variances."""
    rng = np.random.default_rng(seed)
    inits = {"w": (scale * rng.standard_normal((4, classes))).astype(np.float32), "b": rng.standard_normal(classes).astype(np.float32)}
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], [("x", [6, 4])], ["y"], inits)
    post = {"w.std": (rng.uniform(0.05, 0.8, (4, classes))).astype(np.float32), "b.std": rng.uniform(0.1, 2.0, classes).astype(np.float32)}
    return model, post, rng.standard_normal((6, 4)).astype(np.float32)


def _compiled(tmp_path, classes, seed, method, samples=32):
    model, post, x = _gemm(classes, seed)
    out = str(tmp_path / f"{method}{classes}")
    compiler.compile(model, post, out_dir=out, outputs=OUTPUTS, probs_method=method, logit_samples=samples)
    ((mean, var),), extras = compiler.run_host(out, [x], extras=True)
    return mean.astype(np.float64), var.astype(np.float64), extras, out


def _entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def numpy_meanfield(mean, var):
    """q_k = 1 / sum_j exp(-(M_k - M_j) / sqrt(1 + pi V_k / 8)), p = q / sum q (moderate logits: no shift needed)."""
    r = 1.0 / np.sqrt(1.0 + np.pi * var / 8.0)
    q = 1.0 / np.exp(-(mean[:, :, None] - mean[:, None, :]) * r[:, :, None]).sum(axis=2)
    return q / q.sum(axis=1, keepdims=True)


def numpy_probit(mean, var):
    s = np.exp(mean / np.sqrt(1.0 + np.pi * var / 8.0))
    return s / s.sum(axis=1, keepdims=True)


def device_normals(samples, classes):
    """The device's draws, recomputed from their definition with Python integers: eps[s, k] =
    (sum of the 8 bytes of lowbias32(2c), lowbias32(2c + 1), c = s K + k) - 1020) / sqrt(8 (256^2 - 1) / 12)."""
    def lowbias32(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    eps = np.empty((samples, classes))
    for s in range(samples):
        for k in range(classes):
            c = 2 * (s * classes + k)
            total = sum(lowbias32(c).to_bytes(4, "little")) + sum(lowbias32(c + 1).to_bytes(4, "little"))
            eps[s, k] = (total - 1020.0) / np.sqrt(8 * (256.0**2 - 1) / 12.0)
    return eps


def numpy_sampling(mean, var, eps):
    """(mean_s softmax(M + sqrt(V) eps_s), mean_s H[softmax(...)]) per row."""
    z = mean[None] + np.sqrt(var)[None] * eps[:, None, :]
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    return p.mean(axis=0), _entropy(p).mean(axis=0)


def monte_carlo(mean, var, draws=200_000, seed=0):
    """E[softmax(l)] and the mutual information for l ~ N(mean, diag(var)), NumPy's Gaussian generator."""
    z = mean[None] + np.sqrt(var)[None] * np.random.default_rng(seed).standard_normal((draws,) + mean.shape)
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    probs = p.mean(axis=0)
    return probs, _entropy(probs) - _entropy(p).mean(axis=0)


@pytest.mark.parametrize("classes", [3, 10])
def test_each_method_matches_its_numpy_formula(tmp_path, classes):
    eps = device_normals(32, classes)
    for method in ("meanfield", "sampling", "probit"):
        mean, var, extras, out = _compiled(tmp_path, classes, 10 + classes, method)
        expected = {"meanfield": numpy_meanfield, "probit": numpy_probit}.get(method)
        probs = expected(mean, var) if expected else numpy_sampling(mean, var, eps)[0]
        np.testing.assert_allclose(extras["probs"], probs, rtol=1e-5, atol=1e-7, err_msg=method)
        np.testing.assert_allclose(extras["entropy"], _entropy(probs), rtol=1e-5, atol=1e-6, err_msg=method)
        sampled, expected_entropy = numpy_sampling(mean, var, eps)
        np.testing.assert_allclose(extras["mutual_information"], _entropy(sampled) - expected_entropy, rtol=1e-4, atol=2e-6, err_msg=method)
        np.testing.assert_allclose(extras["logit_var"], var.mean(axis=1), rtol=1e-5)
    header = open(os.path.join(out, "pfp_model.h")).read()
    assert "static inline int pfp_model_decide(float score, float threshold)" in header and "probit approximation" in header


def test_device_draws_are_standard_normal():
    """The generator's marginal: mean 0, variance 1 (exact for the byte sum), and no correlation
    between classes or draws."""
    eps = device_normals(256, 16)
    assert abs(eps.mean()) < 4 / np.sqrt(eps.size) and abs(eps.var() - 1) < 0.05
    corr = np.corrcoef(eps.T)
    assert np.abs(corr - np.eye(16)).max() < 0.25


def test_methods_against_monte_carlo(tmp_path):
    """Over 6 rows x 10 classes with unequal logit variances: the mean-field probabilities and
    on-device sampling (128 draws) stay near E[softmax(l)]; the probit, on the same logits, does not
    (the tolerance can fail). Mutual information from 128 draws near Monte Carlo's."""
    mean, var, meanfield, _ = _compiled(tmp_path, 10, 3, "meanfield", samples=128)
    _, _, sampled, _ = _compiled(tmp_path, 10, 3, "sampling", samples=128)
    reference, mutual_information = monte_carlo(mean, var)
    error = lambda p: np.abs(p - reference).sum(axis=1).max()  # noqa: E731  (total variation x 2, worst row)
    assert error(meanfield["probs"]) < 0.12
    assert error(sampled["probs"]) < 0.12
    assert error(numpy_probit(mean, var)) > 0.12
    np.testing.assert_allclose(sampled["mutual_information"], mutual_information, atol=0.05)


def test_method_options_are_checked(tmp_path, capsys):
    model, post, _ = _gemm(3, 0)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "p.npz", **post)
    code = main([str(path), "--posterior", str(tmp_path / "p.npz"), "-o", str(tmp_path / "a"), "--outputs", "probs", "--logit-samples", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--logit-samples" in err and len(err.splitlines()) == 1 and not (tmp_path / "a").exists()
