"""Turn the seed paper's two pretrained Pyro checkpoints into pfpc's inputs: the ONNX mean network
and a posterior .npz made by pfpc's own importer (``pfpc import-posterior --from pyro``).

    python examples/seed_mnist/build_models.py [--data ../shared/data] [--out examples/seed_mnist/generated]

The checkpoints (MIT, Klein et al. 2025) hold ``ScaledAutoNormal.locs.<layer>.<weight|bias>`` and
``ScaledAutoNormal.scales.<layer>...`` (std = softplus(scale)). The architectures are the seed code's:
MLP 784-100-100-10 and LeNet-5 on 28x28 (conv 6@5x5 pad 2, pool, conv 16@5x5, pool, 120, 84, 10).
Written into ``--out`` (git-ignored): ``<net>/model.onnx`` (mean weights = the guide's locs, input
``x`` [N, 1, 28, 28], output ``y`` [N, 10] logits) and ``<net>/post.npz``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data")
CHECKPOINTS = {"mlp": "vi_model_20240730_e40_mlp.pt", "lenet": "vi_model_20240730_e40_lenet.pt"}


class SeedMLP(nn.Module):
    """784-100-100-10, ReLU; layer names as in the checkpoint."""

    def __init__(self):
        super().__init__()
        self.input_layer = nn.Linear(784, 100)
        self.hidden_layers = nn.ModuleList([nn.Linear(100, 100)])
        self.out_layer = nn.Linear(100, 10)

    def forward(self, x):
        h = F.relu(self.input_layer(torch.flatten(x, 1)))
        return self.out_layer(F.relu(self.hidden_layers[0](h)))


class SeedLeNet(nn.Module):
    """LeNet-5 on 28x28; layer names as in the checkpoint."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.fc1(torch.flatten(h, 1)))
        return self.fc3(F.relu(self.fc2(h)))


NETWORKS = {"mlp": SeedMLP, "lenet": SeedLeNet}


def mean_network(net: str, checkpoint: str) -> onnx.ModelProto:
    """The ONNX export of the network with every weight at its posterior mean (the guide's loc)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # a trusted file (see the data README)
    prefix = "ScaledAutoNormal.locs."
    locs = {key[len(prefix):]: torch.as_tensor(value).detach().float() for key, value in state["params"].items() if key.startswith(prefix)}
    model = NETWORKS[net]().eval()
    model.load_state_dict(locs, strict=True)
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def build(net: str, data: str, out: str) -> tuple[str, str]:
    """(model.onnx, post.npz) of ``net`` under ``out``/net, made if absent."""
    from pfpc.frontends.importers import match_posterior, write_npz

    folder = os.path.join(out, net)
    model_path, post_path = os.path.join(folder, "model.onnx"), os.path.join(folder, "post.npz")
    if os.path.exists(model_path) and os.path.exists(post_path):
        return model_path, post_path
    os.makedirs(folder, exist_ok=True)
    checkpoint = os.path.join(data, "seed-checkpoints", CHECKPOINTS[net])
    onnx.save(mean_network(net, checkpoint), model_path)
    result = match_posterior("pyro", checkpoint, model_path)
    write_npz(result.arrays, post_path)
    return model_path, post_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", default=os.path.join(HERE, "generated"))
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "seed-checkpoints")):
        print(f"{args.data}: no seed-checkpoints/ here (see the data README)", file=sys.stderr)
        return 2
    for net in NETWORKS:
        print(*build(net, args.data, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
