"""Small PyTorch networks of the CNN families users export (torch is a test extra), and their
ONNX export with the legacy TorchScript exporter (no onnxscript needed, works offline)."""

from __future__ import annotations

import io

import onnx
import torch
from torch import nn
from torch.nn import functional as F


def _randomise_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking statistics, so that no batch norm is the identity."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(channels, generator=generator) * 0.4 - 0.2)
                module.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)


class _Residual(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, an identity residual block, a downsampling one, global pooling, linear."""

    input_shape = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.block1 = _Residual(6, 6, 1)
        self.block2 = _Residual(6, 8, 2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _separable(cin, cout, stride):
    return [
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    ]


class _InvertedResidual(nn.Module):
    def __init__(self, channels, expand):
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.body(x)


class MobileNet(nn.Module):
    """Depthwise separable convolutions with ReLU6, an inverted residual, a log-softmax head."""

    input_shape = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU6(),
            *_separable(6, 8, 2),
            _InvertedResidual(8, 2),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 5))

    def forward(self, x):
        h = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return F.log_softmax(self.classifier(h), dim=1)


class VGG(nn.Module):
    """Two conv stages with average pooling, then a two-layer classifier."""

    input_shape = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


class TimeSeriesCNN(nn.Module):
    """1-D convolutions over a 2-channel series: BN, LeakyReLU, max and average pooling."""

    input_shape = (1, 2, 24)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.LeakyReLU(0.1), nn.MaxPool1d(2),
            nn.Conv1d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool1d(2),
            nn.Conv1d(8, 8, 3, padding=1, dilation=1), nn.ReLU(),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool1d(self.features(x), 1).flatten(1))


MODELS = {"resnet": ResNet, "mobilenet": MobileNet, "vgg": VGG, "timeseries": TimeSeriesCNN}


def build(name: str, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MODELS[name]()
    _randomise_batch_norms(model, generator)
    return model.eval()


def export(model: nn.Module, opset: int = 17, keep_batch_norm: bool = True, symbolic_batch: bool = False) -> onnx.ModelProto:
    """ONNX of ``model`` in inference mode. ``keep_batch_norm``: export BatchNormalization nodes
    (TrainingMode.PRESERVE on an eval model) instead of letting the exporter fold them.
    ``symbolic_batch``: the input's and output's leading dimension symbolic ("N"), so that
    ``pfpc --batch B`` compiles the network for B samples (a fixed batch of 1 stays 1)."""
    buffer = io.BytesIO()
    mode = torch.onnx.TrainingMode.PRESERVE if keep_batch_norm else torch.onnx.TrainingMode.EVAL
    example = torch.randn(*model.input_shape, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset, training=mode,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if symbolic_batch else None)
    return onnx.load_from_string(buffer.getvalue())
