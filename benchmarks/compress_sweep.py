"""The weight-sharing table of docs/shared_posterior.md: `pfpc compress` options on the LeNet example, each measured
with the compiled PFP against the uncompressed posterior (`pfpc.evaluate.compression.compare`).

    python benchmarks/compress_sweep.py [--target cortex-m4]    # prints the Markdown table (a few minutes)

Weight flash is the `.rodata` of the library built for the target (all weight tensors as the
kernels read them); "smaller" divides the full posterior's by it.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from pfpc.compiler import compile as compile_model
from pfpc.compress import Options, compress_posterior
from pfpc.evaluate.compression import compare, suite_outputs
from pfpc.frontends.onnx_model import load_model
from pfpc.frontends.posterior import bind_posterior, load_posterior
from pfpc.frontends.shared_posterior import to_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "examples", "lenet", "model.onnx")
POSTERIOR = os.path.join(ROOT, "examples", "lenet", "post.npz")
BASE = "--components 15 --precision-weighted --outliers 0.05"

# (label, options): the first row is what examples/lenet_shared/shared.npz holds
ROWS = [
    (f"`{BASE}`", Options(components=15, precision_weighted=True, outliers=0.05)),
    ("`--components 15 --precision-weighted --outliers 0.02`", Options(components=15, precision_weighted=True, outliers=0.02)),
    ("`--components 15 --precision-weighted`", Options(components=15, precision_weighted=True)),
    ("`--components 64 --precision-weighted` (8-bit codes)", Options(components=64, precision_weighted=True)),
    ("`--components 15` (plain W2 k-means)", Options(components=15)),
    ("`--components 15 --outliers 0.1`", Options(components=15, outliers=0.1)),
    ("`--components 64`", Options(components=64)),
    ("`--components 15 --gmm --outliers 0.05`", Options(components=15, gmm=True, outliers=0.05)),
    ("`--global --components 15 --precision-weighted --outliers 0.03`",
     Options(components=15, per_layer=False, precision_weighted=True, outliers=0.03)),
    ("first row `--blend 0.5`", Options(components=15, precision_weighted=True, outliers=0.05, blend_gain=0.5)),
    ("first row `--blend 0.5 --blend-levels 4`",
     Options(components=15, precision_weighted=True, outliers=0.05, blend_gain=0.5, blend_levels=4)),
    ("first row `--channel-scale`", Options(components=15, precision_weighted=True, outliers=0.05, channel_scale=True)),
]


def weight_flash(posterior, target: str) -> int:
    return compile_model(MODEL, posterior, target=target, batch=1, measure=True).footprint["weights_bytes"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cortex-m4")
    args = parser.parse_args(argv)
    model = load_model(MODEL, 1)
    full = load_posterior(model, POSTERIOR)
    full_flash = weight_flash(full, args.target)
    full_outputs = suite_outputs(MODEL, full)  # compiled and run once for all rows
    lines = ["| compress options | weight flash | smaller | Δ accuracy | Δ ECE | Δ NLL | Δ AUROC entropy / logit var | output W2 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, options in tqdm(ROWS, desc="compress options", file=sys.stderr):
        shared, _ = compress_posterior(model, full, options)
        shared_post = bind_posterior(model, to_arrays(shared), "shared.npz")
        flash = weight_flash(shared_post, args.target)
        effect = compare(MODEL, full, shared_post, full_outputs=full_outputs)
        lines.append(f"| {label} | {flash:,} | {full_flash / flash:.1f}x | {100 * effect['accuracy']['delta']:+.2f} pp | "
                     f"{effect['ece']['delta']:+.4f} | {effect['nll']['delta']:+.3f} | "
                     f"{effect['auroc_entropy']['delta']:+.3f} / {effect['auroc_logit_var']['delta']:+.3f} | {effect['output_w2']:.2f} |")
    print(f"LeNet example, {args.target}; full posterior: {full_flash:,} bytes of weight flash.\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
