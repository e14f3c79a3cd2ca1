"""The seed paper's MNIST scenario, reproduced with pfpc: its two pretrained BNNs (MLP 784-100-100-10
and LeNet-5, Pyro checkpoints, MIT) on the official MNIST test set (in distribution) and the
Fashion-MNIST test set (out of distribution, normalised with its own statistics as the authors do).

    python examples/seed_mnist/run.py [--data ../shared/data] [--limit N]

Compares, per network: the deterministic mean network (onnxruntime); SVI with 100 and 1000 weight
samples (onnxruntime, `svi_reference`); the compiled PFP (generated C, built and run on the host)
with each probability method of its output stage (meanfield, the default; sampling, 64 draws on
the device; probit). Accuracy, NLL and ECE (15 bins) on MNIST; OOD AUROC (MNIST vs
Fashion-MNIST) by predictive entropy, mutual information and mean logit variance. NLL in log
space: SVI's log-mean-exp over samples, the PFP methods' formulas in float64 on the C's logit
moments. The PFP's mutual information is the on-device output (64 logit draws). Everything
generated (models, SVI cache, compiled C) goes to ``generated/`` (git-ignored); the table is
printed and written to ``generated/table_<nets>.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from build_models import DEFAULT_DATA, NETWORKS, build  # noqa: E402
from data import load  # noqa: E402
from svi_reference import svi_predictions  # noqa: E402

METHODS = ("meanfield", "sampling", "probit")
DRAWS = 64


def pfp_outputs(model, post, x, method, out):
    """(mean, var, extras) of the compiled PFP (batch 1) with ``method``'s outputs."""
    import pfpc.compiler as compiler

    compiler.compile(model, post, out_dir=out, batch=1, force=True, probs_method=method, logit_samples=DRAWS,
                     outputs=("probs", "entropy", "mutual_information", "logit_var"))
    ((mean, var),), extras = compiler.run_host(out, [x], extras=True)
    return mean, var, extras


def rows_for(net, data, out, limit):
    from pfpc.evaluate import metrics
    from pfpc.ops.predictive import numpy_standard_normal

    model, post = build(net, data, out)
    x_id, y = load(data, "mnist", limit)
    x_ood, _ = load(data, "fashion", limit)
    x = np.concatenate([x_id, x_ood])
    n = len(x_id)
    suffix = "" if limit is None else f"_{limit}"
    svi, deterministic = svi_predictions(model, post, x, os.path.join(out, net, f"svi{suffix}.npz"))

    def row(name, probs, log_probs, entropy, mi=None, logit_var=None, argmax_mean=None, float64=None):
        r = {"method": name, "accuracy": metrics.accuracy(probs[:n], y), "nll": metrics.nll(probs[:n], y, log_probs[:n]),
             "ece": metrics.ece(probs[:n], y), "argmax_mean_accuracy": argmax_mean}
        for score, values in (("entropy", entropy), ("mutual_information", mi), ("logit_var", logit_var)):
            r[f"auroc_{score}"] = None if values is None else metrics.auroc(values[:n], values[n:])
        for score, values in (float64 or {}).items():  # the same scores in float64 from the C's logit moments
            r[f"auroc_{score}_float64"] = metrics.auroc(values[:n], values[n:])
        return r

    rows = [row("deterministic", metrics.softmax(deterministic), metrics.log_softmax(deterministic), metrics.entropy(metrics.softmax(deterministic)))]
    for s, pred in svi.items():
        entropy = metrics.entropy(pred["probs"])
        rows.append(row(f"SVI, {s} samples", pred["probs"], pred["log_probs"], entropy, entropy - pred["expected_entropy"],
                        pred["logit_var"].mean(1), metrics.accuracy(pred["logit_mean"][:n], y)))
    for method in METHODS:
        mean, var, extras = pfp_outputs(model, post, x, method, os.path.join(out, net, f"pfp_{method}"))
        mean, var = mean.astype(np.float64), var.astype(np.float64)
        if method == "meanfield":
            log_probs = metrics.meanfield_log_probs(mean, var)
        elif method == "probit":
            log_probs = metrics.probit_log_probs(mean, var)
        else:
            log_probs = metrics.sampled_log_probs(mean, var, numpy_standard_normal(DRAWS, mean.shape[1]))[0]
        sampled_log_probs, expected_entropy = metrics.sampled_log_probs(mean, var, numpy_standard_normal(DRAWS, mean.shape[1]))
        float64 = {"entropy": metrics.entropy(np.exp(log_probs)),
                   "mutual_information": metrics.entropy(np.exp(sampled_log_probs)) - expected_entropy}
        agreement = np.abs(np.exp(log_probs) - extras["probs"]).max()
        assert agreement < 1e-4, f"{net} {method}: the C's probabilities differ from the float64 formula by {agreement}"
        rows.append(row(f"PFP, {method}" + (" (default)" if method == "meanfield" else "") + (f", {DRAWS} draws" if method == "sampling" else ""),
                        extras["probs"].astype(np.float64), log_probs, extras["entropy"], extras["mutual_information"],
                        extras["logit_var"], metrics.accuracy(mean[:n], y), float64))
    return rows


def markdown(results: dict, limit) -> str:
    def fmt(value, spec, also=None):
        return "–" if value is None else format(value, spec) + ("" if also is None else f" ({format(also, spec)})")

    size = "10,000 + 10,000" if limit is None else f"{limit} + {limit}"
    lines = [f"MNIST test (accuracy, NLL, ECE) and Fashion-MNIST test (OOD AUROC), {size} images. PFP AUROCs: the "
             "generated C's float32 outputs (in parentheses: the same formula in float64 on the C's logit moments; float32 "
             "entropies of inputs with logit gaps above ~88 are exactly 0 and tie).", "",
             "| network | predictor | accuracy | argmax of the logit mean | NLL | ECE | AUROC entropy | AUROC MI | AUROC logit var |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for net, rows in results.items():
        for r in rows:
            lines.append(f"| {net} | {r['method']} | {100 * r['accuracy']:.2f} % | "
                         f"{'–' if r['argmax_mean_accuracy'] is None else format(100 * r['argmax_mean_accuracy'], '.2f') + ' %'} | "
                         f"{r['nll']:.4f} | {r['ece']:.4f} | {fmt(r['auroc_entropy'], '.4f', r.get('auroc_entropy_float64'))} | {fmt(r['auroc_mutual_information'], '.4f', r.get('auroc_mutual_information_float64'))} | "
                         f"{fmt(r['auroc_logit_var'], '.4f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", default=os.path.join(HERE, "generated"))
    parser.add_argument("--limit", type=int, help="only the first N images of each set")
    parser.add_argument("--nets", default=",".join(NETWORKS))
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "mnist")):
        print(f"{args.data}: no mnist/ here (see the data README)", file=sys.stderr)
        return 2
    results = {net: rows_for(net, args.data, args.out, args.limit) for net in args.nets.split(",")}
    text = markdown(results, args.limit)
    print(text)
    stem = "table_" + args.nets.replace(",", "_") + ("" if args.limit is None else f"_{args.limit}")
    with open(os.path.join(args.out, stem + ".md"), "w") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
