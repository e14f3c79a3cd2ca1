"""Cortex-M4 cost of the diagonal PFP (measured) and the extra work of the channel-covariance
propagations (counted from their formulas, tests/reference_covariance.py) for every architecture.

    PYTHONPATH=.:tests nice -n 10 python benchmarks/covariance_cost.py [models...]

Measured: instructions the generated diagonal PFP executes per inference under QEMU
(`pfpc run --emulate --cycles`, target cortex-m4, mps2-an386).
Counted, per convolution (the first reads no loadings and pays only the per-element work):
  channel  the coherent term sum_c (sum_t mu a)^2: one multiply-add per MAC, plus one square-add per
           (output, input channel of its group, position) for a k x k window; the split of the variance
           into shared and independent parts reuses the diagonal PFP's accumulators with a - no extra
           multiply-add per MAC (conv(v - a^2, mu^2) replaces conv(v, mu^2));
  channel_box  as channel, but for a k x k window over several input channels the coherent term
           uses the window's mean loading: one multiply-add per (output, input channel, position);
  pooled   no extra work per MAC (the weight-noise accumulator conv(m^2 + v, s2) is kept apart);
both: window sums of m, a, v - a^2 (3 adds per input element with integral images), the pooled
variance T (2 multiply-adds per weight + 1 per input channel), the projection (about 8 operations
per output element: sqrt, two sums, scale) and the ReLU loading (1 multiply, 1 clamp per element).
Extra instructions are estimated as the extra operations times the diagonal PFP's measured
instructions per operation (its multiply-adds counted as pfpc's cost model does: 3 per MAC with a
Gaussian input, 2 with a deterministic one). An estimate, not a measurement: the compiler does
not implement the propagation yet (docs/covariance.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import architectures as A  # noqa: E402
from pfpc.frontends.onnx_model import fold_constants  # noqa: E402


def conv_layers(model):
    """(MACs, weights, input elements, output elements, window, first, dense) per Conv/Gemm."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    rows = []
    first_input = model.graph.input[0].name
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w = weights[node.input[1]]
        out = int(np.prod(shapes[node.output[0]]))
        inp = int(np.prod(shapes[node.input[0]]))
        if node.op_type == "Conv":
            per_output = int(np.prod(w[1:]))
            window = int(np.prod(w[2:]))
        else:
            per_output = w[1]
            window = 1
        rows.append((out * per_output, int(np.prod(w)), inp, out, window, node.input[0] == first_input or rows == [], node.op_type == "Gemm"))
    return rows


def counted(model):
    diag = channel = pooled = box = 0.0
    for macs, weights, inp, out, window, first, dense in conv_layers(model):
        diag += macs * (2 if first else 3)
        if dense:  # the dense head after the pool needs no loadings
            continue
        common = 3 * inp + 2 * weights + 10 * out
        pooled += common
        if first:  # reads no loadings: only its own weight noise's loading
            channel += common
            box += common
            continue
        channel += common + macs * (1 + (1.0 / window if window > 1 else 0.0))
        dense_window = window > 1 and macs // out > window  # several input channels per group
        box += common + (macs / window if dense_window else macs * (1 + (1.0 / window if window > 1 else 0.0)))
    return diag, channel, pooled, box


def measure(name):
    """Instructions of one diagonal PFP inference on the Cortex-M4 (QEMU)."""
    model = fold_constants(A.build_onnx(name))
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/model.onnx")
        np.savez(f"{tmp}/post.npz", **A.posterior(model))
        np.save(f"{tmp}/x.npy", A.sample_input(name))
        env = {**os.environ, "PYTHONPATH": ROOT}
        subprocess.run([sys.executable, "-m", "pfpc.cli", f"{tmp}/model.onnx", "--posterior", f"{tmp}/post.npz", "--target", "cortex-m4", "--batch", "1", "-o", f"{tmp}/out"],
                       check=True, env=env, capture_output=True)
        done = subprocess.run([sys.executable, "-m", "pfpc.cli", "run", f"{tmp}/out", "--input", f"{tmp}/x.npy", "--output", f"{tmp}/y.npz", "--emulate", "--cycles"],
                              check=True, env=env, capture_output=True, text=True)
    return model, done.stdout + done.stderr


def main(argv=None):
    names = (argv if argv is not None else sys.argv[1:]) or ["resnet8", "dscnn", "mobilenetv1", "dscnn1d", "mobilenetv2"]
    print(f"{'model':12s} {'diag M4 instr':>14s} {'diag ops':>11s} {'instr/op':>8s} {'+channel':>9s} {'+box':>8s} {'+pooled':>8s}")
    for name in names:
        model, text = measure(name)
        numbers = [int(w.replace(",", "")) for line in text.splitlines() if "instruction" in line or "cycles" in line
                   for w in line.split() if w.replace(",", "").isdigit()]
        instructions = numbers[0] if numbers else float("nan")
        diag, channel, pooled, box = counted(model)
        per_op = instructions / diag
        print(f"{name:12s} {instructions:14,} {diag:11,.0f} {per_op:8.2f} {channel * per_op / instructions:8.1%} {box * per_op / instructions:8.1%} {pooled * per_op / instructions:8.1%}", flush=True)
        print("   ", " | ".join(line.strip() for line in text.splitlines() if line.strip())[:300])


if __name__ == "__main__":
    main()
