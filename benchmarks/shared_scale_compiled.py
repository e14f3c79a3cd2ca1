"""The compiled shared fc1 scale (``--shared-scale``, pfpc/passes/share_dense_scale.py) on the seed
LeNet-5 against Monte Carlo, beside the diagonal PFP (``--shared-scale off``): the generated C's
median logit variance ratio (95 % bootstrap interval over the draws), the means' error in MC
standard deviations, argmax accuracy, and Cortex-M4 instructions under QEMU.

    PYTHONPATH=.:tests:benchmarks nice -n 10 python benchmarks/shared_scale_compiled.py [--images 40] [--samples 5000]
        [--kinds fashion mnist] [--accuracy 1000] [--qemu] [--scale-rules]

MC: `nongauss_lenet.monte_carlo` (whole weight draws in onnxruntime, the images batched per draw,
draw seed 7 as that benchmark's). Latest output: benchmarks/shared_scale_compiled.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

for _threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]

import covariance as B  # noqa: E402
import nongauss_lenet as N  # noqa: E402
import pfpc  # noqa: E402
from pfpc import compiler  # noqa: E402


def compiled_moments(model, stds, images, shared_scale, out_dir=None):
    built = pfpc.compile(model, stds, batch=len(images), shared_scale=shared_scale, out_dir=out_dir, force=True)
    (mean, var), = built.run([images]).outputs
    return mean.astype(np.float64), var.astype(np.float64), built


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--kinds", nargs="*", default=["fashion", "mnist"])
    parser.add_argument("--accuracy", type=int, default=0)
    parser.add_argument("--qemu", action="store_true", help="Cortex-M4 instructions of both builds (batch 1)")
    parser.add_argument("--scale-rules", action="store_true",
                        help="also: the float64 prototype with other distributions of the scale (the means' shift)")
    args = parser.parse_args(argv)
    model, variances = B.seed_model("seed_lenet")
    stds = {k + ".std": np.sqrt(v).astype(np.float32) for k, v in variances.items()}
    rng = np.random.default_rng(0)
    if args.qemu:
        image = B.mnist("fashion", 1)
        counts = {}
        for mode in ("off", "auto"):
            with tempfile.TemporaryDirectory() as scratch:
                out = os.path.join(scratch, "c")
                pfpc.compile(model, stds, batch=1, shared_scale=mode, target="cortex-m4", out_dir=out)
                counts[mode] = compiler.run(out, [image], emulate=True).cycles[0]
        print(f"Cortex-M4 instructions (QEMU, batch 1): diagonal PFP {counts['off']:,}, shared scale {counts['auto']:,} "
              f"(+{counts['auto'] / counts['off'] - 1:.1%})")
    for kind in args.kinds:
        images = B.mnist(kind, args.images)
        results = {mode: compiled_moments(model, stds, images, mode)[:2] for mode in ("off", "auto")}
        start = time.time()
        _, _, logits, _ = N.monte_carlo(model, variances, images, args.samples, seed=7, oracles={})
        mc_mean, mc_var = logits.astype(np.float64).mean(0), logits.astype(np.float64).var(0, ddof=1)
        print(f"\n## seed LeNet-5, {kind}: {args.images} images x 10 logits, MC {args.samples} draws ({time.time() - start:.0f} s)")
        print("compiled C                     median PFP/MC var   95% CI (draws)   mean err (MC std)")
        for mode, label in (("off", "diagonal PFP (--shared-scale off)"), ("auto", "shared fc1 scale (auto)")):
            mean, var = results[mode]
            low, high = _interval(var, logits, args.resamples, rng)
            error = np.median(np.abs(mean - mc_mean) / np.sqrt(mc_var))
            print(f"{label:34s} {np.median(var / mc_var):8.3f}   {low:6.3f}-{high:6.3f}   {error:8.3f}")
        if args.scale_rules:
            scale_rules(model, variances, images, logits)
        if args.accuracy:
            import gzip

            path = os.path.join(B.DATA, "mnist", f"{kind}-t10k-labels-idx1-ubyte.gz")
            with gzip.open(path) as f:
                labels = np.frombuffer(f.read(), np.uint8, offset=8)[: args.accuracy]
            many = B.mnist(kind, args.accuracy)
            means = {mode: compiled_moments(model, stds, many, mode)[0] for mode in ("off", "auto")}
            same = np.mean(means["off"].argmax(1) == means["auto"].argmax(1))
            print(f"argmax accuracy ({args.accuracy} images): diagonal {np.mean(means['off'].argmax(1) == labels):.3f}, "
                  f"shared scale {np.mean(means['auto'].argmax(1) == labels):.3f} (same class {same:.1%})")


def lognormal_scale(points):
    """kappa -> [(p, lam)]: `points` Gauss-Hermite points of a log-normal lam with E 1, Var kappa
    (skewed: its third central moment is kappa^2 (3 + kappa); the two-point scale's is 0 while
    kappa <= 1, kappa (kappa - 1) above)."""
    def rule(kappa):
        log_var = np.log1p(np.maximum(kappa, 0.0))
        nodes, weights = np.polynomial.hermite_e.hermegauss(points)
        weights = weights / weights.sum()
        return [(np.full_like(kappa, w), np.exp(np.sqrt(log_var) * z - log_var / 2)) for z, w in zip(nodes, weights)]
    return rule


def scale_rules(model, variances, images, logits):
    """The prototype (tests/reference_nongauss.scale_mixture, the compiler's loadings) with the
    scale's distribution changed: does a skewed scale move the mixture's own means closer to MC?
    (The compiled C keeps the diagonal PFP's means: measured here, they are closer.)"""
    import reference_nongauss as NG

    mc_mean, mc_var = logits.astype(np.float64).mean(0), logits.astype(np.float64).var(0, ddof=1)
    print("float64 prototype, scale rule       median PFP/MC var   mean err (MC std)")
    for label, rule in (("two-point (compiled variance)", None), ("log-normal, 3 points", lognormal_scale(3)), ("log-normal, 5 points", lognormal_scale(5))):
        out, _ = NG.scale_mixture(model, variances, images.astype(np.float64), "/conv2/Conv_output_0", "/fc1/Gemm_output_0",
                                  pool=((2, 2), (2, 2), (0, 0, 0, 0), (1, 1)), scenarios=rule, means="mixture")
        mean, var = out[model.graph.output[0].name]
        print(f"{label:34s} {np.median(var / mc_var):8.3f}   {np.median(np.abs(mean - mc_mean) / np.sqrt(mc_var)):8.3f}")


def _interval(var, logits, resamples, rng):
    """95 % bootstrap interval of the median ratio over the MC draws."""
    samples = len(logits)
    medians = []
    for _ in range(resamples):
        pick = logits[rng.integers(0, samples, samples)].astype(np.float64)
        medians.append(np.median(var / pick.var(0, ddof=1)))
    return np.percentile(medians, [2.5, 97.5])


if __name__ == "__main__":
    main()
