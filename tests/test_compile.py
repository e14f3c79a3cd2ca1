"""The compiled C against the independent NumPy reference (tests/reference.py), onnxruntime
and Monte Carlo sampling."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import reference
from helpers import assert_close, check_against_reference, compile_and_run, make_model, random_std

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _gemm_case(rng, trans_a, trans_b, alpha, beta, with_c):
    w = rng.standard_normal((5, 7) if trans_b else (7, 5)).astype(np.float32)
    inits = {"w": w}
    node_inputs = ["x", "w"]
    if with_c:
        inits["c"] = rng.standard_normal((5,)).astype(np.float32)
        node_inputs.append("c")
    node = helper.make_node("Gemm", node_inputs, ["y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], [("x", [7, 3] if trans_a else [3, 7])], ["y"], inits), inits


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_matches_reference(tmp_path, zero_var, trans_a, trans_b, alpha, beta, with_c):
    rng = np.random.default_rng(1)
    model, inits = _gemm_case(rng, trans_a, trans_b, alpha, beta, with_c)
    x = rng.standard_normal((7, 3) if trans_a else (3, 7)).astype(np.float32)
    check_against_reference(model, inits, {"x": x}, tmp_path, rng, zero_var)


def _hidden_mlp(rng):
    """Two layers, so the second one sees a Gaussian input (both moment paths are exercised)."""
    inits = {
        "w1": rng.standard_normal((8, 6)).astype(np.float32) * 0.5,
        "b1": rng.standard_normal((6,)).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((6, 4)).astype(np.float32) * 0.5,
        "b2": rng.standard_normal((4,)).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Dropout", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"]),
        helper.make_node("Add", ["h4", "b2"], ["y"]),
    ]
    return make_model(nodes, [("x", [2, 8])], ["y"], inits), inits


def test_mlp_matches_reference(tmp_path, zero_var):
    rng = np.random.default_rng(2)
    model, inits = _hidden_mlp(rng)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    check_against_reference(model, inits, {"x": x}, tmp_path, rng, zero_var)


@pytest.mark.parametrize(
    "strides,pads,dilations,group,in_ch,out_ch",
    [
        ((1, 1), (0, 0, 0, 0), (1, 1), 1, 2, 3),
        ((2, 1), (1, 2, 0, 1), (1, 1), 1, 2, 4),
        ((1, 1), (1, 1, 1, 1), (2, 2), 1, 3, 2),
        ((1, 1), (1, 1, 1, 1), (1, 1), 2, 4, 6),
        ((1, 1), (1, 1, 1, 1), (1, 1), 4, 4, 4),  # depthwise
    ],
)
def test_conv_relu_maxpool_matches_reference(tmp_path, zero_var, strides, pads, dilations, group, in_ch, out_ch):
    rng = np.random.default_rng(3)
    inits = {
        "w": rng.standard_normal((out_ch, in_ch // group, 3, 3)).astype(np.float32) * 0.5,
        "b": rng.standard_normal((out_ch,)).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=list(strides), pads=list(pads), dilations=list(dilations), group=group),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[1, 2], pads=[0, 1, 1, 0]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    model = make_model(nodes, [("x", [2, in_ch, 7, 8])], ["y"], inits)
    x = rng.standard_normal((2, in_ch, 7, 8)).astype(np.float32)
    check_against_reference(model, inits, {"x": x}, tmp_path, rng, zero_var)


@pytest.mark.parametrize("pool", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 2]),
])
def test_maxpool_windows_match_reference(tmp_path, zero_var, pool):
    """Clark's max chained over every window position, padding skipped, after a Gaussian conv."""
    rng = np.random.default_rng(8)
    inits = {"w": rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.5}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["y"], **pool),
    ]
    model = make_model(nodes, [("x", [2, 2, 7, 6])], ["y"], inits)
    x = rng.standard_normal((2, 2, 7, 6)).astype(np.float32)
    check_against_reference(model, inits, {"x": x}, tmp_path, rng, zero_var)


def test_residual_add_of_two_gaussians(tmp_path, zero_var):
    rng = np.random.default_rng(4)
    inits = {"w1": rng.standard_normal((5, 5)).astype(np.float32), "w2": rng.standard_normal((5, 5)).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("MatMul", ["ra", "w2"], ["b"]),
        helper.make_node("Add", ["ra", "b"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["y"]),
    ]
    model = make_model(nodes, [("x", [2, 5])], ["y"], {**inits, "shape": np.array([10], np.int64)})
    x = rng.standard_normal((2, 5)).astype(np.float32)
    check_against_reference(model, inits, {"x": x}, tmp_path, rng, zero_var)


@pytest.mark.parametrize("example", ["mlp", "lenet"])
def test_zero_variance_equals_onnxruntime(tmp_path, example):
    """With every variance zero the PFP mean is the deterministic network's output."""
    model_path = os.path.join(EXAMPLES, example, "model.onnx")
    x = np.load(os.path.join(EXAMPLES, example, "sample.npy"))
    expected = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    import pfpc.compiler as compiler

    out = str(tmp_path / "out")
    compiler.compile(model_path, None, out_dir=out, batch=x.shape[0])
    (mean, var), = compiler.run_host(out, [x])
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.all(var == 0)


@pytest.mark.parametrize("example", ["mlp", "lenet"])
def test_examples_match_reference(tmp_path, example):
    import onnx

    import pfpc.compiler as compiler

    model_path = os.path.join(EXAMPLES, example, "model.onnx")
    post = dict(np.load(os.path.join(EXAMPLES, example, "post.npz")))
    x = np.load(os.path.join(EXAMPLES, example, "sample.npy"))
    model = onnx.load(model_path)
    variances = {k[:-4]: v.astype(np.float64) ** 2 for k, v in post.items()}
    expected = reference.pfp_onnx(model, variances, {"input": x})["logits"]
    out = str(tmp_path / "out")
    compiler.compile(model_path, os.path.join(EXAMPLES, example, "post.npz"), out_dir=out, batch=x.shape[0])
    (mean, var), = compiler.run_host(out, [x])
    # whole networks in float32 (erf, exp, sums of 64..576 terms): relative 1e-4 of the logit scale
    assert_close(mean, expected[0], rtol=1e-4, what="mean")
    assert_close(var, expected[1], rtol=1e-4, what="var")


def test_linear_network_matches_monte_carlo(tmp_path):
    """Linear ops only: the PFP is exact, so it must agree with sampling within MC error."""
    rng = np.random.default_rng(5)
    inits = {
        "w1": rng.standard_normal((6, 5)).astype(np.float32),
        "b1": rng.standard_normal((5,)).astype(np.float32),
        "w2": rng.standard_normal((4, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1),
    ]
    model = make_model(nodes, [("x", [2, 6])], ["y"], inits)
    stds = random_std(inits, rng, scale=0.5)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    (mean, var), = compile_and_run(model, stds, [x], tmp_path)
    samples = 20000
    mc_mean, mc_var, stderr, var_stderr = reference.monte_carlo(
        model, {k[:-4]: v for k, v in stds.items()}, {"x": x}, samples, seed=0, with_var_stderr=True
    )["y"]
    assert np.all(np.abs(mean - mc_mean) <= 5 * stderr + 1e-6)
    assert np.all(np.abs(var - mc_var) <= 5 * var_stderr + 1e-6)


def test_generated_c_builds_warning_free_with_gcc_and_clang(tmp_path):
    import pfpc.compiler as compiler

    out = str(tmp_path / "out")
    compiler.compile(os.path.join(EXAMPLES, "lenet", "model.onnx"), os.path.join(EXAMPLES, "lenet", "post.npz"), out_dir=out, batch=2)
    for cc in ("gcc", "clang"):
        if subprocess.run(["which", cc], capture_output=True).returncode:
            pytest.skip(f"{cc} not installed")
        for flags in ("-std=c99 -O2 -Wall -Wextra -Werror -pedantic", "-std=c99 -O0 -Wall -Wextra -Werror -Wshadow -Wconversion -Wno-sign-conversion -Wno-float-conversion"):
            result = subprocess.run([cc, *flags.split(), "-c", "pfp_model.c", "-o", f"/dev/null"], cwd=out, capture_output=True, text=True)
            assert result.returncode == 0, f"{cc} {flags}: {result.stderr[:2000]}"
    source = open(os.path.join(out, "pfp_model.c")).read()
    for forbidden in ("malloc", "fopen", "DLTensor", "tvm/"):
        assert forbidden not in source


# Measured on the example models with 4 test digits and 4000 samples (see README, "Accuracy"):
# MLP: max |mean error| 0.05 MC std, median variance error 20% (the logits' variance lacks the
# covariance of the correlated relu2 outputs, which the PFP drops); LeNet: 0.11 std and 8%.
# The bounds leave room for MC noise at 3000 samples but catch a wrong formula or a lost term.
PFP_VS_MC_BOUNDS = {"mlp": (0.15, 0.3), "lenet": (0.5, 0.25)}


@pytest.mark.parametrize("example", ["mlp", "lenet"])
def test_relu_maxpool_networks_against_monte_carlo(tmp_path, example):
    import onnx

    import pfpc.compiler as compiler

    model_path = os.path.join(EXAMPLES, example, "model.onnx")
    post = dict(np.load(os.path.join(EXAMPLES, example, "post.npz")))
    x = np.load(os.path.join(EXAMPLES, example, "sample.npy"))
    out = str(tmp_path / "out")
    compiler.compile(model_path, os.path.join(EXAMPLES, example, "post.npz"), out_dir=out, batch=x.shape[0])
    (mean, var), = compiler.run_host(out, [x])
    model = onnx.load(model_path)
    mc_mean, mc_var, _ = reference.monte_carlo(model, {k[:-4]: v for k, v in post.items()}, {"input": x}, 3000, seed=1)["logits"]
    mean_err_in_std = np.max(np.abs(mean - mc_mean) / np.sqrt(mc_var))
    var_rel_median = np.median(np.abs(var - mc_var) / mc_var)
    mean_bound, var_bound = PFP_VS_MC_BOUNDS[example]
    assert mean_err_in_std < mean_bound, mean_err_in_std
    assert var_rel_median < var_bound, var_rel_median


def _kernel_bodies(c_source):
    """{kernel comment (its ONNX nodes and ops): C body} of a generated <name>.c."""
    return {comment: body for comment, body in
            re.findall(r"^/\* ((?:(?!\*/).)*?) \*/\nPFP_KERNEL void k_\w+\((?:[^)]*)\) \{\n(.*?)\n\}$", c_source, re.M | re.S)}


@pytest.mark.parametrize("target", ["host", "cortex-m4"])
def test_padded_convolution_loops_have_no_branches(tmp_path, target):
    """SIMD targets read a padded copy (branch-free rows); scalar cores (Cortex-M4) test the border
    in the convolution itself, with no copy and no buffer for it (`pipeline.for_target`)."""
    import pfpc.compiler as compiler

    out = str(tmp_path / "out")
    compiler.compile(os.path.join(EXAMPLES, "lenet", "model.onnx"), os.path.join(EXAMPLES, "lenet", "post.npz"), out_dir=out, batch=1, target=target)
    bodies = _kernel_bodies(open(os.path.join(out, "pfp_model.c")).read())
    convolutions = [body for comment, body in bodies.items() if "(Conv " in comment]  # "/conv1/Conv (Conv 1->6, 3x3, ...)"
    if target == "host":
        assert len(convolutions) == 2 and not any("if (" in body for body in convolutions)
        assert sum("(Conv: pad)" in comment for comment in bodies) == 2  # the border is written once, by a pad kernel
    else:
        assert len(convolutions) == 2 and all("if (" in body for body in convolutions)
        assert not any("(Conv: pad)" in comment for comment in bodies)


def test_dense_layer_wider_than_a_row(tmp_path):
    """Row schedules split rows over 64 elements (TVM moves a larger stack buffer into a runtime
    workspace, which standalone C cannot have)."""
    rng = np.random.default_rng(11)
    inits = {"w1": _w(rng, 8, 600, scale=0.3), "b1": _w(rng, 600, scale=0.1), "w2": _w(rng, 600, 3, scale=0.05)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = make_model(nodes, [("x", [2, 8])], ["y"], inits)
    check_against_reference(model, inits, {"x": rng.standard_normal((2, 8)).astype(np.float32)}, tmp_path, rng)


def _w(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_variance_accumulation_is_two_fused_multiply_adds(tmp_path):
    """A hidden layer's variance update is printed (acc + v q) + v m m, which contracts into two
    fused multiply-adds; TVM prints acc + (v q + v m m), a multiply, a fused multiply-add and an add."""
    import pfpc.compiler as compiler
    from pfpc.codegen.kernels import fused_accumulation

    out = str(tmp_path / "out")
    compiler.compile(os.path.join(EXAMPLES, "lenet", "model.onnx"), os.path.join(EXAMPLES, "lenet", "post.npz"), out_dir=out, batch=1)
    source = re.sub(r"(?<![;{}/])\n\s+", " ", open(os.path.join(out, "pfp_model.c")).read())  # statements wrapped at 160 columns, joined
    updates = [line for line in source.splitlines() if "_var[" in line and "_mean[" in line and "_ptr[" in line and " = (" in line
               and "x_var" not in line.split(" = ", 1)[0] and line.count("_var[") >= 2]
    regrouped = re.compile(r"^\(\(\w+\[[\w +*]+\] \+ \(")  # ((acc + (v q)) + (v m m)), not (acc + ((v q) + (v m m)))
    assert updates and all(line.strip().startswith(("float v_", "v_")) and regrouped.match(line.split(" = ", 1)[1])
                           for line in updates), updates[:2]
    assert fused_accumulation("  float v = (acc_ptr[0] + ((a[i] * b[i]) - (c[i] * d[i])));") == "  float v = ((acc_ptr[0] + (a[i] * b[i])) - (c[i] * d[i]));"
    assert fused_accumulation("  float v = (acc_ptr[0] + ((a[i] * b[i]) + (c[i] * d[i])));") == "  float v = ((acc_ptr[0] + (a[i] * b[i])) + (c[i] * d[i]));"
    untouched = "  float v = (acc_ptr[0] + ((a[i] * b[i]) * c[i]));"
    assert fused_accumulation(untouched) == untouched


def test_bfloat16_moment_storage_matches_reference(tmp_path):
    """--moment-storage bfloat16: the variances between layers take 2 bytes instead of 4 (LeNet's
    arena: mean 4 + variance 2 bytes per element where float32 stores 8), and the result stays
    within the rounding of a few bfloat16 stores (2^-9 relative each) of the float64 reference."""
    import onnx

    import pfpc.compiler as compiler

    model_path, post_path = os.path.join(EXAMPLES, "lenet", "model.onnx"), os.path.join(EXAMPLES, "lenet", "post.npz")
    x = np.load(os.path.join(EXAMPLES, "lenet", "sample.npy"))
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in np.load(post_path).items()}
    ref_mean, ref_var = reference.pfp_onnx(onnx.load(model_path), variances, {"input": x})["logits"]
    arenas = {}
    for storage in ("float32", "bfloat16"):
        out = str(tmp_path / storage)
        arenas[storage] = compiler.compile(model_path, post_path, out_dir=out, batch=1, moment_storage=storage).program.arena_size
        (mean, var), = compiler.run_host(out, [x])
    assert arenas["bfloat16"] * 4 == arenas["float32"] * 3
    assert "uint16_t* restrict" in open(os.path.join(out, "pfp_model.c")).read()
    mean, var = mean.reshape(ref_mean.shape), var.reshape(ref_var.shape)
    np.testing.assert_allclose(var, ref_var, rtol=2.0**-7)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-3 * np.abs(ref_mean).max())
    with pytest.raises(Exception, match="moment storage bfloat16 is for mode pfp"):
        compiler.compile(model_path, post_path, batch=1, mode="svi", moment_storage="bfloat16")


def test_bfloat16_rewrite_converts_loads_and_stores():
    """`store_as_bfloat16`: element loads convert, whole-statement stores round; any other use of
    the buffer (pointer arithmetic) leaves the kernel to float32 (None)."""
    from pfpc.codegen.kernels import CKernel, store_as_bfloat16

    body = "  float v_ = x_var[(i + 1)];\n  y_var[i] = (x_var[i] * w[i]) + v_;"
    kernel = store_as_bfloat16(CKernel("k", [("x_var", False), ("w", False), ("y_var", True)], body), ["x_var", "y_var"])
    assert kernel.body == ("  float v_ = pfpc_bf16_load(x_var[(i + 1)]);\n"
                           "  y_var[i] = pfpc_bf16_store((pfpc_bf16_load(x_var[i]) * w[i]) + v_);")
    assert kernel.ctypes == {"x_var": "uint16_t", "y_var": "uint16_t"}
    assert "const uint16_t* restrict x_var" in kernel.signature("k_")
    assert store_as_bfloat16(CKernel("k", [("x_var", False)], "  f(x_var + 4);"), ["x_var"]) is None
