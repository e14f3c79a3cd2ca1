"""Cortex-M4 instructions (QEMU, exact) of `benchmarks/run.py`'s real-size networks: the PFP
(default options, `--covariance auto`) and the deterministic C, at the generated Makefile's flags
and at the best ones (`codegen.targets.BEST_FLAGS` added), per MAC, with the arithmetic floor
(`pfpc report`'s PFP multiply-adds per MAC) beside; ``--profile`` adds the PFP's instructions per
kernel at the Makefile's flags (`pfpc run --emulate --profile`). Results: benchmarks/m4_kernels.md.

    PYTHONPATH=. python benchmarks/m4_kernels.py [--models seed_lenet resnet8 dscnn] [--profile] [--no-best]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def measure(name: str, best: bool = True, profile: bool = False, options: dict | None = None, target: str = "cortex-m4") -> dict:
    """{"macs", "pfp_fma", ("pfp"|"det", "make"|"best"): instructions, "layers": per-kernel rows}."""
    import run

    import pfpc.compiler as compiler
    from pfpc.bench import with_best_flags
    from pfpc.codegen.footprint import layer_costs
    from pfpc.codegen.targets import BEST_FLAGS

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path, posterior_path, x, _ = run.real_model(name, tmp)
        x = x.astype(np.float32)
        for key, post in (("pfp", posterior_path), ("det", None)):
            for flags in ("make", "best") if best else ("make",):
                out = os.path.join(tmp, f"{key}_{flags}")
                result = compiler.compile(model_path, post, out_dir=out, batch=1, target=target,
                                          **(options or {} if key == "pfp" else {}))
                if key == "pfp" and flags == "make":
                    costs = layer_costs(result.program)
                    found["macs"], found["pfp_fma"] = sum(c["macs"] for c in costs), sum(c["pfp_fma"] for c in costs)
                if flags == "best":
                    with_best_flags(out, BEST_FLAGS)
                found[key, flags] = compiler.run(out, [x], emulate=True).cycles[0]
                if profile and key == "pfp" and flags == "make":  # a build of its own: the counter reads add instructions
                    found["layers"] = compiler.run(out, [x], emulate=True, profile=True).layers
    return found


def main() -> int:
    import pfpc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["seed_lenet", "resnet8", "dscnn"])
    parser.add_argument("--profile", action="store_true", help="also the PFP's instructions per kernel (Makefile flags)")
    parser.add_argument("--no-best", action="store_true", help="only the Makefile's flags")
    parser.add_argument("--covariance", help="the PFP's --covariance (default: the compiler's, auto)")
    parser.add_argument("--target", default="cortex-m4", help="a Cortex-M target of pfpc (default cortex-m4; cortex-m7)")
    args = parser.parse_args()
    print(f"pfpc from {os.path.dirname(pfpc.__file__)}, target {args.target}")
    options = {"covariance": args.covariance} if args.covariance else {}
    rows = []
    for name in args.models:
        found = measure(name, best=not args.no_best, profile=args.profile, options=options, target=args.target)
        macs = found["macs"]
        for flags in ("make", "best"):
            if ("pfp", flags) not in found:
                continue
            pfp, det = found["pfp", flags], found["det", flags]
            best_det = min(found["det", f] for f in ("make", "best") if ("det", f) in found)
            rows.append(f"| {name} | {flags} | {pfp:,} | {pfp / macs:.2f} | {det:,} | {det / macs:.2f} | "
                        f"{pfp / best_det:.2f} | {found['pfp_fma'] / macs:.2f} | {macs:,} |")
            print(rows[-1], flush=True)
        if found.get("layers"):
            total = sum(layer["instructions"] for layer in found["layers"])
            print(f"\n{name} PFP per kernel (Makefile flags, the profiled build):\n\n| kernel | instructions | share |\n|---|---:|---:|")
            for layer in sorted(found["layers"], key=lambda layer: -layer["instructions"]):
                print(f"| {layer['function']} | {layer['instructions']:,} | {100 * layer['instructions'] / total:.1f} % |")
            print(flush=True)
    print("\n| model | flags | PFP | PFP / MAC | det. | det. / MAC | PFP / best det. | floor PFP / det. per MAC | MACs |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
