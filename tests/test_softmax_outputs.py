"""Outputs keep their meaning: an output computed by a final Softmax/LogSoftmax returns the
predictive probabilities (their logs) under its own name, its logits' moments beside it
(``<name>_logits_mean/_var``). Checked against onnxruntime and onnx's own test data (zero
variance), a float64 NumPy mean-field of the reference logit moments, and Monte Carlo (the
averaged softmax of sampled weights)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import reference
from helpers import random_std
from pfpc import compiler
from pfpc.cli import main

ONNX_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
#: onnx's own test models that end in a softmax (opset 6, upgraded by the front door)
BACKEND_MODELS = ["test_LogSoftmax", "test_Softmax", "test_Softmin", "test_log_softmax_dim3", "test_log_softmax_lastdim",
                  "test_softmax_functional_dim3", "test_softmax_lastdim"]


def _ort(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def meanfield(mean, var, axis, log=False):
    """float64 mean-field probabilities over ``axis`` (Lu, Ie & Sha 2020), written here from the
    formula: q_k = 1 / sum_j exp(-(M_k - M_j) / sqrt(1 + pi V_k / 8)), p = q / sum q."""
    m, v = np.moveaxis(mean, axis, -1).astype(np.float64), np.moveaxis(var, axis, -1).astype(np.float64)
    r = 1.0 / np.sqrt(1.0 + np.pi * v / 8.0)
    q = 1.0 / np.exp(-(m[..., :, None] - m[..., None, :]) * r[..., :, None]).sum(axis=-1)
    p = q / q.sum(axis=-1, keepdims=True)
    return np.moveaxis(np.log(p) if log else p, -1, axis)


@pytest.mark.parametrize("name", BACKEND_MODELS)
def test_onnx_test_models_ending_in_softmax(tmp_path, name):
    """Zero variance: the output equals onnx's expected output and onnxruntime's (the issue measured
    relative errors of 0.7 to 56 when the logits came back under the output's name)."""
    folder = os.path.join(ONNX_DATA, name)
    if not os.path.isdir(folder):
        pytest.skip(f"onnx's backend test data is not installed ({folder})")
    inputs = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(f"{folder}/test_data_set_0/input_*.pb"))]
    (expected,) = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(f"{folder}/test_data_set_0/output_*.pb"))]
    out = str(tmp_path / "out")
    compiler.compile(os.path.join(folder, "model.onnx"), None, out_dir=out)
    result = compiler.run(out, inputs)
    (value, var), = result.outputs
    assert var is None and np.all(result.logits[0][1] == 0)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(value.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * scale)
    model = onnx.load(os.path.join(folder, "model.onnx"))
    by_ort = _ort(model, {model.graph.input[0].name: inputs[0]})[0]
    np.testing.assert_allclose(value.reshape(by_ort.shape), by_ort, rtol=1e-4, atol=1e-4 * scale)


def _classifier(function, layout):
    """(model, input, logits name): a dense head ([2, 6] -> [2, 4], optionally followed by Identity)
    or a 1x1 convolution with the softmax over its channels ([1, 3, 3, 2] -> [1, 4, 3, 2], axis 1)."""
    rng = np.random.default_rng(11)
    if layout == "conv_axis1":
        inits = {"w": (rng.standard_normal((4, 3, 1, 1)) * 0.8).astype(np.float32), "b": (rng.standard_normal(4) * 0.3).astype(np.float32)}
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["logits"]), helper.make_node(function, ["logits"], ["y"], axis=1)]
        x_shape, y_shape = [1, 3, 3, 2], [1, 4, 3, 2]
    else:
        inits = {"w": (rng.standard_normal((6, 4)) * 0.8).astype(np.float32), "b": (rng.standard_normal(4) * 0.3).astype(np.float32)}
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"]),
                 helper.make_node(function, ["logits"], ["p" if layout == "identity" else "y"], axis=-1)]
        if layout == "identity":
            nodes.append(helper.make_node("Identity", ["p"], ["y"]))
        x_shape, y_shape = [2, 6], [2, 4]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, inits, rng.standard_normal(x_shape).astype(np.float32)


def _logits_model(model):
    return onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["x"], ["logits"])


#: Monte Carlo check of the probabilities: max |p - MC mean of the sampled softmax| over all
#: classes and rows, at posterior std 0.5 (|w| + 0.05). Measured 0.015 (dense heads) and 0.032
#: (the softmax over channels): the mean-field approximation's own error, 6-8x the MC standard
#: error (2-4e-3 at 4000 samples); on these heads the softmax of the logit means misses by as much
#: (0.013, 0.031), so this bounds the approximation, it does not rank it (issue 17's measurements do).
#: Logits in place of probabilities, or the wrong axis, miss by more than 0.1.
MC_TOLERANCE = 0.05


@pytest.mark.parametrize("function", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("layout", ["dense", "identity", "conv_axis1"])
def test_softmax_output_value_and_logits(tmp_path, function, layout):
    model, inits, x = _classifier(function, layout)
    log = function == "LogSoftmax"
    axis = 1 if layout == "conv_axis1" else -1
    # zero variance: the ONNX model's own output
    out = str(tmp_path / "det")
    compiler.compile(model, None, out_dir=out)
    (value, _), = compiler.run(out, [x]).outputs
    expected = _ort(model, {"x": x})[0]
    np.testing.assert_allclose(value.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # a posterior: the logits' moments as the reference has them, the value as their mean-field probabilities
    stds = random_std(inits, np.random.default_rng(5), 0.5)
    out = str(tmp_path / "post")
    compiler.compile(model, stds, out_dir=out)
    result = compiler.run(out, [x])
    (value, var), = result.outputs
    assert var is None
    variances = {k[:-4]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    ref_mean, ref_var = reference.pfp_onnx(_logits_model(model), variances, {"x": x})["logits"]
    logits_mean, logits_var = result.logits[0]
    np.testing.assert_allclose(logits_mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, atol=1e-4 * np.abs(ref_mean).max())
    np.testing.assert_allclose(logits_var.reshape(ref_var.shape), ref_var, rtol=1e-4, atol=1e-4 * np.abs(ref_var).max())
    np.testing.assert_allclose(value.reshape(ref_mean.shape), meanfield(ref_mean, ref_var, axis, log), rtol=1e-4, atol=1e-5)
    # against Monte Carlo: the averaged softmax of sampled weights (for LogSoftmax: of exp of the output)
    sampled = model if not log else _with_exp(model)
    mc_mean, _, stderr = reference.monte_carlo(sampled, {k[:-4]: v for k, v in stds.items()}, {"x": x}, 4000, seed=3)["y" if not log else "exp_y"]
    probs = np.exp(value.astype(np.float64)) if log else value
    error = np.abs(probs.reshape(mc_mean.shape) - mc_mean)
    print(f"{function} {layout}: max |p - MC| {error.max():.4f} (MC stderr max {stderr.max():.1e}); "
          f"softmax of the logit means: {np.abs(_softmax(ref_mean, axis) - mc_mean).max():.4f}")
    assert error.max() < MC_TOLERANCE
    meta = json.loads(open(os.path.join(out, "pfpc.json")).read())
    assert meta["output_buffers"] == [["y", 0, "value"], ["y_logits_mean", 0, "logits_mean"], ["y_logits_var", 0, "logits_var"]]
    header = open(os.path.join(out, "pfp_model.h")).read()
    assert "float* y, float* y_logits_mean, float* y_logits_var" in header
    assert ("the log of the predictive probabilities" if log else "the predictive probabilities") in header


def _softmax(logits, axis):
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _with_exp(model):
    """The model with exp(y) as output exp_y (the probabilities behind a log-softmax output)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.node.append(helper.make_node("Exp", ["y"], ["exp_y"]))
    copy.graph.output.append(helper.make_tensor_value_info("exp_y", TensorProto.FLOAT, None))
    return copy


@pytest.mark.parametrize("function", ["Softmax", "LogSoftmax"])
def test_sampling_build_averages_the_softmax(tmp_path, function):
    """--mode svi: the same signature; the value is the mean of the sampled softmaxes (log of it)."""
    model, inits, x = _classifier(function, "dense")
    stds = random_std(inits, np.random.default_rng(5), 0.5)
    out = str(tmp_path / "svi")
    compiler.compile(model, stds, out_dir=out, mode="svi", samples=2000)
    result = compiler.run(out, [x])
    (value, _), = result.outputs
    header = open(os.path.join(out, "pfp_model.h")).read()
    assert "float* y, float* y_logits_mean, float* y_logits_var" in header
    mc_mean, _, stderr = reference.monte_carlo(model if function == "Softmax" else _with_exp(model),
                                               {k[:-4]: v for k, v in stds.items()}, {"x": x}, 4000, seed=3)["y" if function == "Softmax" else "exp_y"]
    probs = np.exp(value.astype(np.float64)) if function == "LogSoftmax" else value
    # two independent estimates of E[softmax]: 2000 and 4000 samples
    assert np.max(np.abs(probs.reshape(mc_mean.shape) - mc_mean) / (stderr * np.sqrt(1.0 + 4000 / 2000))) < 5
    logits_mc = reference.monte_carlo(_logits_model(model), {k[:-4]: v for k, v in stds.items()}, {"x": x}, 4000, seed=3)["logits"]
    assert np.max(np.abs(result.logits[0][0] - logits_mc[0]) / (logits_mc[2] * np.sqrt(1.5))) < 5


def test_cli_run_verify_and_evaluate_on_a_softmax_model(tmp_path, capsys):
    """`pfpc run` takes the model's own probabilities, `verify` compares them with the averaged
    sampled softmax and the logits with their samples, and evaluation sees the logits once."""
    from pfpc.evaluate.predictors import deterministic_logits, pfp_outputs
    from pfpc.frontends.posterior import load_posterior

    model, inits, x = _classifier("LogSoftmax", "dense")
    path, post = str(tmp_path / "m.onnx"), str(tmp_path / "post.npz")
    onnx.save(model, path)
    np.savez(post, **random_std(inits, np.random.default_rng(5), 0.5))
    np.save(tmp_path / "x.npy", x)
    out = str(tmp_path / "out")
    assert main([path, "--posterior", post, "-o", out]) == 0
    capsys.readouterr()
    assert main(["run", out, "--input", str(tmp_path / "x.npy"), "--json", "--output", str(tmp_path / "y.npz")]) == 0
    report = json.loads(capsys.readouterr().out)
    saved = np.load(tmp_path / "y.npz")
    assert sorted(saved.files) == ["log_softmax", "logits_mean", "logits_var"]
    np.testing.assert_allclose([ex["probabilities"] for ex in report["examples"]], np.exp(saved["log_softmax"]), rtol=1e-6)
    assert "log_softmax" in report["probabilities_from"]
    assert main(["verify", path, "--posterior", post, "--input", str(tmp_path / "x.npy"), "--samples", "3000"]) == 0
    rows = {line.split()[0]: [float(v) for v in line.split()[1:3]] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"y:probabilities", "y:logits"}
    assert rows["y:probabilities"][0] < MC_TOLERANCE and rows["y:logits"][1] < 0.2, rows  # |dp|; logits' mean error in MC std
    # evaluation: the logits of the softmax model are those of the same model without the softmax
    logits_model = _logits_model(model)
    logits_path = str(tmp_path / "logits.onnx")
    onnx.save(logits_model, logits_path)
    posterior = load_posterior(model, post)
    mean, var, probs = pfp_outputs(path, posterior, x)
    mean_l, var_l, probs_l = pfp_outputs(logits_path, load_posterior(logits_model, post), x)
    np.testing.assert_allclose(mean, mean_l, rtol=1e-6)
    np.testing.assert_allclose(probs, probs_l, rtol=1e-6)
    np.testing.assert_allclose(deterministic_logits(model, posterior, x), deterministic_logits(logits_model, posterior, x), rtol=1e-6)
