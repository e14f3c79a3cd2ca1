"""Cost of the predictive output stage on Cortex-M4 (QEMU instructions per call) on the seed paper's
LeNet-5 (examples/seed_mnist/build_models.py makes it from the pretrained checkpoint; any [N, K]
classifier works): the PFP pass alone, then the PFP with probs + entropy by each probability method,
and with mutual_information (sampling draws), and the log-space scores log_entropy and
log_mutual_information.

    python benchmarks/predictive_outputs.py [MODEL.onnx POST.npz] [--only SUBSTRING]   (rows whose outputs contain it)
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = os.path.join(ROOT, "examples", "seed_mnist", "generated", "lenet")


def instructions(model, post, **options) -> int:
    import pfpc.compiler as compiler

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        compiler.compile(model, post, out_dir=out, batch=1, target="cortex-m4", **options)
        x = np.random.default_rng(0).standard_normal([1] + compiler.read_metadata(out)["inputs"][0][1][1:]).astype(np.float32)
        return compiler.run(out, [x], emulate=True).cycles[0]


def main(argv) -> int:
    only = None
    if "--only" in argv:
        at = argv.index("--only")
        only, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    model, post = argv[1:3] if len(argv) > 2 else (os.path.join(SEED, "model.onnx"), os.path.join(SEED, "post.npz"))
    base = instructions(model, post)
    print(f"| outputs | Cortex-M4 instructions per call | extra over the PFP pass |\n|---|---:|---:|\n| PFP pass only | {base:,} | |")
    rows = [("probs,entropy", {"probs_method": m}) for m in ("meanfield", "probit")]
    rows += [("probs,entropy", {"probs_method": "sampling", "logit_samples": s}) for s in (16, 64)]
    rows += [("mutual_information", {"logit_samples": s}) for s in (16, 64)]
    rows += [("log_entropy", {"probs_method": "meanfield"})]
    rows += [("log_entropy", {"probs_method": "sampling", "logit_samples": s}) for s in (16, 64)]
    rows += [("log_mutual_information", {"logit_samples": s}) for s in (16, 64)]
    for outputs, options in [row for row in rows if only is None or only in row[0]]:
        count = instructions(model, post, outputs=tuple(outputs.split(",")), **options)
        label = f"{outputs} ({', '.join(f'{k}={v}' for k, v in options.items())})"
        print(f"| {label} | {count:,} | {count - base:,} ({100 * (count - base) / base:.2f} %) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
