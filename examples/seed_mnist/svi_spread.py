"""How much SVI's own numbers move with its weight samples: SVI with 100 weight samples (onnxruntime,
`pfpc.verify.sampled_outputs`, one draw shared by all images as in `svi_reference`) rerun with seeds
0..R-1 on MNIST test + Fashion-MNIST test: accuracy, NLL, ECE and the OOD AUROCs by entropy and by
mutual information, both exact in log space (`metrics.log_entropy`, `metrics.log_mutual_information`);
then the mean and spread over seeds, and SVI with all R x 100 samples pooled (entropy only).

    python examples/seed_mnist/svi_spread.py [--net mlp] [--seeds 10]   (writes generated/<net>/svi_spread.md)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from build_models import DEFAULT_DATA, build  # noqa: E402
from data import load  # noqa: E402


def main(argv=None) -> int:
    from pfpc.evaluate import metrics
    from pfpc.frontends.onnx_model import load_model
    from pfpc.frontends.posterior import load_posterior
    from pfpc.verify import sampled_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="mlp")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", default=os.path.join(HERE, "generated"))
    args = parser.parse_args(argv)
    model_path, post_path = build(args.net, args.data, args.out)
    x_id, y = load(args.data, "mnist")
    x = np.concatenate([x_id, load(args.data, "fashion")[0]])
    n = len(x_id)
    model = load_model(model_path, len(x))
    posterior = load_posterior(model, post_path)
    rows, pooled = [], None
    for seed in range(args.seeds):
        stream = sampled_outputs(model, posterior, {"x": x}, args.samples, seed)
        next(stream)
        log_p = np.stack([metrics.log_softmax(values[0]) for values in stream])  # [S, N, K] float64
        log_mean = metrics._logsumexp(log_p, 0) - np.log(args.samples)
        pooled = log_mean if pooled is None else np.logaddexp(pooled, log_mean)
        probs = np.exp(log_mean)
        h, mi = metrics.log_entropy(log_mean), metrics.log_mutual_information(log_p)
        rows.append([metrics.accuracy(probs[:n], y), metrics.nll(probs[:n], y, log_mean[:n]), metrics.ece(probs[:n], y),
                     metrics.auroc(h[:n], h[n:]), metrics.auroc(mi[:n], mi[n:])])
        print(f"seed {seed}: " + " ".join(f"{v:.4f}" for v in rows[-1]), flush=True)
        del log_p
    table = np.array(rows)
    pooled = pooled - np.log(args.seeds)
    h = metrics.log_entropy(pooled)
    probs = np.exp(pooled)
    names = ["accuracy", "NLL", "ECE", "AUROC entropy", "AUROC MI"]
    lines = [f"SVI, {args.samples} weight samples, seeds 0..{args.seeds - 1}, seed network `{args.net}`, MNIST test vs Fashion-MNIST test "
             f"(10,000 + 10,000; `python examples/seed_mnist/svi_spread.py --net {args.net} --seeds {args.seeds}`):", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| seed {s} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for s, row in enumerate(rows)]
    lines.append("| mean ± std | " + " | ".join(f"{m:.4f} ± {d:.4f}" for m, d in zip(table.mean(0), table.std(0, ddof=1))) + " |")
    lines.append("| min – max | " + " | ".join(f"{a:.4f} – {b:.4f}" for a, b in zip(table.min(0), table.max(0))) + " |")
    lines.append(f"| all {args.seeds * args.samples} samples pooled | {metrics.accuracy(probs[:n], y):.4f} | {metrics.nll(probs[:n], y, pooled[:n]):.4f} | "
                 f"{metrics.ece(probs[:n], y):.4f} | {metrics.auroc(h[:n], h[n:]):.4f} | – |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(args.out, args.net, "svi_spread.md"), "w") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
