"""Why the diagonal C's logit variances on the seed LeNet-5 sit ~5e-4 above tests/reference.py's
(means agree to 1e-6 relative): the ReLU's variance in its lower tail from the C's Phi.

    PYTHONPATH=.:tests nice -n 10 python benchmarks/seed_lenet_phi_tail.py [--images 100]

The C computes Phi(z) by Abramowitz & Stegun 26.2.17 (`moments.std_normal_cdf`: absolute error
below 7.5e-8), the reference by scipy's ndtr. Below z = -1 a ReLU's variance
V [Phi (1 + z^2) + z phi - (z Phi + phi)^2] is a difference of terms up to ~100 times larger
(z = -3), so Phi's absolute error becomes a relative error of 1e-4 to 3e-3 (z in [-3, -2)) and
several % and more (z < -3) of those elements' variances; 400-800 of them feed each dense
layer. Printed per data set:
  1. the C's logit variance against the reference (exact Phi) and against the same reference
     with the C's Phi substituted (what is left is float32: accumulation order, rounding);
  2. per ReLU layer, the float64 ReLU variance with the C's Phi against the exact one, by z
     (the reference's moments of the layer's input), and the float32 evaluation of the same
     formula with an exact Phi (float32 rounding alone).
Data: the seed paper's checkpoint and MNIST / Fashion-MNIST under ../shared/data.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import onnx
from scipy.special import ndtr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]

import covariance as B  # noqa: E402
import reference as R  # noqa: E402

AS_P = 0.2316419
AS_B = (0.319381530, -0.356563782, 1.781477937, -1.821255978, 1.330274429)
Z_BINS = [(-np.inf, -3), (-3, -2), (-2, -1), (-1, 0), (0, np.inf)]


def phi_as(z):
    """Phi(z) as the C computes it (A&S 26.2.17), in float64."""
    z = np.asarray(z, np.float64)
    a = np.abs(z)
    t = 1.0 / (1.0 + AS_P * a)
    poly = sum(b * t ** (i + 1) for i, b in enumerate(AS_B))
    with np.errstate(invalid="ignore"):
        lower = np.where(np.isinf(a), 0.0, np.exp(-a * a / 2) / np.sqrt(2 * np.pi) * poly)
    return np.where(z >= 0, 1.0 - lower, lower)


def relu_var(mean, var, cdf, dtype=np.float64):
    """The C's ReLU variance form (`moments.relu_moments`) in ``dtype`` with Phi from ``cdf``."""
    m, v = mean.astype(dtype), var.astype(dtype)
    s = np.sqrt(v)
    z = m / s
    big = cdf(z.astype(np.float64)).astype(dtype)
    small = (np.exp(-(z.astype(np.float64) ** 2) / 2) / np.sqrt(2 * np.pi)).astype(dtype)
    sp, upper = s * small, dtype(1.0) - big
    return (v * big + m * m * big * upper + m * sp * (upper - big) - sp * sp).astype(np.float64), z.astype(np.float64)


def cut(model, name):
    """``model`` up to the node writing ``name``, which becomes its output."""
    cut_model = copy.deepcopy(model)
    names = [node.output[0] for node in cut_model.graph.node]
    del cut_model.graph.node[names.index(name) + 1:]
    del cut_model.graph.output[:]
    cut_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return cut_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(B.DATA, "seed-checkpoints")):
        print(f"skipped: {B.DATA} is absent")
        return
    import pfpc

    model, variances = B.seed_model("seed_lenet")
    posterior = {k + ".std": np.sqrt(v).astype(np.float32) for k, v in variances.items()}
    input_name, output_name = model.graph.input[0].name, model.graph.output[0].name
    program = pfpc.compile(model, posterior, covariance="none", batch=1)
    exact_ndtr = R.ndtr
    for kind in ("mnist", "fashion"):
        images = B.mnist(kind, args.images)
        (mean, var), = program.run([images]).outputs
        var = np.asarray(var, np.float64).reshape(len(images), -1)
        print(f"\n## seed LeNet-5, {kind}, {len(images)} images x 10 logits: C / reference - 1 of the logit variance")
        for label, cdf in (("exact Phi (scipy ndtr)", exact_ndtr), ("the C's Phi (A&S 26.2.17)", phi_as)):
            R.ndtr = cdf
            try:
                expected = R.pfp_onnx(model, variances, {input_name: images})[output_name][1].reshape(var.shape)
            finally:
                R.ndtr = exact_ndtr
            rel = var / expected - 1
            print(f"reference with {label:26s} median {np.median(rel):+.2e}  mean {rel.mean():+.2e}  max |.| {np.abs(rel).max():.2e}  "
                  f"(sum of variances {var.sum() / expected.sum() - 1:+.2e})")
        print("ReLU variance, float64 with the C's Phi / exact - 1 (median, and share of the layer's summed variance), "
              "and float32 with an exact Phi (median |.|), by z = mean / std of the ReLU's input:")
        relus = [node for node in model.graph.node if node.op_type == "Relu"]
        for node in relus:
            source = node.input[0]
            m, v = R.pfp_onnx(cut(model, source), variances, {input_name: images})[source]
            exact, z = relu_var(m, v, exact_ndtr)
            with_as, _ = relu_var(m, v, phi_as)
            rounded, _ = relu_var(m, v, exact_ndtr, np.float32)
            cells = []
            for low, high in Z_BINS:
                inside = (z >= low) & (z < high) & (exact > 0)
                if inside.any():
                    rel = with_as[inside] / exact[inside] - 1
                    share = (with_as[inside] - exact[inside]).sum() / exact.sum()
                    f32 = np.median(np.abs(rounded[inside] / exact[inside] - 1))
                    cells.append(f"[{low:g},{high:g}) n={inside.sum()}: {np.median(rel):+.1e} ({share:+.1e}), f32 {f32:.0e}")
            print(f"  {node.name or node.output[0]} ({source}): " + "; ".join(cells))


if __name__ == "__main__":
    main()
