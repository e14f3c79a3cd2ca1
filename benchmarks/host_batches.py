"""TVM's LLVM build (Relax VM) against the PFP C at batch 8 and 128 on the real-size networks
(issue 19: PFP C >= TVM LLVM VM at every size and at batch 1-128; batch 1: host_kernels.py).
Side by side (`pfpc.bench.benchmark_model`, process CPU time, medians, 5 turns), the Makefile's
flags only, no onnxruntime, SVI at 2 samples only (not reported). Results: benchmarks/host_kernels.md.

    PYTHONPATH=. nice -n 5 python benchmarks/host_batches.py seed_mlp seed_lenet resnet8 dscnn
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run  # noqa: E402

from pfpc.bench import benchmark_model  # noqa: E402

for name in sys.argv[1:]:
    with tempfile.TemporaryDirectory() as tmp:
        model_path, posterior_path, x, origin = run.real_model(name, tmp)
        r = benchmark_model(model_path, posterior_path, batches=(8, 128), samples=(2,), inputs=x, cycles_target=(), ort=False,
                            best=False, repeats=5, progress=lambda t: print(name, t, file=sys.stderr, flush=True))
    for row in r["host"]:
        print(name, "batch", row["batch"], "PFP", round(row["pfp"], 1), "TVM", round(row["tvm_vm"], 1), "TVM/PFP %.2f" % (row["tvm_vm"] / row["pfp"]), flush=True)
