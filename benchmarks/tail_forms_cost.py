"""Cortex-M4 instructions (QEMU) of small layers whose Gaussian operator has a tail-stable or
quadrature form (issue 20's deep-tail fixes): a 16-channel 1x1 convolution followed by a 2x2
MaxPool (three Clark steps per output), by GlobalMaxPool, by Elu, by Relu (alone and fused into
the convolution), by the smooth activations (Softplus, SiLU, GELU, Sigmoid, Tanh). ``--networks`` adds the whole PFP of the seed LeNet-5 and ResNet-8
(`benchmarks/run.py`'s models and inputs, default options) in instructions per MAC (issue 19's
target: at most 8). Run it with the tree to measure on the path (PYTHONPATH) and compare two
trees side by side:

    PYTHONPATH=. python benchmarks/tail_forms_cost.py [--networks [seed_lenet resnet8]] [--layers Relu MaxPool]
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto


def _model(tail, opset=17):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((16, 8, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"])] + tail
    graph = helper.make_graph(nodes, "cost", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model), {"w.std": (0.1 * np.abs(weight) + 0.01).astype(np.float32)}


LAYERS = {
    "conv only": [helper.make_node("Identity", ["c"], ["y"])],
    "conv + MaxPool 2x2": [helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
    "conv + GlobalMaxPool": [helper.make_node("GlobalMaxPool", ["c"], ["y"])],
    "conv + Elu": [helper.make_node("Elu", ["c"], ["y"])],
    "conv + HardSwish": [helper.make_node("HardSwish", ["c"], ["y"])],
    # a ReLU of its own (the Identity keeps it out of the convolution's kernel) and fused
    "conv + Relu (own kernel)": [helper.make_node("Identity", ["c"], ["i"]), helper.make_node("Sigmoid", ["i"], ["s"]),
                                 helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Sum", ["r", "s"], ["y"])],
    "conv + Relu (fused)": [helper.make_node("Relu", ["c"], ["y"])],
    # the smooth activations' Gauss-Hermite differences and the probit slopes (session 10)
    "conv + Softplus": [helper.make_node("Softplus", ["c"], ["y"])],
    "conv + SiLU": [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])],
    "conv + Gelu": [helper.make_node("Gelu", ["c"], ["y"])],
    "conv + Gelu tanh": [helper.make_node("Gelu", ["c"], ["y"], approximate="tanh")],
    "conv + Sigmoid": [helper.make_node("Sigmoid", ["c"], ["y"])],
    "conv + Tanh": [helper.make_node("Tanh", ["c"], ["y"])],
}
#: Gelu is an ONNX operator from opset 20
OPSETS = {"conv + Gelu": 20, "conv + Gelu tanh": 20}


def instructions(model, post) -> int:
    import pfpc.compiler as compiler

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        compiler.compile(model, post, out_dir=out, batch=1, target="cortex-m4", covariance="none")
        x = np.random.default_rng(1).standard_normal([1, 8, 16, 16]).astype(np.float32)
        return compiler.run(out, [x], emulate=True).cycles[0]


def network_instructions(name: str):
    """(PFP Cortex-M4 instructions, MACs) of `benchmarks/run.py`'s model ``name`` (its weights and input)."""
    import pfpc.compiler as compiler
    from pfpc.codegen.footprint import layer_costs

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import run

    with tempfile.TemporaryDirectory() as tmp:
        model_path, posterior_path, x, _ = run.real_model(name, tmp)
        result = compiler.compile(model_path, posterior_path, out_dir=os.path.join(tmp, "out"), batch=1, target="cortex-m4")
        macs = sum(cost["macs"] for cost in layer_costs(result.program))
        return compiler.run(os.path.join(tmp, "out"), [x.astype(np.float32)], emulate=True).cycles[0], macs


def main() -> int:
    import argparse

    import pfpc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="*", choices=("seed_lenet", "resnet8"),
                        help="also these whole networks (both when none is named)")
    parser.add_argument("--layers", nargs="*", help="only the layer rows whose name contains one of these words")
    args = parser.parse_args()
    print(f"pfpc from {os.path.dirname(pfpc.__file__)}")
    if args.networks is not None:
        print("| network | PFP Cortex-M4 instructions | MACs | per MAC |\n|---|---:|---:|---:|")
        for name in args.networks or ("seed_lenet", "resnet8"):
            count, macs = network_instructions(name)
            print(f"| {name} | {count:,} | {macs:,} | {count / macs:.2f} |", flush=True)
    base = None
    print("| layers | Cortex-M4 instructions | over the convolution alone |\n|---|---:|---:|")
    for name, tail in LAYERS.items():
        if base is not None and args.layers and not any(word in name for word in args.layers):
            continue
        count = instructions(*_model(tail, OPSETS.get(name, 17)))
        base = count if base is None else base
        print(f"| {name} | {count:,} | {count - base:,} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
