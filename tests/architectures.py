"""Real-size networks embedded users deploy, with random weights, for tests and benchmarks.

The MLPerf Tiny reference layouts (ResNet-8 for CIFAR-10 image classification, DS-CNN for keyword
spotting, MobileNetV1 0.25 for visual wake words), a 1-D DS-CNN of the streaming wake-word kind, a
MobileNetV2 inverted-residual stack, the seed paper's two MNIST networks (MLP 784-100-100-10,
LeNet-5 on 28x28), a ShuffleNetV2-style block stack and a small convolutional autoencoder. Weights are He-initialised from a seeded generator and batch norms get
trained-looking statistics, so activations keep their scale through the depth. TensorFlow's "same"
padding of stride-2 convolutions is written as an explicit asymmetric zero pad, as tf2onnx exports it.

`posterior(onnx_model, relative, floor)` gives the stated posterior of the benchmarks:
std = relative * |mu| + floor for every float initializer of rank >= 1.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from torch_models import _randomise_batch_norms, export  # noqa: F401  (export re-exported)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "seed_mnist"))
import build_models as seed_networks  # noqa: E402  (the seed networks, defined in their example)


def _conv_bn_relu(cin, cout, kernel, stride=1, padding=0, groups=1, relu=nn.ReLU):
    return [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout), relu()]


class _ResNetBlock(nn.Module):
    """resnet_v1_eembc stack: conv-BN-ReLU, conv-BN, (1x1 strided conv shortcut), add, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet8(nn.Module):
    """MLPerf Tiny image classification (CIFAR-10): 16/32/64 filters, 8x8 global average pool, 12.5 M MACs."""

    input_shape = (1, 3, 32, 32)

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, 16, 3, 1, 1))
        self.stack1 = _ResNetBlock(16, 16, 1)
        self.stack2 = _ResNetBlock(16, 32, 2)
        self.stack3 = _ResNetBlock(32, 64, 2)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        h = self.stack3(self.stack2(self.stack1(self.stem(x))))
        return self.fc(torch.flatten(F.avg_pool2d(h, 8), 1))


def _depthwise_separable(cin, cout, stride, relu=nn.ReLU):
    pad = [nn.ZeroPad2d((0, 1, 0, 1))] if stride == 2 else []  # TF "same" for stride 2, 3x3, even input
    return pad + _conv_bn_relu(cin, cin, 3, stride, 0 if stride == 2 else 1, groups=cin, relu=relu) + _conv_bn_relu(cin, cout, 1, relu=relu)


class DSCNN(nn.Module):
    """MLPerf Tiny keyword spotting: 49x10 MFCC input, conv 64 10x4 stride 2 ("same"), four depthwise
    separable blocks of 64, 25x5 global average pool, 12 classes."""

    input_shape = (1, 1, 49, 10)

    def __init__(self, classes=12, filters=64):
        super().__init__()
        layers = [nn.ZeroPad2d((1, 1, 4, 5))] + _conv_bn_relu(1, filters, (10, 4), 2)
        for _ in range(4):
            layers += _conv_bn_relu(filters, filters, 3, 1, 1, groups=filters) + _conv_bn_relu(filters, filters, 1)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(filters, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.avg_pool2d(self.features(x), (25, 5)), 1))


class MobileNetV1(nn.Module):
    """MLPerf Tiny visual wake words: MobileNetV1 with width 0.25 on 96x96x3, 3x3 global average pool, 2 classes."""

    input_shape = (1, 3, 96, 96)
    #: (output filters at width 1, stride) of the 13 depthwise separable blocks
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
              (512, 1), (1024, 2), (1024, 1))

    def __init__(self, classes=2, width=0.25):
        super().__init__()
        channels = int(32 * width)
        layers = [nn.ZeroPad2d((0, 1, 0, 1))] + _conv_bn_relu(3, channels, 3, 2)
        for filters, stride in self.BLOCKS:
            layers += _depthwise_separable(channels, int(filters * width), stride)
            channels = int(filters * width)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.avg_pool2d(self.features(x), 3), 1))


class DSCNN1d(nn.Module):
    """A streaming wake-word style 1-D DS-CNN: 40 filterbank channels x 49 frames, conv 64 k3 stride 2,
    four depthwise separable 1-D blocks, global average pool, 2 classes."""

    input_shape = (1, 40, 49)

    def __init__(self, classes=2, filters=64):
        super().__init__()
        layers = [nn.Conv1d(40, filters, 3, 2, 1, bias=False), nn.BatchNorm1d(filters), nn.ReLU()]
        for _ in range(4):
            layers += [nn.Conv1d(filters, filters, 3, 1, 1, groups=filters, bias=False), nn.BatchNorm1d(filters), nn.ReLU(),
                       nn.Conv1d(filters, filters, 1, bias=False), nn.BatchNorm1d(filters), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(filters, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(self.features(x), 1), 1))


class _InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=6):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *_conv_bn_relu(cin, hidden, 1, relu=nn.ReLU6),
            *_conv_bn_relu(hidden, hidden, 3, stride, 1, groups=hidden, relu=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Stack(nn.Module):
    """MobileNetV2 inverted residual blocks (expansion 6, ReLU6, linear bottlenecks) on 32x32x3."""

    input_shape = (1, 3, 32, 32)

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 16, 3, 2, 1, relu=nn.ReLU6),
            _InvertedResidual(16, 16, 1), _InvertedResidual(16, 24, 2), _InvertedResidual(24, 24, 1),
            _InvertedResidual(24, 32, 2), _InvertedResidual(32, 32, 1),
        )
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2 basic unit (stride 1): split the channels in two, 1x1 -> depthwise 3x3 ->
    1x1 on one half, concatenate with the other half, shuffle the channels (groups of 2)."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(*_conv_bn_relu(half, half, 1), nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
                                    nn.BatchNorm2d(half), *_conv_bn_relu(half, half, 1))

    def forward(self, x):
        half = x.shape[1] // 2
        kept, changed = torch.split(x, [half, half], dim=1)
        return _channel_shuffle(torch.cat([kept, self.branch(changed)], 1), 2)


class _ShuffleDown(nn.Module):
    """ShuffleNetV2 down-sampling unit (stride 2): both branches see the whole input."""

    def __init__(self, cin, cout):
        super().__init__()
        half = cout // 2
        self.left = nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), *_conv_bn_relu(cin, half, 1))
        self.right = nn.Sequential(*_conv_bn_relu(cin, half, 1), nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False),
                                   nn.BatchNorm2d(half), *_conv_bn_relu(half, half, 1))

    def forward(self, x):
        return _channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2Blocks(nn.Module):
    """A ShuffleNetV2-style block stack (channel split = two ONNX Slices, channel shuffle = Reshape,
    5-D Transpose, Reshape) on 16x16x3: stem, one down-sampling unit, two basic units, 1x1 conv,
    global average pool, dense."""

    input_shape = (1, 3, 16, 16)

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, 8, 3, 2, 1))
        self.units = nn.Sequential(_ShuffleDown(8, 16), _ShuffleUnit(16), _ShuffleUnit(16))
        self.head = nn.Sequential(*_conv_bn_relu(16, 24, 1))
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(self.units(self.stem(x))), 1), 1))


class ConvAutoencoder(nn.Module):
    """A small convolutional autoencoder on 16x16x1: two stride-2 convs down to 4x4x16, up by a
    ConvTranspose (stride 2) and a bilinear Resize, a 3x3 conv to one channel, sigmoid."""

    input_shape = (1, 1, 16, 16)

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1)
        self.smooth = nn.Conv2d(8, 4, 3, 1, 1)
        self.out = nn.Conv2d(4, 1, 3, 1, 1)

    def forward(self, x):
        h = F.relu(self.up(self.encoder(x)))
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(F.relu(self.smooth(h))))


class MLPAutoencoder(nn.Module):
    """A dense autoencoder on 64 features (an 8x8 patch or a sensor frame): 64-32-8-32-64, ReLU
    between, sigmoid at the reconstruction."""

    input_shape = (1, 64)

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))

    def forward(self, x):
        return torch.sigmoid(self.decoder(self.encoder(x)))


class SeedMLP(seed_networks.SeedMLP):
    """The seed paper's MNIST MLP 784-100-100-10 (89,400 MACs), layer names as in its checkpoint;
    defined once, in the seed example (examples/seed_mnist/build_models.py)."""

    input_shape = (1, 1, 28, 28)


class SeedLeNet(seed_networks.SeedLeNet):
    """The seed paper's LeNet-5 on 28x28 MNIST (416,520 MACs), layer names as in its checkpoint;
    defined once, in the seed example."""

    input_shape = (1, 1, 28, 28)


ARCHITECTURES = {
    "resnet8": ResNet8, "dscnn": DSCNN, "mobilenetv1": MobileNetV1, "dscnn1d": DSCNN1d,
    "mobilenetv2": MobileNetV2Stack, "seed_mlp": SeedMLP, "seed_lenet": SeedLeNet,
    "shufflenetv2_blocks": ShuffleNetV2Blocks, "conv_autoencoder": ConvAutoencoder,
    "mlp_autoencoder": MLPAutoencoder,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """``name`` with He-initialised weights and random batch-norm statistics, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = ARCHITECTURES[name]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * np.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.05)
    _randomise_batch_norms(model, generator)
    return model.eval()


def build_onnx(name: str, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """The ONNX export of `build` (TorchScript exporter, batch norms kept as nodes)."""
    return export(build(name, seed), opset=opset)


def posterior(model: onnx.ModelProto, relative: float = 0.1, floor: float = 1e-3) -> dict[str, np.ndarray]:
    """std = relative * |mu| + floor for every float initializer of rank >= 1 that is not a batch
    norm's parameter or statistic (the BNN's random weights are the conv and dense ones; pfpc folds
    the batch norms into them)."""
    from pfpc.ops.registry import CONSTANT_INPUTS

    batch_norm = {name for node in model.graph.node if node.op_type == "BatchNormalization" for name in node.input[1:]}
    # Resize scales, pad values, clip bounds: compile-time constants, never weights (the dynamo exporter makes them initializers)
    constants = {node.input[i] for node in model.graph.node for i in CONSTANT_INPUTS.get(node.op_type, ()) if i < len(node.input)}
    out = {}
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype == np.float32 and value.ndim >= 1 and init.name not in batch_norm | constants:
            out[f"{init.name}.std"] = (relative * np.abs(value) + floor).astype(np.float32)
    return out


def sample_input(name: str, seed: int = 0) -> np.ndarray:
    """A standard-normal input of the architecture's shape (representative of normalised features)."""
    return np.random.default_rng(seed).standard_normal(ARCHITECTURES[name].input_shape).astype(np.float32)
