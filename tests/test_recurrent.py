"""ONNX LSTM and GRU (pfpc/frontends/unroll_recurrent.py): unrolled over the static sequence
length into operators pfpc propagates. Zero variance against onnxruntime (onnx's reference
evaluator for layout 1, which onnxruntime does not run), a random posterior on W, R and B against
the float64 NumPy PFP of the cell (tests/reference.py: `lstm`, `gru`), the refusals, and the
approximation error against Monte Carlo (weights sampled, onnxruntime running the original
node) as the sequence grows."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import pfpc.compiler as compiler
import reference
from helpers import assert_close, compile_and_run, make_model, random_std
from pfpc.errors import PfpcError

HIDDEN, FEATURES, BATCH = 5, 3, 1


def recurrent_model(rng, op, steps=4, direction="forward", layout=0, clip=None, linear_before_reset=None, initial=False,
                    bias=True, hidden=HIDDEN, batch=BATCH, scale=0.5, extra=None):
    """One LSTM/GRU node with random weights: (model, initializers, inputs)."""
    directions = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    inits = {"W": rng.normal(0, scale, (directions, gates * hidden, FEATURES)).astype(np.float32),
             "R": rng.normal(0, scale, (directions, gates * hidden, hidden)).astype(np.float32)}
    if bias:
        inits["B"] = rng.normal(0, 0.3, (directions, 2 * gates * hidden)).astype(np.float32)
    attrs = dict(hidden_size=hidden, direction=direction, **(extra or {}))
    if layout:
        attrs["layout"] = 1
    if clip is not None:
        attrs["clip"] = clip
    if linear_before_reset is not None:
        attrs["linear_before_reset"] = linear_before_reset
    x_shape = [steps, batch, FEATURES] if layout == 0 else [batch, steps, FEATURES]
    state_shape = [directions, batch, hidden] if layout == 0 else [batch, directions, hidden]
    inputs = {"x": rng.normal(0, 1, x_shape).astype(np.float32)}
    names = ["x", "W", "R", "B" if bias else "", "", "h0" if initial else ""]
    if initial:
        inputs["h0"] = rng.normal(0, 1, state_shape).astype(np.float32)
    outputs = ["y", "y_h"]
    if op == "LSTM":
        names.append("c0" if initial else "")
        outputs.append("y_c")
        if initial:
            inputs["c0"] = rng.normal(0, 1, state_shape).astype(np.float32)
    while names and not names[-1]:
        names.pop()
    model = make_model([helper.make_node(op, names, outputs, name="cell", **attrs)],
                       [(name, list(value.shape)) for name, value in inputs.items()], outputs, inits, opset=14 if layout else 13)
    return model, inits, inputs


VARIANTS = {
    "lstm_reverse_clip": ("LSTM", dict(direction="reverse", clip=0.7)),
    "lstm_bidirectional_initial_states": ("LSTM", dict(direction="bidirectional", initial=True)),
    "lstm_layout1_initial_states": ("LSTM", dict(layout=1, initial=True)),
    "lstm_no_bias_batch2": ("LSTM", dict(bias=False, batch=2)),
    "gru_reverse_clip": ("GRU", dict(direction="reverse", clip=0.7)),
    "gru_bidirectional_initial_state": ("GRU", dict(direction="bidirectional", initial=True)),
    "gru_layout1_linear_before_reset": ("GRU", dict(layout=1, initial=True, linear_before_reset=1)),
    "gru_linear_before_reset_bidirectional_no_bias": ("GRU", dict(linear_before_reset=1, direction="bidirectional", bias=False)),
}


def _onnx_outputs(model, inputs):
    """What the ONNX model computes: onnxruntime, or onnx's reference evaluator for layout 1."""
    if any(a.name == "layout" and a.i == 1 for a in model.graph.node[0].attribute):
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, inputs)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_variance_equals_onnx(variant, tmp_path):
    op, kwargs = VARIANTS[variant]
    rng = np.random.default_rng(1)
    model, _, inputs = recurrent_model(rng, op, **kwargs)
    got = compile_and_run(model, {}, list(inputs.values()), tmp_path)
    expected = _onnx_outputs(model, inputs)
    assert len(got) == len(expected)
    for (mean, var), want in zip(got, expected):
        np.testing.assert_allclose(mean.reshape(want.shape), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert np.all(var == 0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_posterior_equals_reference(variant, tmp_path):
    op, kwargs = VARIANTS[variant]
    rng = np.random.default_rng(2)
    model, inits, inputs = recurrent_model(rng, op, **kwargs)
    stds = random_std(inits, rng)
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = reference.pfp_onnx(model, variances, inputs)
    got = compile_and_run(model, stds, list(inputs.values()), tmp_path)
    for (mean, var), (name, (ref_mean, ref_var)) in zip(got, expected.items()):
        assert np.all(ref_var > 0)
        assert_close(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, what=f"{name} mean")
        assert_close(var.reshape(ref_var.shape), ref_var, rtol=1e-4, what=f"{name} var")


def test_the_reference_cell_is_onnx_with_zero_variance():
    """The NumPy PFP of the cell (tests/reference.py) reduces to onnxruntime's LSTM/GRU."""
    rng = np.random.default_rng(3)
    for op, kwargs in VARIANTS.values():
        model, _, inputs = recurrent_model(rng, op, **kwargs)
        expected = _onnx_outputs(model, inputs)
        for (mean, var), want in zip(reference.pfp_onnx(model, {}, inputs).values(), expected):
            np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-5)
            assert np.all(var == 0)


def test_posterior_weights_are_split_per_direction(tmp_path):
    """The per-direction weights carry the posterior of their slice of W, R, B: a variance on
    the reverse direction's R alone leaves the forward half of Y deterministic."""
    rng = np.random.default_rng(4)
    model, inits, inputs = recurrent_model(rng, "LSTM", direction="bidirectional")
    std = np.zeros_like(inits["R"])
    std[1] = 0.2
    (y_mean, y_var), *_ = compile_and_run(model, {"R.std": std}, list(inputs.values()), tmp_path)
    y_var = y_var.reshape(4, 2, BATCH, HIDDEN)
    assert np.all(y_var[:, 0] == 0)
    assert np.all(y_var[:-1, 1] > 0) and np.all(y_var[-1, 1] == 0)  # reverse: its first step (t = T-1) has no recurrent term yet


@pytest.mark.parametrize("extra, message", [
    (dict(activations=["Relu", "Tanh", "Tanh"]), "activations ['Relu', 'Tanh', 'Tanh']: only the default (Sigmoid, Tanh, Tanh)"),
    (dict(input_forget=1), "input_forget=1"),
])
def test_non_default_cells_are_refused_with_the_node_name(extra, message, tmp_path):
    model, _, _ = recurrent_model(np.random.default_rng(5), "LSTM", extra=extra)
    with pytest.raises(PfpcError, match=r"^model: 1 unsupported node\(s\): cell \(LSTM: " + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        compiler.compile(model, None, out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sequence_lengths_other_than_the_static_one_are_refused_with_the_node_name(tmp_path):
    """sequence_lens must be the sequence length for every sequence (a graph input holding it is
    an int32 input, refused before as pfpc compiles float32 inputs only)."""
    rng = np.random.default_rng(6)
    model, inits, inputs = recurrent_model(rng, "GRU")
    model.graph.node[0].input.extend(["lengths"])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([3], np.int32), "lengths"))
    with pytest.raises(PfpcError, match=r"^model: GRU node 'cell': sequence_lens 'lengths' is not the constant 4 for every sequence"):
        compiler.compile(model, None)
    model.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(np.array([4], np.int32), "lengths"))
    got = compile_and_run(model, {}, list(inputs.values()), tmp_path)
    expected = _onnx_outputs(model, inputs)
    np.testing.assert_allclose(got[0][0].reshape(expected[0].shape), expected[0], rtol=1e-4, atol=1e-5)


def test_initial_state_with_a_posterior_is_refused(tmp_path):
    rng = np.random.default_rng(8)
    model, inits, inputs = recurrent_model(rng, "LSTM")
    model.graph.node[0].input.extend(["", "zeros"])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, BATCH, HIDDEN), np.float32), "zeros"))
    with pytest.raises(PfpcError, match=r"^model: LSTM node 'cell': initial_h 'zeros' has a posterior variance"):
        compiler.compile(model, {"zeros.std": np.ones((1, BATCH, HIDDEN), np.float32)})
    got = compile_and_run(model, {}, list(inputs.values()), tmp_path)  # deterministic zeros: no initial state
    expected = _onnx_outputs(model, inputs)
    np.testing.assert_allclose(got[0][0].reshape(expected[0].shape), expected[0], rtol=1e-4, atol=1e-5)


def test_sampling_build_equals_monte_carlo_of_the_original_node(tmp_path):
    """The unrolled network under weight sampling (``mode="svi"``: every step reads the same
    draw of each per-direction weight) against onnxruntime running the original LSTM with sampled
    W, R, B: two Monte Carlo estimates of the same moments, within their sampling error."""
    rng = np.random.default_rng(26)
    model, inits, inputs = recurrent_model(rng, "LSTM", steps=16, hidden=8, direction="bidirectional")
    stds = random_std(inits, rng, scale=0.5)
    out = str(tmp_path / "svi")
    compiler.compile(model, stds, out_dir=out, mode="svi", samples=4000, seed=1)
    got = compiler.run_host(out, list(inputs.values()))
    mc = reference.monte_carlo(model, {k[: -len(".std")]: v for k, v in stds.items()}, inputs, 4000, seed=0, with_var_stderr=True)
    for (mean, var), name in zip(got, ("y", "y_h", "y_c")):
        mc_mean, mc_var, stderr, var_stderr = mc[name]
        mean, var = mean.reshape(mc_mean.shape), var.reshape(mc_var.shape)
        assert np.all(np.abs(mean - mc_mean) <= 5 * np.sqrt(2) * stderr), name
        assert np.all(np.abs(var - mc_var) <= 5 * np.sqrt(2) * var_stderr), name


def _mc_errors(op, steps, tmp_path, samples=2000):
    """PFP vs Monte Carlo (W, R, B sampled, onnxruntime running the LSTM/GRU node) at the
    last hidden state: (max |mean error| in MC stds, median relative variance error)."""
    rng = np.random.default_rng(10 + steps)
    model, inits, inputs = recurrent_model(rng, op, steps=steps, hidden=8)
    stds = random_std(inits, rng, scale=0.2)
    got = compile_and_run(model, stds, list(inputs.values()), tmp_path)
    mc = reference.monte_carlo(model, {k[: -len(".std")]: v for k, v in stds.items()}, inputs, samples, seed=0)
    mean, var = (np.asarray(a, np.float64).reshape(mc["y_h"][0].shape) for a in got[1])
    mc_mean, mc_var, _ = mc["y_h"]
    return float(np.max(np.abs(mean - mc_mean) / np.sqrt(mc_var))), float(np.median(np.abs(var - mc_var) / mc_var))


#: (op, steps) -> bounds on (max |mean error| in MC stds, median relative variance error) at the
#: last hidden state, above the errors measured at 2,000 draws (docs/supported_operators.md).
#: Measured: T = 1 0.062 / 0.031 (LSTM), 0.045 / 0.040 (GRU); T = 16 0.058 / 0.242, 0.114 / 0.293.
MC_BOUNDS = {("LSTM", 1): (0.15, 0.1), ("LSTM", 16): (0.3, 0.4), ("GRU", 1): (0.15, 0.1), ("GRU", 16): (0.3, 0.4)}


@pytest.mark.parametrize("op, steps", sorted(MC_BOUNDS))
def test_monte_carlo_error_within_its_measured_bound(op, steps, tmp_path):
    mean_err, var_err = _mc_errors(op, steps, tmp_path)
    print(f"{op} T={steps}: max |mean error| {mean_err:.3f} MC std, median relative variance error {var_err:.3f}")
    bound_mean, bound_var = MC_BOUNDS[op, steps]
    assert mean_err < bound_mean and var_err < bound_var, (mean_err, var_err)


def kws_model(cell, steps, exporter, path, bidirectional=False, hidden=16, features=10, classes=12):
    """A keyword-spotting-style network (MFCC frames -> torch nn.LSTM/GRU -> last step ->
    Linear -> Softmax), random weights, exported by torch's TorchScript or dynamo exporter."""
    import torch

    class KeywordSpotter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(features, hidden, batch_first=True, bidirectional=bidirectional)
            self.fc = torch.nn.Linear(hidden * (2 if bidirectional else 1), classes)

        def forward(self, x):
            y, _ = self.rnn(x)
            return torch.softmax(self.fc(y[:, -1]), -1)

    torch.manual_seed(0)
    x = torch.randn(1, steps, features)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(KeywordSpotter().eval(), (x,), str(path), dynamo=exporter == "dynamo", opset_version=18 if exporter == "dynamo" else 17)
    model = onnx.load(str(path))
    assert cell.upper() in {node.op_type for node in model.graph.node}
    return model, x.numpy()


@pytest.mark.parametrize("cell, exporter, bidirectional", [("LSTM", "torchscript", False), ("GRU", "torchscript", False),
                                                          pytest.param("LSTM", "dynamo", True, marks=pytest.mark.slow),
                                                          pytest.param("GRU", "dynamo", True, marks=pytest.mark.slow)])
def test_torch_keyword_spotter(cell, exporter, bidirectional, tmp_path):
    """An exported torch LSTM/GRU network (8 frames): zero variance equals onnxruntime, a posterior
    on every weight equals the NumPy reference."""
    import onnxruntime

    path = tmp_path / "kws.onnx"
    model, x = kws_model(cell, 8, exporter, path, bidirectional)
    (probs, _), = compiler.run(compiler.compile(str(path), None, out_dir=str(tmp_path / "zero")).out_dir, [x]).outputs
    want = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(probs.reshape(want.shape), want, rtol=1e-4, atol=1e-6)
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    weights = {name for node in model.graph.node if node.op_type in ("Gemm", cell) for name in node.input[1:4]}
    stds = random_std({k: v for k, v in inits.items() if k in weights}, np.random.default_rng(7))
    result = compiler.run(compiler.compile(str(path), stds, out_dir=str(tmp_path / "post"), covariance="none").out_dir, [x])
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    (ref_mean, ref_var), = reference.pfp_onnx(onnx.shape_inference.infer_shapes(model), variances, {model.graph.input[0].name: x}).values()
    (mean, var), = result.logits.values()
    assert np.all(ref_var > 0)
    assert_close(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, what="logits mean")
    assert_close(var.reshape(ref_var.shape), ref_var, rtol=1e-4, what="logits var")


@pytest.mark.parametrize("cell", [pytest.param("LSTM", marks=pytest.mark.slow), "GRU"])
def test_keras_recurrent_layer_through_tf2onnx(cell, tmp_path):
    """A Keras LSTM/GRU (GRU reset_after, Keras's default) keyword spotter converted by tf2onnx:
    zero variance equals onnxruntime, a posterior on every weight the NumPy reference."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    # Keras 2 (tf_keras): tf2onnx recognises its recurrent layers as LSTM/GRU nodes (Keras 3's become a Loop)
    keras = pytest.importorskip("tf_keras")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 10), batch_size=1, name="x")
    hidden = getattr(keras.layers, cell)(16)(inputs)
    keras_model = keras.Model(inputs, keras.layers.Dense(12, activation="softmax")(hidden))
    model, _ = tf2onnx.convert.from_keras(keras_model, input_signature=(tf.TensorSpec((1, 8, 10), tf.float32, name="x"),), opset=13)
    assert cell in {node.op_type for node in model.graph.node}
    x = np.random.default_rng(0).standard_normal((1, 8, 10)).astype(np.float32)
    out = str(tmp_path / "zero")
    compiler.compile(model, None, out_dir=out)
    (probs, _), = compiler.run(out, [x]).outputs
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(probs.reshape(want.shape), want, rtol=1e-4, atol=1e-6)
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    weights = {name for node in model.graph.node if node.op_type in ("MatMul", "Add", cell) for name in node.input[1:4]}
    stds = random_std({k: v for k, v in inits.items() if k in weights and v.dtype == np.float32}, np.random.default_rng(7))
    assert any(name in stds for name in (f"{n}.std" for node in model.graph.node if node.op_type == cell for n in node.input[1:3]))
    out = str(tmp_path / "post")
    compiler.compile(model, stds, out_dir=out, covariance="none")
    (mean, var), = compiler.run(out, [x]).logits.values()
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    (ref_mean, ref_var), = reference.pfp_onnx(onnx.shape_inference.infer_shapes(model), variances, {"x": x}).values()
    assert np.all(ref_var > 0)
    assert_close(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, what="logits mean")
    assert_close(var.reshape(ref_var.shape), ref_var, rtol=1e-4, what="logits var")


CAN_EMULATE = all(shutil.which(tool) for tool in ("arm-none-eabi-gcc", "qemu-system-arm"))


@pytest.mark.slow
@pytest.mark.skipif(not CAN_EMULATE, reason="arm-none-eabi-gcc or qemu-system-arm missing")
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_keyword_spotter_on_cortex_m4_under_qemu_equals_host(cell, tmp_path):
    """The keyword spotter at its real length (49 MFCC frames of 10 coefficients, hidden size 16,
    12 classes) with a posterior on every weight: built for Cortex-M4 it fits 1 MB flash /
    512 KB RAM and, under QEMU, gives what the host build gives."""
    path = tmp_path / "kws.onnx"
    model, x = kws_model(cell, 49, "torchscript", path)
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    weights = {name for node in model.graph.node if node.op_type in ("Gemm", cell) for name in node.input[1:4]}
    stds = random_std({k: v for k, v in inits.items() if k in weights}, np.random.default_rng(9))
    out = str(tmp_path / "m4")
    compiled = compiler.compile(str(path), stds, out_dir=out, target="cortex-m4", measure=True)
    footprint = compiled.footprint
    print(f"{cell} keyword spotter: cortex-m4 flash {footprint['flash_bytes']:,} bytes, RAM {footprint['ram_bytes']:,} bytes")
    assert footprint["flash_bytes"] <= 1 << 20 and footprint["ram_bytes"] <= 512 << 10
    host = compiler.run(out, [x])
    device = compiler.run(out, [x], emulate=True)
    for a, b in zip(host.outputs + list(host.logits.values()), device.outputs + list(device.logits.values())):
        for h, d in zip(a, b):
            if h is not None:
                np.testing.assert_allclose(d, h, rtol=1e-5, atol=1e-5 * np.abs(h).max())
