"""The compiled per-channel shared-noise PFP (``covariance=``, pfpc/passes/carry_channel_covariance.py):
the generated C (host build) against the float64 reference tests/reference_covariance.py, and
the networks it must leave untouched."""

import os

import numpy as np
import pytest

import reference_covariance as RC
import test_covariance as TC
import pfpc


def _compiled(cls, covariance, out_dir=None):
    model, stds, inputs = TC._onnx(cls)
    post = {k + ".std": v for k, v in stds.items()}
    compiled = pfpc.compile(model, post, covariance=covariance, batch=1, out_dir=out_dir)
    return model, stds, inputs, compiled


@pytest.mark.parametrize("cls", [TC.LinearConvNet, TC.TinyDSCNN])
def test_generated_c_matches_the_float64_reference(cls):
    """conv (+ depthwise/pointwise, ReLU, batch norm) -> global average pool -> dense with every
    convolution's loadings: the C's output moments equal reference_covariance's "channel_box"
    with the compiler's box-form spread (box_noise) to 1e-5, and differ from the diagonal PFP."""
    model, stds, inputs, compiled = _compiled(cls, "channel")
    (mean, var), = compiled.run([inputs["x"]]).outputs
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = RC.pfp_covariance(model, variances, inputs, "channel_box", box_noise=True)["y"]
    diagonal = RC.pfp_covariance(model, variances, inputs, "none")["y"]
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1], rtol=1e-5)
    assert np.median(var / diagonal[1]) > 1.1  # the pooled covariance is there


@pytest.mark.parametrize("cls", [TC.LinearMLP, TC.ConvPointwise])
def test_auto_leaves_networks_without_a_pool_untouched(cls, tmp_path):
    """No loading can reach a mean over positions: auto and channel generate the same C as none."""
    sources = {}
    for mode in ("none", "auto", "channel"):
        _compiled(cls, mode, out_dir=str(tmp_path / mode))
        sources[mode] = open(tmp_path / mode / "pfp_model.c").read()
    assert sources["auto"] == sources["none"] and sources["channel"] == sources["none"]


def test_none_is_the_diagonal_pfp_bit_for_bit(tmp_path):
    """covariance="none" runs no rewrite: the same C as a pass list without the pass."""
    from pfpc.passes.pipeline import default_passes

    model, stds, inputs = TC._onnx(TC.LinearConvNet)
    post = {k + ".std": v for k, v in stds.items()}
    without = [p for p in default_passes() if p[0] != "carry_channel_covariance"]
    pfpc.compile(model, post, covariance="none", out_dir=str(tmp_path / "none"))
    pfpc.compile(model, post, passes=without, out_dir=str(tmp_path / "without"))
    assert open(tmp_path / "none" / "pfp_model.c").read() == open(tmp_path / "without" / "pfp_model.c").read()
