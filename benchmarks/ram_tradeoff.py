"""RAM against accuracy and instructions: the compile plans `--ram-limit` chooses among, measured.

    PYTHONPATH=.:tests nice -n 10 python benchmarks/ram_tradeoff.py [--samples 2000] [--plans auto,auto@0.1/bf16,...] [models...]

A plan is ``COVARIANCE[@BUDGET][/bf16]`` (``auto@0.15/bf16``: ``--covariance auto
--covariance-budget 0.15 --moment-storage bfloat16``). Per model (tests/architectures.py, random
weights, posterior std = 0.1 |mu| + 1e-3, one standard-normal input, as in
benchmarks/covariance_compiled.py) and plan:

- ratio: the median over the outputs of the compiled PFP's output variance (host build) over the
  Monte Carlo variance (onnxruntime, whole weight draws, tests/reference.monte_carlo). Every plan is
  divided by the SAME Monte Carlo draws: the differences between plans carry no sampling noise,
  each ratio carries the MC variance's relative standard error printed in the header;
- arena + stack: `pfpc report`'s numbers for Cortex-M4 (the memory plan's arena and gcc's
  ``-fstack-usage`` bound) and the peak stack painted and measured under QEMU (libm included);
- instructions: one inference on the Cortex-M4 under QEMU (mps2-an386, ``-icount shift=0``), exact.
- ``--ram-limit`` (bytes, or 256K): also the plan `pfpc.compile(ram_limit=...)` chooses, and its line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import architectures as A  # noqa: E402
import reference as R  # noqa: E402
from pfpc.frontends.onnx_model import fold_constants  # noqa: E402

DEFAULT_PLANS = "none,none/bf16,auto,auto/bf16,auto@0.2,auto@0.2/bf16,auto@0.15,auto@0.15/bf16,auto@0.1,auto@0.1/bf16"


def options(plan: str) -> dict:
    """``auto@0.15/bf16`` -> pfpc.compile keyword arguments."""
    head, _, storage = plan.partition("/")
    covariance, _, budget = head.partition("@")
    found = {"covariance": covariance, "moment_storage": "bfloat16" if storage == "bf16" else "float32"}
    if budget:
        found["covariance_budget"] = float(budget)
    return found


def measure_plan(tmp: str, plan: str, x: np.ndarray, m4: bool) -> dict:
    import pfpc
    from pfpc.runner import run

    host = pfpc.compile(f"{tmp}/model.onnx", f"{tmp}/post.npz", batch=1, **options(plan))
    (mean, var), = host.run([x]).outputs[:1]
    found = {"mean": np.asarray(mean, np.float64).ravel(), "var": np.asarray(var, np.float64).ravel()}
    out = f"{tmp}/m4_{plan.replace('/', '_')}"
    board = pfpc.compile(f"{tmp}/model.onnx", f"{tmp}/post.npz", batch=1, target="cortex-m4", out_dir=out, measure=True,
                         **options(plan))
    found.update({key: board.footprint[key] for key in ("arena_bytes", "stack_bytes")})
    if m4:
        emulated = run(out, [x], emulate=True)
        found["instructions"], found["peak_stack"] = emulated.cycles[0], max(emulated.stack_bytes)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["resnet8"])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--plans", default=DEFAULT_PLANS)
    parser.add_argument("--no-m4", action="store_true")
    parser.add_argument("--ram-limit", help="also the plan pfpc.compile(ram_limit=...) picks (e.g. 256K)")
    args = parser.parse_args(argv)
    plans = args.plans.split(",")
    for name in args.models:
        model = fold_constants(A.build_onnx(name))
        posterior = A.posterior(model)
        x = A.sample_input(name)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(model, f"{tmp}/model.onnx")
            np.savez(f"{tmp}/post.npz", **posterior)
            stds = {k[: -len(".std")]: v for k, v in posterior.items()}
            output_name = model.graph.output[0].name
            mc_mean, mc_var, _, var_se = R.monte_carlo(model, stds, {model.graph.input[0].name: x}, args.samples, seed=1,
                                                       with_var_stderr=True)[output_name]
            mc_mean, mc_var, var_se = (np.asarray(a, np.float64).ravel() for a in (mc_mean, mc_var, var_se))
            print(f"\n## {name}: MC {args.samples} weight draws x 1 input, median rel. s.e. of an output's MC variance "
                  f"{np.median(var_se / mc_var):.3f}\n")
            print("| plan | PFP/MC variance (median) | mean error (MC std) | arena | stack (gcc) | arena + stack | peak stack (QEMU) "
                  "| Cortex-M4 instructions |")
            print("|---|---|---|---|---|---|---|---|", flush=True)
            base = None
            for plan in plans:
                found = measure_plan(tmp, plan, x, not args.no_m4)
                ratio = np.median(found["var"] / mc_var)
                error = np.median(np.abs(found["mean"] - mc_mean) / np.sqrt(mc_var))
                count = found.get("instructions")
                base = count if base is None else base
                cost = "-" if count is None else f"{count:,}" + ("" if count == base else f" ({count / base - 1:+.1%})")
                print(f"| {plan} | {ratio:.3f} | {error:.3f} | {found['arena_bytes']:,} | {found['stack_bytes']:,} | "
                      f"{found['arena_bytes'] + found['stack_bytes']:,} | {found.get('peak_stack', '-')} | {cost} |", flush=True)
            if args.ram_limit:
                import pfpc
                from pfpc.options import parse_bytes

                chosen = pfpc.compile(f"{tmp}/model.onnx", f"{tmp}/post.npz", batch=1, target="cortex-m4",
                                      ram_limit=parse_bytes(args.ram_limit, "--ram-limit"))
                print(f"\npfpc.compile(ram_limit={args.ram_limit}): {chosen.footprint.get('ram_plan')}", flush=True)


if __name__ == "__main__":
    main()
