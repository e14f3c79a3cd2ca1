"""The seed LeNet-5's uncertainty metrics with and without the shared scale (`--shared-scale`).

Compiles the seed paper's pretrained LeNet-5 (Pyro checkpoint) twice, `shared_scale="off"` (the
diagonal PFP) and the default `"auto"` (docs/covariance.md, "The shared scale compiled"), runs
both on the full MNIST test set (in distribution) and Fashion-MNIST (out of distribution), and
prints accuracy, NLL and ECE on MNIST and the AUROCs of the C's `log_entropy`,
`log_mutual_information` and mean `logit_var` (MNIST against Fashion-MNIST), as
examples/seed_mnist/run.py computes them. Needs ``<repo root>/../shared/data``.

    python benchmarks/shared_scale_seed_metrics.py [--data DIR] [--limit N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "seed_mnist"))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each set")
    args = parser.parse_args(argv)
    from build_models import build
    from data import load

    import pfpc.compiler as compiler
    from pfpc.evaluate import metrics

    work = tempfile.mkdtemp(prefix="pfpc-shared-scale-")
    model, post = build("lenet", args.data, work)
    x_id, labels = load(args.data, "mnist", args.limit)
    x_ood, _ = load(args.data, "fashion", args.limit)
    x, n = np.concatenate([x_id, x_ood]), len(labels)
    print(f"seed LeNet-5, {n} MNIST + {len(x_ood)} Fashion-MNIST test images\n")
    print("| shared scale | accuracy | NLL | ECE | AUROC log entropy | AUROC log MI | AUROC mean logit var |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in ("off", "auto"):
        out = os.path.join(work, f"pfp_{mode}")
        compiler.compile(model, post, out_dir=out, batch=1, force=True, shared_scale=mode,
                         outputs=("probs", "log_entropy", "log_mutual_information", "logit_var"))
        ((mean, var),), extras = compiler.run_host(out, [x], extras=True)
        probs = extras["probs"].astype(np.float64).reshape(len(x), -1)
        log_probs = metrics.meanfield_log_probs(mean.astype(np.float64), var.astype(np.float64))
        score = {key: np.asarray(extras[key], np.float64).reshape(len(x), -1).mean(1)
                 for key in ("log_entropy", "log_mutual_information", "logit_var")}
        aurocs = " | ".join(f"{metrics.auroc(s[:n], s[n:]):.4f}" for s in score.values())
        print(f"| {mode} | {metrics.accuracy(probs[:n], labels):.2%} | {metrics.nll(probs[:n], labels, log_probs[:n]):.4f} "
              f"| {metrics.ece(probs[:n], labels):.4f} | {aurocs} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
