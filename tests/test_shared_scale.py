"""The compiled shared dense-layer scale (``shared_scale=``, pfpc/passes/share_dense_scale.py): the
generated C (host build) against the float64 prototype tests/reference_nongauss.py, its linear
limit, where ``auto`` leaves networks alone, and Monte Carlo on the seed LeNet-5."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

import reference_covariance as RC
import reference_nongauss as NG
import test_covariance as TC
import test_covariance_compiled as TCC
import pfpc
from pfpc.errors import PfpcError
from pfpc.passes.pipeline import default_passes
from pfpc.passes.share_dense_scale import ShareDenseScale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
NO_DATA = not os.path.isdir(os.path.join(DATA, "seed-checkpoints")) or not os.path.isdir(os.path.join(DATA, "mnist"))
NO_DATA_REASON = f"{DATA} (the MNIST test sets and the seed checkpoints) is absent: a fresh clone has no data"


class ConvDense(nn.Module):
    """conv 3x3 -> ReLU -> [max-pool 2x2] -> flatten -> dense -> [ReLU] -> dense."""

    input_shape = (1, 2, 10, 10)

    def __init__(self, pool=True, tail_relu=True):
        super().__init__()
        self.pool, self.tail_relu = pool, tail_relu
        self.conv = nn.Conv2d(2, 5, 3)
        self.fc1 = nn.Linear(5 * (4 * 4 if pool else 8 * 8), 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.pool:
            x = nn.functional.max_pool2d(x, 2)
        x = self.fc1(torch.flatten(x, 1))
        return self.fc2(torch.relu(x) if self.tail_relu else x)


class StridedPool(ConvDense):
    """ConvDense with a 3x3 max-pool of stride 2 (overlapping windows) in place of the 2x2 one."""

    def __init__(self, pool=True, tail_relu=True):
        super().__init__(pool, tail_relu)
        self.fc1 = nn.Linear(5 * 3 * 3, 12)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 3, stride=2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _noisy(pool=True, tail_relu=True, batch=2, base=ConvDense):
    """The network with the seed LeNet-5's kind of posterior: convolution weights std ~ 2 |mean|,
    dense weights almost pure noise (std 30 |mean| + 0.05)."""
    layout = type("ConvDense", (base,), {"__init__": lambda self: base.__init__(self, pool, tail_relu)})
    model, stds, _ = TC._onnx(layout)
    from onnx import numpy_helper

    means = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name in stds:
        scale = 30.0 if name.startswith("fc") else 2.0
        stds[name] = (scale * np.abs(means[name]) + 0.05).astype(np.float32)
    images = np.random.default_rng(3).standard_normal((batch,) + ConvDense.input_shape[1:]).astype(np.float32)
    # fc1's units below the ReLU's kink (bias -1.5 std), as the seed LeNet-5's fc2: there the scale's tails matter
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    dense = next(n for n in model.graph.node if n.op_type == "Gemm")
    spread = np.sqrt(np.median(RC.pfp_covariance(model, variances, {"x": images.astype(np.float64)}, "none")[dense.output[0]][1]))
    bias = next(i for i in model.graph.initializer if i.name == dense.input[2])
    bias.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(bias).shape, -1.5 * spread, np.float32), bias.name))
    return model, stds, images


def _run(model, stds, images, shared_scale, **options):
    compiled = pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, batch=len(images), shared_scale=shared_scale, **options)
    (mean, var), = compiled.run([images]).outputs
    return mean.astype(np.float64), var.astype(np.float64), compiled


def test_the_operator_references_compose_to_the_prototype_kappa():
    """tests/reference.py's per-operator references (scipy's truncated normal for the ReLU's raw
    moments) composed as the pass composes the operators: feature_scale_sums at the nodes, the
    mixture over the nodes, the sum over channels gives reference_nongauss.feature_scale_variance
    (checked against Monte Carlo in tests/test_nongauss.py); the two-point scale is its."""
    import reference as R

    rng = np.random.default_rng(5)
    shape = (2, 3, 2, 2)
    mean, var = rng.normal(-0.5, 1.0, shape), rng.uniform(0.5, 2.0, shape)
    loading, alpha = rng.uniform(0.3, 0.95, shape) * np.sqrt(var), rng.uniform(0.1, 1.0, shape)
    nodes, weights = np.polynomial.hermite_e.hermegauss(5)
    sums = R.feature_scale_sums(mean, var, loading, alpha, nodes)
    channel_mean, channel_var = R.mixture(*sums, (weights / weights.sum())[None, None], axis=2)
    kappa = channel_var.sum(1)
    np.testing.assert_allclose(kappa, NG.feature_scale_variance(mean, var, loading, alpha.reshape(2, -1), 5), rtol=1e-6)
    p, lam = R.scale_points(np.array([0.2, 3.0]))
    assert np.all(p[0] == 0) and np.all(lam[0] == 1)  # the diagonal scenario: its means, no weight
    for k, (expected_p, expected_lam) in enumerate(NG.two_point_scale(np.array([0.2, 3.0])), start=1):
        np.testing.assert_allclose(p[k], expected_p)
        np.testing.assert_allclose(lam[k], expected_lam)


@pytest.mark.parametrize("pool", [True, False])
def test_generated_c_matches_the_float64_prototype(pool):
    """conv -> ReLU -> [max-pool] -> dense -> ReLU -> dense, two rows: the C's output moments equal
    reference_nongauss.scale_mixture's (each row its own kappa) to 1e-5 and differ from the
    diagonal PFP's (``on``: on a network this small the scale's own work is over ``auto``'s budget)."""
    model, stds, images = _noisy(pool)
    mean, var, compiled = _run(model, stds, images, "on")
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    conv = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    dense = next(n.output[0] for n in model.graph.node if n.op_type == "Gemm")
    window = ((2, 2), (2, 2), (0, 0, 0, 0), (1, 1)) if pool else None
    expected, kappa = NG.scale_mixture(model, variances, images.astype(np.float64), conv, dense, pool=window)
    expected_mean, expected_var = expected["y"]
    assert np.all(kappa > 0.01) and kappa[0] != pytest.approx(kappa[1], rel=0.01)  # the scale matters, per row
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-5 * np.abs(expected_mean).max())
    np.testing.assert_allclose(var, expected_var, rtol=1e-5)
    diagonal = RC.pfp_covariance(model, variances, {"x": images.astype(np.float64)}, "none")["y"]
    assert np.max(np.abs(var / diagonal[1] - 1)) > 0.01


def test_overlapping_pool_windows_match_the_float64_prototype():
    """A 3x3 max-pool of stride 2 before the dense layer: `feature_scale_sums` runs the correlated
    maxima's Clark steps over overlapping windows in its own kernel; the C's moments equal
    reference_nongauss.scale_mixture's (its max-pool in float64) to 1e-5 and differ from the diagonal PFP's."""
    model, stds, images = _noisy(base=StridedPool)
    mean, var, _ = _run(model, stds, images, "on")
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    conv = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    dense = next(n.output[0] for n in model.graph.node if n.op_type == "Gemm")
    expected, kappa = NG.scale_mixture(model, variances, images.astype(np.float64), conv, dense, pool=((3, 3), (2, 2), (0, 0, 0, 0), (1, 1)))
    assert np.all(kappa > 0.01)
    np.testing.assert_allclose(mean, expected["y"][0], rtol=1e-5, atol=1e-5 * np.abs(expected["y"][0]).max())
    np.testing.assert_allclose(var, expected["y"][1], rtol=1e-5)
    diagonal = RC.pfp_covariance(model, variances, {"x": images.astype(np.float64)}, "none")["y"]
    assert np.max(np.abs(var / diagonal[1] - 1)) > 0.01


def test_a_linear_tail_keeps_the_diagonal_moments():
    """dense -> dense after the scale: the scenarios' means are equal and sum_k p_k lam_k = 1, so
    the mixture is the diagonal PFP's moments (to float32 rounding)."""
    model, stds, images = _noisy(tail_relu=False)
    mean, var, _ = _run(model, stds, images, "on")
    diagonal_mean, diagonal_var, _ = _run(model, stds, images, "off")
    np.testing.assert_allclose(mean, diagonal_mean, rtol=1e-5, atol=1e-6 * np.abs(diagonal_mean).max())
    np.testing.assert_allclose(var, diagonal_var, rtol=1e-5)


def test_auto_leaves_networks_without_noise_dominated_dense_weights_unchanged(tmp_path):
    """ConvDense with the tests' usual posterior (std ~ 0.1 |mean|): ``auto`` generates the same C
    as ``off`` and says why; ``on`` applies the scale anyway."""
    model, stds, inputs = TC._onnx(ConvDense)
    post = {k + ".std": v for k, v in stds.items()}
    for mode in ("auto", "off"):
        pfpc.compile(model, post, batch=1, shared_scale=mode, out_dir=str(tmp_path / mode))
    assert (tmp_path / "auto" / "pfp_model.c").read_text() == (tmp_path / "off" / "pfp_model.c").read_text()
    transforms = {mode: ShareDenseScale(mode) for mode in ("auto", "on")}
    for transform in transforms.values():
        pfpc.compile(model, post, batch=1, passes=[(n, transform if n == "share_dense_scale" else t) for n, t in default_passes()])
    assert transforms["auto"].site is None and "fc1_matmul: its weights are not noise-dominated" in transforms["auto"].reasons[0]
    assert transforms["on"].site is not None and not transforms["on"].reasons


def test_the_pass_says_why_it_did_not_apply():
    """TinyLeNet's second max-pool (a padded 3x3 window) stays after its ReLU: the dense layer
    reads a max-pool, not a ReLU, and the pass says so; a bad mode is one line."""
    model, stds, inputs = TC._onnx(TCC.TinyLeNet)
    transform = ShareDenseScale("on")
    pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, batch=1,
                 passes=[(n, transform if n == "share_dense_scale" else t) for n, t in default_passes()])
    assert transform.site is None and "fc1_matmul: its input is not a ReLU's output" in transform.reasons[0]
    with pytest.raises(PfpcError, match="--shared-scale 'sometimes'"):
        ShareDenseScale("sometimes")


def _seed(kind, count):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import covariance as B

    model, variances = B.seed_model("seed_lenet")
    return model, variances, B.mnist(kind, count)


@pytest.mark.skipif(NO_DATA, reason=NO_DATA_REASON)
def test_seed_lenet_generated_c_matches_the_prototype():
    """The seed LeNet-5 on 3 Fashion-MNIST images: ``auto`` applies the scale (dense weights
    std/|mean| 37-52); the C equals scale_mixture (the compiler's loadings) to 1e-5 and
    lenet_scale_mixture (session 10's prototype, its own loadings) to 1e-3; the variances are
    well above the diagonal PFP's."""
    model, variances, images = _seed("fashion", 3)
    mean, var, _ = _run(model, {k: np.sqrt(v).astype(np.float32) for k, v in variances.items()}, images, "auto")
    window = ((2, 2), (2, 2), (0, 0, 0, 0), (1, 1))
    expected, kappa = NG.scale_mixture(model, variances, images.astype(np.float64), "/conv2/Conv_output_0", "/fc1/Gemm_output_0", pool=window)
    np.testing.assert_allclose(mean, expected["y"][0], rtol=1e-5, atol=1e-5 * np.abs(expected["y"][0]).max())
    np.testing.assert_allclose(var, expected["y"][1], rtol=1e-5)
    prototype_mean, prototype_var, _ = NG.lenet_scale_mixture(model, variances, images.astype(np.float64))
    np.testing.assert_allclose(var, prototype_var, rtol=1e-3)
    diagonal = RC.pfp_covariance(model, variances, {model.graph.input[0].name: images.astype(np.float64)}, "none")["y"]
    assert np.median(var / diagonal[1]) > 1.3


@pytest.mark.slow  # ~25 s: 2000 onnxruntime runs and two compiles
@pytest.mark.skipif(NO_DATA, reason=NO_DATA_REASON)
def test_seed_lenet_fashion_compiled_variance_equals_monte_carlo():
    """The compiled C on 8 Fashion-MNIST images against 2000 whole weight draws (onnxruntime): the
    median PFP/MC logit variance is within [0.8, 1.25] where the diagonal PFP's is below 0.8;
    the means stay within 0.15 MC standard deviations (median): the diagonal PFP's."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import nongauss_lenet as N

    model, variances, images = _seed("fashion", 8)
    stds = {k: np.sqrt(v).astype(np.float32) for k, v in variances.items()}
    _, _, logits, _ = N.monte_carlo(model, variances, images, 2000, seed=3, oracles={})
    mc_mean, mc_var = logits.astype(np.float64).mean(0), logits.astype(np.float64).var(0, ddof=1)
    mean, var, _ = _run(model, stds, images, "auto")
    diagonal_mean, diagonal_var, _ = _run(model, stds, images, "off")
    assert 0.8 <= np.median(var / mc_var) <= 1.25
    assert np.median(diagonal_var / mc_var) < 0.8
    assert np.median(np.abs(mean - mc_mean) / np.sqrt(mc_var)) < 0.15
    # the means are the diagonal PFP's (scenario 0), not the two-point mixture's
    np.testing.assert_allclose(mean, diagonal_mean, rtol=1e-5, atol=1e-5 * np.abs(diagonal_mean).max())


def test_the_digits_lenet_keeps_the_diagonal_pfp(tmp_path):
    """examples/lenet (the digits LeNet-5, fc1's median std/|mean| 2.5): ``auto``
    generates the same C as ``off``."""
    model, post = os.path.join(ROOT, "examples", "lenet", "model.onnx"), os.path.join(ROOT, "examples", "lenet", "post.npz")
    for mode in ("auto", "off"):
        pfpc.compile(model, post, batch=1, shared_scale=mode, out_dir=str(tmp_path / mode))
    assert (tmp_path / "auto" / "pfp_model.c").read_text() == (tmp_path / "off" / "pfp_model.c").read_text()
