"""Small versions of the embedded architectures that use the operators of issue 18, built with
torch (random weights, trained-looking batch norms) and exported with the TorchScript exporter:
MobileNetV3-Small-style (HardSwish, squeeze-and-excitation with a HardSigmoid gate), an
EfficientNet-B0-style block stack (SiLU, squeeze-and-excitation with a sigmoid gate) and
SqueezeNet (Fire modules). Each compiles for the host; zero variance equals onnxruntime
(rtol 1e-4) and a random posterior the NumPy reference (1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import torch_models  # noqa: E402
from helpers import assert_posterior_matches_reference, assert_zero_variance_equals_onnxruntime  # noqa: E402
from test_torch_models import _posterior  # noqa: E402


class _SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed, gate):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.expand(F.relu(self.reduce(scale)) if self.gate == "hard" else F.silu(self.reduce(scale)))
        return x * (F.hardsigmoid(scale) if self.gate == "hard" else torch.sigmoid(scale))


class _Bottleneck(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> squeeze-and-excitation -> project 1x1 (+ residual)."""

    def __init__(self, cin, expanded, cout, stride, activation, gate):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), activation())
        self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False), nn.BatchNorm2d(expanded), activation())
        self.se = _SqueezeExcite(expanded, max(2, expanded // 4), gate)
        self.project = nn.Sequential(nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.project(self.se(self.depthwise(self.expand(x))))
        return x + h if self.residual else h


class MobileNetV3Small(nn.Module):
    input_shape = (1, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(_Bottleneck(8, 16, 8, 1, nn.Hardswish, "hard"), _Bottleneck(8, 24, 12, 2, nn.Hardswish, "hard"))
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1), nn.Hardswish())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class EfficientNetBlocks(nn.Module):
    input_shape = (1, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.blocks = nn.Sequential(_Bottleneck(8, 16, 8, 1, nn.SiLU, "sigmoid"), _Bottleneck(8, 24, 12, 2, nn.SiLU, "sigmoid"))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class _Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], 1)


class SqueezeNet(nn.Module):
    input_shape = (1, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2)
        self.fire1 = _Fire(8, 4, 6)
        self.fire2 = _Fire(12, 4, 8)
        self.classifier = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.stem(x)), 3, 2, ceil_mode=True)
        h = self.fire2(self.fire1(h))
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.classifier(h)), 1), 1)


ARCHITECTURES = {"mobilenetv3_small": MobileNetV3Small, "efficientnet_blocks": EfficientNetBlocks, "squeezenet": SqueezeNet}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exported(request):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ARCHITECTURES[request.param]()
    torch_models._randomise_batch_norms(model, generator)
    model.eval()
    return request.param, model, torch_models.export(model, 17)


def test_zero_variance_equals_onnxruntime(tmp_path, exported):
    name, model, onnx_model = exported
    x = np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)
    assert_zero_variance_equals_onnxruntime(onnx_model, x, tmp_path)


def test_posterior_matches_reference(tmp_path, exported):
    name, model, onnx_model = exported
    x = np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)
    assert_posterior_matches_reference(onnx_model, _posterior(onnx_model), x, tmp_path, what=name)
