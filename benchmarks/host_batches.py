"""TVM's LLVM build (Relax VM) against the PFP C at batch 8 and 128 on the real-size networks
(issue 19: PFP C >= TVM LLVM VM at every size and at batch 1-128; batch 1: host_kernels.py).
Side by side (`pfpc.bench.benchmark_model`, process CPU time, medians, 5 turns), the Makefile's
flags only, no onnxruntime, SVI at 2 samples only (not reported). Every network is exported with a
symbolic batch dimension (`run.real_model(symbolic_batch=True)`): exported with a fixed batch of 1,
`--batch B` left it at 1, and the rows of session 11's first run were batch 1 under another label.
Results: benchmarks/host_kernels.md.

    PYTHONPATH=. nice -n 5 python benchmarks/host_batches.py [--batches 8 128] seed_mlp seed_lenet resnet8 dscnn

``--against FLAGS``: also time the PFP C built with FLAGS appended, in the same turns (the
`pfpc.bench` "best" slot), e.g. ``--against=--param=max-completely-peeled-insns=200`` (gcc's
default: the host build before session 13's `targets.HOST_GCC_FLAGS`).

A model may also be an .onnx file with a symbolic batch, its posterior post.npz and its input
sample.npy beside it (examples/lenet/model.onnx: the digits LeNet).
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run  # noqa: E402

from pfpc.bench import benchmark_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("models", nargs="+")
parser.add_argument("--batches", nargs="+", type=int, default=[8, 128])
parser.add_argument("--repeats", type=int, default=5, help="turns of the side-by-side loop")
parser.add_argument("--against", help="flags appended to a second build of the PFP C, timed in the same turns")
args = parser.parse_args()
if args.against:
    import pfpc.bench

    pfpc.bench.host_best_flags = lambda: tuple(args.against.split())
for name in args.models:
    with tempfile.TemporaryDirectory() as tmp:
        if name.endswith(".onnx"):
            folder = os.path.dirname(name)
            model_path, posterior_path, x = name, os.path.join(folder, "post.npz"), np.load(os.path.join(folder, "sample.npy"))
        else:
            model_path, posterior_path, x, origin = run.real_model(name, tmp, symbolic_batch=True)
        r = benchmark_model(model_path, posterior_path, batches=tuple(args.batches), samples=(2,), inputs=x, cycles_target=(), ort=False,
                            best=bool(args.against), repeats=args.repeats, progress=lambda t: print(name, t, file=sys.stderr, flush=True))
    for row in r["host"]:
        print(name, "batch", row["batch"], "PFP %.1f" % row["pfp"], "TVM %.1f" % row["tvm_vm"], "(µs per call of the whole batch)",
              "TVM/PFP %.2f" % (row["tvm_vm"] / row["pfp"]),
              *([f"PFP with {args.against} %.1f" % row["pfp_best"], "TVM/that %.2f" % (row["tvm_vm"] / row["pfp_best"])] if args.against else []),
              flush=True)
