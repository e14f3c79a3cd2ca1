"""CNN families exported from PyTorch (ResNet, MobileNet, VGG, 1-D time-series CNN): with zero
variance the PFP mean is onnxruntime's output; with a posterior the PFP matches the NumPy
reference and, layer by layer, Monte Carlo sampling within stated bounds; every opset from 11
to 21 compiles."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
# the legacy TorchScript exporter announces its deprecation on every export
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

import pfpc.compiler as compiler  # noqa: E402
import reference  # noqa: E402
import torch_models  # noqa: E402
from helpers import assert_close, random_std  # noqa: E402

#: Ops whose outputs are reported layer by layer against Monte Carlo.
LAYER_OPS = ("Relu", "Clip", "LeakyRelu", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm")


def _input(model):
    return np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)


def _stochastic(onnx_model):
    """Weights and biases of Conv/Gemm/MatMul, and batch-norm shifts: the tensors a BNN's
    posterior covers (batch-norm scales and statistics stay deterministic)."""
    initializers = {init.name for init in onnx_model.graph.initializer}
    alias = {node.output[0]: node.input[0] for node in onnx_model.graph.node if node.op_type == "Identity"}
    chosen = set()
    for node in onnx_model.graph.node:
        positions = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (2,)}.get(node.op_type, ())
        for index in positions:
            if index < len(node.input):
                name = alias.get(node.input[index], node.input[index])
                if name in initializers:
                    chosen.add(name)
    return sorted(chosen)


def _posterior(onnx_model, scale=0.2):
    values = {init.name: onnx.numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    return random_std({name: values[name] for name in _stochastic(onnx_model)}, np.random.default_rng(4), scale)


def _with_layer_outputs(onnx_model):
    """The model with every layer output (LAYER_OPS) as an extra graph output, and the name of
    the logits (the input of a final softmax, else the output)."""
    model = onnx.shape_inference.infer_shapes(onnx_model)
    shapes = {v.name: v for v in model.graph.value_info}
    final = model.graph.output[0].name
    producer = {node.output[0]: node for node in model.graph.node}
    logits = producer[final].input[0] if producer[final].op_type in ("Softmax", "LogSoftmax") else final
    names = [node.output[0] for node in model.graph.node if node.op_type in LAYER_OPS and node.output[0] != final]
    for name in names:
        model.graph.output.append(shapes[name])
    return model, names, logits


@pytest.fixture(scope="module", params=sorted(torch_models.MODELS))
def exported(request):
    model = torch_models.build(request.param)
    return request.param, model, torch_models.export(model, 17)


def test_zero_variance_equals_onnxruntime(tmp_path, exported):
    import onnxruntime as ort

    name, model, onnx_model = exported
    x = _input(model)
    out = str(tmp_path / "out")
    compiler.compile(onnx_model, None, out_dir=out)
    result = compiler.run(out, [x])
    (mean, var), = result.outputs
    expected = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    softmax = json.loads(open(f"{out}/pfpc.json").read())["output_softmax"]
    if name == "mobilenet":  # the model ends in log_softmax: its value, the logits' moments beside it
        assert [{k: e[k] for k in ("output", "function", "axis")} for e in softmax] == [{"output": 0, "function": "log_softmax", "axis": 1}]
        var = result.logits[0][1]
    else:
        assert softmax == []
    np.testing.assert_allclose(mean.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.all(var == 0)


# PFP vs Monte Carlo (4000 samples, posterior std 0.2 (|w| + 0.05), the input of `_input`),
# (max |mean error| in MC std, median relative variance error) of the logits, measured:
# resnet (0.023, 14%), mobilenet (0.041, 38%), vgg (0.038, 0.9%), timeseries (0.014, 5.6%).
# The variance error comes from pooling: positions share the conv kernels, so they are
# positively correlated and the PFP (independent Gaussians) under-estimates the variance of
# their average (global average pooling: PFP/MC ~0.1-0.2). The bounds leave room for MC noise;
# a dropped variance term or a wrong operator formula exceeds them.
MC_BOUNDS = {"resnet": (0.1, 0.3), "mobilenet": (0.15, 0.6), "vgg": (0.15, 0.08), "timeseries": (0.1, 0.15)}


def test_posterior_matches_reference_and_monte_carlo(tmp_path, exported):
    name, model, onnx_model = exported
    x = _input(model)
    stds = _posterior(onnx_model)
    layered, layers, logits = _with_layer_outputs(onnx_model)
    out = str(tmp_path / "out")
    compiler.compile(layered, stds, out_dir=out, covariance="none")  # the diagonal PFP of tests/reference.py
    result = compiler.run(out, [x])
    # a softmax output: the reference's moments are its logits' (its value: tests/test_softmax_outputs.py)
    got = {o.name: result.logits.get(index, pair) for index, (o, pair) in enumerate(zip(layered.graph.output, result.outputs))}
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = reference.pfp_onnx(layered, variances, {"x": x})
    for output, (ref_mean, ref_var) in expected.items():
        mean, var = got[output]
        assert_close(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, what=f"{name} {output} mean")
        assert_close(var.reshape(ref_var.shape), ref_var, rtol=1e-4, what=f"{name} {output} var")
    got[logits] = got[layered.graph.output[0].name]  # the final output holds the logit moments
    mc_model, _, _ = _with_layer_outputs(onnx_model)
    if logits not in [o.name for o in mc_model.graph.output]:
        mc_model.graph.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    mc = reference.monte_carlo(mc_model, {k[:-4]: v for k, v in stds.items()}, {"x": x}, 4000, seed=0)
    report = []
    for layer in layers + ([logits] if logits not in layers else []):
        mean, var = (a.reshape(mc[layer][0].shape) for a in got[layer])
        mc_mean, mc_var, _ = mc[layer]
        spread = mc_var > 1e-12
        mean_err = float(np.max(np.abs(mean - mc_mean)[spread] / np.sqrt(mc_var[spread])))
        var_err = float(np.median(np.abs(var - mc_var)[spread] / mc_var[spread]))
        ratio = float(np.median(var[spread] / mc_var[spread]))
        report.append(f"  {layer}: mean error {mean_err:.3f} MC std, median variance error {var_err:.1%} (median PFP/MC {ratio:.2f})")
    print(f"\n{name}: PFP vs Monte Carlo per layer\n" + "\n".join(report))
    mean_bound, var_bound = MC_BOUNDS[name]
    assert mean_err < mean_bound and var_err < var_bound, report[-1]


@pytest.mark.parametrize("opset", [11, 13, 15, 17, 19, 21])
@pytest.mark.parametrize("name", sorted(torch_models.MODELS))
def test_every_opset_compiles(tmp_path, name, opset):
    """Exports at opsets 11..21 compile; MobileNet (the most operator kinds) also runs and matches
    onnxruntime (through its log-softmax) with zero variance."""
    import onnxruntime as ort

    model = torch_models.build(name)
    onnx_model = torch_models.export(model, opset)
    assert onnx_model.opset_import[0].version == opset
    if name != "mobilenet":
        compiler.compile(onnx_model, _posterior(onnx_model))
        return
    out = str(tmp_path / "out")
    compiler.compile(onnx_model, None, out_dir=out)
    x = _input(model)
    (mean, _), = compiler.run_host(out, [x])
    expected = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(mean.astype(np.float64), expected, rtol=1e-4, atol=1e-4)
