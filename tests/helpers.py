"""Shared test utilities: build small ONNX models, compile them, run the generated C."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import pfpc.compiler as compiler
import reference

RTOL = 1e-5


def make_model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value if np.asarray(value).dtype.kind == "i" else np.asarray(value, np.float32), name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def random_std(initializers, rng, scale=0.3):
    """A posterior std per initializer, proportional to the weights' typical size."""
    return {f"{name}.std": (scale * (np.abs(value) + 0.05) * rng.uniform(0.2, 1.0, value.shape)).astype(np.float32)
            for name, value in initializers.items() if np.asarray(value).dtype == np.float32}


def compile_and_run(model, posterior, inputs, tmp_path, name="out"):
    out_dir = str(tmp_path / name)
    # the diagonal PFP, which tests/reference.py computes (the default adds per-channel
    # covariance where a convolution reaches a global pool: tests/test_covariance_compiled.py)
    compiler.compile(model, posterior, out_dir=out_dir, covariance="none")
    return compiler.run_host(out_dir, inputs)


def assert_close(actual, expected, rtol=RTOL, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    # float32 accumulation: allow rtol relative to the element and a small part of the tensor's scale
    atol = rtol * max(np.max(np.abs(expected)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def assert_zero_variance_equals_onnxruntime(model, x, tmp_path):
    """A model compiled without a posterior returns onnxruntime's output (rtol 1e-4, and 1e-4 of
    the output's scale) with every variance exactly zero; ``x`` feeds the input named ``x``."""
    import onnxruntime as ort

    out_dir = str(tmp_path / "out")
    compiler.compile(model, None, out_dir=out_dir)
    (mean, var), = compiler.run_host(out_dir, [x])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(mean.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.all(var == 0)


def assert_posterior_matches_reference(model, stds, x, tmp_path, what=""):
    """The diagonal PFP of ``model`` with posterior ``stds`` against tests/reference.py's float64
    PFP at rtol 1e-4 (every reference variance positive: the posterior reaches the output)."""
    (mean, var), = compile_and_run(model, stds, [x], tmp_path)
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    (ref_mean, ref_var), = reference.pfp_onnx(model, variances, {"x": x}).values()
    assert np.all(ref_var > 0)
    assert_close(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, what=f"{what} mean")
    assert_close(var.reshape(ref_var.shape), ref_var, rtol=1e-4, what=f"{what} var")


def check_against_reference(model, initializers, inputs, tmp_path, rng, zero_var=False, stochastic=None):
    """The compiled PFP against the NumPy reference; with zero variance also against onnxruntime.

    ``stochastic``: the initializers that get a random posterior std (default: every float one).
    """
    import onnxruntime as ort

    chosen = initializers if stochastic is None else {k: initializers[k] for k in stochastic}
    stds = {} if zero_var else random_std(chosen, rng)
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = reference.pfp_onnx(model, variances, inputs)
    got = compile_and_run(model, stds, list(inputs.values()), tmp_path)
    for (mean, var), (name, (ref_mean, ref_var)) in zip(got, expected.items()):
        mean, var = mean.reshape(ref_mean.shape), var.reshape(ref_var.shape)
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
        assert_close(mean, ref_mean, what=f"{name} mean")
        assert_close(var, ref_var, rtol=3e-5 if not zero_var else RTOL, what=f"{name} var")
        if zero_var:
            assert np.all(var == 0)
    if zero_var:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for (mean, _), expected_mean in zip(got, session.run(None, inputs)):
            np.testing.assert_allclose(mean.reshape(expected_mean.shape), expected_mean, rtol=1e-4, atol=1e-4 * np.abs(expected_mean).max())
    return got
