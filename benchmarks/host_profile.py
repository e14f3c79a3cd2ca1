"""Per kernel on the host: the generated PFP C against TVM's LLVM build of the same scheduled module
(issue 19's "PFP C >= TVM LLVM VM"), to see which kernels lose. The C is built at the Makefile's
flags with -DPFPC_PROFILE and a process-CPU timer in `pfpc_layer_done` (the time of each step of
`<name>_run`); TVM's build runs in the Relax VM with `VirtualMachine.set_instrument` timing each
packed call (process CPU time). The two run one after the other, not side by side: on a loaded
machine a kernel's ratio moves by 10-15 % between runs; what repeats across runs is what counts.
Exported with a symbolic batch (`run.real_model(symbolic_batch=True)`). Output: one row per
kernel, slowest first by C time minus TVM's, then the totals (TVM's VM calls outside the kernels
excluded; printed apart). Results: benchmarks/host_kernels.md.

    PYTHONPATH=. nice -n 5 python benchmarks/host_profile.py resnet8 --batch 8 [--runs 20] [--rows 25]
    PYTHONPATH=. nice -n 5 python benchmarks/host_profile.py examples/lenet/model.onnx --posterior examples/lenet/post.npz --batch 128
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MAIN = r"""#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "%(name)s.h"

%(buffers)s
static double spent[%(steps)d + 1], last;

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

void pfpc_layer_done(int step) {
  double t = now_ns();
  if (step > 0) spent[step] += t - last;
  last = now_ns();
}

int main(int argc, char** argv) {
  int runs = atoi(argv[2]), run, step;
  FILE* in = fopen(argv[1], "rb");
  if (!in || %(reads)s) return 2;
  fclose(in);
  %(call)s; /* warm-up */
  for (step = 0; step <= %(steps)d; ++step) spent[step] = 0.0;
  for (run = 0; run < runs; ++run) %(call)s;
  for (step = 1; step <= %(steps)d; ++step) printf("%%d %%.3f\n", step, spent[step] / runs / 1e3);
  return 0;
}
"""


def c_kernel_times(out_dir: str, x: np.ndarray, runs: int) -> dict:
    """{kernel: µs per run} of the generated C in ``out_dir`` (steps of one kernel summed)."""
    from pfpc.codegen.targets import TARGETS, c_flags
    from pfpc.compiler import read_metadata
    from pfpc.runner import output_buffers

    meta = read_metadata(out_dir)
    name, upper = meta["name"], meta["name"].upper()
    with open(os.path.join(out_dir, f"{name}.c")) as handle:
        steps = {int(index): kernel for index, kernel in re.findall(r"/\* step (\d+): (\S+) \*/", handle.read())}
    outs = [(f"out{k}", f"{upper}_OUTPUT{index}_ELEMENTS" if index is not None else f"{upper}_{(c_name or '').upper()}_ELEMENTS")
            for k, (c_name, index, _) in enumerate(output_buffers(meta))]
    source = MAIN % {
        "name": name, "steps": max(steps),
        "buffers": "\n".join([f"static float in0[{upper}_INPUT0_ELEMENTS];"] + [f"static float {v}[{size}];" for v, size in outs]),
        "reads": f"fread(in0, sizeof(float), {upper}_INPUT0_ELEMENTS, in) != {upper}_INPUT0_ELEMENTS",
        "call": f"{name}_run({', '.join(['in0'] + [v for v, _ in outs] + ['NULL'])})",
    }
    work = os.path.join(out_dir, "profile")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "main.c"), "w") as handle:
        handle.write(source)
    binary, in_path = os.path.join(work, "profile"), os.path.join(work, "in.f32")
    subprocess.run(["cc", *c_flags(TARGETS["host"]), "-DPFPC_PROFILE", "-I", out_dir, os.path.join(work, "main.c"),
                    os.path.join(out_dir, f"{name}.c"), "-lm", "-o", binary], check=True)
    np.ascontiguousarray(x, np.float32).tofile(in_path)
    times = collections.defaultdict(float)
    for line in subprocess.run([binary, in_path, str(runs)], capture_output=True, text=True, check=True).stdout.splitlines():
        step, micros = line.split()
        times[steps[int(step)]] += float(micros)
    return dict(times)


def tvm_kernel_times(mod, x: np.ndarray, runs: int) -> dict:
    """{kernel: µs per run} of TVM's LLVM build of ``mod`` (scheduled as the C is) in the Relax VM."""
    import tvm
    from tvm import relax

    from pfpc import ir_state
    from pfpc.bench import _tvm_scheduled
    from pfpc.codegen.targets import TARGETS

    scheduled = _tvm_scheduled(mod, TARGETS["host"].accumulate)
    func = scheduled["main"]
    params, num_input = func.attrs[ir_state.PARAMS], int(func.attrs["num_input"])
    vm = relax.VirtualMachine(tvm.compile(scheduled, target="llvm"), tvm.cpu())
    vm.set_input("main", tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), tvm.cpu()), *[params[p.name] for p in func.params[num_input:]])
    vm.invoke_stateful("main")  # warm-up
    times, started = collections.defaultdict(float), {}

    def instrument(func, symbol, before, result, *args):
        if before:
            started["ns"] = time.process_time_ns()
        else:
            times[symbol] += time.process_time_ns() - started["ns"]
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm.invoke_stateful("main")
    return {symbol: ns / runs / 1e3 for symbol, ns in times.items()}


def main() -> int:
    import run

    from pfpc import compiler
    from pfpc.frontends.onnx_model import input_shapes, load_model
    from pfpc.frontends.posterior import load_posterior

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a network of benchmarks/run.py (seed_mlp, seed_lenet, resnet8, dscnn), or an .onnx file "
                        "with a symbolic batch (with --posterior; e.g. examples/lenet/model.onnx, the digits LeNet)")
    parser.add_argument("--posterior", help="the .npz posterior of an .onnx model (its input: sample.npy beside it)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20, help="inferences timed (after one warm-up)")
    parser.add_argument("--rows", type=int, default=25, help="kernels printed")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", run.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model.endswith(".onnx"):
            model_path, posterior_path = args.model, args.posterior
            x = np.load(os.path.join(os.path.dirname(args.model), "sample.npy"))
        else:
            model_path, posterior_path, x, _ = run.real_model(args.model, tmp, symbolic_batch=True)
        model = load_model(model_path, args.batch)
        (shape,) = input_shapes(model).values()
        x = np.resize(x.astype(np.float32), shape)
        result = compiler.compile(model, load_posterior(model, posterior_path), out_dir=os.path.join(tmp, "pfp"), batch=args.batch)
        c_times = c_kernel_times(os.path.join(tmp, "pfp"), x, args.runs)
        tvm_times = tvm_kernel_times(result.mod, x, args.runs)
    print(f"{args.model} at batch {args.batch}, commit {commit}, {args.runs} runs; µs per run (process CPU time), "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| kernel | PFP C | TVM LLVM | TVM / C |\n|---|---:|---:|---:|")
    for kernel in sorted(c_times, key=lambda k: tvm_times.get(k, 0.0) - c_times[k])[:args.rows]:
        print(f"| {kernel} | {c_times[kernel]:,.1f} | {tvm_times.get(kernel, float('nan')):,.1f} | {tvm_times.get(kernel, 0.0) / c_times[kernel]:.2f} |")
    c_total, tvm_total = sum(c_times.values()), sum(tvm_times.get(k, 0.0) for k in c_times)
    print(f"\nAll {len(c_times)} kernels: PFP C {c_total:,.0f} µs, TVM {tvm_total:,.0f} µs (TVM / C {tvm_total / c_total:.3f}); "
          f"TVM's other VM calls {sum(t for k, t in tvm_times.items() if k not in c_times):,.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
