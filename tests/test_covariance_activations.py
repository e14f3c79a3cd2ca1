"""Loadings through the activations other than ReLU and Clip (`registry.LOADING_SLOPES`): a
convolution's per-channel shared noise reaches a global average pool through LeakyRelu, Sigmoid,
Tanh, HardSigmoid, HardSwish, SiLU (x * Sigmoid(x)), GELU, Softplus, Elu and Selu, each carrying
the loading a E[f'(x)] (Stein's lemma). The generated C against the float64 reference
(tests/reference_covariance.py, whose slopes come from Stein's integral or a derivative of the
mean, not from the compiler's closed forms), and against Monte Carlo."""

import numpy as np
import pytest
import torch
from torch import nn

import architectures as A
import reference as R
import reference_covariance as RC
import pfpc
from pfpc.frontends.onnx_model import fold_constants

ACTIVATIONS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "prelu": nn.PReLU,  # one slope per channel (`_net`)
    "prelu_one_slope": nn.PReLU,  # PyTorch's default: one slope for all channels
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "hard_sigmoid": nn.Hardsigmoid,
    "hard_swish": nn.Hardswish,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "selu": nn.SELU,
}


def _onnx(activation, seed=0):
    """The network with random weights, its posterior (`architectures.posterior`) and an input;
    GELU exported at opset 20 (ONNX's Gelu, which the float64 reference reads; before it torch
    writes the erf formula out, which the compiler fuses: tests/test_exporter_forms.py)."""
    generator = torch.Generator().manual_seed(seed)
    model = _net(activation)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * np.sqrt(2.0 / module.weight[0].numel()))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.05)
            if isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5)
    onnx_model = fold_constants(A.export(model.eval(), opset=20 if activation == "gelu" else 17))
    stds = {k[: -len(".std")]: v for k, v in A.posterior(onnx_model).items() if "PRelu" not in k}  # PReLU slopes: deterministic
    return onnx_model, stds, {"x": np.random.default_rng(seed).standard_normal(model.input_shape).astype(np.float32)}


def _net(activation):
    class ConvActivationPool(nn.Module):
        """conv 3x3 -> activation -> conv 3x3 -> activation -> global average pool -> dense."""

        input_shape = (1, 3, 10, 10)

        def __init__(self):
            super().__init__()
            per_channel = {"num_parameters": 6}, {"num_parameters": 8}
            first, second = per_channel if activation == "prelu" else ({}, {})
            self.conv1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), ACTIVATIONS[activation](**first)
            self.conv2, self.act2 = nn.Conv2d(6, 8, 3, padding=1), ACTIVATIONS[activation](**second)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.act2(self.conv2(self.act1(self.conv1(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ConvActivationPool


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_generated_c_carries_loadings_through_the_activation(activation):
    """Every convolution's loading goes through the activation to the pool: the C's output
    moments equal the float64 reference's to 1e-5 (rtol), and the pooled variance is above the
    diagonal PFP's (which drops the loadings at the activation, as before; the saturating
    sigmoids pass the least on: slope at most 1/4)."""
    model, stds, inputs = _onnx(activation)
    compiled = pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, covariance="channel", batch=1)
    (mean, var), = compiled.run([inputs["x"]]).outputs
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = RC.pfp_covariance(model, variances, inputs, "channel_box", spread_variance=True)["y"]
    diagonal = RC.pfp_covariance(model, variances, inputs, "none")["y"]
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1], rtol=1e-5)
    assert np.median(var / diagonal[1]) > 1.03


@pytest.mark.parametrize("activation", ["silu", "hard_swish", "elu"])
def test_auto_keeps_the_pooled_variance_through_the_activation(activation):
    """The default (auto) against Monte Carlo (onnxruntime, 1000 weight draws): median PFP/MC
    output variance in [0.8, 1.25] where the diagonal PFP is below 0.7."""
    model, stds, inputs = _onnx(activation)
    post = {k + ".std": v for k, v in stds.items()}
    (_, var), = pfpc.compile(model, post, covariance="auto", batch=1).run([inputs["x"]]).outputs
    (_, diag_var), = pfpc.compile(model, post, covariance="none", batch=1).run([inputs["x"]]).outputs
    _, mc_var, _, var_se = R.monte_carlo(model, stds, inputs, 1000, seed=1, with_var_stderr=True)["y"]
    assert np.median(var_se / mc_var) < 0.1
    assert np.median(diag_var / mc_var) < 0.7
    assert 0.8 < np.median(var / mc_var) < 1.25


def test_slopes_against_stein_integrals():
    """The closed-form slopes of the reference (leaky ReLU, the derivative of the sigmoid's and
    tanh's approximate means) against E[f'(x)] integrated, and the Gauss-Hermite Stein form
    against the integral for a smooth f: the slope is E[f'(x)] within the approximation."""
    m = np.array([-3.0, -0.5, 0.0, 0.7, 2.5])
    v = np.array([0.04, 1.0, 2.0, 0.5, 3.0])
    ones = np.ones_like(m)
    leaky = R._stein_slope(lambda x: np.where(x > 0, x, 0.1 * x), m, v)
    np.testing.assert_allclose(R.leaky_relu_loading(m, v, ones, 0.1), leaky, rtol=1e-6)
    silu = R.SMOOTH_FUNCTIONS["silu"]({})
    np.testing.assert_allclose(R.smooth_loading(silu, m, v, ones), R._stein_slope(silu, m, v), rtol=2e-3)
    # the probit approximation's slope is close to the exact sigmoid's E[f'(x)] (its mean is within 0.005)
    exact = R._stein_slope(lambda x: 1 / (1 + np.exp(-x)), m, v)
    np.testing.assert_allclose(R.sigmoid_loading(m, v, ones), exact, atol=0.01)
