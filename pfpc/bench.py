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

from . import ir_state
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


def time_ort_svi(model, posterior, inputs: dict, samples: int, rounds: int = 7, seed: int = 0) -> float:
    """Median ns per prediction of SVI as users run it today: per sample, weights drawn in NumPy
    and the mean network run by onnxruntime (one thread), S samples per prediction."""
    import time

    from .verify import sampling_session, weight_sampler

    session, stochastic = sampling_session(model, posterior)
    draw = weight_sampler(posterior, stochastic, seed, dtype=np.float32)
    names = [o.name for o in session.get_outputs()]

    def predict():
        total = total_sq = 0.0
        for _ in range(samples):
            out = session.run(names, {**inputs, **draw()})[0]
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
    params = func.attrs[ir_state.PARAMS]
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


def _tvm_scheduled(mod, accumulate: str):
    """The compiled module with every kernel scheduled as the C backend gets it."""
    import tvm

    from .codegen.kernels import scheduled

    functions = {gvar: scheduled(func, accumulate) if isinstance(func, tvm.tirx.PrimFunc) else func
                 for gvar, func in mod.functions.items()}
    return tvm.IRModule(functions, attrs=mod.attrs)


def benchmark_model(model_path: str, posterior_path: str, batches=(1, 8, 32, 128), samples=(10, 30, 100),
                    inputs: np.ndarray | None = None, tvm_vm: bool = True, ort: bool = True, cycles_target: str | None = "cortex-m4",
                    progress=None) -> dict:
    """Every predictor of one model at every batch size, timed side by side (see the module doc).

    Returns {"host": [row per batch], "cycles": {predictor: cycles under QEMU} or None, "compile_s": float}."""
    import time

    from . import compiler
    from .codegen.targets import get_target
    from .frontends.onnx_model import input_shapes, load_model
    from .frontends.posterior import load_posterior

    def step(text):
        if progress is not None:
            progress(text)

    def batch_input(shape):
        """``inputs`` repeated to fill the batch, or standard-normal values."""
        if inputs is None:
            return np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        return np.resize(inputs.astype(np.float32), shape)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compiler.compile(model_path, posterior_path, out_dir=os.path.join(tmp, "compile_time"), batch=1)
        compile_s = time.perf_counter() - start
        for batch in batches:
            model = load_model(model_path, batch)
            posterior = load_posterior(model, posterior_path)
            (input_name, shape), = input_shapes(model).items()
            x = batch_input(shape)
            where = os.path.join(tmp, f"b{batch}")
            step(f"batch {batch}: compiling PFP, deterministic and SVI")
            pfp = compiler.compile(model, posterior, out_dir=os.path.join(where, "pfp"), batch=batch)
            compiler.compile(model, None, out_dir=os.path.join(where, "det"), batch=batch)
            compiler.compile(model, posterior, out_dir=os.path.join(where, "svi"), batch=batch, mode="svi", samples=max(samples))
            binaries = {
                "pfp": build_timer(os.path.join(where, "pfp"), os.path.join(where, "t_pfp")),
                "det": build_timer(os.path.join(where, "det"), os.path.join(where, "t_det")),
            }
            for count in samples:
                binaries[f"svi_c_{count}"] = build_timer(os.path.join(where, "svi"), os.path.join(where, f"t_svi{count}"),
                                                         (f"-D{read_metadata(os.path.join(where, 'svi'))['name'].upper()}_SAMPLES={count}",))
            step(f"batch {batch}: timing the generated C")
            row = {"batch": batch, **{k: v / 1e3 for k, v in time_binaries(binaries, [x]).items()}}
            if ort:
                for count in samples:
                    step(f"batch {batch}: onnxruntime SVI, {count} samples")
                    row[f"svi_ort_{count}"] = time_ort_svi(model, posterior, {input_name: x}, count) / 1e3
            if tvm_vm:
                step(f"batch {batch}: TVM LLVM build in the Relax VM")
                row["tvm_vm"] = time_tvm_vm(_tvm_scheduled(pfp.mod, get_target("host").accumulate), [x]) / 1e3
            rows.append(row)
        cycles = None
        emulated = get_target(cycles_target) if cycles_target else None
        if emulated and emulated.bare_metal and shutil.which(emulated.emulator) and shutil.which(emulated.cc):
            step(f"{cycles_target}: cycles under QEMU")
            model = load_model(model_path, 1)
            posterior = load_posterior(model, posterior_path)
            (_, shape), = input_shapes(model).items()
            x = batch_input(shape)
            cycles = {}
            variants = [("pfp", posterior, {}), ("det", None, {})] + [(f"svi_c_{n}", posterior, {"mode": "svi", "samples": n}) for n in samples]
            for key, post, options in variants:
                out = os.path.join(tmp, f"m_{key}")
                compiler.compile(model, post, out_dir=out, batch=1, target=cycles_target, **options)
                cycles[key] = int(np.median(compiler.run(out, [x], emulate=True).cycles))
    return {"host": rows, "cycles": cycles, "cycles_target": cycles_target, "compile_s": compile_s}


def markdown(results: dict, samples=(10, 30, 100)) -> str:
    """BENCHMARKS.md tables from {model name: benchmark_model(...)}."""
    lines = []
    for name, result in results.items():
        lines += [f"### {name}", "", f"Compile time, ONNX to C (batch 1): {result['compile_s']:.1f} s", ""]
        head = ["batch", "PFP C", "det. C", "PFP/det"] + [f"SVI-C S={n}" for n in samples] + [f"ORT SVI S={n}" for n in samples]
        head += ["TVM LLVM VM", f"SVI-C {max(samples)} / PFP", f"ORT {max(samples)} / PFP", "TVM VM / PFP"]
        lines += ["Host, µs per call of the whole batch (median):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in result["host"]:
            top = max(samples)

            def cell(key, row=row):
                return "n/a" if key not in row else f"{row[key]:,.2f}" if row[key] < 100 else f"{row[key]:,.0f}"

            def ratio(key, row=row):
                return f"{row[key] / row['pfp']:,.0f}x" if key in row else "n/a"

            cells = [str(row["batch"]), cell("pfp"), cell("det"), f"{row['pfp'] / row['det']:.2f}"]
            cells += [cell(f"svi_c_{n}") for n in samples] + [cell(f"svi_ort_{n}") for n in samples]
            cells += [cell("tvm_vm"), ratio(f"svi_c_{top}"), ratio(f"svi_ort_{top}"), f"{row['tvm_vm'] / row['pfp']:.2f}" if "tvm_vm" in row else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
        if result.get("cycles"):
            cycles = result["cycles"]
            lines += ["", f"{result['cycles_target']} under QEMU (`-icount shift=0`), cycles per inference at batch 1 (one per instruction executed):", "",
                      "| PFP | det. | PFP/det | " + " | ".join(f"SVI-C S={n}" for n in samples) + f" | SVI-C {max(samples)} / PFP |",
                      "|" + "---|" * (4 + len(samples))]
            lines.append(f"| {cycles['pfp']:,} | {cycles['det']:,} | {cycles['pfp'] / cycles['det']:.2f} | "
                         + " | ".join(f"{cycles[f'svi_c_{n}']:,}" for n in samples) + f" | {cycles[f'svi_c_{max(samples)}'] / cycles['pfp']:,.0f}x |")
        lines.append("")
    return "\n".join(lines)
