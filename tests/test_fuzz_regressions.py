"""Minimal reproductions of defects found by differential fuzzing (issue 20; tools/fuzz_graphs.py),
each compiled to C and checked against the float64 NumPy reference (tests/reference.py) and,
where the posterior is zero, onnxruntime. Each failed on the code before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import onnx
from onnx import helper

import reference
from helpers import compile_and_run, make_model

node = helper.make_node


def _run(model, stds, feeds, tmp_path):
    got = compile_and_run(model, stds, list(feeds.values()), tmp_path)
    variances = {k[: -len(".std")]: np.asarray(v, np.float64) ** 2 for k, v in stds.items()}
    expected = reference.pfp_onnx(model, variances, feeds)
    return [(m.reshape(em.shape), v.reshape(ev.shape), em, ev) for (m, v), (em, ev) in zip(got, expected.values())]


def _assert_moments(results, mean_rtol=1e-5, var_rtol=1e-4):
    for mean, var, ref_mean, ref_var in results:
        np.testing.assert_allclose(mean, ref_mean, rtol=mean_rtol, atol=mean_rtol * np.abs(ref_mean).max())
        np.testing.assert_allclose(var, ref_var, rtol=var_rtol, atol=var_rtol * np.abs(ref_var).max())


def test_prelu_one_element_slope_broadcasts(tmp_path):
    """PRelu([0.25]) (PyTorch's nn.PReLU()) read the slope at the last axis' index: wrong means
    and a read past the one-element array."""
    bias = np.zeros((1, 1, 2, 3), np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"]), node("PRelu", ["h", "s"], ["y"])], [("x", [1, 1, 2, 3])], ["y"],
                       {"b": bias, "s": np.array([0.25], np.float32)})
    feeds = {"x": np.array([-4, -2, -1, 1, 2, 3], np.float32).reshape(1, 1, 2, 3)}
    results = _run(model, {"b.std": np.full(bias.shape, 0.5, np.float32)}, feeds, tmp_path)
    _assert_moments(results)


@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu", "Clip", "MaxPool", "HardSwish", "Abs"])
def test_concentrated_input_far_from_zero_keeps_its_variance(tmp_path, activation):
    """x ~ N(100, 1e-4) (a bias with std 0.01 on a large input): the variance was E[y^2] - E[y]^2
    in float32, 1e4 - 1e4 = 0."""
    extra, attrs, inputs = {}, {}, ["h"]
    if activation == "LeakyRelu":
        attrs = {"alpha": 0.1}
    if activation == "Clip":
        extra, inputs = {"lo": np.array(-1.0, np.float32), "hi": np.array(200.0, np.float32)}, ["h", "lo", "hi"]
    if activation == "MaxPool":
        attrs = {"kernel_shape": [2, 2]}
    bias = np.zeros((1, 1, 2, 2), np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"]), node(activation, inputs, ["y"], **attrs)], [("x", [1, 1, 2, 2])], ["y"],
                       {"b": bias, **extra})
    feeds = {"x": np.array([100.0, -100.0, 99.0, 100.5], np.float32).reshape(1, 1, 2, 2)}
    results = _run(model, {"b.std": np.full(bias.shape, 0.01, np.float32)}, feeds, tmp_path)
    assert results[0][1].max() > 5e-5  # not rounded away
    _assert_moments(results)


@pytest.mark.parametrize("ratio", [1e-3, 1e-4])
def test_concentrated_posterior_mlp_variance(tmp_path, ratio):
    """Gemm-Relu-Gemm with posterior std = ratio |w|: the hidden layer's variance was a difference
    of second moments, 1.1 % wrong at ratio 1e-3 and ~100 % at 1e-4."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((8, 16)).astype(np.float32), "b1": rng.standard_normal(16).astype(np.float32),
             "w2": rng.standard_normal((16, 4)).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32)}
    model = make_model([node("Gemm", ["x", "w1", "b1"], ["h"]), node("Relu", ["h"], ["r"]), node("Gemm", ["r", "w2", "b2"], ["y"])],
                       [("x", [2, 8])], ["y"], inits)
    stds = {f"{k}.std": (ratio * np.abs(v)).astype(np.float32) for k, v in inits.items()}
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    _assert_moments(_run(model, stds, feeds, tmp_path), var_rtol=1e-3)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "Conv"])
@pytest.mark.parametrize("auto_pad", ["SAME_LOWER", "SAME_UPPER", "VALID"])
def test_auto_pad(tmp_path, op, auto_pad):
    """auto_pad SAME_LOWER pooled a 7x7 input with kernel 3, stride 2 to 3x3 (ONNX: 4x4); a SAME
    Conv was refused as an opaque relax.call_tir."""
    rng = np.random.default_rng(5)
    bias = rng.standard_normal((1, 2, 7, 6)).astype(np.float32)
    inits = {"b": bias}
    attrs = {"auto_pad": auto_pad, "strides": [2, 2]}
    if op == "Conv":
        inits["w"] = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
        second = node("Conv", ["h", "w"], ["y"], **attrs)
    else:
        second = node(op, ["h"], ["y"], kernel_shape=[3, 2], **attrs)
    model = make_model([node("Add", ["x", "b"], ["h"]), second], [("x", [1, 2, 7, 6])], ["y"], inits)
    feeds = {"x": rng.standard_normal((1, 2, 7, 6)).astype(np.float32)}
    import onnxruntime as ort

    ort_out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    results = _run(model, {"b.std": np.full(bias.shape, 0.3, np.float32)}, feeds, tmp_path)
    assert results[0][2].shape == ort_out.shape  # the reference's geometry is onnxruntime's
    _assert_moments(results, var_rtol=3e-5)
    zero = _run(model, {}, feeds, tmp_path / "zero")
    np.testing.assert_allclose(zero[0][0], ort_out, rtol=1e-4, atol=1e-4 * np.abs(ort_out).max())


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
@pytest.mark.parametrize("shape", [[1, 1, 3, 1], [1, 3, 1, 1]])
def test_one_by_one_maxpool_then_activation(tmp_path, activation, shape):
    """MaxPool 1x1 + Relu/Clip on a width-1 tensor returned zeros: the relu read the max-pool
    accumulator's initial value through a local the C printer had bound before the store."""
    inputs = ["p", "lo", "hi"] if activation == "Clip" else ["p"]
    extra = {"lo": np.array(-0.5, np.float32), "hi": np.array(1.5, np.float32)} if activation == "Clip" else {}
    model = make_model([node("MaxPool", ["x"], ["p"], kernel_shape=[1, 1]), node(activation, inputs, ["y"])], [("x", shape)], ["y"], extra)
    x = np.array([0.5, -1.0, 2.0], np.float32).reshape(shape)
    (mean, var), = compile_and_run(model, {}, [x], tmp_path)
    np.testing.assert_array_equal(mean.ravel(), np.clip(x.ravel(), -0.5 if activation == "Clip" else 0.0, 1.5 if activation == "Clip" else None))
    assert not var.any()


def test_printer_locals_never_read_stale_values(tmp_path):
    """The unrolled max reduction of docs/upstream_tvm.md (defect 1), through pfpc's kernel
    extraction, built with gcc and run: every window's maximum, not its last element."""
    import subprocess

    import tvm
    from tvm import s_tir, te

    from pfpc.codegen.kernels import _extract

    x = te.placeholder((4, 4), "float32", name="x")
    ky, kx = te.reduce_axis((0, 2), name="ky"), te.reduce_axis((0, 2), name="kx")
    pooled = te.compute((2, 2), lambda i, j: te.max(x[2 * i + ky, 2 * j + kx], axis=[ky, kx]), name="pooled")
    sch = s_tir.Schedule(te.create_prim_func([x, pooled]).with_attr("global_symbol", "pool"))
    block = sch.get_sblock("pooled")
    sch.decompose_reduction(block, sch.get_loops(block)[2])
    for loop in sch.get_loops(block)[2:]:
        sch.unroll(loop)
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        source = tvm.compile(sch.mod, target="c").mod.inspect_source()
    kernel = _extract(source, "pool")
    values = np.array([[9, 1, 2, 3], [4, 5, 6, 7], [8, 0, 1, 2], [3, 4, 9, 5]], np.float32)
    program = tmp_path / "pool.c"
    program.write_text("#include <stdint.h>\n#include <stdio.h>\n" + kernel.signature("") + " {\n" + kernel.body + "\n}\n"
                       "int main(void) { float x[16] = {" + ", ".join(map(str, values.ravel())) + "}; float pooled[4];\n"
                       "  pool(x, pooled); for (int k = 0; k < 4; ++k) printf(\"%g\\n\", pooled[k]); return 0; }\n")
    subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Werror", "-o", str(tmp_path / "pool"), str(program)], check=True)
    printed = subprocess.run([str(tmp_path / "pool")], check=True, capture_output=True, text=True).stdout.split()
    expected = values.reshape(2, 2, 2, 2).max(axis=(1, 3))
    np.testing.assert_array_equal(np.array(printed, np.float32).reshape(2, 2), expected)


def _symbolic_model(tmp_path, shape):
    import onnx
    from onnx import TensorProto

    graph = helper.make_graph([node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return str(path)


def test_batch_sets_only_the_leading_dimension(tmp_path, capsys):
    """--batch 2 made ["N", 3, "L"] a [2, 3, 2] network; "L" is not the batch."""
    import json

    from pfpc.cli import main

    code = main([_symbolic_model(tmp_path, ["N", 3, "L"]), "--deterministic", "--batch", "2", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "dimension 2 ('L') of 'x'" in err and not (tmp_path / "out").exists()
    code = main([_symbolic_model(tmp_path, ["N", 3, 5]), "--deterministic", "--batch", "2", "-o", str(tmp_path / "ok")])
    assert code == 0
    meta = json.loads((tmp_path / "ok" / "pfpc.json").read_text())
    assert [list(shape) for _, shape in meta["inputs"]] == [[2, 3, 5]]


def test_output_that_is_an_input(tmp_path):
    """An output Identity(input) was a KeyError."""
    model = make_model([node("Identity", ["x"], ["y"]), node("Relu", ["x"], ["z"])], [("x", [1, 3])], ["y", "z"], {})
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    (y, y_var), (z, z_var) = compile_and_run(model, {}, [x], tmp_path)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(z, np.maximum(x, 0))
    assert not y_var.any() and not z_var.any()


@pytest.mark.parametrize("op", ["PRelu", "Div"])
def test_deterministic_input_with_constant_operand(tmp_path, op):
    """x -> PRelu(slope) or x -> Div(k[3, 1]) on a deterministic x: "a deterministic tensor has no
    moment to convert" (the constant operand was given a zero variance that made the output
    representation a variance)."""
    import onnxruntime as ort

    operand = np.array([0.25], np.float32) if op == "PRelu" else np.array([[2.0], [-3.0], [4.0]], np.float32)
    model = make_model([node(op, ["x", "k"], ["y"])], [("x", [1, 3, 2])], ["y"], {"k": operand})
    x = (np.arange(6, dtype=np.float32).reshape(1, 3, 2) - 2.5)
    (mean, var), = compile_and_run(model, {}, [x], tmp_path)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(mean.reshape(expected.shape), expected, rtol=1e-6)
    assert not var.any()


@pytest.mark.parametrize("case", ["relu_2_output", "y_var_input"])
def test_onnx_names_like_generated_names(tmp_path, case):
    """An output named relu_2 after three ReLUs, or an input y_var with an output y, repeated a C
    name pfpc generates (the C did not build, or passed one buffer twice as restrict)."""
    if case == "relu_2_output":
        model = make_model([node("Relu", ["x"], ["a"]), node("Relu", ["a"], ["b"]), node("Relu", ["b"], ["relu_2"])],
                           [("x", [1, 3])], ["relu_2"], {})
        stds = {}
    else:
        model = make_model([node("Add", ["y_var", "b"], ["y"])], [("y_var", [1, 3])], ["y"], {"b": np.ones((1, 3), np.float32)})
        stds = {"b.std": np.full((1, 3), 0.5, np.float32)}
    feeds = {model.graph.input[0].name: np.array([[1.0, -2.0, 3.0]], np.float32)}
    _assert_moments(_run(model, stds, feeds, tmp_path))


@pytest.mark.parametrize("posterior", [False, True])
def test_divide_by_zero_scalar(tmp_path, posterior):
    """Div by a zero scalar constant was "float division by zero" at compile time; ONNX (and
    onnxruntime) give +-inf and NaN."""
    import onnxruntime as ort

    model = make_model([node("Add", ["x", "b"], ["h"]), node("Div", ["h", "k"], ["y"])], [("x", [1, 3])], ["y"],
                       {"b": np.array([[0.0, 1.0, -1.0]], np.float32), "k": np.array(0.0, np.float32)})
    x = np.array([[0.0, 2.0, -3.0]], np.float32)
    stds = {"b.std": np.full((1, 3), 0.5, np.float32)} if posterior else {}
    (mean, var), = compile_and_run(model, stds, [x], tmp_path)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(mean, expected)
    assert np.all(np.isinf(var)) if posterior else not var.any()


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


SCHEDULE_CASES = {
    # TVM "reverse-compute-at ... requires all the producer(s)": relu's sqrt(bias variance) does not read the matmul
    "gemm_with_only_a_stochastic_bias": lambda r: ([node("Gemm", ["x", "w", "b"], ["h"]), node("Relu", ["h"], ["y"])], [("x", [2, 3])],
                                                 {"w": _w(r, 3, 4), "b": _w(r, 4)}, ["b"]),
    # "'merge' requires at least 2 loop(s)"
    "tanh_after_add": lambda r: ([node("Add", ["x", "b"], ["h"]), node("Tanh", ["h"], ["y"])], [("x", [1, 3, 9])], {"b": _w(r, 1, 3, 9)}, ["b"]),
    "sigmoid_after_batchnorm": lambda r: ([node("BatchNormalization", ["x", "g", "beta", "m", "v"], ["h"]), node("Sigmoid", ["h"], ["y"])],
                                          [("x", [1, 3, 4, 4])], {"g": _w(r, 3), "beta": _w(r, 3), "m": _w(r, 3), "v": np.abs(_w(r, 3)) + 0.5}, ["beta"]),
    # "Buffer maxpool_4.v1 is used before its definition": window columns that are padding for every output
    "maxpool_asymmetric_pads": lambda r: ([node("Add", ["x", "b"], ["h"]), node("MaxPool", ["h"], ["y"], kernel_shape=[2, 3], pads=[1, 0, 0, 2], strides=[2, 3])],
                                          [("x", [1, 1, 3, 2])], {"b": _w(r, 1, 1, 3, 2)}, ["b"]),
    # gcc -Werror: "variable 'maxpool_cdf_1_ptr' set but not used"
    "maxpool_werror_set_but_not_used": lambda r: ([node("Add", ["x", "b"], ["h"]), node("MaxPool", ["h"], ["y"], kernel_shape=[3, 2], pads=[2, 1, 1, 1])],
                                                  [("x", [1, 1, 4, 1])], {"b": _w(r, 1, 1, 4, 1)}, ["b"]),
}


@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_kernel_schedules_of_fuzzed_graphs(tmp_path, case):
    """Graphs whose kernels TVM could not schedule or whose C did not build with -Werror."""
    rng = np.random.default_rng(11)
    nodes, inputs, inits, stochastic = SCHEDULE_CASES[case](rng)
    model = make_model(nodes, inputs, ["y"], inits)
    stds = {f"{k}.std": (0.3 * np.abs(inits[k]) + 0.05).astype(np.float32) for k in stochastic}
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in inputs}
    _assert_moments(_run(model, stds, feeds, tmp_path), var_rtol=3e-5)


def test_integer_constant_output_refused_in_one_line(tmp_path, capsys):
    """An int64 Constant as a graph output was a KeyError traceback."""
    import onnx
    from onnx import TensorProto

    from pfpc.cli import main

    graph = helper.make_graph(
        [node("Relu", ["x"], ["y"]), node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.INT64, [2], [1, 2]))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]), helper.make_tensor_value_info("c", TensorProto.INT64, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    code = main([str(tmp_path / "m.onnx"), "--deterministic", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "output 'c'" in err and "int64" in err


def test_verify_per_layer_on_a_graph_ending_in_softmax():
    """pfpc verify --per-layer ended in a KeyError after all its work when the graph ended in a
    Softmax: the Monte Carlo run samples the logits there (as the PFP returns them)."""
    from pfpc.frontends.posterior import Posterior
    from pfpc.verify import per_layer

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    model = make_model([node("Gemm", ["x", "w"], ["h"]), node("Relu", ["h"], ["r"]), node("Softmax", ["r"], ["y"])], [("x", [1, 4])], ["y"], {"w": w})
    rows = per_layer(model, Posterior({"w": w}, {"w": (0.1 * np.abs(w)) ** 2}), {"x": rng.standard_normal((1, 4)).astype(np.float32)}, 100)
    assert [(row["output"], row["op"]) for row in rows] == [("h", "Gemm"), ("r", "Relu")]
    assert rows[0]["mean_err_in_std"] < 5  # a linear layer: the PFP is exact, MC within its noise


@pytest.mark.parametrize("shape, kernel, pads", [([1, 1, 1, 1], [1, 2], [0, 1, 0, 1]), ([1, 1, 1], [2], [1, 1])])
def test_maxpool_windows_with_one_element_inside(tmp_path, shape, kernel, pads):
    """Gaussian MaxPool where no output has two window elements inside the input (2,000-graph
    long run): its Clark steps were dead code TVM cut loose from their accumulator ("Buffer
    maxpool_0.v1 is used before its definition"). Each step now only picks its element there."""
    bias = np.zeros(shape, np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"]), node("MaxPool", ["h"], ["y"], kernel_shape=kernel, pads=pads)],
                       [("x", shape)], ["y"], {"b": bias})
    feeds = {"x": np.arange(1, 1 + np.prod(shape), dtype=np.float32).reshape(shape)}
    results = _run(model, {"b.std": np.full(shape, 0.5, np.float32)}, feeds, tmp_path)
    _assert_moments(results)


def _clip_by_quadrature(mean, var, lower, upper):
    """E[y] and Var[y] of y = clip(x, lower, upper), x ~ N(mean, var), by 30-digit quadrature."""
    import mpmath

    with mpmath.workdps(30):
        std, mean = mpmath.sqrt(var), mpmath.mpf(mean)
        clip = lambda x: min(max(x, -mpmath.inf if lower is None else lower), mpmath.inf if upper is None else upper)
        points = sorted({mean - 40 * std, mean, mean + 40 * std} | {mpmath.mpf(p) for p in (lower, upper) if p is not None and abs(p - mean) < 40 * std})
        first = mpmath.quad(lambda x: clip(x) * mpmath.npdf(x, mean, std), points)
        return float(first), float(mpmath.quad(lambda x: (clip(x) - first) ** 2 * mpmath.npdf(x, mean, std), points))


def test_clip_with_the_mean_beyond_a_bound(tmp_path):
    """Clip where the input's mean lies 1.6 to 7.5 standard deviations beyond a bound (the
    2,000-graph long run's N(-78, 210) clipped below at -0.3, N(10.6, 9.8) above at 0.2, an input
    near 50 clipped to [-1, 5]): the closed form's terms are O(M'^2 P) and cancel to a variance
    of O(V phi(u) / u^3), so the normal CDF's error came out 1e-4 to 14 times the variance. Every
    element to 5e-5 of its own variance, against the float64 reference, itself checked against
    30-digit quadrature here (its E[y^2] - E[y]^2 and 1 - P_lo - P_hi cancelled too)."""
    distances, std = np.linspace(1.6, 7.5, 12), 3.0
    branches = {(-0.3, None): [(-78.0, 210.0)] + [(-0.3 - u * std, std * std) for u in distances],
                (None, 0.2): [(10.6, 9.8)] + [(0.2 + u * std, std * std) for u in distances],
                (-1.0, 5.0): [(50.0, 100.0)] + [(5.0 + u * std, std * std) for u in distances] + [(-1.0 - u * std, std * std) for u in distances]}
    nodes, inputs, outputs, inits, stds, feeds = [], [], [], {}, {}, {}
    for i, ((lower, upper), elements) in enumerate(branches.items()):
        shape = [1, len(elements)]
        bounds = [f"lo{i}" if lower is not None else "", f"hi{i}" if upper is not None else ""]
        inits.update({name: np.array(value, np.float32) for name, value in zip(bounds, (lower, upper)) if name})
        inits[f"b{i}"] = np.zeros(shape, np.float32)
        stds[f"b{i}.std"] = np.sqrt([[v for _, v in elements]]).astype(np.float32)
        feeds[f"x{i}"] = np.array([[m for m, _ in elements]], np.float32)
        nodes += [node("Add", [f"x{i}", f"b{i}"], [f"h{i}"]), node("Clip", [f"h{i}"] + bounds[: 2 if upper is not None else 1], [f"y{i}"])]
        inputs.append((f"x{i}", shape))
        outputs.append(f"y{i}")
    model = make_model(nodes, inputs, outputs, inits)
    for (mean, var, ref_mean, ref_var), ((lower, upper), elements), x in zip(_run(model, stds, feeds, tmp_path), branches.items(), feeds.values()):
        bounds = [None if bound is None else float(np.float32(bound)) for bound in (lower, upper)]
        quadrature = np.array([_clip_by_quadrature(float(m), float(s) ** 2, *bounds)
                               for m, s in zip(x.ravel(), np.sqrt([v for _, v in elements]).astype(np.float32))])
        np.testing.assert_allclose(ref_var.ravel(), quadrature[:, 1], rtol=1e-6)
        np.testing.assert_allclose(ref_mean.ravel(), quadrature[:, 0], rtol=1e-9)
        np.testing.assert_allclose(var.ravel(), ref_var.ravel(), rtol=5e-5, err_msg=f"clip to [{lower}, {upper}]")
        np.testing.assert_allclose(mean.ravel(), ref_mean.ravel(), rtol=1e-6)


def test_resize_scale_that_rounds_the_size_down_is_refused(tmp_path, capsys):
    """Resize(linear, half_pixel) of H = 3 by scale 0.5 (the fuzzer): ONNX reads x at 0.5, the
    interpolation between x[0] and x[1] (onnxruntime), resize2d maps with output/input = 1/3 and
    returned x[1]. Refused in one line, exit 2; a scale that divides the size compiles."""
    from pfpc import cli

    x = [("x", [1, 1, 3, 2])]
    bad = make_model([node("Resize", ["x", "", "s"], ["y"], mode="linear")], x, ["y"], {"s": np.array([1, 1, 0.5, 1], np.float32)})
    path = tmp_path / "bad.onnx"
    onnx.save(bad, str(path))
    assert cli.main([str(path), "-o", str(tmp_path / "out"), "--deterministic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scale 0.5" in err and "rounds the output down" in err, err
    assert not (tmp_path / "out").exists()
    good = make_model([node("Resize", ["x", "", "s"], ["y"], mode="linear")], [("x", [1, 1, 4, 2])], ["y"], {"s": np.array([1, 1, 0.5, 1], np.float32)})
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(1, 1, 4, 2)}
    import onnxruntime as ort

    expected = ort.InferenceSession(good.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    (mean, var), = compile_and_run(good, {}, list(feeds.values()), tmp_path)
    np.testing.assert_allclose(mean.reshape(expected.shape), expected, rtol=1e-6)


@pytest.mark.parametrize("target, compiler_command", [
    ("host", ["gcc"]),
    ("cortex-m4", ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"])])
def test_gaussian_maxpool_c_has_no_uninitialized_warning(tmp_path, target, compiler_command):
    """Issue 20: the Gaussian MaxPool of x[1,1,4,1] + b -> MaxPool(k [3,2], pads [2,1,1,1]) was
    reported to trip a false-positive -Wmaybe-uninitialized under -Werror. Its C compiles without
    a warning at every optimisation level where gcc's flow analysis differs (-Og, -O1, -O2, -O3,
    -O3 -funroll-loops), on the host and for Cortex-M4 (session 7: not reproduced with gcc and
    arm-none-eabi-gcc 12.2)."""
    import shutil
    import subprocess

    import pfpc.compiler as compiler

    if not shutil.which(compiler_command[0]):
        pytest.skip(f"{compiler_command[0]} not installed")
    shape = [1, 1, 4, 1]
    model = make_model([node("Add", ["x", "b"], ["h"]), node("MaxPool", ["h"], ["y"], kernel_shape=[3, 2], pads=[2, 1, 1, 1])],
                       [("x", shape)], ["y"], {"b": np.zeros(shape, np.float32)})
    out = tmp_path / "out"
    compiler.compile(model, {"b.std": np.full(shape, 0.5, np.float32)}, out_dir=str(out), batch=1, target=target, covariance="none")
    source, = [path for path in out.glob("*.c") if not path.name.endswith("_main.c")]  # the kernels, not the runner
    for level in (["-Og"], ["-O1"], ["-O2"], ["-O3"], ["-O3", "-funroll-loops"]):
        result = subprocess.run(compiler_command + level + ["-std=c99", "-Wall", "-Wextra", "-Werror", "-Wmaybe-uninitialized",
                                                            "-I", str(out), "-c", str(source), "-o", str(tmp_path / "kernel.o")],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(level)}: {result.stderr[-2000:]}"


@pytest.mark.slow
def test_initializer_named_like_a_folded_constant(tmp_path):
    """The long run's seed 100014 (25 graphs in one model, 105 nodes): a Conv weight named
    ``constant0``, and another graph's constant operand that `substitute_layers` made a
    deterministic weight named ``constant0`` too; the means are merged by name, so the Conv read
    the constant's values (silently wrong means: 0.34 for 0.79). Renaming the initializer made it
    pass; the new weight now takes a name no weight has. Each graph alone passed, hence the
    whole model here."""
    import fuzz_graphs

    outcome = fuzz_graphs.check(fuzz_graphs.generate(100014, 25), str(tmp_path))
    assert outcome.ok, str(outcome)


def _max_in_40_digits(mean1, var1, mean2, var2):
    """E[y] and Var[y] of y = max(x1, x2), x_i ~ N(mean_i, var_i) independent: Clark's exact
    raw moments E[y] = M1 Phi(al) + M2 Phi(-al) + a phi(al), E[y^2] = (V1 + M1^2) Phi(al)
    + (V2 + M2^2) Phi(-al) + (M1 + M2) a phi(al) in 40-digit arithmetic, where their
    cancellation costs nothing."""
    import mpmath

    with mpmath.workdps(40):
        m1, v1, m2, v2 = (mpmath.mpf(x) for x in (mean1, var1, mean2, var2))
        spread = mpmath.sqrt(v1 + v2)
        alpha = (m1 - m2) / spread
        cdf, cdf_neg, pdf = mpmath.ncdf(alpha), mpmath.ncdf(-alpha), mpmath.npdf(alpha)
        first = m1 * cdf + m2 * cdf_neg + spread * pdf
        second = (v1 + m1 ** 2) * cdf + (v2 + m2 ** 2) * cdf_neg + (m1 + m2) * spread * pdf
        return float(first), float(second - first ** 2)


def _pairs_with_a_clear_winner():
    """(M1, V1, M2, V2) where one operand wins by 0.5 to 7.5 standard deviations of the difference:
    x2 wins, then x1 wins, concentrated winner, wide loser; float32 means and stds (as a model holds them)."""
    distances = np.linspace(0.5, 7.5, 8)
    pairs = []
    for winner_var, loser_var in ((1e-8, 0.04), (2.5e-8, 1e-6)):
        spread = np.sqrt(winner_var + loser_var)
        pairs += [(0.5 - u * spread, loser_var, 0.5, winner_var) for u in distances]
        pairs += [(-3.0, winner_var, -3.0 - u * spread, loser_var) for u in distances]
    return [(float(np.float32(m1)), float(np.float32(np.sqrt(v1))) ** 2, float(np.float32(m2)), float(np.float32(np.sqrt(v2))) ** 2)
            for m1, v1, m2, v2 in pairs]


def test_clark_max_where_one_operand_wins_by_many_standard_deviations(tmp_path):
    """Max, Min and GlobalMaxPool where one operand wins by 0.5 to 7.5 standard deviations
    of the difference and the winner is concentrated (the long run's GlobalMaxPool, seed 100040:
    variance 8.96e-8 for 2.54e-8; Min, 100037: 5.5e-8 for 3.6e-11; Min's mean, 100022): Clark's
    terms are O(d^2 Q(u)) and cancel to the winner's tiny variance plus O(a^2 phi(u) / u^3), so
    the normal CDF's error 7.5e-8 times d^2 came out many times the variance. Every element to
    1e-4 of its own variance and 1e-6 of its mean against the float64 reference, itself checked
    against Clark's raw moments in 40-digit arithmetic. (2-D MaxPool:
    `test_maxpool_2d_where_one_element_wins_by_many_standard_deviations`.)"""
    pairs = _pairs_with_a_clear_winner()
    n = len(pairs)
    m1, v1, m2, v2 = (np.array([p[k] for p in pairs], np.float64).reshape(1, 1, 1, n) for k in range(4))
    zeros = np.zeros((1, 1, 1, n), np.float32)
    inits = {"b1": zeros, "b2": zeros}
    nodes = [node("Add", ["x1", "b1"], ["h1"]), node("Add", ["x2", "b2"], ["h2"]), node("Max", ["h1", "h2"], ["max"]),
             node("Neg", ["h1"], ["n1"]), node("Neg", ["h2"], ["n2"]), node("Min", ["n1", "n2"], ["min"]),
             node("Concat", ["h1", "h2"], ["pair"], axis=2),
             node("Transpose", ["pair"], ["columns"], perm=[3, 1, 2, 0]), node("GlobalMaxPool", ["columns"], ["global"])]
    model = make_model(nodes, [("x1", [1, 1, 1, n]), ("x2", [1, 1, 1, n])], ["max", "min", "global"], inits)
    stds = {"b1.std": np.sqrt(v1.astype(np.float64)).astype(np.float32), "b2.std": np.sqrt(v2.astype(np.float64)).astype(np.float32)}
    results = _run(model, stds, {"x1": m1.astype(np.float32), "x2": m2.astype(np.float32)}, tmp_path)
    exact = np.array([_max_in_40_digits(*p) for p in pairs])
    for (mean, var, ref_mean, ref_var), name in zip(results, ["max", "min", "global"]):
        sign = -1.0 if name == "min" else 1.0
        np.testing.assert_allclose(ref_var.ravel(), exact[:, 1], rtol=1e-6, err_msg=f"{name}: reference")
        np.testing.assert_allclose(sign * ref_mean.ravel(), exact[:, 0], rtol=1e-9, atol=1e-12, err_msg=f"{name}: reference")
        np.testing.assert_allclose(var.ravel(), ref_var.ravel(), rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(mean.ravel(), ref_mean.ravel(), rtol=1e-6, atol=1e-7, err_msg=name)


def _smooth_in_30_digits(function, mean, var):
    """E[f(x)] and Var[f(x)], x ~ N(mean, var), by 30-digit quadrature (f smooth within 8 std)."""
    import mpmath

    with mpmath.workdps(30):
        mean, std = mpmath.mpf(mean), mpmath.sqrt(var)
        center = function(mean)
        # (f(mean + std z) - f(mean)) / scale, of order 1: quad's tolerance is absolute (1e-30),
        # so a variance of 1e-35 (a far tail) came out 1.5 % off, and f(x) itself left a shift
        # 1e-5 of its size to quad's relative error
        scale = max(abs(function(mean + std) - center), abs(function(mean - std) - center))
        step = lambda z: (function(mean + std * z) - center) / scale
        shift = mpmath.quad(lambda z: step(z) * mpmath.npdf(z), [-12, 0, 12])
        spread = mpmath.quad(lambda z: (step(z) - shift) ** 2 * mpmath.npdf(z), [-12, 0, 12])
        return float(center + shift * scale), float(spread * scale ** 2)


@pytest.mark.parametrize("op, alpha, gamma", [("Elu", 0.7, 1.0), ("Selu", 1.67326319217681884765625, 1.05070102214813232421875)])
def test_smooth_activation_of_a_concentrated_input(tmp_path, op, alpha, gamma):
    """Elu and Selu of concentrated inputs (std 1e-4 and 1e-2, the long run's Elu, seed 100008:
    variance 1.277e-8 for 1.299e-8; Selu, 100061: 2.129e-7 for 2.155e-7): the Gauss-Hermite
    differences f(M + h) - f(M) were formed from the two float32 values and lost the step.
    Means at least 8 std from the kink, where 16-point Gauss-Hermite is exact to float64: every
    element to 1e-4 of its variance against the float64 reference, itself checked against
    30-digit quadrature of the activation."""
    import mpmath

    means = [-3.0, -0.5, -0.1, 0.2, 7.0, 30.0]
    stds = [1e-4, 1e-2]
    elements = [(m, s) for m in means for s in stds]
    shape = [1, len(elements)]
    x = np.array([[m for m, _ in elements]], np.float32)
    std = np.array([[s for _, s in elements]], np.float32)
    attrs = {"alpha": alpha} if op == "Elu" else {"alpha": alpha, "gamma": gamma}
    model = make_model([node("Add", ["x", "b"], ["h"]), node(op, ["h"], ["y"], **attrs)], [("x", shape)], ["y"],
                       {"b": np.zeros(shape, np.float32)})
    (mean, var, ref_mean, ref_var), = _run(model, {"b.std": std}, {"x": x}, tmp_path)
    alpha32, gamma32 = float(np.float32(alpha)), float(np.float32(gamma))
    exact = np.array([_smooth_in_30_digits(lambda v: gamma32 * (v if v > 0 else alpha32 * mpmath.expm1(v)), float(m), float(s) ** 2)
                      for m, s in zip(x.ravel(), std.ravel())])
    np.testing.assert_allclose(ref_var.ravel(), exact[:, 1], rtol=1e-7)
    np.testing.assert_allclose(ref_mean.ravel(), exact[:, 0], rtol=1e-12)
    np.testing.assert_allclose(var.ravel(), ref_var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(mean.ravel(), ref_mean.ravel(), rtol=1e-6)


def _hard_swish_layer(elements, tmp_path):
    """x + b -> HardSwish, one element per (mean, std) of ``elements`` (b's std): (x, std, the
    compiled C's and the float64 reference's (mean, var, ref_mean, ref_var))."""
    shape = [1, len(elements)]
    x = np.array([[m for m, _ in elements]], np.float32)
    std = np.array([[s for _, s in elements]], np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"]), node("HardSwish", ["h"], ["y"])], [("x", shape)], ["y"],
                       {"b": np.zeros(shape, np.float32)})
    (outputs,) = _run(model, {"b.std": std}, {"x": x}, tmp_path)
    return x, std, outputs


def _hard_swish_quadrature(x, std, points):
    """[N, 2] (E[y], Var[y]) of HardSwish of N(m, s^2) per element by 30-digit quadrature over the
    intervals ``points(m, s)`` (mpf) bounds."""
    import mpmath

    def exact(m, s):
        with mpmath.workdps(30):
            m, s = mpmath.mpf(m), mpmath.mpf(s)
            f = lambda v: v * min(max(v / 6 + mpmath.mpf(1) / 2, 0), 1)  # noqa: E731
            bounds = points(m, s)
            first = mpmath.quad(lambda v: f(v) * mpmath.npdf(v, m, s), bounds)
            second = mpmath.quad(lambda v: f(v) ** 2 * mpmath.npdf(v, m, s), bounds)
            return float(first), float(second - first ** 2)

    return np.array([exact(float(m), float(s)) for m, s in zip(x.ravel(), std.ravel())])


def test_hard_swish_deep_below_its_lower_breakpoint(tmp_path):
    """HardSwish where the mean lies 1.6 to 7.5 standard deviations below -3 (the long run's
    seed 100007, 3.2 std below: variance 1.74e-4 for 7.37e-5 after a Tanh): the closed form's
    pieces cancel to a variance O(s^2 phi(a) / a^3), so the normal CDF's error came out a large
    part of it. Every element to 1e-4 of its own variance and of its mean against 30-digit
    quadrature (the float64 reference, a grid integration, checked against it too)."""
    import mpmath

    distances, stds = np.linspace(1.6, 7.5, 8), [0.05, 1.0, 3.0]
    x, std, (mean, var, ref_mean, ref_var) = _hard_swish_layer([(-3.0 - u * s, s) for s in stds for u in distances], tmp_path)

    def points(m, s):
        ends = sorted({m + 12 * s, mpmath.mpf(-3), mpmath.mpf(3)} | ({m + 12 * s} if m + 12 * s > 3 else set()))
        return [p for p in ends if p >= -3]

    quadrature = _hard_swish_quadrature(x, std, points)
    # the reference integrates on a grid: its variance within 1e-5, its mean within 1e-3 there
    np.testing.assert_allclose(ref_var.ravel(), quadrature[:, 1], rtol=1e-5)
    np.testing.assert_allclose(ref_mean.ravel(), quadrature[:, 0], rtol=1e-3)
    np.testing.assert_allclose(var.ravel(), quadrature[:, 1], rtol=1e-4)
    np.testing.assert_allclose(mean.ravel(), quadrature[:, 0], rtol=1e-4)


def _relu_in_40_digits(mean, std):
    """E[max(x, 0)] and Var[max(x, 0)], x ~ N(mean, std^2), mean < 0, in 40-digit arithmetic:
    s psi1(u) and s^2 (psi2(u) - psi1(u)^2), u = -mean / std, psi_k the tail's partial moments."""
    import mpmath

    with mpmath.workdps(40):
        mean, std = mpmath.mpf(mean), mpmath.mpf(std)
        u = -mean / std
        tail, pdf = mpmath.ncdf(-u), mpmath.npdf(u)
        psi1, psi2 = pdf - u * tail, (1 + u * u) * tail - u * pdf
        return float(std * psi1), float(std * std * (psi2 - psi1 * psi1))


def test_relu_deep_in_its_lower_tail(tmp_path):
    """ReLU with the mean 1.6 to 7.7 standard deviations below 0 (the long run's seed 200037,
    Sum -> Relu -> ReduceMean 3.5 std below: 7.624e-6 for 7.647e-6): M Phi(z) + s phi(z) cancels
    to O(s phi / z^2), so Phi's absolute error 7.5e-8 came out a large part of the mean, and the
    variance's closed form cancels too. Alone and fused after a convolution, stds 1e-3 to 3: every
    element's mean and variance within 1e-4 of itself against 40-digit arithmetic; beyond 7.75 std
    both are 0 (phi(z) is 0 there by design, `moments.std_normal_pdf`), within 1e-15 s of the
    exact values."""
    distances, stds = list(np.linspace(1.6, 7.7, 12)) + [8.0], [1e-3, 1.0, 3.0]
    elements = [(np.float32(-u * s), np.float32(s)) for s in stds for u in distances]
    n = len(elements)
    x = np.array([m for m, _ in elements], np.float32).reshape(1, 1, 1, n)
    std = np.array([s for _, s in elements], np.float32).reshape(1, 1, 1, n)
    nodes = [node("Add", ["x", "b"], ["h"]), node("Relu", ["h"], ["y"]),
             node("Conv", ["h", "w"], ["c"]), node("Relu", ["c"], ["fused"])]
    model = make_model(nodes, [("x", [1, 1, 1, n])], ["y", "fused"],
                       {"b": np.zeros((1, 1, 1, n), np.float32), "w": np.ones((1, 1, 1, 1), np.float32)})
    results = _run(model, {"b.std": std}, {"x": x}, tmp_path)
    exact = np.array([_relu_in_40_digits(float(m), float(s)) for m, s in elements])
    scale = std.ravel().astype(np.float64)
    inside = np.array([u < 7.75 for _ in stds for u in distances])
    for (mean, var, ref_mean, ref_var), name in zip(results, ["relu", "conv -> relu"]):
        np.testing.assert_allclose(ref_mean.ravel(), exact[:, 0], rtol=1e-9, err_msg=f"{name}: reference")
        np.testing.assert_allclose(ref_var.ravel(), exact[:, 1], rtol=1e-9, err_msg=f"{name}: reference")
        np.testing.assert_allclose(mean.ravel()[inside], exact[inside, 0], rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(var.ravel()[inside], exact[inside, 1], rtol=1e-4, err_msg=name)
        outside = ~inside
        assert np.all(np.abs(mean.ravel()[outside] - exact[outside, 0]) <= 1e-15 * scale[outside]), name
        assert np.all(np.abs(var.ravel()[outside] - exact[outside, 1]) <= 1e-15 * scale[outside] ** 2), name


def test_maxpool_2d_where_one_element_wins_by_many_standard_deviations(tmp_path):
    """2-D MaxPool over a pair whose winner leads by 0.5 to 7.5 standard deviations, without
    padding (a window of 2) and with padding (pads [1, 0, 1, 0]: only the middle output's window
    holds both, the padded one picks its element): Clark's closed form cancelled to the winner's
    tiny variance (as Max's did: `test_clark_max_where_one_operand_wins_by_many_standard_deviations`);
    the tail form, each element to 1e-4 of its variance and 1e-6 of its mean against 40-digit
    arithmetic. The padded kernel also builds with -Werror (gcc 12 reported a false
    -Wmaybe-uninitialized with the tail form and the pick in one loop)."""
    pairs = _pairs_with_a_clear_winner()
    n = len(pairs)
    m1, v1, m2, v2 = (np.array([p[k] for p in pairs], np.float64).reshape(1, 1, 1, n) for k in range(4))
    zeros = np.zeros((1, 1, 1, n), np.float32)
    nodes = [node("Add", ["x1", "b1"], ["h1"]), node("Add", ["x2", "b2"], ["h2"]), node("Concat", ["h1", "h2"], ["pair"], axis=2),
             node("Transpose", ["pair"], ["columns"], perm=[3, 1, 2, 0]),
             node("MaxPool", ["columns"], ["pool"], kernel_shape=[2, 1]),
             node("MaxPool", ["columns"], ["padded"], kernel_shape=[2, 1], pads=[1, 0, 1, 0])]
    model = make_model(nodes, [("x1", [1, 1, 1, n]), ("x2", [1, 1, 1, n])], ["pool", "padded"], {"b1": zeros, "b2": zeros})
    stds = {"b1.std": np.sqrt(v1).astype(np.float32), "b2.std": np.sqrt(v2).astype(np.float32)}
    results = _run(model, stds, {"x1": m1.astype(np.float32), "x2": m2.astype(np.float32)}, tmp_path)
    exact = np.array([_max_in_40_digits(*p) for p in pairs])
    for (mean, var, ref_mean, ref_var), name in zip(results, ["pool", "padded"]):
        both = (slice(None), 0, 0 if name == "pool" else 1, 0)
        np.testing.assert_allclose(ref_var[both], exact[:, 1], rtol=1e-6, err_msg=f"{name}: reference")
        np.testing.assert_allclose(var[both], exact[:, 1], rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(mean[both], exact[:, 0], rtol=1e-6, atol=1e-7, err_msg=name)
    _assert_moments(results[1:])  # the padded outputs that pick an element: against the reference


def _gelu_tanh_exact(v):
    import mpmath

    return v / (1 + mpmath.exp(-2 * mpmath.sqrt(2 / mpmath.pi) * (v + mpmath.mpf(0.044715) * v ** 3)))


#: op -> (nodes from h to y, opset, the activation in mpmath)
_SMOOTH_TAILS = {
    "Softplus": ([node("Softplus", ["h"], ["y"])], 17, lambda v: __import__("mpmath").log1p(__import__("mpmath").exp(v))),
    "SiLU": ([node("Sigmoid", ["h"], ["s"]), node("Mul", ["h", "s"], ["y"])], 17, lambda v: v / (1 + __import__("mpmath").exp(-v))),
    "Gelu": ([node("Gelu", ["h"], ["y"])], 20, lambda v: v * __import__("mpmath").ncdf(v)),
    "GeluTanh": ([node("Gelu", ["h"], ["y"], approximate="tanh")], 20, _gelu_tanh_exact),
}


@pytest.mark.parametrize("op", sorted(_SMOOTH_TAILS))
def test_smooth_activation_in_its_far_tails(tmp_path, op):
    """Softplus, SiLU, GELU (erf and tanh) of concentrated inputs from -80 to 80 (std 1e-4, 1e-2):
    the differences f(M + h) - f(M) of two float32 values kept nothing of the step near +-80
    (Softplus, the long run's seed 600002: variance 1.51e-9 for 1.38e-9 at M ~ 80) or in a
    saturated tail (e^-80 (e^h - 1)). Every element to 1e-4 of its own variance and 1e-6 of its
    mean against the float64 reference, itself checked against 30-digit quadrature (where
    16-point Gauss-Hermite is exact to float64); wide inputs (std 1, 10) against the reference."""
    nodes, opset, exact_function = _SMOOTH_TAILS[op]
    means = [-80.0, -30.0, -8.0, -3.0, -1.0, -0.1, 0.2, 1.0, 3.0, 5.0, 8.0, 30.0, 80.0]
    narrow = [(m, s) for m in means for s in (1e-4, 1e-2)]
    wide = [(m, s) for m in (-80.0, -3.0, 0.0, 3.0, 80.0) for s in (1.0, 10.0)]
    elements = narrow + wide
    shape = [1, len(elements)]
    x = np.array([[m for m, _ in elements]], np.float32)
    std = np.array([[s for _, s in elements]], np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"])] + nodes, [("x", shape)], ["y"], {"b": np.zeros(shape, np.float32)}, opset=opset)
    (mean, var, ref_mean, ref_var), = _run(model, {"b.std": std}, {"x": x}, tmp_path)
    mean, var, ref_mean, ref_var = (a.ravel() for a in (mean, var, ref_mean, ref_var))
    count = len(narrow)
    exact = np.array([_smooth_in_30_digits(exact_function, float(m), float(s) ** 2)
                      for m, s in zip(x.ravel()[:count], std.ravel()[:count])])
    np.testing.assert_allclose(ref_var[:count], exact[:, 1], rtol=1e-7)
    np.testing.assert_allclose(ref_mean[:count], exact[:, 0], rtol=1e-12)
    # below 1e-32 the float32 products w_k d_k^2 leave float32's normal range (or the variance does)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-32)
    # the mean to float32 exp of arguments up to ~50 (a relative 50 eps)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize("op", sorted(_SMOOTH_TAILS))
def test_smooth_activation_branches_over_means_and_spreads(tmp_path, op):
    """The branches of the session-11 forms (no libm call per node): SiLU's and GELU-tanh's end
    tail as E P away from 0, E / P short of it, P / E across it, e^-|w(v)| where |w(M)| or the
    step passes 80 (std 30 and 100: outer steps up to 660); GELU's Taylor series where
    |h| (|M| + |h|) <= 1 and normal_cdf beyond; Softplus unchanged. Means -12 to 12 and beyond 80,
    stds 1e-3 to 100: every element to 1e-4 of its variance and 1e-5 of its mean (or 1e-6 of its
    spread, where the mean crosses 0) against the float64 reference."""
    nodes, opset, _ = _SMOOTH_TAILS[op]
    means = [-85.0, -40.0, -12.0, -7.0, -4.5, -2.6, -2.4, -1.3, -0.5, 0.0, 0.4, 1.1, 2.5, 4.0, 6.5, 12.0, 40.0, 85.0]
    elements = [(m, s) for m in means for s in (1e-3, 0.05, 0.3, 1.0, 3.0, 30.0, 100.0)]
    shape = [1, len(elements)]
    x = np.array([[m for m, _ in elements]], np.float32)
    std = np.array([[s for _, s in elements]], np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"])] + nodes, [("x", shape)], ["y"], {"b": np.zeros(shape, np.float32)}, opset=opset)
    (mean, var, ref_mean, ref_var), = _run(model, {"b.std": std}, {"x": x}, tmp_path)
    mean, var, ref_mean, ref_var = (a.ravel() for a in (mean, var, ref_mean, ref_var))
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-32)
    spread = std.ravel().astype(np.float64)
    assert np.all(np.abs(mean - ref_mean) <= 1e-5 * np.abs(ref_mean) + 1e-6 * spread + 1e-37), op


def _probit_in_30_digits(op, mean, var):
    """The probit approximation's moments (pfpc's Sigmoid and Tanh) to 30 digits (at 200: the
    slopes down to e^-300 are differences from 1): Sigmoid
    E = s(u), u = M / sqrt(1 + pi V / 8), slope d = E (1 - E); Tanh E = tanh(u), u = M /
    sqrt(1 + pi V / 2), d = 1 - E^2; Var = d (1 - 1 / sqrt(1 + 2 d V))."""
    import mpmath

    with mpmath.workdps(200):
        mean, var = mpmath.mpf(mean), mpmath.mpf(var)
        if op == "Sigmoid":
            first = 1 / (1 + mpmath.exp(-mean / mpmath.sqrt(1 + mpmath.pi * var / 8)))
            slope = first * (1 - first)
        else:
            first = mpmath.tanh(mean / mpmath.sqrt(1 + mpmath.pi * var / 2))
            slope = 1 - first ** 2
        return float(first), float(slope * (1 - 1 / mpmath.sqrt(1 + 2 * slope * var)))


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh"])
def test_sigmoid_and_tanh_deep_in_saturation(tmp_path, op):
    """Tanh of N(-60, 55) (the long run's seed 600028, MatMul -> Tanh: variance 6.735e-9 for
    6.666e-9) and Sigmoid likewise: the slope 1 - E^2 (E (1 - E)) of a float32 E near +-1 (1)
    kept the rounding of E, not the slope. Means from 3 to 150 and spreads from 1e-4 to 15 std
    on both sides: every element to 1e-4 of its variance against the probit formulas at 30 digits
    (the float64 reference checked against them too)."""
    elements = [(sign * m, s) for sign in (-1.0, 1.0) for m in (3.0, 12.0, 40.0, 60.0, 150.0) for s in (1e-4, 1.0, 7.4, 15.0)]
    shape = [1, len(elements)]
    x = np.array([[m for m, _ in elements]], np.float32)
    std = np.array([[s for _, s in elements]], np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"]), node(op, ["h"], ["y"])], [("x", shape)], ["y"], {"b": np.zeros(shape, np.float32)})
    (mean, var, ref_mean, ref_var), = _run(model, {"b.std": std}, {"x": x}, tmp_path)
    exact = np.array([_probit_in_30_digits(op, float(m), float(s) ** 2) for m, s in zip(x.ravel(), std.ravel())])
    np.testing.assert_allclose(ref_var.ravel(), exact[:, 1], rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(ref_mean.ravel(), exact[:, 0], rtol=1e-12)
    # below 1e-32 the variance leaves float32's normal range
    np.testing.assert_allclose(var.ravel(), exact[:, 1], rtol=1e-4, atol=1e-32)
    # the mean to float32 exp of arguments up to ~50 (a relative 50 eps)
    np.testing.assert_allclose(mean.ravel(), exact[:, 0], rtol=1e-5, atol=1e-37)


def test_hard_swish_of_a_wide_input_below_its_lower_breakpoint(tmp_path):
    """HardSwish of N(-147, 39^2) (the long run's seed 700002, Gemm -> HardSwish: variance 0.92
    for 0.0157): with the middle piece [-3, 3] narrower than one standard deviation the closed
    form's O(s^4) pieces cancelled to the variance (N(-1603, 1000^2): 1.1e6 for 0.019). Means 0.5
    to 5 std below -3, std 10 to 1000: every element to 1e-4 of its variance and mean against
    30-digit quadrature."""
    import mpmath

    elements = [(-3.0 - u * s, s) for s in (10.0, 39.0, 1000.0) for u in (0.5, 1.6, 3.0, 3.65, 5.0)]
    x, std, (mean, var, _, _) = _hard_swish_layer(elements, tmp_path)
    quadrature = _hard_swish_quadrature(x, std, lambda m, s: [mpmath.mpf(-3), mpmath.mpf(3), m + 14 * s])
    np.testing.assert_allclose(var.ravel(), quadrature[:, 1], rtol=1e-4)
    np.testing.assert_allclose(mean.ravel(), quadrature[:, 0], rtol=1e-4)


def test_reference_hard_swish_of_a_concentrated_input_far_above():
    """The float64 reference's HardSwish took E[y^2] - E[y]^2 of its trapezoid sums: for N(54,
    6.5e-9) (the long run's seed 700039, Sub -> HardSwish) 6.399e-9 where y = x there gives
    exactly V. Above 3 + 12 std and below -3 - 12 std the moments are (M, V) and (0, 0)."""
    mean = np.array([54.27, 3.5, -40.0, 100.0])
    var = np.array([6.5e-9, 1e-6, 1e-4, 1e-12])
    ref_mean, ref_var = reference.hard_swish(mean, var)
    np.testing.assert_allclose(ref_var, [6.5e-9, 1e-6, 0.0, 1e-12], rtol=1e-9)
    np.testing.assert_allclose(ref_mean, [54.27, 3.5, 0.0, 100.0], rtol=1e-12)


@pytest.mark.parametrize("op", ["Elu", "Selu"])
def test_elu_of_a_wide_input_far_below_zero(tmp_path, op):
    """Selu of N(-130, 40^2) (the long run's seed 700073, MatMul -> Expand -> Selu): at the outer
    Gauss-Hermite nodes e^h overflowed while e^min(M, 0) was 0, a NaN mean. Means -20 to -300,
    std 10 to 100: every element to 1e-4 of its mean and variance against the float64 reference."""
    elements = [(m, s) for m in (-20.0, -130.0, -300.0) for s in (10.0, 40.0, 100.0)]
    shape = [1, len(elements)]
    x = np.array([[m for m, _ in elements]], np.float32)
    std = np.array([[s for _, s in elements]], np.float32)
    model = make_model([node("Add", ["x", "b"], ["h"]), node(op, ["h"], ["y"])], [("x", shape)], ["y"], {"b": np.zeros(shape, np.float32)})
    (mean, var, ref_mean, ref_var), = _run(model, {"b.std": std}, {"x": x}, tmp_path)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
    # below 1e-32 (a variance of 1e-40 here) float32 is subnormal
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-32)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-32)


def test_layer_norm_over_more_rows_than_the_stack_holds(tmp_path):
    """LayerNormalization over 300 rows: the statistics kernel kept all rows' sums before the
    normalisation (5 arrays of 300 floats, over TVM's 1 KiB stack limit, so a runtime workspace:
    "uses the TVM runtime", exit 3; long-run seed 800045 graph 1, 270 rows). The normalisation
    now follows each block of rows' sums (`schedule._after_outputs` counts the consumer's elements)."""
    rng = np.random.default_rng(4)
    shape, width = [1, 300, 8], 8
    nodes = [node("Add", ["x", "b"], ["h"]), node("LayerNormalization", ["h", "g", "beta"], ["y"], axis=-1)]
    weights = {"b": (0.3 * rng.standard_normal(shape)).astype(np.float32), "g": (1 + 0.2 * rng.standard_normal(width)).astype(np.float32),
               "beta": (0.1 * rng.standard_normal(width)).astype(np.float32)}
    model = make_model(nodes, [("x", shape)], ["y"], weights)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    stds = {"b.std": np.full(shape, 0.2, np.float32), "g.std": np.full(width, 0.05, np.float32)}
    _assert_moments(_run(model, stds, feeds, tmp_path), mean_rtol=1e-4, var_rtol=1e-3)


@pytest.mark.parametrize("classes", [300, 1000])
def test_softmax_over_more_classes_than_the_stack_holds(tmp_path, classes):
    """A model ending in Softmax over 300 or 1,000 classes (ImageNet's): the output stage keeps a
    row of K floats per intermediate, over TVM's 1 KiB stack limit from K = 257 on, which TVM puts
    in a runtime workspace ("uses the TVM runtime", exit 3; long-run seed 900043 graph 16, 1,008
    classes). Now a static array of the kernel (`kernels.static_scratch`): the probabilities equal
    the float64 mean-field formula on the reference's logit moments."""
    from test_softmax_outputs import meanfield

    rng = np.random.default_rng(5)
    w = (0.5 * rng.standard_normal((16, classes))).astype(np.float32)
    b = np.zeros(classes, np.float32)
    model = make_model([node("Gemm", ["x", "w", "b"], ["h"]), node("Softmax", ["h"], ["y"], axis=-1)], [("x", [1, 16])], ["y"], {"w": w, "b": b})
    feeds = {"x": rng.standard_normal((1, 16)).astype(np.float32)}
    stds = {"w.std": np.full(w.shape, 0.05, np.float32)}
    (probs, _), = compile_and_run(model, stds, [feeds["x"]], tmp_path)
    logits = make_model([node("Gemm", ["x", "w", "b"], ["y"])], [("x", [1, 16])], ["y"], {"w": w, "b": b})
    (mean, var), = reference.pfp_onnx(logits, {"w": np.full(w.shape, 0.05 ** 2)}, feeds).values()
    np.testing.assert_allclose(probs.reshape(mean.shape), meanfield(mean, var, -1), rtol=1e-4, atol=1e-7)
