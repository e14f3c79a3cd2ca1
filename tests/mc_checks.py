"""Monte Carlo checks shared by the importer tests: the compiled PFP against samples of a training
library's own stochastic forward passes (exact networks within MC standard errors, approximate ones
within bounds on the approximation's error)."""

from __future__ import annotations

import numpy as np

import pfpc.compiler as compiler

#: PFP vs MC on the small CNNs (conv -> ReLU -> flatten -> linear): max |mean error| in MC stds,
#: median relative variance error (measured: at most 0.043 and 0.031).
CNN_BOUNDS = (0.15, 0.15)


def _moments(samples):
    """Sample mean, variance, and the standard errors of both (the latter from the 4th moment)."""
    samples = np.asarray(samples, np.float64)
    count = len(samples)
    mean = samples.mean(0)
    centred = samples - mean
    var = (centred ** 2).sum(0) / (count - 1)
    m4 = (centred ** 4).mean(0)
    return mean, var, np.sqrt(var / count), np.sqrt(np.maximum(m4 - var ** 2, 0) / count)


def check_exact(pfp, samples):
    """The PFP is exact here: means and variances within 5 MC standard errors."""
    mean, var = (np.asarray(a, np.float64).reshape(samples.shape[1:]) for a in pfp)
    mc_mean, mc_var, stderr, var_stderr = _moments(samples)
    print(f"exact: max |mean error| {np.max(np.abs(mean - mc_mean) / stderr):.2f} MC stderr, "
          f"max |var error| {np.max(np.abs(var - mc_var) / var_stderr):.2f} MC stderr ({len(samples)} samples)")
    assert np.all(np.abs(mean - mc_mean) <= 5 * stderr + 1e-6), np.max(np.abs(mean - mc_mean) / stderr)
    assert np.all(np.abs(var - mc_var) <= 5 * var_stderr + 1e-6), np.max(np.abs(var - mc_var) / var_stderr)


def check_approximate(pfp, samples, bounds=CNN_BOUNDS):
    mean, var = (np.asarray(a, np.float64).reshape(samples.shape[1:]) for a in pfp)
    mc_mean, mc_var, _, _ = _moments(samples)
    mean_err = np.max(np.abs(mean - mc_mean) / np.sqrt(mc_var))
    var_err = np.median(np.abs(var - mc_var) / mc_var)
    print(f"approximate: max |mean error| {mean_err:.3f} MC std, median relative variance error {var_err:.3f}")
    assert mean_err < bounds[0] and var_err < bounds[1], (mean_err, var_err)


def compile_pfp(onnx_model, arrays, x, tmp_path, name="out"):
    """The compiled PFP's (mean, variance) on ``x`` (host build)."""
    out = str(tmp_path / name)
    compiler.compile(onnx_model, arrays, out_dir=out, batch=x.shape[0], covariance="none")  # the diagonal PFP
    (mean, var), = compiler.run_host(out, [x])
    return mean, var
