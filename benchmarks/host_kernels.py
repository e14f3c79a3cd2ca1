"""Host timings of `benchmarks/run.py`'s real-size networks (issue 19): every predictor of
`pfpc.bench.benchmark_model` at batch 1 (PFP C and det. C at the generated Makefile's flags and at the
best ones, SVI-C and onnxruntime SVI at 100 samples, onnxruntime's deterministic network, the TVM LLVM
build in the Relax VM), timed side by side in one alternating loop (process CPU time, medians), no
Cortex-M counts (benchmarks/m4_kernels.py has those). Results: benchmarks/host_kernels.md.

    PYTHONPATH=. nice -n 5 python benchmarks/host_kernels.py [--models seed_mlp seed_lenet resnet8 dscnn] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SAMPLES = (100,)


def main() -> int:
    import run

    import pfpc
    from pfpc.bench import benchmark_model, markdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[name for name, *_ in run.REAL])
    parser.add_argument("--repeats", type=int, default=7, help="turns of the side-by-side loop")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", run.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"pfpc from {os.path.dirname(pfpc.__file__)}, commit {commit}; load average {os.getloadavg()[0]:.1f} at the start\n", flush=True)
    titles = {name: title for name, title, *_ in run.REAL}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            model_path, posterior_path, x, origin = run.real_model(name, tmp)
            result = benchmark_model(model_path, posterior_path, batches=(1,), samples=SAMPLES, inputs=x, cycles_target=(),
                                     repeats=args.repeats, progress=lambda text: print(f"{name}: {text}", file=sys.stderr))
        row = result["host"][0]
        print(markdown({f"{titles[name]} ({origin})": result}, SAMPLES))
        print(f"TVM VM / PFP C: {row['tvm_vm'] / row['pfp']:.2f} (Makefile's flags), {row['tvm_vm'] / row['pfp_best']:.2f} (best); "
              f"PFP C / ORT det.: {row['pfp'] / row['ort_det']:.2f} and {row['pfp_best'] / row['ort_det']:.2f}; "
              f"ORT SVI-100 / PFP C: {row['svi_ort_100'] / row['pfp']:,.0f}x and {row['svi_ort_100'] / row['pfp_best']:,.0f}x; "
              f"load average {os.getloadavg()[0]:.1f} at the end\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
