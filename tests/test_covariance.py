"""The per-channel shared-noise PFP (tests/reference_covariance.py, issue 16) against Monte Carlo
on small versions of the architectures with global average pooling, where the diagonal PFP loses
most of the output variance: positions of a convolution's output share its random weights."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import architectures as A
import reference as R
import reference_covariance as RC
from pfpc.frontends.onnx_model import fold_constants


class TinyResNet(nn.Module):
    """ResNet-8's layout at a quarter of its width on 16x16 inputs."""

    input_shape = (1, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*A._conv_bn_relu(3, 8, 3, 1, 1))
        self.stack1 = A._ResNetBlock(8, 8, 1)
        self.stack2 = A._ResNetBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.avg_pool2d(self.stack2(self.stack1(self.stem(x))), 8), 1))


class TinyDSCNN(A.DSCNN):
    """DS-CNN (keyword spotting) with 16 filters instead of 64."""

    def __init__(self):
        super().__init__(classes=12, filters=16)


class LinearConvNet(nn.Module):
    """No activation: conv 3x3, global average pool, dense (the pooled channels are independent:
    the exact answer is the pooled covariance of one convolution's output)."""

    input_shape = (1, 3, 12, 12)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv1(x), 1), 1))


class LinearMLP(nn.Module):
    """Dense, dense on a deterministic input: the diagonal PFP is exact, and so must "channel" be."""

    input_shape = (1, 12)

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class ConvPointwise(nn.Module):
    """Conv 3x3 on the deterministic input, then a 1x1 conv: the diagonal PFP is exact."""

    input_shape = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def _onnx(cls, seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * np.sqrt(2.0 / module.weight[0].numel()))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.05)
    A._randomise_batch_norms(model, generator)
    onnx_model = fold_constants(A.export(model.eval()))
    stds = {k[: -len(".std")]: v for k, v in A.posterior(onnx_model).items()}
    return onnx_model, stds, {"x": np.random.default_rng(seed).standard_normal(cls.input_shape).astype(np.float32)}


def _ratios(model, stds, inputs, samples):
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    mc = R.monte_carlo(model, stds, inputs, samples, seed=1, with_var_stderr=True)["y"]
    none = RC.pfp_covariance(model, variances, inputs, "none")["y"]
    channel = RC.pfp_covariance(model, variances, inputs, "channel")["y"]
    return none, channel, mc


def test_diagonal_mode_is_the_reference_pfp():
    model, stds, inputs = _onnx(TinyResNet)
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = R.pfp_onnx(model, variances, inputs)["y"]
    mean, var = RC.pfp_covariance(model, variances, inputs, "none")["y"]
    np.testing.assert_allclose(mean, expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, expected[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls", [TinyResNet, TinyDSCNN])
def test_channel_keeps_the_pooled_variance(cls):
    """Median PFP/MC output variance: the diagonal PFP is far below 1, the channel one (and its
    channel_box variant) within [0.8, 1.25]; means as good as the diagonal PFP's. MC: 600 draws, relative s.e. of a unit's
    variance about 6 %."""
    model, stds, inputs = _onnx(cls)
    none, channel, (mc_mean, mc_var, _, var_se) = _ratios(model, stds, inputs, 600)
    assert np.median(var_se / mc_var) < 0.1
    assert np.median(none[1] / mc_var) < 0.7
    assert 0.8 < np.median(channel[1] / mc_var) < 1.25
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    box = RC.pfp_covariance(model, variances, inputs, "channel_box")["y"]  # the cheap coherent term of k x k convs
    assert 0.8 < np.median(box[1] / mc_var) < 1.25
    std = np.sqrt(mc_var)
    assert np.max(np.abs(channel[0] - mc_mean) / std) <= np.max(np.abs(none[0] - mc_mean) / std) + 0.05


def test_linear_network_exact_within_monte_carlo_error():
    """Without activations the channel PFP matches MC's variance within 4 standard errors per
    unit (the diagonal PFP misses the pooled covariance), and the means are exact."""
    model, stds, inputs = _onnx(LinearConvNet)
    none, channel, (mc_mean, mc_var, mean_se, var_se) = _ratios(model, stds, inputs, 2000)
    assert np.all(np.abs(channel[0] - mc_mean) < 4 * mean_se + 1e-6)
    assert np.all(np.abs(channel[1] - mc_var) < 4 * var_se + 0.02 * mc_var)
    assert np.median(none[1] / mc_var) < 0.9


@pytest.mark.parametrize("cls", [LinearMLP, ConvPointwise])
def test_channel_is_diagonal_where_the_diagonal_pfp_is_exact(cls):
    model, stds, inputs = _onnx(cls)
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    none = RC.pfp_covariance(model, variances, inputs, "none")["y"]
    channel = RC.pfp_covariance(model, variances, inputs, "channel")["y"]
    np.testing.assert_allclose(channel[1], none[1], rtol=1e-12)
