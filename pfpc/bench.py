"""Benchmarks: the generated PFP against the deterministic network and against sampling.

Every number is a median over repeated timed rounds after a warm-up, measured in one process
run side by side, so that ratios are comparable on a shared, noisy machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

from .compiler import read_metadata
from .errors import PfpcError

BENCH_MAIN = r"""/* Times <name>_run on one input: warm-up, then ROUNDS rounds of CALLS calls; prints ns per call per round. */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "%(name)s.h"

%(buffers)s

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char** argv) {
  long calls = 1, round, call;
  int rounds = argc > 2 ? atoi(argv[2]) : 15;
  double target_ns = argc > 3 ? atof(argv[3]) : 2e7, start;
  FILE* in = fopen(argv[1], "rb");
  if (!in || %(reads)s) return 2;
  fclose(in);
  %(call)s; /* warm-up */
  for (;;) { /* calibrate: enough calls per round for target_ns */
    double elapsed;
    start = now_ns();
    for (call = 0; call < calls; ++call) %(call)s;
    elapsed = now_ns() - start;
    if (elapsed > target_ns / 8 || calls > (1L << 30)) {
      calls = (long)((double)calls * target_ns / elapsed);
      if (calls < 1) calls = 1;
      break;
    }
    calls *= 2;
  }
  for (round = 0; round < rounds; ++round) {
    start = now_ns();
    for (call = 0; call < calls; ++call) %(call)s;
    printf("%%.1f\n", (now_ns() - start) / (double)calls);
  }
  printf("checksum %%g\n", (double)%(checksum)s);
  return 0;
}
"""


def build_timer(out_dir: str, build_dir: str, cflags: tuple = ()) -> str:
    """Build ``<name>_run`` of ``out_dir`` with the timing main above, for the host; returns the binary."""
    meta = read_metadata(out_dir)
    name = meta["name"]
    upper = name.upper()
    os.makedirs(build_dir, exist_ok=True)
    ins = [f"in{i}" for i in range(len(meta["inputs"]))]
    outs = [f"out{i}" for i in range(len(meta["outputs"]))]
    buffers = "\n".join([f"static float {v}[{upper}_INPUT{i}_SIZE];" for i, v in enumerate(ins)]
                        + [f"static float {v}_mean[{upper}_OUTPUT{i}_SIZE], {v}_var[{upper}_OUTPUT{i}_SIZE];" for i, v in enumerate(outs)])
    reads = " || ".join(f"fread({v}, sizeof(float), {upper}_INPUT{i}_SIZE, in) != {upper}_INPUT{i}_SIZE" for i, v in enumerate(ins))
    args = ins + [a for v in outs for a in (f"{v}_mean", f"{v}_var")] + ["NULL"]
    source = BENCH_MAIN % {"name": name, "buffers": buffers, "reads": reads,
                           "call": f"{name}_run({', '.join(args)})", "checksum": "out0_mean[0] + out0_var[0]"}
    main_path = os.path.join(build_dir, "bench.c")
    with open(main_path, "w") as handle:
        handle.write(source)
    binary = os.path.join(build_dir, "bench")
    # the flags of the generated Makefile (-O2 -fno-math-errno), for the host
    flags = ["-std=c99", "-O2", "-fno-math-errno", *cflags]
    build = subprocess.run(["cc", *flags, "-I", out_dir, main_path, os.path.join(out_dir, f"{name}.c"), "-lm", "-o", binary],
                           capture_output=True, text=True)
    if build.returncode != 0:
        raise PfpcError(f"{out_dir}: building the benchmark failed: {build.stderr.strip()[-300:]}")
    return binary


def time_binaries(binaries: dict, inputs: list[np.ndarray], repeats: int = 5, rounds: int = 3, round_ns: float = 2e7) -> dict:
    """Median ns per call of each timing binary; the binaries take turns, ``repeats`` times, so
    that a change in the machine's load hits them all alike."""
    with tempfile.TemporaryDirectory() as tmp:
        in_path = os.path.join(tmp, "in.f32")
        np.concatenate([np.ascontiguousarray(x, np.float32).reshape(-1) for x in inputs]).tofile(in_path)
        times = {key: [] for key in binaries}
        for _ in range(repeats):
            for key, binary in binaries.items():
                result = subprocess.run([binary, in_path, str(rounds), str(round_ns)], capture_output=True, text=True)
                if result.returncode != 0:
                    raise PfpcError(f"{binary}: the benchmark failed ({result.returncode})")
                times[key] += [float(line) for line in result.stdout.splitlines() if not line.startswith("checksum")]
    return {key: float(np.median(values)) for key, values in times.items()}


def time_c(out_dir: str, inputs: list[np.ndarray], cflags: tuple = ()) -> float:
    """Median ns per call of ``<name>_run`` of one generated library."""
    with tempfile.TemporaryDirectory() as tmp:
        return time_binaries({"c": build_timer(out_dir, tmp, cflags)}, inputs)["c"]


def time_ort_svi(model, posterior, inputs: dict, samples: int, rounds: int = 7, seed: int = 0) -> float:
    """Median ns per prediction of SVI as users run it today: per sample, weights drawn in NumPy
    and the mean network run by onnxruntime (one thread), S samples per prediction."""
    import time

    from .verify import sampling_session

    session, stochastic = sampling_session(model, posterior)
    rng = np.random.default_rng(seed)
    means = {name: posterior.means[name].astype(np.float32) for name in stochastic}
    stds = {name: np.sqrt(posterior.variances[name]).astype(np.float32) for name in stochastic}
    names = [o.name for o in session.get_outputs()]

    def predict():
        total = total_sq = 0.0
        for _ in range(samples):
            feed = dict(inputs)
            for name in stochastic:
                feed[name] = means[name] + stds[name] * rng.standard_normal(means[name].shape, dtype=np.float32)
            out = session.run(names, feed)[0]
            total = total + out
            total_sq = total_sq + out * out
        return total / samples, total_sq / samples - (total / samples) ** 2

    predict()
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        predict()
        times.append(time.perf_counter_ns() - start)
    return float(np.median(times))


def time_tvm_vm(mod, inputs: list[np.ndarray], rounds: int = 15) -> float:
    """Median ns per call of the compiled PFP module built by TVM's LLVM backend, in the Relax VM."""
    import tvm
    from tvm import relax

    func = mod["main"]
    params = func.attrs["pfp.params"]
    num_input = int(func.attrs["num_input"])
    executable = tvm.compile(mod, target="llvm")
    device = tvm.cpu()
    vm = relax.VirtualMachine(executable, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), device) for x in inputs]
    args += [params[p.name] for p in func.params[num_input:]]
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=3, min_repeat_ms=20)
    per_call = timer("main").median
    number = max(1, int(0.02 / max(per_call, 1e-9)))
    timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=rounds)
    return float(timer("main").median * 1e9)
