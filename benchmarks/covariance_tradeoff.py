"""Trade-off curve of the channel-covariance PFP: output variance ratio against Monte Carlo when
only the convolutions from the k-th on carry loadings, beside the extra work counted as in
benchmarks/covariance_cost.py.

    PYTHONPATH=.:tests nice -n 10 python benchmarks/covariance_tradeoff.py [--samples 1000] [models...]

Monte Carlo at the outputs only (onnxruntime, pfpc.verify.monte_carlo, whole weight draws), on 2
standard-normal inputs; ratios are medians over the outputs of both inputs.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]

import architectures as A  # noqa: E402
import reference_covariance as RC  # noqa: E402
from covariance_cost import conv_layers  # noqa: E402
from pfpc.frontends.onnx_model import fold_constants  # noqa: E402
from pfpc.frontends.posterior import Posterior  # noqa: E402
from pfpc.verify import monte_carlo  # noqa: E402


def extra_work(model, start, channel, box=False):
    """Extra operations of the convolutions from the start-th on, over the diagonal PFP's."""
    diag = extra = 0.0
    for index, (macs, weights, inp, out, window, first, dense) in enumerate(conv_layers(model)):
        diag += macs * (2 if first else 3)
        if dense or index < start:
            continue
        extra += 3 * inp + 2 * weights + 10 * out
        if channel and not first:
            dense_window = window > 1 and macs // out > window  # several input channels per group
            extra += macs / window if box and dense_window else macs * (1 + (1.0 / window if window > 1 else 0.0))
    return extra / diag


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["resnet8", "dscnn", "mobilenetv2", "dscnn1d"])
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    for name in args.models:
        model = fold_constants(A.build_onnx(name))
        variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in A.posterior(model).items()}
        means = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        posterior = Posterior({k: means[k] for k in variances}, {k: v.astype(np.float32) for k, v in variances.items()})
        convs = sum(n.op_type == "Conv" for n in model.graph.node)
        starts = sorted({0, 1, convs // 2, convs - 3, convs - 2, convs - 1, convs} - {-1})
        results = {(mode, s): [] for mode in ("channel", "pooled", "channel_box") for s in starts}
        se = []
        for seed in range(2):
            x = A.sample_input(name, seed)
            feed = {model.graph.input[0].name: x}
            _, ((mc_mean, mc_var, _, var_se),) = monte_carlo(model, posterior, feed, args.samples, seed)
            se.append(var_se / mc_var)
            for mode, start in results:
                var = RC.pfp_covariance(model, variances, feed, mode, start=start)["y"][1]
                results[mode, start].append(var / mc_var)
        print(f"\n## {name}: {convs} convolutions, MC {args.samples} samples x 2 inputs, median rel. s.e. of MC variance {np.median(se):.3f}")
        print(f"{'loadings from conv':>19s} {'channel ratio':>14s} {'extra work':>10s} {'pooled ratio':>13s} {'extra work':>10s} {'box ratio':>10s} {'extra work':>10s}")
        for start in starts:
            label = "none (diagonal)" if start == convs else str(start)
            print(f"{label:>19s} {np.median(results['channel', start]):14.3f} {extra_work(model, start, True):10.1%}"
                  f" {np.median(results['pooled', start]):13.3f} {extra_work(model, start, False):10.1%}"
                  f" {np.median(results['channel_box', start]):10.3f} {extra_work(model, start, True, box=True):10.1%}", flush=True)


if __name__ == "__main__":
    main()
