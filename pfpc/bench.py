"""Benchmarks: the generated PFP against the deterministic network and against sampling.

Every number is a median over repeated timed rounds after a warm-up, measured in one process
run side by side, so that ratios are comparable on a shared, noisy machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from . import ir_state
from .codegen.targets import BEST_FLAGS, TARGETS, c_flags
from .compiler import read_metadata
from .runner import output_buffers
from .errors import PfpcError

BENCH_MAIN = r"""/* Times <name>_run on one input: warm-up, then ROUNDS rounds of CALLS calls; prints ns of process CPU time per call per round. */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "%(name)s.h"

%(buffers)s

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); /* process CPU time: another process's load is not counted */
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
    # every output buffer of <name>_run (a softmax output has three, an extra output its own size)
    outs = [(f"out{k}", f"{upper}_OUTPUT{index}_ELEMENTS" if index is not None else f"{upper}_{(c_name or '').upper()}_ELEMENTS")
            for k, (c_name, index, _) in enumerate(output_buffers(meta))]
    buffers = "\n".join([f"static float {v}[{upper}_INPUT{i}_ELEMENTS];" for i, v in enumerate(ins)]
                        + [f"static float {v}[{size}];" for v, size in outs])
    reads = " || ".join(f"fread({v}, sizeof(float), {upper}_INPUT{i}_ELEMENTS, in) != {upper}_INPUT{i}_ELEMENTS" for i, v in enumerate(ins))
    args = ins + [v for v, _ in outs] + ["NULL"]
    source = BENCH_MAIN % {"name": name, "buffers": buffers, "reads": reads,
                           "call": f"{name}_run({', '.join(args)})", "checksum": "out0[0] + out1[0]"}
    main_path = os.path.join(build_dir, "bench.c")
    with open(main_path, "w") as handle:
        handle.write(source)
    binary = os.path.join(build_dir, "bench")
    flags = [*c_flags(TARGETS["host"]), *cflags]  # the generated Makefile's, for the host; later -O flags win
    build = subprocess.run(["cc", *flags, "-I", out_dir, main_path, os.path.join(out_dir, f"{name}.c"), "-lm", "-o", binary],
                           capture_output=True, text=True)
    if build.returncode != 0:
        raise PfpcError(f"{out_dir}: building the benchmark failed: {build.stderr.strip()[-300:]}")
    return binary


def host_best_flags() -> tuple:
    """The benchmarks' second flag set on the host: `targets.BEST_FLAGS` and -march=native."""
    return (*BEST_FLAGS, "-march=native")


def _process_ns() -> int:
    return time.process_time_ns()


def _calibrated(call, rounds: int, round_ns: float) -> list[float]:
    """ns of process CPU time per call of ``call``, one value per round of enough calls to last ``round_ns``."""
    call()  # warm-up
    calls = 1
    while True:
        start = _process_ns()
        for _ in range(calls):
            call()
        elapsed = _process_ns() - start
        if elapsed > round_ns / 8 or calls > (1 << 20):
            calls = max(1, int(calls * round_ns / max(elapsed, 1)))
            break
        calls *= 2
    values = []
    for _ in range(rounds):
        start = _process_ns()
        for _ in range(calls):
            call()
        values.append((_process_ns() - start) / calls)
    return values


def binary_timer(binary: str, in_path: str, rounds: int = 3, round_ns: float = 2e7):
    """A timer (see `time_side_by_side`) of a `build_timer` binary on the input file ``in_path``."""

    def timer():
        result = subprocess.run([binary, in_path, str(rounds), str(round_ns)], capture_output=True, text=True)
        if result.returncode != 0:
            raise PfpcError(f"{binary}: the benchmark failed ({result.returncode})")
        return [float(line) for line in result.stdout.splitlines() if not line.startswith("checksum")]

    return timer


def time_side_by_side(timers: dict, repeats: int = 5) -> dict:
    """Median ns per call of each timer (a function returning per-call ns of a few rounds): the
    timers take turns, ``repeats`` times, so that a change in the machine's load hits them all alike."""
    times = {key: [] for key in timers}
    for _ in range(repeats):
        for key, timer in timers.items():
            times[key] += timer()
    return {key: float(np.median(values)) for key, values in times.items()}


def time_binaries(binaries: dict, inputs: list[np.ndarray], repeats: int = 5, rounds: int = 3, round_ns: float = 2e7) -> dict:
    """Median ns per call of each timing binary, side by side (`time_side_by_side`)."""
    with tempfile.TemporaryDirectory() as tmp:
        in_path = write_inputs(tmp, inputs)
        return time_side_by_side({key: binary_timer(b, in_path, rounds, round_ns) for key, b in binaries.items()}, repeats)


def write_inputs(directory: str, inputs: list[np.ndarray]) -> str:
    path = os.path.join(directory, "in.f32")
    np.concatenate([np.ascontiguousarray(x, np.float32).reshape(-1) for x in inputs]).tofile(path)
    return path


def ort_det_timer(model, inputs: dict, rounds: int = 3, round_ns: float = 2e7):
    """A timer of the deterministic (mean) network in onnxruntime, one thread, all graph optimisations."""
    from .frontends.onnxruntime_session import ort_session

    session = ort_session(model, threads=1)
    names = [o.name for o in session.get_outputs()]
    return lambda: _calibrated(lambda: session.run(names, inputs), rounds, round_ns)


def ort_svi_timer(model, posterior, inputs: dict, samples: int, rounds: int = 1, seed: int = 0):
    """A timer of SVI as users run it today: per sample, weights drawn in NumPy and the mean
    network run by onnxruntime (one thread), ``samples`` samples per prediction."""
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

    return lambda: _calibrated(predict, rounds, 0)


def tvm_vm_timer(mod, inputs: list[np.ndarray], rounds: int = 3, round_ns: float = 2e7):
    """A timer of the compiled PFP module built by TVM's LLVM backend, in the Relax VM."""
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
    return lambda: _calibrated(lambda: vm.invoke_stateful("main"), rounds, round_ns)


def _tvm_scheduled(mod, accumulate: str):
    """The compiled module with every kernel scheduled as the C backend gets it."""
    import tvm

    from .codegen.kernels import scheduled

    functions = {gvar: scheduled(func, accumulate) if isinstance(func, tvm.tirx.PrimFunc) else func
                 for gvar, func in mod.functions.items()}
    return tvm.IRModule(functions, attrs=mod.attrs)


def with_best_flags(out_dir: str, flags) -> None:
    """Append ``flags`` to the CFLAGS of a generated build (its pfpc_target.mk): the benchmarks'
    second flag set for `compiler.run` under QEMU."""
    with open(os.path.join(out_dir, "pfpc_target.mk"), "a") as handle:
        handle.write(f"CFLAGS += {' '.join(flags)}\n")


def benchmark_model(model_path: str, posterior_path: str, batches=(1, 8, 32, 128), samples=(10, 30, 100),
                    inputs: np.ndarray | None = None, tvm_vm: bool = True, ort: bool = True, cycles_target="cortex-m4",
                    progress=None, best: bool = True, cycles_samples=None, repeats: int = 5) -> dict:
    """Every predictor of one model at every batch size, timed side by side (see the module doc).

    ``best``: also build the generated C with the best flags (`host_best_flags`, `BEST_FLAGS` on
    Cortex-M). ``cycles_target``: one Cortex-M target or a list ("" / None: none);
    ``cycles_samples``: SVI-C sample counts run under QEMU (default ``samples``).
    Returns {"host": [row per batch], "cycles": {target: {flag set: {predictor: instructions}}},
    "macs": deterministic MACs per sample, "pfp_fma": the PFP's multiply-adds per sample, "compile_s"}."""
    from . import compiler
    from .codegen.footprint import layer_costs
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

    targets = [cycles_target] if isinstance(cycles_target, str) and cycles_target else list(cycles_target or [])
    cycles_samples = samples if cycles_samples is None else cycles_samples
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        first = compiler.compile(model_path, posterior_path, out_dir=os.path.join(tmp, "compile_time"), batch=1)
        compile_s = time.perf_counter() - start
        costs = layer_costs(first.program)
        macs, pfp_fma = sum(c["macs"] for c in costs), sum(c["pfp_fma"] for c in costs)
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
            if best:
                binaries["pfp_best"] = build_timer(os.path.join(where, "pfp"), os.path.join(where, "t_pfp_best"), host_best_flags())
                binaries["det_best"] = build_timer(os.path.join(where, "det"), os.path.join(where, "t_det_best"), host_best_flags())
            for count in samples:
                binaries[f"svi_c_{count}"] = build_timer(os.path.join(where, "svi"), os.path.join(where, f"t_svi{count}"),
                                                         (f"-D{read_metadata(os.path.join(where, 'svi'))['name'].upper()}_SAMPLES={count}",))
            in_path = write_inputs(where, [x])
            timers = {key: binary_timer(binary, in_path) for key, binary in binaries.items()}
            if ort:
                timers["ort_det"] = ort_det_timer(model, {input_name: x})
                for count in samples:
                    timers[f"svi_ort_{count}"] = ort_svi_timer(model, posterior, {input_name: x}, count)
            if tvm_vm:
                step(f"batch {batch}: TVM LLVM build for the Relax VM")
                timers["tvm_vm"] = tvm_vm_timer(_tvm_scheduled(pfp.mod, get_target("host").accumulate), [x])
            step(f"batch {batch}: timing {len(timers)} predictors side by side, {repeats} turns")
            rows.append({"batch": batch, **{k: v / 1e3 for k, v in time_side_by_side(timers, repeats).items()}})
        cycles = {}
        for name in targets:
            emulated = get_target(name)
            if not (emulated.bare_metal and shutil.which(emulated.emulator) and shutil.which(emulated.cc)):
                continue
            model = load_model(model_path, 1)
            posterior = load_posterior(model, posterior_path)
            (_, shape), = input_shapes(model).items()
            x = batch_input(shape)
            cycles[name] = {}
            for flag_set in ("make", "best") if best else ("make",):
                step(f"{name}: instructions under QEMU, {flag_set} flags")
                variants = [("pfp", posterior, {}), ("det", None, {})]
                if flag_set == "make":
                    variants += [(f"svi_c_{n}", posterior, {"mode": "svi", "samples": n}) for n in cycles_samples]
                counts = cycles[name][flag_set] = {}
                for key, post, options in variants:
                    out = os.path.join(tmp, f"m_{name}_{flag_set}_{key}")
                    compiler.compile(model, post, out_dir=out, batch=1, target=name, **options)
                    if flag_set == "best":
                        with_best_flags(out, BEST_FLAGS)
                    counts[key] = int(np.median(compiler.run(out, [x], emulate=True).cycles))
    return {"host": rows, "cycles": cycles, "cycles_target": ", ".join(targets), "compile_s": compile_s,
            "macs": macs, "pfp_fma": pfp_fma, "cycles_samples": list(cycles_samples)}


def markdown(results: dict, samples=(10, 30, 100)) -> str:
    """BENCHMARKS.md tables from {model name: benchmark_model(...)}."""
    lines = []
    for name, result in results.items():
        summary = f"Compile time, ONNX to C (batch 1): {result['compile_s']:.1f} s"
        if result.get("macs"):
            summary += (f"; {result['macs']:,} MACs per sample, {result['pfp_fma']:,} PFP multiply-adds "
                        f"({result['pfp_fma'] / result['macs']:.2f} per MAC)")
        lines += [f"### {name}", "", summary, ""]
        head = ["batch", "PFP C", "det. C", "PFP/det"] + [f"SVI-C S={n}" for n in samples] + [f"ORT SVI S={n}" for n in samples]
        head += ["TVM LLVM VM", f"SVI-C {max(samples)} / PFP", f"ORT {max(samples)} / PFP", "TVM VM / PFP"]
        best = any("pfp_best" in row for row in result["host"])
        ort_det = any("ort_det" in row for row in result["host"])
        head += ["PFP C best", "det. C best", "PFP/det best", "TVM VM / PFP best"] if best else []
        head += ["ORT det.", "PFP / ORT det."] + (["PFP best / ORT det."] if best else []) if ort_det else []
        lines += ["Host, µs of process CPU time per call of the whole batch (median); *best*: the same C built with "
                  f"`{' '.join(host_best_flags())}`:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in result["host"]:
            top = max(samples)

            def cell(key, row=row):
                return "n/a" if key not in row else f"{row[key]:,.2f}" if row[key] < 100 else f"{row[key]:,.0f}"

            def ratio(key, row=row):
                return f"{row[key] / row['pfp']:,.0f}x" if key in row else "n/a"

            def quotient(top_key, bottom_key, row=row):
                return f"{row[top_key] / row[bottom_key]:.2f}" if top_key in row and bottom_key in row else "n/a"

            cells = [str(row["batch"]), cell("pfp"), cell("det"), quotient("pfp", "det")]
            cells += [cell(f"svi_c_{n}") for n in samples] + [cell(f"svi_ort_{n}") for n in samples]
            cells += [cell("tvm_vm"), ratio(f"svi_c_{top}"), ratio(f"svi_ort_{top}"), quotient("tvm_vm", "pfp")]
            if best:
                cells += [cell("pfp_best"), cell("det_best"), quotient("pfp_best", "det_best"), quotient("tvm_vm", "pfp_best")]
            if ort_det:
                cells += [cell("ort_det"), quotient("pfp", "ort_det")] + ([quotient("pfp_best", "ort_det")] if best else [])
            lines.append("| " + " | ".join(cells) + " |")
        for target, flag_sets in (result.get("cycles") or {}).items():
            counted = result.get("cycles_samples", samples)
            lines += ["", f"{target} under QEMU (`-icount shift=0`), instructions per inference at batch 1; *make*: the generated "
                      f"Makefile's flags, *best*: with `{' '.join(BEST_FLAGS)}` added; floor: one instruction per multiply-add "
                      "(the PFP's multiply-adds per MAC, 1 for the deterministic network), no loads:", ""]
            head = ["flags", "PFP", "det.", "PFP/det"]
            if result.get("macs"):
                head += ["PFP per MAC", "det. per MAC", "floor PFP / det. per MAC"]
            head += [f"SVI-C S={n}" for n in counted] + ([f"SVI-C {max(counted)} / PFP"] if counted else [])
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for flag_set, counts in flag_sets.items():
                cells = [flag_set, f"{counts['pfp']:,}", f"{counts['det']:,}", f"{counts['pfp'] / counts['det']:.2f}"]
                if result.get("macs"):
                    cells += [f"{counts['pfp'] / result['macs']:.2f}", f"{counts['det'] / result['macs']:.2f}",
                              f"{result['pfp_fma'] / result['macs']:.2f} / 1.00"]
                cells += [f"{counts[f'svi_c_{n}']:,}" if f"svi_c_{n}" in counts else "-" for n in counted]
                if counted:
                    top = f"svi_c_{max(counted)}"
                    cells.append(f"{counts[top] / counts['pfp']:,.0f}x" if top in counts else "-")
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
