"""Each Gaussian operator of the operator-coverage set, compiled to C, against the NumPy
reference (tests/reference.py) and onnxruntime (zero variance), and the nonlinear ones against
Monte Carlo sampling with onnxruntime."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from onnx import helper

import reference
from helpers import check_against_reference, compile_and_run, make_model, random_std
from pfpc import compiler

X4 = [2, 4, 6, 6]


def _w(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _conv(out="c", x="x", w="w"):
    """A stochastic 3x3 conv, so the operator under test sees a Gaussian input."""
    return helper.make_node("Conv", [x, w], [out], pads=[1, 1, 1, 1])


def _conv_case(rng, nodes, extra=None, stochastic=("w",), opset=17, in_shape=X4):
    inits = {"w": _w(rng, 4, in_shape[1], 3, 3), **(extra or {})}
    return nodes, [("x", in_shape)], inits, list(stochastic), opset


def _bn_params(rng, channels=4):
    return {
        "gamma": rng.uniform(0.5, 2.0, channels).astype(np.float32) * rng.choice([-1, 1], channels).astype(np.float32),
        "beta": _w(rng, channels),
        "mean": _w(rng, channels),
        "var": rng.uniform(0.2, 2.0, channels).astype(np.float32),
    }


BN = ["gamma", "beta", "mean", "var"]


def _cases():
    """name -> builder(rng) -> (nodes, inputs, initializers, stochastic initializers, opset)."""
    node = helper.make_node
    cases = {
        "avgpool_2x2": lambda r: _conv_case(r, [_conv(), node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]),
        "avgpool_pads_exclude": lambda r: _conv_case(r, [_conv(), node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]),
        "avgpool_pads_include_ceil": lambda r: _conv_case(r, [_conv(), node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=1, ceil_mode=1)]),
        "maxpool_ceil_drops_window": lambda r: _conv_case(r, [_conv(), node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1)],
                                                           in_shape=[1, 4, 4, 4]),
        "avgpool_ceil_drops_window": lambda r: _conv_case(r, [_conv(), node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1)],
                                                           in_shape=[1, 4, 4, 4]),
        "global_avgpool": lambda r: _conv_case(r, [_conv(), node("GlobalAveragePool", ["c"], ["y"])]),
        "batchnorm_folded": lambda r: _conv_case(r, [_conv(), node("BatchNormalization", ["c", *BN], ["y"])], _bn_params(r), ("w", "beta")),
        "batchnorm_folded_bias": lambda r: _conv_case(
            r, [node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("BatchNormalization", ["c", *BN], ["y"], epsilon=1e-3)],
            {**_bn_params(r), "b": _w(r, 4)}, ("w", "b", "beta")),
        "batchnorm_affine": lambda r: _conv_case(r, [_conv(), node("Relu", ["c"], ["h"]), node("BatchNormalization", ["h", *BN], ["y"])], _bn_params(r), ("w", "beta")),
        "batchnorm_gemm": lambda r: ([node("Gemm", ["x", "w", "b"], ["h"], transB=1), node("BatchNormalization", ["h", *BN], ["y"])],
                                     [("x", [3, 5])], {"w": _w(r, 4, 5), "b": _w(r, 4), **_bn_params(r)}, ["w", "b", "beta"], 17),
        "mul_per_channel": lambda r: _conv_case(r, [_conv(), node("Mul", ["c", "k"], ["y"])], {"k": _w(r, 4, 1, 1)}),
        "mul_scalar": lambda r: _conv_case(r, [_conv(), node("Mul", ["k", "c"], ["y"])], {"k": np.array(-1.5, np.float32)}),
        "mul_two_gaussians": lambda r: _conv_case(r, [_conv(), _conv("d", w="w2"), node("Mul", ["c", "d"], ["y"])], {"w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "mul_stochastic_weight": lambda r: _conv_case(r, [_conv(), node("Mul", ["c", "k"], ["y"])], {"k": _w(r, 1, 4, 1, 1)}, ("w", "k")),
        "sub_constant": lambda r: _conv_case(r, [_conv(), node("Sub", ["c", "k"], ["y"])], {"k": _w(r, 4, 1, 1)}),
        "sub_from_constant": lambda r: _conv_case(r, [_conv(), node("Sub", ["k", "c"], ["y"])], {"k": np.array(2.0, np.float32)}),
        "div_per_channel": lambda r: _conv_case(r, [_conv(), node("Div", ["c", "k"], ["y"])], {"k": r.uniform(0.5, 2.0, (4, 1, 1)).astype(np.float32)}),
        "div_scalar": lambda r: _conv_case(r, [_conv(), node("Div", ["c", "k"], ["y"])], {"k": np.array(4.0, np.float32)}),
        "sum_of_three": lambda r: _conv_case(r, [_conv(), _conv("d", w="w2"), node("Sum", ["c", "d", "x"], ["y"])], {"w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "add_of_two_gaussians": lambda r: _conv_case(r, [_conv(), _conv("d", w="w2"), node("Add", ["c", "d"], ["y"])], {"w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "add_same_tensor": lambda r: _conv_case(r, [_conv(), node("Add", ["c", "c"], ["y"])]),
        "mul_same_tensor": lambda r: _conv_case(r, [_conv(), node("Mul", ["c", "c"], ["y"])]),
        "concat": lambda r: _conv_case(r, [_conv(), node("Relu", ["c"], ["h"]), node("Concat", ["h", "x", "c"], ["y"], axis=1)]),
        "transpose": lambda r: _conv_case(r, [_conv(), node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1])]),
        "squeeze_unsqueeze_flatten": lambda r: _conv_case(r, [
            _conv(), node("Unsqueeze", ["c", "axes"], ["u"]), node("Squeeze", ["u", "axes"], ["s"]), node("Flatten", ["s"], ["y"])],
            {"axes": np.array([2], np.int64)}),
        "pad_zero": lambda r: _conv_case(r, [_conv(), node("Pad", ["c", "pads"], ["y"])], {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64)}),
        "pad_value": lambda r: _conv_case(r, [_conv(), node("Pad", ["c", "pads", "value"], ["p"]), _conv("y", x="p", w="w2")],
                                          {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "value": np.array(0.5, np.float32), "w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "relu6_clip": lambda r: _conv_case(r, [_conv(), node("Clip", ["c", "lo", "hi"], ["y"])], {"lo": np.array(0.0, np.float32), "hi": np.array(1.0, np.float32)}),
        "clip_opset10": lambda r: _conv_case(r, [_conv(), node("Clip", ["c"], ["y"], min=-0.5, max=0.5)], opset=10),
        "clip_lower_only": lambda r: _conv_case(r, [_conv(), node("Clip", ["c", "lo"], ["y"])], {"lo": np.array(-0.3, np.float32)}),
        "leaky_relu": lambda r: _conv_case(r, [_conv(), node("LeakyRelu", ["c"], ["y"], alpha=0.1)]),
        "prelu": lambda r: _conv_case(r, [_conv(), node("PRelu", ["c", "slope"], ["y"])], {"slope": r.uniform(-0.5, 0.5, (4, 1, 1)).astype(np.float32)}),
        "sigmoid": lambda r: _conv_case(r, [_conv(), node("Sigmoid", ["c"], ["y"])]),
        "tanh": lambda r: _conv_case(r, [_conv(), node("Tanh", ["c"], ["y"])]),
        "conv1d_maxpool1d": lambda r: ([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1], strides=[1]),
                                        node("MaxPool", ["c"], ["y"], kernel_shape=[3], strides=[2], pads=[1, 1])],
                                       [("x", [2, 3, 11])], {"w": _w(r, 4, 3, 3), "b": _w(r, 4)}, ["w", "b"], 17),
        "conv1d_avgpool1d_gap": lambda r: ([node("Conv", ["x", "w"], ["c"], dilations=[2], group=1), node("AveragePool", ["c"], ["p"], kernel_shape=[2], strides=[2]),
                                            node("GlobalAveragePool", ["p"], ["y"])],
                                           [("x", [2, 3, 12])], {"w": _w(r, 4, 3, 3)}, ["w"], 17),
        "batch_matmul": lambda r: ([node("MatMul", ["x", "w"], ["h"]), node("Relu", ["h"], ["r"]), node("MatMul", ["r", "w2"], ["y"])],
                                   [("x", [2, 3, 4, 5])], {"w": _w(r, 3, 5, 6), "w2": _w(r, 1, 6, 2)}, ["w", "w2"], 17),
    }
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_matches_reference(tmp_path, zero_var, case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    nodes, inputs, inits, stochastic, opset = CASES[case](rng)
    model = make_model(nodes, inputs, ["y"], inits, opset=opset)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in inputs}
    check_against_reference(model, inits, feeds, tmp_path, rng, zero_var, stochastic=stochastic)


def _gemm_then(rng, nodes, extra=None):
    """y = op(x W + b): with a deterministic input the pre-activation is exactly Gaussian with
    independent elements, so an element-wise operator's PFP moments are exact (or, for the
    approximations, their error is the operator's own)."""
    inits = {"w": _w(rng, 6, 5, scale=0.8), "b": _w(rng, 5), **(extra or {})}
    first = helper.make_node("Gemm", ["x", "w", "b"], ["h"])
    return make_model([first] + nodes, [("x", [4, 6])], ["y"], inits), inits


def _pooling_input(rng, shape, nodes, extra=None):
    """y = op(x * W) with W a stochastic weight of x's full shape: independent Gaussian inputs."""
    inits = {"w": _w(rng, *shape[1:], scale=1.0), **(extra or {})}
    first = helper.make_node("Mul", ["x", "w"], ["h"])
    return make_model([first] + nodes, [("x", shape)], ["y"], inits), inits


def _bn(rng):
    return _bn_params(rng, 3)


EXACT_MC_CASES = {
    "relu6_clip": lambda r: _gemm_then(r, [helper.make_node("Clip", ["h", "lo", "hi"], ["y"])], {"lo": np.array(0.0, np.float32), "hi": np.array(2.0, np.float32)}),
    "leaky_relu": lambda r: _gemm_then(r, [helper.make_node("LeakyRelu", ["h"], ["y"], alpha=0.2)]),
    "prelu": lambda r: _gemm_then(r, [helper.make_node("PRelu", ["h", "slope"], ["y"])], {"slope": r.uniform(-0.5, 0.5, 5).astype(np.float32)}),
    "avgpool": lambda r: _pooling_input(r, [1, 3, 5, 5], [helper.make_node("AveragePool", ["h"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]),
    "global_avgpool": lambda r: _pooling_input(r, [1, 3, 4, 4], [helper.make_node("GlobalAveragePool", ["h"], ["y"])]),
    "batchnorm": lambda r: _pooling_input(r, [1, 3, 2, 2], [helper.make_node("BatchNormalization", ["h", *BN], ["y"])], _bn(r)),
    "batchnorm_folded_into_conv": lambda r: (
        make_model([helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("BatchNormalization", ["h", *BN], ["y"])],
                   [("x", [1, 2, 4, 4])], ["y"], inits := {"w": _w(r, 3, 2, 3, 3), **_bn(r)}), inits),
}


def _mc_inputs(model, inits, rng, stochastic):
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (rng.standard_normal(x_shape) * 1.5).astype(np.float32)
    stds = random_std({k: inits[k] for k in stochastic}, rng, scale=0.5)
    return x, stds


@pytest.mark.parametrize("case", sorted(EXACT_MC_CASES))
def test_exact_operators_match_monte_carlo(tmp_path, case):
    """Clip, LeakyRelu, PRelu (on an exactly Gaussian input), average pooling and batch norm
    (on independent inputs) are exact: the PFP must agree with sampling within its error."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    model, inits = EXACT_MC_CASES[case](rng)
    stochastic = [k for k in ("w", "b", "beta") if k in inits]
    x, stds = _mc_inputs(model, inits, rng, stochastic)
    (mean, var), = compile_and_run(model, stds, [x], tmp_path)
    mc_mean, mc_var, stderr, var_stderr = reference.monte_carlo(
        model, {k[:-4]: v for k, v in stds.items()}, {"x": x}, 20000, seed=0, with_var_stderr=True
    )["y"]
    mean, var = mean.reshape(mc_mean.shape), var.reshape(mc_var.shape)
    # + 1e-5: tail masses below 1e-5 are invisible to 20000 samples (MC error estimate 0)
    assert np.all(np.abs(mean - mc_mean) <= 5 * stderr + 1e-5), np.max(np.abs(mean - mc_mean) / stderr)
    assert np.all(np.abs(var - mc_var) <= 5 * var_stderr + 1e-5), np.max(np.abs(var - mc_var) / var_stderr)


# Measured (20000 samples; pre-activations with |M| up to ~6, V up to ~5), variance error
# over the elements whose MC variance is at least 1e-3 (see docs/supported_operators.md): sigmoid
# max |mean error| 0.005, median variance error 8%, max 12%; tanh 0.019, 7%, 72%. Deep in the
# saturated tails (|M| >> sqrt(V)) the variance is under-estimated by far more: there the output
# is log-normal-like, not the two-valued limit the formula interpolates to. The bounds leave
# room for MC noise and catch a wrong formula (e.g. the mean without the probit factor).
APPROX_MC_BOUNDS = {"sigmoid": (0.015, 0.12, 0.25), "tanh": (0.04, 0.12, 1.0)}


@pytest.mark.parametrize("op", sorted(APPROX_MC_BOUNDS))
def test_sigmoid_tanh_approximation_error_against_monte_carlo(tmp_path, op):
    rng = np.random.default_rng(zlib.crc32(op.encode()))
    model, inits = _gemm_then(rng, [helper.make_node(op.capitalize(), ["h"], ["y"])])
    x, stds = _mc_inputs(model, inits, rng, ["w", "b"])
    (mean, var), = compile_and_run(model, stds, [x], tmp_path)
    mc_mean, mc_var, _ = reference.monte_carlo(model, {k[:-4]: v for k, v in stds.items()}, {"x": x}, 20000, seed=0)["y"]
    mean, var = mean.reshape(mc_mean.shape), var.reshape(mc_var.shape)
    mean_err = np.max(np.abs(mean - mc_mean))
    spread = mc_var >= 1e-3
    var_rel = np.abs(var - mc_var)[spread] / mc_var[spread]
    print(f"{op}: max |mean error| {mean_err:.4f}, variance error median {np.median(var_rel):.3f} max {np.max(var_rel):.3f} over {spread.sum()}/{spread.size}")
    mean_bound, median_bound, max_bound = APPROX_MC_BOUNDS[op]
    assert spread.sum() >= spread.size // 2
    assert mean_err < mean_bound and np.median(var_rel) < median_bound and np.max(var_rel) < max_bound


@pytest.mark.parametrize("function", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_at_the_output_returns_logit_moments(tmp_path, function, opset):
    """The logits' moments (the reference) come beside the output (its own value: tests/test_softmax_outputs.py),
    and pfpc.json says so."""
    rng = np.random.default_rng(7)
    inits = {"w": _w(rng, 5, 3)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node(function, ["logits"], ["y"], axis=1)]
    model = make_model(nodes, [("x", [2, 5])], ["y"], inits, opset=opset)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    stds = random_std(inits, rng)
    compiler.compile(model, stds, out_dir=str(tmp_path / "out"))
    mean, var = compiler.run(str(tmp_path / "out"), [x]).logits[0]
    ref_mean, ref_var = reference.pfp_onnx(model, {"w": stds["w.std"].astype(np.float64) ** 2}, {"x": x})["y"]
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=3e-5, atol=1e-6)
    meta = json.loads((tmp_path / "out" / "pfpc.json").read_text())
    entry = {"output": 0, "function": function.lower().replace("logsoftmax", "log_softmax"), "axis": 1}
    assert meta["output_softmax"] == [{**entry, "logits": "y_logits", "method": "meanfield", "logit_samples": 64}]


def test_no_softmax_no_metadata(tmp_path):
    rng = np.random.default_rng(8)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 5])], ["y"], {"w": _w(rng, 5, 3)})
    compile_and_run(model, None, [np.zeros((2, 5), np.float32)], tmp_path)
    assert json.loads((tmp_path / "out" / "pfpc.json").read_text())["output_softmax"] == []


def _exp_and_pdf_func(a, z):
    from tvm import te

    from pfpc.ops.moments import exp_nonpositive, std_normal_pdf

    arg = te.placeholder(a.shape, "float32", name="a")
    zs = te.placeholder(z.shape, "float32", name="z")
    exp = te.compute(a.shape, lambda i: exp_nonpositive(arg[i]), name="exp")
    pdf = te.compute(z.shape, lambda i: std_normal_pdf(zs[i]), name="pdf")
    return te.create_prim_func([arg, zs, exp, pdf])


#: exp's whole range, and phi inside, at and beyond the cut-off at |z| = sqrt(60) = 7.746
_EXP_ARGS = np.concatenate([-np.linspace(0.0, 87.0, 100001), -np.geomspace(1e-30, 1.0, 1000)]).astype(np.float32)
_PDF_ARGS = np.array([0.0, 1.0, -2.5, 7.7, -7.74, 7.75, 13.0, 20.0, np.inf, -np.inf, 1e30], np.float32)


def _check_exp_and_pdf(exp, pdf):
    expected = np.exp(_EXP_ARGS.astype(np.float64))
    assert np.max(np.abs(exp - expected) / expected) < 2e-7
    assert exp[0] == 1.0
    phi = np.exp(-0.5 * _PDF_ARGS.astype(np.float64) ** 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(pdf[:5], phi[:5], rtol=2e-7)
    assert np.all(pdf[5:] == 0.0)  # cut off: phi < 3.8e-14 there, and no tiny value to turn subnormal downstream


def test_exp_without_libm_matches_numpy():
    """`moments.exp_nonpositive` (phi's exp, no libm call) over its whole range, and phi at its cut-off (TVM's LLVM build)."""
    import tvm

    func = tvm.compile(_exp_and_pdf_func(_EXP_ARGS, _PDF_ARGS), target="llvm")
    out = [tvm.runtime.tensor(np.zeros(x.shape, np.float32)) for x in (_EXP_ARGS, _PDF_ARGS)]
    func(tvm.runtime.tensor(_EXP_ARGS), tvm.runtime.tensor(_PDF_ARGS), *out)
    _check_exp_and_pdf(out[0].numpy(), out[1].numpy())


def test_exp_in_generated_c_is_defined_c_and_matches_numpy(tmp_path):
    """The same in the C pfpc emits: 2^n is a bit copy through `kernels.FLOAT_FROM_BITS`, not TVM's
    type-punned pointer (which gcc -O2 -Wall -Werror rejects), and the C is vectorisable."""
    import ctypes
    import subprocess

    from pfpc.codegen.kernels import FLOAT_FROM_BITS, HELPERS, generate_c_kernels

    kernel = generate_c_kernels({"exp_pdf": _exp_and_pdf_func(_EXP_ARGS, _PDF_ARGS)}, "row")["exp_pdf"]
    assert kernel.helpers == [FLOAT_FROM_BITS] and "*)(&" not in kernel.body
    source = tmp_path / "exp_pdf.c"
    source.write_text("#include <stdint.h>\n#include <string.h>\n" + HELPERS[FLOAT_FROM_BITS]
                      + f"{kernel.signature('')} {{\n{kernel.body}\n}}\n")
    library = tmp_path / "exp_pdf.so"
    subprocess.run(["cc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-fPIC", "-shared",
                    str(source), "-o", str(library)], check=True)
    exp, pdf = np.zeros_like(_EXP_ARGS), np.zeros_like(_PDF_ARGS)
    pointer = ctypes.POINTER(ctypes.c_float)
    getattr(ctypes.CDLL(str(library)), "exp_pdf")(*(x.ctypes.data_as(pointer) for x in (_EXP_ARGS, _PDF_ARGS, exp, pdf)))
    _check_exp_and_pdf(exp, pdf)
