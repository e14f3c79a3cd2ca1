"""Cortex-A instructions of the PFP C against the deterministic C (issue 19, Cortex-A kernels), and
whether the Cortex-A targets should build with the host's `-fno-trapping-math`
(`codegen.targets.HOST_VECTOR_FLAGS`): `benchmarks/run.py`'s seed LeNet-5 and ResNet-8 (batch 1,
default options), compiled for ``--target cortex-a53`` (the "channel_rows" schedules of the host),
built with the target's compiler and flags (aarch64-linux-gnu-gcc, the generated Makefile's
`c_flags` and ``-mcpu=cortex-a53``; and the variants of `VARIANTS`), statically linked, run under ``qemu-aarch64 -cpu cortex-a53``.

Counting: QEMU's user mode has no instruction counter and no plugins are installed here, so the
run is logged with ``-d in_asm,exec,nochain``: ``in_asm`` prints each translated block's guest
instructions, ``exec`` (with chaining off) one line per execution of a block, so the instructions
executed are the sum over executions of the block's instruction count. The program runs 0 and 1
inferences on the same input; the difference is one inference's instructions, libm calls included,
start-up and input reading excluded. Exact for straight-line blocks (a block left early by a fault
would be over-counted; none occur here), and independent of the machine's load (these are
instructions, not a cycle model: a Cortex-A53 is in order and dual issue, an A72 out of order).

    PYTHONPATH=. nice -n 5 python benchmarks/cortex_a.py [--models seed_lenet resnet8] [--cpu cortex-a53]

Results: benchmarks/cortex_a.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MAIN = r"""/* Runs <name>_run argv[2] times on the input file argv[1] (an instruction count's difference of 0 and 1 runs is one inference). */
#include <stdio.h>
#include <stdlib.h>

#include "%(name)s.h"

%(buffers)s

int main(int argc, char** argv) {
  int calls = atoi(argv[2]), call;
  FILE* in = fopen(argv[1], "rb");
  if (!in || %(reads)s) return 2;
  fclose(in);
  for (call = 0; call < calls; ++call) %(call)s;
  printf("%%g\n", calls ? (double)out0[0] : 0.0);
  return 0;
}
"""


def build(out_dir: str, binary: str, extra_flags: tuple = ()) -> None:
    """The generated library in ``out_dir`` with `MAIN`, statically linked for its target."""
    from pfpc.codegen.targets import c_flags, get_target
    from pfpc.compiler import read_metadata
    from pfpc.runner import output_buffers

    meta = read_metadata(out_dir)
    name, upper = meta["name"], meta["name"].upper()
    target = get_target(meta["target"])
    ins = [f"in{i}" for i in range(len(meta["inputs"]))]
    outs = [(f"out{k}", f"{upper}_OUTPUT{index}_ELEMENTS" if index is not None else f"{upper}_{(c_name or '').upper()}_ELEMENTS")
            for k, (c_name, index, _) in enumerate(output_buffers(meta))]
    source = MAIN % {
        "name": name,
        "buffers": "\n".join([f"static float {v}[{upper}_INPUT{i}_ELEMENTS];" for i, v in enumerate(ins)]
                             + [f"static float {v}[{size}];" for v, size in outs]),
        "reads": " || ".join(f"fread({v}, sizeof(float), {upper}_INPUT{i}_ELEMENTS, in) != {upper}_INPUT{i}_ELEMENTS" for i, v in enumerate(ins)),
        "call": f"{name}_run({', '.join(ins + [v for v, _ in outs] + ['NULL'])})",
    }
    main_path = os.path.join(os.path.dirname(binary), "count_main.c")
    with open(main_path, "w") as handle:
        handle.write(source)
    subprocess.run([target.cc, *c_flags(target), *target.flags, *extra_flags, "-static", "-I", out_dir, main_path,
                    os.path.join(out_dir, f"{name}.c"), "-lm", "-o", binary], check=True, capture_output=True)


def _logged_instructions(command: list, log: str) -> int:
    """Guest instructions ``command`` executes under qemu-aarch64 (see the module doc)."""
    subprocess.run(command[:1] + ["-d", "in_asm,exec,nochain", "-D", log] + command[1:], check=True, capture_output=True)
    sizes, total, block, count = {}, 0, None, 0
    with open(log, errors="replace") as handle:
        for line in handle:
            if line.startswith("Trace "):  # Trace 0: host [cs_base/pc/flags/cflags] symbol
                total += sizes[int(line.split("[", 1)[1].split("/")[1], 16)]
            elif line.startswith("IN:"):
                block, count = None, 0
            elif line.startswith("0x") and ":  " in line:  # 0x00400600:  d503201f  nop
                if block is None:
                    block = int(line.split(":", 1)[0], 16)
                count += 1
                sizes[block] = count
    os.remove(log)
    return total


def instructions_per_inference(binary: str, x: np.ndarray, cpu: str) -> int:
    """Instructions of one inference of a `build` binary on input ``x`` (1 run minus 0 runs)."""
    directory = os.path.dirname(binary)
    in_path = os.path.join(directory, "in.f32")
    np.ascontiguousarray(x, np.float32).tofile(in_path)
    command = ["qemu-aarch64", "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu", binary, in_path]
    counts = [_logged_instructions(command + [str(calls)], os.path.join(directory, f"qemu{calls}.log")) for calls in (0, 1)]
    return counts[1] - counts[0]


#: Flag sets beside the generated Makefile's (-O3 since session 12, `targets.CORTEX_A_OPTIMISE`): the host's
#: vectoriser flag and its gcc unrolling limit (`targets.HOST_VECTOR_FLAGS`, `targets.HOST_GCC_FLAGS`),
#: and -O2 (the level before). (name, column title, flags)
VARIANTS = (("make", "make", ()), ("no-trapping", "-fno-trapping-math", ("-fno-trapping-math",)),
            ("peel150", "--param=max-completely-peeled-insns=150", ("--param=max-completely-peeled-insns=150",)),
            ("O2", "-O2", ("-O2",)), ("O2 no-trapping", "-O2 -fno-trapping-math", ("-O2", "-fno-trapping-math")))


def measure(name: str, cpu: str) -> dict:
    """{(predictor, variant): instructions per inference, "macs", "pfp_fma"} for one model."""
    import run

    import pfpc.compiler as compiler
    from pfpc.codegen.footprint import layer_costs

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path, posterior_path, x, found["origin"] = run.real_model(name, tmp)
        for key, post in (("pfp", posterior_path), ("det", None)):
            out = os.path.join(tmp, key)
            result = compiler.compile(model_path, post, out_dir=out, batch=1, target=cpu)
            if key == "pfp":
                costs = layer_costs(result.program)
                found["macs"], found["pfp_fma"] = sum(c["macs"] for c in costs), sum(c["pfp_fma"] for c in costs)
            for variant, _, flags in VARIANTS:
                binary = os.path.join(tmp, f"{key}_{variant}", "count")
                os.makedirs(os.path.dirname(binary))
                build(out, binary, flags)
                found[key, variant] = instructions_per_inference(binary, x, cpu)
                print(f"{name} {key} {variant}: {found[key, variant]:,}", file=sys.stderr, flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["seed_lenet", "resnet8"])
    parser.add_argument("--cpu", default="cortex-a53", help="pfpc target and qemu -cpu (cortex-a53 or cortex-a72)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; --target {args.cpu}, qemu-aarch64 -cpu {args.cpu}; instructions per inference (batch 1)\n")
    print("Instructions per inference; in brackets: relative to the same C at the generated Makefile's flags (make: "
          "`-std=c99 -O3 -fno-math-errno -ffp-contract=fast -mcpu=...`).\n")
    print("| model | predictor | " + " | ".join(title for _, title, _ in VARIANTS) + " | per MAC (make / best) |")
    print("|---|---|" + "---:|" * (len(VARIANTS) + 1))
    for name in args.models:
        r = measure(name, args.cpu)
        for key, title in (("pfp", "PFP C"), ("det", "det. C")):
            cells = [f"{r[key, 'make']:,}"] + [f"{r[key, v]:,} ({r[key, v] / r[key, 'make']:.3f})" for v, _, _ in VARIANTS[1:]]
            best = min(r[key, v] for v, _, _ in VARIANTS)
            print(f"| {name} | {title} | {' | '.join(cells)} | {r[key, 'make'] / r['macs']:.2f} / {best / r['macs']:.2f} |")
        print(f"| {name} | PFP / det. | " + " | ".join(f"{r['pfp', v] / r['det', v]:.2f}" for v, _, _ in VARIANTS)
              + f" | floor {r['pfp_fma'] / r['macs']:.2f} ({r['macs']:,} MACs, {r['origin']}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
