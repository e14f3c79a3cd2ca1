"""Predictive outputs in the generated C (``--outputs probs,entropy,ood``) against NumPy
implementations of the same formulas, written here independently (float64). The probit method
here; the default (mean-field) and on-device sampling in test_predictive_methods.py."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from onnx import helper

import pfpc.compiler as compiler
from helpers import make_model, random_std
from pfpc.cli import main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
MLP, MLP_POST = os.path.join(EXAMPLES, "mlp", "model.onnx"), os.path.join(EXAMPLES, "mlp", "post.npz")


def numpy_predictive(mean, var):
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    scaled = mean / np.sqrt(1.0 + np.pi * var / 8.0)
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    entropy = -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-300)), 0.0), axis=1)
    return probs, entropy, var.mean(axis=1)


def _check(results, extras, atol_scale=1e-7):
    (mean, var), = results
    probs, entropy, ood = numpy_predictive(mean, var)
    # rtol 1e-5 on every value; absolute slack only at the float32 resolution of values near 0
    np.testing.assert_allclose(extras["probs"], probs, rtol=1e-5, atol=atol_scale)
    np.testing.assert_allclose(extras["entropy"], entropy, rtol=1e-5, atol=atol_scale)
    np.testing.assert_allclose(extras["ood"], ood, rtol=1e-5)


def test_mlp_predictive_outputs_match_numpy(tmp_path):
    x = np.load(os.path.join(EXAMPLES, "mlp", "sample.npy"))
    out = str(tmp_path / "out")
    compiler.compile(MLP, MLP_POST, out_dir=out, batch=2, outputs=("probs", "entropy", "ood"), probs_method="probit")
    results, extras = compiler.run_host(out, [x], extras=True)
    assert extras["probs"].shape == (4, 10) and extras["entropy"].shape == (4,) and extras["ood"].shape == (4,)
    _check(results, extras)
    header = open(os.path.join(out, "pfp_model.h")).read()
    assert "float* logits_mean, float* logits_var, float* logits_probs, float* logits_entropy, float* logits_ood, void* arena" in header
    assert "probit approximation" in header and "PFP_MODEL_LOGITS_PROBS_SIZE 20" in header
    for flags in ("-std=c99 -O2 -Wall -Wextra -Werror -pedantic",):
        result = subprocess.run(["gcc", *flags.split(), "-c", "pfp_model.c", "-o", "/dev/null"], cwd=out, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[:2000]


def test_extreme_logits_stay_finite(tmp_path):
    """Logits of +-hundreds with tiny and huge variances: the max-shifted softmax neither
    overflows nor takes log(0)."""
    rng = np.random.default_rng(0)
    inits = {"w": (60 * rng.standard_normal((3, 5))).astype(np.float32), "b": np.zeros(5, np.float32)}
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], [("x", [4, 3])], ["y"], inits)
    post = {"w.std": np.full((3, 5), 1e-3, np.float32), "b.std": np.array([1e-4, 1e-4, 30.0, 1e-4, 1e-4], np.float32)}
    x = rng.standard_normal((4, 3)).astype(np.float32) * 3
    out = str(tmp_path / "out")
    compiler.compile(model, post, out_dir=out, outputs=("probs", "entropy", "ood"), probs_method="probit")
    results, extras = compiler.run_host(out, [x], extras=True)
    assert all(np.all(np.isfinite(v)) for v in extras.values())
    _check(results, extras, atol_scale=1e-6)


def test_deterministic_logits_give_softmax_and_zero_ood(tmp_path):
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((6, 4)).astype(np.float32)}
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [3, 6])], ["y"], inits)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    out = str(tmp_path / "out")
    compiler.compile(model, None, out_dir=out, outputs=("ood", "probs"))
    (( mean, var),), extras = compiler.run_host(out, [x], extras=True)
    assert list(extras) == ["probs", "ood"]  # canonical order whatever the request's
    assert np.all(var == 0) and np.all(extras["ood"] == 0)
    logits = x.astype(np.float64) @ inits["w"].astype(np.float64)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(extras["probs"], softmax / softmax.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_one_output_only_and_signature_unchanged_without_outputs(tmp_path):
    rng = np.random.default_rng(2)
    inits = {"w": rng.standard_normal((6, 4)).astype(np.float32)}
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 6])], ["y"], inits)
    stds = random_std(inits, rng)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    plain, ood_only = str(tmp_path / "plain"), str(tmp_path / "ood")
    compiler.compile(model, stds, out_dir=plain)
    assert "int pfp_model_run(const float* x, float* y_mean, float* y_var, void* arena);" in open(os.path.join(plain, "pfp_model.h")).read()
    compiler.compile(model, stds, out_dir=ood_only, outputs=["ood"])
    assert "int pfp_model_run(const float* x, float* y_mean, float* y_var, float* y_ood, void* arena);" in open(os.path.join(ood_only, "pfp_model.h")).read()
    results, extras = compiler.run_host(ood_only, [x], extras=True)
    np.testing.assert_allclose(extras["ood"], results[0][1].astype(np.float64).mean(1), rtol=1e-5)


def test_bad_outputs_requests_are_one_line_errors(tmp_path, capsys):
    code = main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(tmp_path / "a"), "--outputs", "probs,confidence"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "confidence" in err and len(err.splitlines()) == 1
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 5, 3])], ["y"], inits)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    code = main([str(path), "-o", str(tmp_path / "b"), "--outputs", "entropy", "--deterministic"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "[N, classes]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_run_cli_saves_the_predictive_outputs(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([MLP, "--posterior", MLP_POST, "--batch", "4", "-o", out, "--outputs", "probs,entropy,ood"]) == 0
    assert main(["run", out, "--input", os.path.join(EXAMPLES, "mlp", "sample.npy"), "--output", str(tmp_path / "y.npz")]) == 0
    saved = np.load(tmp_path / "y.npz")
    assert sorted(saved.files) == ["entropy", "mean", "ood", "probs", "var"]
    np.testing.assert_allclose(saved["probs"].sum(1), 1.0, rtol=1e-5)
