"""Per-channel loadings through activations other than ReLU and Clip: median PFP/MC variance of
the logits of conv -> f -> conv -> f -> global average pool -> dense (the network of
tests/test_covariance_activations.py, random weights, posterior std 0.1 |mu| + 1e-3) under
``--covariance none``, ``auto`` and ``channel``, against Monte Carlo in onnxruntime.

    python benchmarks/covariance_activations.py [--samples 2000] [ACTIVATION ...]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pfpc  # noqa: E402
import reference as R  # noqa: E402
from test_covariance_activations import ACTIVATIONS, _onnx  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("activations", nargs="*", default=sorted(ACTIVATIONS))
    args = parser.parse_args()
    print(f"| activation | none | auto | channel | MC rel. s.e. of var ({args.samples} draws) |")
    print("|---|---|---|---|---|")
    for activation in args.activations:
        model, stds, inputs = _onnx(activation)
        post = {k + ".std": v for k, v in stds.items()}
        _, mc_var, _, var_se = R.monte_carlo(model, stds, inputs, args.samples, seed=1, with_var_stderr=True)["y"]
        ratios = []
        for mode in ("none", "auto", "channel"):
            (_, var), = pfpc.compile(model, post, covariance=mode, batch=1).run([inputs["x"]]).outputs
            ratios.append(f"{np.median(var / mc_var):.3f}")
        print(f"| {activation} | " + " | ".join(ratios) + f" | {np.median(var_se / mc_var):.3f} |", flush=True)


if __name__ == "__main__":
    main()
