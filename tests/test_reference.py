"""Tests that prove tests/reference.py right, independently of pfpc.

Three kinds of evidence:
1. All variances zero: every op equals onnxruntime running the deterministic model.
2. Linear networks (and Gemm->Relu->Gemm) whose inputs to every op really are independent:
   PFP mean and variance are exact, so they must equal Monte Carlo (onnxruntime, sampled
   weights) within MC error. Tolerances are per element, Z standard errors, where the
   standard error of the sample variance is estimated from the samples' 4th central moment
   (sqrt((m4 - m2^2)/S)), so it holds for non-Gaussian outputs too.
3. Single ReLU / Clark max / MaxPool on Gaussian inputs vs NumPy Monte Carlo of the op itself
   and vs exact numerical integration (no sampling noise) of the max of Gaussians.

Measured (seeded, see the asserts): Clark's pairwise max is exact for 2 inputs (~1e-15);
for 4 (2x2 window) and 9 (3x3) independent inputs, over 40 random windows, the worst mean
error is 0.032 / 0.031 output standard deviations and the worst relative variance error
0.24 / 0.32, with the variance underestimated on average (-8 % / -17 %); iid inputs:
mean +0.2 % / -0.2 % sd, variance -4.4 % / -11.3 %.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from scipy.special import ndtr

import reference as R

Z = 5.0  # standard errors allowed in MC comparisons (two-sided p ~ 6e-7 per element)
MC_SAMPLES = 10000  # ORT MC: rel. SE of a variance = sqrt((kurt-1)/S), 1.4 % if Gaussian


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def make_model(nodes, inputs, outputs, inits=None, opset=17):
    """inputs: {name: shape}; outputs: list of names; inits: {name: np.ndarray}."""
    inits = inits or {}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # fills output shapes
    onnx.checker.check_model(model)
    return model


def run_ort(model, inputs):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
    names = [o.name for o in model.graph.output]
    return dict(zip(names, sess.run(names, feed)))


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def check_deterministic(model, inputs, atol=1e-5):
    """PFP with explicit all-zero variances == onnxruntime; output variance exactly 0."""
    zero_vars = {i.name: np.zeros(tuple(i.dims)) for i in model.graph.initializer
                 if i.data_type == TensorProto.FLOAT}
    got = R.pfp_onnx(model, zero_vars, inputs)
    want = run_ort(model, inputs)
    for name, expected in want.items():
        mean, var = got[name]
        assert mean.shape == expected.shape, name
        np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=atol)
        assert np.all(var == 0.0) and not np.isnan(mean).any()


def check_mc(model, stds, inputs, samples=MC_SAMPLES, seed=0, input_stds=None,
             max_rel_tol=0.25):
    """PFP == Monte Carlo within Z standard errors, mean and variance, every element."""
    variances = {k: np.asarray(v, np.float64) ** 2 for k, v in stds.items()}
    input_vars = {k: np.asarray(v, np.float64) ** 2 for k, v in (input_stds or {}).items()}
    pfp = R.pfp_onnx(model, variances, inputs, input_vars=input_vars)
    mc = R.monte_carlo(model, stds, inputs, samples, seed, input_stds=input_stds,
                       with_var_stderr=True)
    for name, (mc_mean, mc_var, se_mean, se_var) in mc.items():
        mean, var = pfp[name]
        assert np.all(var > 0)
        z_mean = np.abs(mean - mc_mean) / se_mean
        z_var = np.abs(var - mc_var) / se_var
        assert z_mean.max() < Z, (name, z_mean.max())
        assert z_var.max() < Z, (name, z_var.max())
        # the tolerance has teeth: Z standard errors are a small fraction of the variance
        assert (Z * se_var / mc_var).max() < max_rel_tol
    return pfp, mc


def rel_std(rng, w, frac=(0.2, 0.6)):
    """Posterior std proportional to |w| (plus a floor), float64."""
    w = np.asarray(w, np.float64)
    return rng.uniform(*frac, size=w.shape) * (np.abs(w) + 0.1)


# --------------------------------------------------------------------------------------
# 1. all variances zero == onnxruntime
# --------------------------------------------------------------------------------------

C_SHAPES = {"none": None, "scalar": (), "n": ("N",), "1n": (1, "N"), "m1": ("M", 1),
            "mn": ("M", "N")}


@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([0, 1], [0, 1])))
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -2.0)])
@pytest.mark.parametrize("c_kind", list(C_SHAPES))
def test_gemm_deterministic(trans_a, trans_b, alpha, beta, c_kind):
    rng = np.random.default_rng(1)
    m, k, n = 3, 4, 5
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    inits = {"B": f32(rng, *b_shape)}
    names = ["A", "B"]
    if C_SHAPES[c_kind] is not None:
        c_shape = tuple({"M": m, "N": n}.get(d, d) for d in C_SHAPES[c_kind])
        inits["C"] = f32(rng, *c_shape)
        names.append("C")
    node = helper.make_node("Gemm", names, ["Y"], alpha=alpha, beta=beta,
                            transA=trans_a, transB=trans_b)
    model = make_model([node], {"A": a_shape}, ["Y"], inits)
    check_deterministic(model, {"A": f32(rng, *a_shape)})


def test_gemm_weight_first_operand_deterministic():
    """The Gaussian (weight) may be the first operand: Y = W @ x."""
    rng = np.random.default_rng(2)
    node = helper.make_node("Gemm", ["W", "x"], ["Y"], transA=1, alpha=0.7)
    model = make_model([node], {"x": (4, 2)}, ["Y"], {"W": f32(rng, 4, 3)})
    check_deterministic(model, {"x": f32(rng, 4, 2)})


@pytest.mark.parametrize("x_shape,w_shape", [((3, 5), (5, 6)), ((2, 3, 5), (5, 6)),
                                             ((2, 3, 4, 5), (5, 6)), ((5,), (5, 6))])
def test_matmul_deterministic(x_shape, w_shape):
    rng = np.random.default_rng(3)
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = make_model([node], {"x": x_shape}, ["y"], {"W": f32(rng, *w_shape)})
    check_deterministic(model, {"x": f32(rng, *x_shape)})


CONV_CASES = [
    # (C, O, H, W, kernel, attrs, bias)
    (3, 4, 7, 6, (3, 3), {}, True),
    (3, 4, 7, 6, (3, 3), {"pads": [1, 1, 1, 1]}, True),
    (3, 4, 8, 9, (3, 2), {"strides": [2, 3], "pads": [1, 0, 2, 1]}, False),
    (2, 3, 9, 9, (3, 3), {"dilations": [2, 2], "pads": [2, 1, 0, 2]}, True),
    (4, 6, 6, 6, (3, 3), {"group": 2, "pads": [1, 1, 1, 1]}, True),
    (4, 4, 6, 7, (3, 3), {"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}, True),  # dw
    (3, 6, 6, 6, (3, 3), {"group": 3}, False),  # depthwise, channel multiplier 2
    (5, 2, 4, 4, (1, 1), {}, True),  # pointwise
    (2, 3, 7, 8, (3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, True),
    (2, 3, 7, 8, (2, 4), {"auto_pad": "SAME_LOWER"}, False),
    (2, 3, 7, 8, (3, 3), {"auto_pad": "VALID", "strides": [2, 1]}, False),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_deterministic(case):
    c, o, h, w, kernel, attrs, bias = case
    rng = np.random.default_rng(4)
    groups = attrs.get("group", 1)
    inits = {"W": f32(rng, o, c // groups, *kernel)}
    names = ["x", "W"]
    if bias:
        inits["b"] = f32(rng, o)
        names.append("b")
    node = helper.make_node("Conv", names, ["y"], kernel_shape=list(kernel), **attrs)
    model = make_model([node], {"x": (2, c, h, w)}, ["y"], inits)
    check_deterministic(model, {"x": f32(rng, 2, c, h, w)})


POOL_CASES = [
    ((2, 2), {"strides": [2, 2]}),
    ((3, 3), {"strides": [1, 1], "pads": [1, 1, 1, 1]}),
    ((3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1]}),
    ((2, 3), {"strides": [2, 1], "pads": [0, 1, 1, 0]}),
    ((2, 2), {"strides": [1, 1], "dilations": [2, 2]}),
    ((3, 3), {"strides": [2, 2], "ceil_mode": 1}),
    ((2, 2), {"strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ((3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((2, 2), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((2, 2), {}),  # default strides 1
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(i) for i in range(len(POOL_CASES))])
def test_maxpool_deterministic(case):
    kernel, attrs = case
    rng = np.random.default_rng(5)
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=list(kernel), **attrs)
    model = make_model([node], {"x": (2, 3, 7, 8)}, ["y"])
    # all values negative: padding treated as a 0 value instead of "ignored" would win
    x = np.abs(f32(rng, 2, 3, 7, 8)) * -1 - 0.5
    check_deterministic(model, {"x": x})


def test_shape_ops_and_relu_deterministic():
    """Relu, Reshape (shape from Constant and from initializer, 0 and -1), Flatten,
    Identity, Dropout, Add with broadcasting."""
    rng = np.random.default_rng(6)
    shape_const = helper.make_node(
        "Constant", [], ["s1"], value=numpy_helper.from_array(np.array([0, -1], np.int64)))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        shape_const,
        helper.make_node("Reshape", ["r", "s1"], ["r2"]),  # [2, 3*4*5]
        helper.make_node("Reshape", ["r2", "s2"], ["r3"]),  # [2, 3, 20]
        helper.make_node("Add", ["r3", "bias"], ["a"]),  # bias [20] broadcast
        helper.make_node("Identity", ["a"], ["i"]),
        helper.make_node("Dropout", ["i"], ["d"]),
        helper.make_node("Flatten", ["d"], ["y"], axis=2),
        helper.make_node("Flatten", ["x"], ["z"]),
    ]
    inits = {"s2": np.array([2, 3, -1], np.int64), "bias": f32(rng, 20)}
    model = make_model(nodes, {"x": (2, 3, 4, 5)}, ["y", "z"], inits)
    check_deterministic(model, {"x": f32(rng, 2, 3, 4, 5)})


def test_unsupported_op_names_it():
    model = make_model([helper.make_node("Sin", ["x"], ["y"])], {"x": (2,)}, ["y"])
    with pytest.raises(NotImplementedError, match="Sin"):
        R.pfp_onnx(model, {}, {"x": np.zeros(2)})


def test_functional_ops_match_numpy():
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((4, 5)), rng.standard_normal((3, 5)), rng.standard_normal(3)
    zero = np.zeros_like
    m, v = R.linear(x, zero(x), w, zero(w), b, zero(b))
    np.testing.assert_allclose(m, x @ w.T + b, rtol=1e-12)
    assert np.all(v == 0)
    m, v = R.matmul(x, None, w.T, None)
    np.testing.assert_allclose(m, x @ w.T, rtol=1e-12)
    m, v = R.gemm(x, None, w, None, b, None, alpha=2.0, beta=3.0, transB=1)
    np.testing.assert_allclose(m, 2 * x @ w.T + 3 * b, rtol=1e-12)
    m, v = R.relu(x, zero(x))
    assert np.array_equal(m, np.maximum(x, 0)) and np.all(v == 0)
    m, v = R.flatten(rng.standard_normal((2, 3, 4)), None, axis=2)
    assert m.shape == (6, 4) and v.shape == (6, 4)


def test_gaussian_scaling_and_single_layer_formula():
    """gemm scales variances by alpha^2 / beta^2; linear var is sum(s2*q + mu^2*v) + s2_b."""
    rng = np.random.default_rng(8)
    xm, xv = rng.standard_normal((3, 4)), rng.uniform(0.1, 1, (3, 4))
    wm, wv = rng.standard_normal((2, 4)), rng.uniform(0.1, 1, (2, 4))
    bm, bv = rng.standard_normal(2), rng.uniform(0.1, 1, 2)
    m, v = R.linear(xm, xv, wm, wv, bm, bv)
    q = xm ** 2 + xv
    want_v = np.array([[np.sum(wv[o] * q[n] + wm[o] ** 2 * xv[n]) + bv[o] for o in range(2)]
                       for n in range(3)])
    np.testing.assert_allclose(v, want_v, rtol=1e-12)
    m2, v2 = R.gemm(xm, xv, wm, wv, bm, bv, alpha=-2.0, beta=0.5, transB=1)
    m0, v0 = R.gemm(xm, xv, wm, wv, transB=1)
    np.testing.assert_allclose(m2, -2 * m0 + 0.5 * bm, rtol=1e-12)
    np.testing.assert_allclose(v2, 4 * v0 + 0.25 * bv, rtol=1e-12)


# --------------------------------------------------------------------------------------
# 2. networks where the PFP is exact == Monte Carlo through onnxruntime
# --------------------------------------------------------------------------------------


def test_mc_mlp_gemm_gemm():
    """x (deterministic) -> Gemm(transB=1) -> Gemm(transA=0, transB=0, alpha, beta, C[1,N]).
    Hidden units use disjoint weight rows, so they are independent: PFP exact."""
    rng = np.random.default_rng(10)
    w1, b1 = f32(rng, 8, 5), f32(rng, 8)
    w2, c2 = f32(rng, 8, 3, scale=0.5), f32(rng, 1, 3)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Gemm", ["h", "W2", "C2"], ["y"], alpha=1.5, beta=-0.5)]
    model = make_model(nodes, {"x": (4, 5)}, ["y"], {"W1": w1, "b1": b1, "W2": w2, "C2": c2})
    stds = {"W1": rel_std(rng, w1), "b1": rel_std(rng, b1), "W2": rel_std(rng, w2),
            "C2": rel_std(rng, c2)}
    x = f32(rng, 4, 5)
    pfp, _ = check_mc(model, stds, {"x": x})

    # every variance term of the second layer matters (so dropping one would fail):
    # var(y) = alpha^2 * (m^2 @ s2 + v @ mu^2 + v @ s2) + beta^2 s2_c
    hm, hv = R.linear(x, None, w1, stds["W1"] ** 2, b1, stds["b1"] ** 2)
    s2 = stds["W2"] ** 2
    terms = [hm ** 2 @ s2, hv @ w2.astype(np.float64) ** 2, hv @ s2]
    total = pfp["y"][1] / 1.5 ** 2
    for t in terms:
        assert (t / total).min() > 0.05


def test_mc_batched_matmul_add_matmul():
    rng = np.random.default_rng(11)
    w1, b1, w2 = f32(rng, 4, 6), f32(rng, 6), f32(rng, 6, 2)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("MatMul", ["hb", "W2"], ["y"])]
    model = make_model(nodes, {"x": (2, 3, 4)}, ["y"], {"W1": w1, "b1": b1, "W2": w2})
    stds = {"W1": rel_std(rng, w1), "b1": rel_std(rng, b1), "W2": rel_std(rng, w2)}
    check_mc(model, stds, {"x": f32(rng, 2, 3, 4)})


def test_mc_conv_conv1x1():
    """Grouped, strided, padded 3x3 conv -> 1x1 conv: the 1x1 conv at a pixel sees only
    that pixel's channels, which use disjoint kernels: PFP exact."""
    rng = np.random.default_rng(12)
    w1, b1 = f32(rng, 4, 2, 3, 3, scale=0.5), f32(rng, 4)
    w2, b2 = f32(rng, 3, 4, 1, 1), f32(rng, 3)
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], group=2, strides=[2, 1],
                              pads=[1, 0, 1, 2], dilations=[1, 2]),
             helper.make_node("Conv", ["h", "W2", "b2"], ["y"])]
    inits = {"W1": w1, "b1": b1, "W2": w2, "b2": b2}
    model = make_model(nodes, {"x": (1, 4, 5, 5)}, ["y"], inits)
    stds = {k: rel_std(rng, v) for k, v in inits.items()}
    check_mc(model, stds, {"x": f32(rng, 1, 4, 5, 5)})


def test_mc_depthwise_conv_then_pointwise():
    rng = np.random.default_rng(13)
    w1, w2 = f32(rng, 3, 1, 3, 3), f32(rng, 2, 3, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "W2"], ["y"])]
    model = make_model(nodes, {"x": (1, 3, 4, 4)}, ["y"], {"W1": w1, "W2": w2})
    stds = {"W1": rel_std(rng, w1), "W2": rel_std(rng, w2)}
    check_mc(model, stds, {"x": f32(rng, 1, 3, 4, 4)})


def test_mc_residual_add_of_independent_branches():
    """y = Gemm(W3, Gemm(x, W1) + MatMul(x, W2)); the branches have disjoint weights."""
    rng = np.random.default_rng(14)
    w1, w2, w3 = f32(rng, 6, 4), f32(rng, 4, 6), f32(rng, 2, 6)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["a"], transB=1),
             helper.make_node("MatMul", ["x", "W2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Gemm", ["s", "W3"], ["y"], transB=1)]
    model = make_model(nodes, {"x": (3, 4)}, ["y"], {"W1": w1, "W2": w2, "W3": w3})
    stds = {"W1": rel_std(rng, w1), "W2": rel_std(rng, w2), "W3": rel_std(rng, w3)}
    check_mc(model, stds, {"x": f32(rng, 3, 4)})


def test_mc_stochastic_input_conv():
    """Gaussian input (input_vars / input_stds) exercises conv(v, mu^2) + conv(v, s2)."""
    rng = np.random.default_rng(15)
    w, b = f32(rng, 3, 2, 3, 3), f32(rng, 3)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])
    model = make_model([node], {"x": (1, 2, 5, 5)}, ["y"], {"W": w, "b": b})
    x = f32(rng, 1, 2, 5, 5)
    check_mc(model, {"W": rel_std(rng, w), "b": rel_std(rng, b)}, {"x": x},
             input_stds={"x": rng.uniform(0.2, 1.0, x.shape)})


def test_mc_gemm_relu_gemm():
    """Nonlinear but still exact: hidden pre-activations are exactly Gaussian and
    independent, ReLU moments are exact, and the next Gemm needs only two moments."""
    rng = np.random.default_rng(16)
    w1, b1, w2 = f32(rng, 10, 4), f32(rng, 10), f32(rng, 3, 10)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1)]
    model = make_model(nodes, {"x": (3, 4)}, ["y"], {"W1": w1, "b1": b1, "W2": w2})
    stds = {"W1": rel_std(rng, w1), "b1": rel_std(rng, b1), "W2": rel_std(rng, w2)}
    check_mc(model, stds, {"x": f32(rng, 3, 4)})


def test_mc_detects_broken_independence():
    """Three dense layers: layer-2 outputs share layer-2 inputs, so they are correlated
    and layer 3 sees dependent inputs. The PFP mean stays exact (multilinear in
    independent weights) but its variance misses the covariance terms; with all-positive
    weight means those are positive, so the PFP underestimates. This shows the MC check is
    sharp enough to catch a violated assumption (and documents the limitation)."""
    rng = np.random.default_rng(17)
    w1, w2, w3 = (np.abs(f32(rng, 6, 3)) + 0.2, np.abs(f32(rng, 6, 6)) + 0.2,
                  np.abs(f32(rng, 2, 6)) + 0.2)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h1"], transB=1),
             helper.make_node("Gemm", ["h1", "W2"], ["h2"], transB=1),
             helper.make_node("Gemm", ["h2", "W3"], ["y"], transB=1)]
    model = make_model(nodes, {"x": (2, 3)}, ["y"], {"W1": w1, "W2": w2, "W3": w3})
    stds = {"W1": 1.0 * w1, "W2": 0.1 * w2, "W3": 0.1 * w3}  # h1 noise dominates
    x = np.abs(f32(rng, 2, 3)) + 0.5
    pfp = R.pfp_onnx(model, {k: v.astype(np.float64) ** 2 for k, v in stds.items()}, {"x": x})
    mean, var = pfp["y"]
    mc_mean, mc_var, se_mean, se_var = R.monte_carlo(model, stds, {"x": x}, MC_SAMPLES, 1,
                                                     with_var_stderr=True)["y"]
    assert (np.abs(mean - mc_mean) / se_mean).max() < Z
    assert ((mc_var - var) / se_var).min() > Z  # PFP variance clearly too small
    assert (var / mc_var).max() < 0.5


def test_monte_carlo_api():
    """3-tuple by default; reproducible with a seed; deterministic model -> zero variance."""
    rng = np.random.default_rng(18)
    w = f32(rng, 2, 3)
    model = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
                       {"x": (1, 3)}, ["y"], {"W": w})
    x = f32(rng, 1, 3)
    r1 = R.monte_carlo(model, {"W": np.full(w.shape, 0.1)}, {"x": x}, 50, seed=3)
    r2 = R.monte_carlo(model, {"W": np.full(w.shape, 0.1)}, {"x": x}, 50, seed=3)
    assert len(r1["y"]) == 3
    for a, b in zip(r1["y"], r2["y"]):
        assert np.array_equal(a, b)
    m, v, se = R.monte_carlo(model, {}, {"x": x}, 10, seed=0)["y"]
    np.testing.assert_allclose(m, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-6)
    assert np.all(v == 0) and np.all(se == 0)


# --------------------------------------------------------------------------------------
# 3. single nonlinear ops vs NumPy Monte Carlo and exact integration
# --------------------------------------------------------------------------------------


def sample_moments(samples):
    """Sample mean/var and their standard errors along axis 0 (float64)."""
    n = samples.shape[0]
    mean = samples.mean(axis=0)
    d = samples - mean
    m2 = (d ** 2).mean(axis=0)
    m4 = (d ** 4).mean(axis=0)
    return mean, m2 * n / (n - 1), np.sqrt(m2 / n), np.sqrt(np.maximum(m4 - m2 ** 2, 0) / n)


def assert_mc_match(mean, var, samples):
    """Z standard errors. Rare-event elements (relu of M << 0: a handful of nonzero
    samples) have unreliable sample SEs, so the mean SE uses max(model var, sample var)
    and the variance check has an absolute floor of 1e-6 (values here are O(1))."""
    mc_mean, mc_var, _, se_var = sample_moments(samples)
    se_mean = np.sqrt(np.maximum(var, mc_var) / samples.shape[0])
    assert (np.abs(mean - mc_mean) <= Z * se_mean + 1e-12).all()
    assert (np.abs(var - mc_var) <= Z * se_var + 1e-6).all()


def exact_max_moments(means, variances):
    """E[max], Var[max] of independent Gaussians by numerical integration: with f the
    density of the max X of the stochastic inputs, f(x) = sum_i phi_i(x) prod_{j!=i} Phi_j(x),
    and c the largest deterministic input (if any), E[h(max)] = int h(max(x, c)) f(x) dx
    (trapezoid rule on a fine grid that contains the kink c). No Clark, no sampling."""
    mu = np.asarray(means, np.float64).ravel()
    var = np.asarray(variances, np.float64).ravel()
    det = var == 0
    c = mu[det].max() if det.any() else -np.inf
    mu, sd = mu[~det], np.sqrt(var[~det])
    x = np.linspace((mu - 12 * sd).min(), (mu + 12 * sd).max(), 100001)
    if np.isfinite(c):
        x = np.sort(np.append(x, c))
    z = (x[:, None] - mu) / sd
    cdf = ndtr(z)
    pdf = np.exp(-0.5 * z ** 2) / (np.sqrt(2 * np.pi) * sd)
    ones = np.ones((x.size, 1))
    before = np.cumprod(np.hstack([ones, cdf[:, :-1]]), axis=1)  # prod_{j<i} Phi_j
    after = np.cumprod(np.hstack([ones, cdf[:, :0:-1]]), axis=1)[:, ::-1]  # prod_{j>i}
    f = (pdf * before * after).sum(axis=1)
    y = np.maximum(x, c)
    e1 = np.trapezoid(y * f, x)
    e2 = np.trapezoid((y - e1) ** 2 * f, x)
    return e1, e2


def test_relu_vs_monte_carlo():
    rng = np.random.default_rng(20)
    m = np.linspace(-3, 3, 13)[:, None] * np.ones((1, 4))
    v = np.array([0.01, 0.5, 1.0, 4.0])[None, :] * np.ones((13, 1))
    mean, var = R.relu(m, v)
    x = m + np.sqrt(v) * rng.standard_normal((100000,) + m.shape)
    assert_mc_match(mean, var, np.maximum(x, 0))


def test_relu_matches_closed_form_from_design():
    """The docs/math.md formulas written naively (valid for V > 0)."""
    rng = np.random.default_rng(21)
    m, v = rng.normal(size=200) * 3, rng.uniform(0.01, 5, 200)
    s = np.sqrt(v)
    z = m / s
    pdf = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
    ey = m * ndtr(z) + s * pdf
    ey2 = (m ** 2 + v) * ndtr(z) + m * s * pdf
    mean, var = R.relu(m, v)
    np.testing.assert_allclose(mean, ey, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var, ey2 - ey ** 2, rtol=1e-8, atol=1e-10)


def test_clark_max_two_inputs_is_exact():
    rng = np.random.default_rng(22)
    m1, m2 = rng.normal(size=30) * 2, rng.normal(size=30) * 2
    v1, v2 = rng.uniform(0.05, 3, 30), rng.uniform(0.05, 3, 30)
    v2[:5] = 0.0  # one deterministic input
    mean, var = R.clark_max(m1, v1, m2, v2)
    for i in range(30):
        e1, e2 = exact_max_moments([m1[i], m2[i]], [v1[i], v2[i]])
        assert abs(mean[i] - e1) < 1e-7 and abs(var[i] - e2) < 1e-7 * max(1, e2)
    x1 = m1 + np.sqrt(v1) * rng.standard_normal((100000, 30))
    x2 = m2 + np.sqrt(v2) * rng.standard_normal((100000, 30))
    assert_mc_match(mean, var, np.maximum(x1, x2))


def test_maxpool_two_element_windows_vs_monte_carlo():
    """Windows of 2 (kernel 1x2, stride 2): exact, also with a padded half-window."""
    rng = np.random.default_rng(23)
    m = rng.normal(size=(1, 3, 2, 5))
    v = rng.uniform(0.1, 2.0, m.shape)
    mean, var = R.maxpool2d(m, v, (1, 2), (1, 2), pads=(0, 1, 0, 0))
    assert mean.shape == (1, 3, 2, 3)
    x = m + np.sqrt(v) * rng.standard_normal((100000,) + m.shape)
    want = np.stack([x[..., 0], np.maximum(x[..., 1], x[..., 2]),
                     np.maximum(x[..., 3], x[..., 4])], axis=-1)  # padded slot ignored
    assert_mc_match(mean, var, want)


def test_maxpool_padded_3x3_vs_monte_carlo():
    """3x3/stride 2/pad 1 on 4x4: windows of 4 or 6 real inputs (corner, edge)."""
    rng = np.random.default_rng(24)
    m = rng.normal(size=(1, 2, 4, 4))
    v = rng.uniform(0.1, 2.0, m.shape)
    mean, var = R.maxpool2d(m, v, (3, 3), (2, 2), pads=(1, 1, 1, 1))
    x = m + np.sqrt(v) * rng.standard_normal((20000,) + m.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    mc = np.stack([np.stack([xp[..., 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(-1, -2))
                             for j in range(2)], -1) for i in range(2)], -2)
    mc_mean, mc_var, _, _ = sample_moments(mc)
    sd = np.sqrt(mc_var)
    # Clark approximation for >2 inputs (see test_clark_max_many_inputs_error for the
    # measured bound); MC noise at 20k samples is < 0.04 sd, < 4 % variance.
    assert (np.abs(mean - mc_mean) / sd).max() < 0.15
    assert (np.abs(var / mc_var - 1)).max() < 0.45


@pytest.mark.parametrize("n,mean_bound,var_bound", [(2, 1e-9, 1e-9), (4, 0.06, 0.35),
                                                     (9, 0.10, 0.50)])
def test_clark_max_many_inputs_error(n, mean_bound, var_bound):
    """Pairwise Clark over a window of n independent inputs vs exact integration.
    Measured worst over 40 random windows (seed 25): n=4 0.032 sd / 24 % var,
    n=9 0.031 sd / 32 % var; n=2 exact to ~1e-15."""
    rng = np.random.default_rng(25)
    worst_mean = worst_var = 0.0
    for _ in range(40):
        m = rng.normal(size=n) * rng.choice([0.1, 0.5, 1.0, 3.0])
        v = rng.uniform(0.05, 2.0, n)
        pm, pv = R.maxpool2d(m.reshape(1, 1, 1, n), v.reshape(1, 1, 1, n), (1, n), (1, n))
        e1, e2 = exact_max_moments(m, v)
        worst_mean = max(worst_mean, abs(pm.item() - e1) / np.sqrt(e2))
        worst_var = max(worst_var, abs(pv.item() / e2 - 1))
    assert worst_mean < mean_bound and worst_var < var_bound
    # iid window (all means equal): the textbook hard case
    pm, pv = R.maxpool2d(np.zeros((1, 1, 1, n)), np.ones((1, 1, 1, n)), (1, n), (1, n))
    e1, e2 = exact_max_moments(np.zeros(n), np.ones(n))
    assert abs(pm.item() - e1) / np.sqrt(e2) < max(mean_bound, 1e-9)
    assert abs(pv.item() / e2 - 1) < max(var_bound, 1e-9)


# --------------------------------------------------------------------------------------
# 4. zero / tiny variance edge cases and invariants
# --------------------------------------------------------------------------------------


def test_zero_variance_edge_cases_no_nan():
    m = np.array([-1e30, -3.0, -1e-300, -0.0, 0.0, 1e-300, 2.0, 1e30])
    z = np.zeros_like(m)
    mean, var = R.relu(m, z)
    assert np.array_equal(mean, np.maximum(m, 0.0)) and np.all(var == 0)
    for v in (1e-300, 5e-324, 1e-30):
        mean, var = R.relu(m, np.full_like(m, v))
        assert np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()
        np.testing.assert_allclose(mean[np.abs(m) > 1e-5], np.maximum(m, 0)[np.abs(m) > 1e-5])
    # Clark with a = 0: ties, winner either side
    a = np.array([1.0, 2.0, 3.0, -5.0])
    b = np.array([1.0, 3.0, 2.0, -5.0])
    mean, var = R.clark_max(a, np.zeros(4), b, np.zeros(4))
    assert np.array_equal(mean, np.maximum(a, b)) and np.all(var == 0)
    # one side deterministic, the other almost
    mean, var = R.clark_max(a, np.full(4, 1e-300), b, np.zeros(4))
    assert np.isfinite(mean).all() and np.isfinite(var).all()
    # max pool / linear / conv of deterministic tensors stay deterministic, no NaN
    x = -np.abs(np.random.default_rng(30).normal(size=(1, 2, 5, 5)))
    mean, var = R.maxpool2d(x, np.zeros_like(x), (3, 3), (2, 2), pads=(1, 1, 1, 1))
    assert np.all(var == 0) and np.isfinite(mean).all() and (mean < 0).all()
    w = np.ones((3, 2, 3, 3))
    mean, var = R.conv2d(x, None, w, np.zeros_like(w), pads=(1, 1, 1, 1))
    assert np.all(var == 0) and np.isfinite(mean).all()
    # a stochastic element next to a deterministic one in a window
    v = np.zeros_like(x)
    v[0, 0, 0, 0] = 1e-200
    mean, var = R.maxpool2d(x, v, (2, 2), (2, 2))
    assert np.isfinite(mean).all() and np.isfinite(var).all()


finite = st.floats(-50, 50, allow_nan=False)
variance = st.one_of(st.just(0.0), st.floats(1e-12, 100.0))


@settings(max_examples=300, deadline=None)
@given(finite, variance)
def test_relu_invariants(m, v):
    """E[relu] >= max(M, 0) (Jensen), 0 <= var <= V (ReLU is 1-Lipschitz)."""
    mean, var = R.relu(np.array(m), np.array(v))
    assert np.isfinite(mean) and np.isfinite(var)
    assert mean >= max(m, 0.0) - 1e-12 * (1 + abs(m))
    assert 0.0 <= var <= v * (1 + 1e-9) + 1e-12 * (1 + m * m)


@settings(max_examples=300, deadline=None)
@given(finite, variance, finite, variance)
def test_clark_max_invariants(m1, v1, m2, v2):
    """Symmetric; E[max] >= max(m1, m2); Gaussian Poincare inequality
    Var f(X) <= E|grad f|^2_Sigma gives var <= v1 P(x1 wins) + v2 P(x2 wins) <= max(v1, v2)."""
    a = R.clark_max(np.array(m1), np.array(v1), np.array(m2), np.array(v2))
    b = R.clark_max(np.array(m2), np.array(v2), np.array(m1), np.array(v1))
    tol = 1e-12 * (1 + abs(m1) + abs(m2)) ** 2
    assert np.isfinite(a[0]) and np.isfinite(a[1])
    assert abs(a[0] - b[0]) <= tol and abs(a[1] - b[1]) <= tol
    assert a[0] >= max(m1, m2) - tol
    assert 0.0 <= a[1] <= max(v1, v2) * (1 + 1e-9) + tol
