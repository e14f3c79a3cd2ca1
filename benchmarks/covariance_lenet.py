"""The seed LeNet-5 (conv -> ReLU -> max-pool twice, flatten, dense tail) on MNIST and
Fashion-MNIST: which covariance rule closes which part of the output variance the diagonal PFP
loses, in the float64 reference and compiled, against Monte Carlo; Cortex-M4 cost and accuracy.

    PYTHONPATH=.:tests nice -n 10 python benchmarks/covariance_lenet.py [--images 30] [--samples 1000] [--accuracy 1000] [--no-m4]

The seed paper's pretrained checkpoint (../shared/data/seed-checkpoints, std = softplus(scale)),
its test images normalised as the seed authors did. Monte Carlo: whole weight draws from the
posterior run in onnxruntime (benchmarks/covariance.py's sampler); its noise is printed as the
median relative standard error of a logit's MC variance. Printed per data set, the median over
logits and images of PFP variance / MC variance for
  none              the diagonal PFP (float64 reference, tests/reference.py)
  max only          the max-pools read the convolutions' loadings (Clark's max of correlated
                    window elements) and drop them: what the compiler builds
  max + carry       the max-pools also pass a loading on (Stein: a1 Phi(al) + a2 Phi(-al)), the
                    dense layer after Flatten still diagonal
  max + dense       ... and the dense layer adds the loadings of one channel coherently (the
                    whole per-channel propagation, reference_covariance "channel")
  C none / auto / channel   the generated C (host build) with that --covariance
and the argmax accuracy of the C's means on the first --accuracy test images (the checkpoint is
trained on MNIST; Fashion-MNIST is its out-of-distribution set) with the share of images whose
class is the diagonal PFP's, and the
instructions of one inference on the Cortex-M4 (QEMU, `pfpc run --emulate --cycles`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]

import covariance as B  # noqa: E402
import covariance_compiled as BC  # noqa: E402
import reference_covariance as RC  # noqa: E402

VARIANTS = {"none": dict(mode="none"), "max only": dict(mode="channel", max_keeps_loading=False),
            "max + carry": dict(mode="channel", dense=False), "max + dense": dict(mode="channel")}


def float64_variance(model, variances, feed, options):
    options = dict(options)
    coherent_dense = options.pop("dense", True)
    original = RC.gemm_channel
    if not coherent_dense:  # every flattened feature its own latent: the diagonal dense layer
        RC.gemm_channel = lambda m, v, a, group, *rest: original(m, v, a, np.arange(m.shape[1]), *rest)
    try:
        env = RC.pfp_covariance(model, variances, feed, **options)
    finally:
        RC.gemm_channel = original
    return env[model.graph.output[0].name][1].ravel()


def labels(kind, count):
    import gzip

    with gzip.open(os.path.join(B.DATA, "mnist", f"{kind}-t10k-labels-idx1-ubyte.gz")) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)[:count]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--accuracy", type=int, default=1000)
    parser.add_argument("--no-m4", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(B.DATA, "seed-checkpoints")):
        print(f"skipped: {B.DATA} is absent")
        return
    import pfpc

    model, variances = B.seed_model("seed_lenet")
    posterior = {k + ".std": np.sqrt(v).astype(np.float32) for k, v in variances.items()}
    input_name, output_name = model.graph.input[0].name, model.graph.output[0].name
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/model.onnx")
        np.savez(f"{tmp}/post.npz", **posterior)
        compiled = {mode: pfpc.compile(model, posterior, covariance=mode, batch=1) for mode in ("none", "auto", "channel")}
        print(f"MC: {args.samples} weight draws x {args.images} images per data set")
        for kind in ("mnist", "fashion"):
            ratios = {name: [] for name in list(VARIANTS) + ["C none", "C auto", "C channel"]}
            rel_se = []
            images = B.mnist(kind, args.images)
            c_vars = {mode: np.asarray(program.run([images]).outputs[0][1], np.float64).reshape(len(images), -1)
                      for mode, program in compiled.items()}  # one build and run, the images in turn
            for index, x in enumerate(images):
                x = x[None]
                mc_mean, mc_var, var_se = B.monte_carlo_all(model, variances, x, args.samples, seed=index)[output_name]
                mc_var = mc_var.ravel()
                rel_se.append(var_se.ravel() / mc_var)
                for name, options in VARIANTS.items():
                    ratios[name].append(float64_variance(model, variances, {input_name: x}, options) / mc_var)
                for mode in compiled:
                    ratios[f"C {mode}"].append(c_vars[mode][index] / mc_var)
            print(f"\n## seed LeNet-5, {kind} ({args.images} images x 10 logits; MC var rel. s.e. {np.median(np.concatenate(rel_se)):.3f})")
            for name, values in ratios.items():
                values = np.concatenate(values)
                print(f"{name:12s} median PFP/MC variance {np.median(values):.3f}   (quartiles {np.quantile(values, 0.25):.3f} / {np.quantile(values, 0.75):.3f})")
            images, truth = B.mnist(kind, args.accuracy), labels(kind, args.accuracy)
            argmax = {mode: np.argmax(np.asarray(program.run([images]).outputs[0][0]).reshape(len(images), -1), axis=1)
                      for mode, program in compiled.items()}
            for mode in compiled:  # the checkpoint is trained on MNIST: Fashion-MNIST is its out-of-distribution set
                print(f"C {mode:7s} argmax of means on {args.accuracy} images: accuracy {np.mean(argmax[mode] == truth):.4f}, "
                      f"same class as none {np.mean(argmax[mode] == argmax['none']):.4f}")
            if not args.no_m4 and kind == "mnist":  # the count does not depend on the image: once
                np.save(f"{tmp}/x.npy", B.mnist(kind, 1)[:1])
                counts = [BC.m4_instructions(tmp, mode) for mode in ("none", "auto", "channel")]
                print(f"Cortex-M4 instructions: none {counts[0]:,}  auto {counts[1]:,} ({counts[1] / counts[0] - 1:+.1%})"
                      f"  channel {counts[2]:,} ({counts[2] / counts[0] - 1:+.1%})", flush=True)


if __name__ == "__main__":
    main()
