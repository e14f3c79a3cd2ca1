"""The COMPILED per-channel shared-noise PFP (``--covariance``) at real size: output variance vs
Monte Carlo and Cortex-M4 instructions, diagonal PFP (``--covariance none``) beside the default
(``auto``, or the modes given with --modes).

    PYTHONPATH=.:tests nice -n 10 python benchmarks/covariance_compiled.py [--samples 200] [--modes none,auto,auto@0.25] [models...]

(``auto@B``: ``--covariance auto --covariance-budget B``.)

Per model (tests/architectures.py: random He-initialised weights, trained-looking batch norms,
posterior std = 0.1 |mu| + 1e-3 on every conv and dense weight and bias, one standard-normal
input): the generated C (host build) gives the output moments; Monte Carlo draws whole weight
sets from the posterior and runs the ONNX graph in onnxruntime (tests/reference.monte_carlo);
printed: the median over outputs of PFP variance / MC variance, the MC noise (median relative
standard error of a unit's MC variance), the median |PFP mean - MC mean| / MC std, and the
instructions one inference executes on the Cortex-M4 (QEMU, `pfpc run --emulate --cycles`,
mps2-an386), with the extra over the diagonal PFP.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import architectures as A  # noqa: E402
import reference as R  # noqa: E402
from pfpc.frontends.onnx_model import fold_constants  # noqa: E402


def _option(mode):
    """``auto@0.25`` -> ("auto", 0.25); ``none`` -> ("none", None)."""
    covariance, _, budget = mode.partition("@")
    return covariance, float(budget) if budget else None


def m4_instructions(tmp, mode):
    """Instructions of one inference on the Cortex-M4 (QEMU) of the model in ``tmp``."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = f"{tmp}/m4_{mode}"
    covariance, budget = _option(mode)
    subprocess.run([sys.executable, "-m", "pfpc.cli", f"{tmp}/model.onnx", "--posterior", f"{tmp}/post.npz", "--target", "cortex-m4",
                    "--batch", "1", "--covariance", covariance, *(["--covariance-budget", str(budget)] if budget is not None else []),
                    "-o", out], check=True, env=env, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "pfpc.cli", "run", out, "--input", f"{tmp}/x.npy", "--output", f"{tmp}/y.npz",
                           "--emulate", "--cycles"], check=True, env=env, capture_output=True, text=True)
    text = done.stdout + done.stderr
    numbers = [int(w.replace(",", "")) for line in text.splitlines() if "instruction" in line or "cycles" in line
               for w in re.findall(r"[\d,]+", line) if w.replace(",", "").isdigit()]
    return max(numbers) if numbers else float("nan")


def host_moments(tmp, mode, x):
    import pfpc

    covariance, budget = _option(mode)
    options = {} if budget is None else {"covariance_budget": budget}
    compiled = pfpc.compile(f"{tmp}/model.onnx", f"{tmp}/post.npz", covariance=covariance, batch=1, **options)
    (mean, var), = compiled.run([x]).outputs[:1]
    return np.asarray(mean, np.float64).ravel(), np.asarray(var, np.float64).ravel()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["resnet8", "dscnn", "dscnn1d", "mobilenetv1", "mobilenetv2"])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--modes", default="none,auto")
    parser.add_argument("--no-m4", action="store_true")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    print(f"MC: {args.samples} weight draws x 1 input per model")
    header = f"{'model':12s} {'MC rel.se':>9s} " + " ".join(f"{m + ' ratio':>11s} {m + ' mean err':>13s}" for m in modes)
    header += "" if args.no_m4 else " " + " ".join(f"{m + ' M4 instr':>16s}" for m in modes)
    print(header, flush=True)
    for name in args.models:
        model = fold_constants(A.build_onnx(name))
        posterior = A.posterior(model)
        x = A.sample_input(name)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(model, f"{tmp}/model.onnx")
            np.savez(f"{tmp}/post.npz", **posterior)
            np.save(f"{tmp}/x.npy", x)
            stds = {k[: -len(".std")]: v for k, v in posterior.items()}
            input_name = model.graph.input[0].name
            output_name = model.graph.output[0].name
            mc_mean, mc_var, _, var_se = R.monte_carlo(model, stds, {input_name: x}, args.samples, seed=1, with_var_stderr=True)[output_name]
            mc_mean, mc_var, var_se = (np.asarray(a, np.float64).ravel() for a in (mc_mean, mc_var, var_se))
            row = f"{name:12s} {np.median(var_se / mc_var):9.3f} "
            cells = []
            for mode in modes:
                mean, var = host_moments(tmp, mode, x)
                cells.append(f"{np.median(var / mc_var):11.3f} {np.median(np.abs(mean - mc_mean) / np.sqrt(mc_var)):13.3f}")
            row += " ".join(cells)
            if not args.no_m4:
                counts = [m4_instructions(tmp, mode) for mode in modes]
                row += " " + " ".join(f"{c:>10,} ({c / counts[0] - 1:+.0%})" if i else f"{c:>16,}" for i, c in enumerate(counts))
            print(row, flush=True)


if __name__ == "__main__":
    main()
