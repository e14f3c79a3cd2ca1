"""The evaluation as Markdown tables (stdout and ``report.md``) and plots (matplotlib, Agg):
reliability diagrams on the clean set and histograms of the OOD scores, clean vs ambiguous vs OOD."""

from __future__ import annotations

import os

import numpy as np

from ..errors import PfpcError
from . import LABELLED_METRICS, PER_LAYER_IMAGES, PER_LAYER_SAMPLES, PREDICTORS, SCORES, SUMMARY_METRICS, Evaluation, metrics

NAMES = {"deterministic": "deterministic", "svi": "SVI", "pfp": "PFP", "logit_var": "mean logit variance",
         "entropy": "predictive entropy", "mutual_information": "mutual information", "expected_entropy": "expected entropy",
         "log_entropy": "log predictive entropy", "log_mutual_information": "log mutual information",
         "accuracy": "accuracy", "nll": "NLL", "ece": "ECE", "brier": "Brier", "all_ood": "all OOD"}

#: The issue's targets: PFP against SVI with 100 samples, and against the deterministic network.
ACCURACY_GAP, ECE_GAP, AUROC_GAP = 0.01, 0.01, 0.02


def _fmt(value, digits=4):
    return "—" if value is None else f"{value:.{digits}g}" if abs(value) >= 100 else f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_tables(evaluation: Evaluation) -> str:
    columns = LABELLED_METRICS + SUMMARY_METRICS
    labelled, unlabelled = [], []
    for eval_set in evaluation.sets:
        for predictor in PREDICTORS:
            row = evaluation.table[(predictor, eval_set.name)]
            if eval_set.labels is not None:
                labelled.append([eval_set.name, NAMES[predictor]] + [_fmt(row.get(c)) for c in columns])
            else:
                unlabelled.append([eval_set.name, NAMES[predictor]] + [_fmt(row.get(c)) for c in SUMMARY_METRICS])
    ood = [s.name for s in evaluation.sets if s.kind == "ood"] + ["all_ood"]
    auroc_rows = []
    for predictor in PREDICTORS:
        for score in SCORES:
            if (predictor, score, "all_ood") in evaluation.auroc:
                auroc_rows.append([NAMES[predictor], NAMES[score]] + [_fmt(evaluation.auroc[(predictor, score, s)], 3) for s in ood])
    means = "(means over the set; entropies in nats)"
    return "\n\n".join([
        f"Labelled sets {means}:\n\n" + _table(["set", "predictor"] + [NAMES[c] for c in columns], labelled),
        f"Out-of-distribution sets {means}:\n\n" + _table(["set", "predictor"] + [NAMES[c] for c in SUMMARY_METRICS], unlabelled),
        "OOD AUROC (clean test set vs each OOD set; higher = better separated):\n\n"
        + _table(["predictor", "score"] + [NAMES.get(s, s) for s in ood], auroc_rows),
    ])


def targets(evaluation: Evaluation) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for the issue's targets on the clean set and pooled OOD sets."""
    table, auroc = evaluation.table, evaluation.auroc
    pfp, svi, det = (table[(p, "clean")] for p in ("pfp", "svi", "deterministic"))
    rows = [
        ("accuracy PFP − SVI (pp)", 100 * (pfp["accuracy"] - svi["accuracy"]), f"within ±{100 * ACCURACY_GAP:g}", abs(pfp["accuracy"] - svi["accuracy"]) <= ACCURACY_GAP + 1e-12),
        ("ECE PFP − SVI", pfp["ece"] - svi["ece"], f"within ±{ECE_GAP:g}", abs(pfp["ece"] - svi["ece"]) <= ECE_GAP),
    ]
    for score in SCORES:
        gap = auroc[("pfp", score, "all_ood")] - auroc[("svi", score, "all_ood")]
        rows.append((f"AUROC PFP − SVI, {NAMES[score]}", gap, f"within ±{AUROC_GAP:g}", abs(gap) <= AUROC_GAP))
    rows.append(("ECE PFP − deterministic", pfp["ece"] - det["ece"], "≤ 0", pfp["ece"] <= det["ece"]))
    det_auroc = auroc[("deterministic", "entropy", "all_ood")]
    for score in SCORES:
        gap = auroc[("pfp", score, "all_ood")] - det_auroc
        rows.append((f"AUROC PFP ({NAMES[score]}) − deterministic (entropy)", gap, "≥ 0", gap >= 0))
    return rows


def targets_table(evaluation: Evaluation) -> str:
    rows = [[what, f"{value:+.4f}", target, "yes" if met else "**no**"] for what, value, target, met in targets(evaluation)]
    return _table(["target (clean set; AUROC on all OOD sets pooled)", "measured", "target", "met"], rows)


def approximation_table(evaluation: Evaluation) -> str:
    """Clean-set metrics of the chain SVI -> its logits as independent Gaussians -> the PFP's
    Gaussian logits -> the PFP's mean-field probabilities: each step isolates one approximation."""
    clean = next(s for s in evaluation.sets if s.name == "clean")
    svi, pfp = evaluation.predictions["svi"]["clean"], evaluation.predictions["pfp"]["clean"]
    steps = [
        (f"SVI-{evaluation.samples}: mean of sampled softmaxes", svi.probs, svi.log_probs),
        ("SVI's logit means and variances as independent Gaussians (sampled softmax)", svi.gaussian_probs, None),
        ("PFP's logit means and variances as independent Gaussians (sampled softmax)", pfp.gaussian_probs, None),
        ("PFP: mean-field approximation (the generated C's probs, the default output stage)", pfp.probs, pfp.log_probs),
    ]
    rows = [[label, _fmt(metrics.accuracy(p, clean.labels)), _fmt(metrics.nll(p, clean.labels, log_p)), _fmt(metrics.ece(p, clean.labels)),
             _fmt(metrics.brier(p, clean.labels))] for label, p, log_p in steps]
    return _table(["clean set", "accuracy", "NLL", "ECE", "Brier"], rows)


def svi_spread_table(evaluation: Evaluation) -> str:
    """SVI's own variation between seeds next to the PFP's value, per target quantity."""
    runs = evaluation.svi_runs
    pfp = {"accuracy": evaluation.table[("pfp", "clean")]["accuracy"], "ece": evaluation.table[("pfp", "clean")]["ece"]}
    pfp.update({score: evaluation.auroc[("pfp", score, "all_ood")] for score in SCORES})
    rows = []
    for key in ("accuracy", "ece") + SCORES:
        values = [run[key] for run in runs]
        label = NAMES[key] if key in ("accuracy", "ece") else f"AUROC, {NAMES[key]}"
        rows.append([label, f"{min(values):.4f} … {max(values):.4f}", f"{max(values) - min(values):.4f}", f"{pfp[key]:.4f}"])
    return _table([f"quantity (clean; AUROC all OOD pooled)", f"SVI-{evaluation.samples}, {len(runs)} seeds: min … max", "range", "PFP"], rows)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PfpcError("the report's plots need matplotlib: pip install 'pfpc[eval]' (or matplotlib), or leave out --report") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(evaluation: Evaluation, path: str) -> None:
    plt = _pyplot()
    clean = next(s for s in evaluation.sets if s.name == "clean")
    fig, axes = plt.subplots(1, len(PREDICTORS), figsize=(3.2 * len(PREDICTORS), 3.2), sharey=True)
    for axis, predictor in zip(axes, PREDICTORS):
        probs = evaluation.predictions[predictor]["clean"].probs
        centres, acc, conf, count = metrics.reliability(probs, clean.labels)
        filled = count > 0
        width = 1.0 / len(centres)
        axis.bar(centres[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        axis.bar(centres[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width, color="tab:red", alpha=0.35, label="gap to confidence")
        axis.plot([0, 1], [0, 1], "k--", lw=0.8)
        axis.set_title(f"{NAMES[predictor]}: ECE {metrics.ece(probs, clean.labels):.3f}", fontsize=9)
        axis.set_xlabel("confidence")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{evaluation.model}: reliability on the clean test set (15 bins)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_scores(evaluation: Evaluation, path: str) -> None:
    plt = _pyplot()
    groups = [("clean", ["clean"]), ("ambiguous", [s.name for s in evaluation.sets if s.kind == "ambiguous"]),
              ("OOD (all)", [s.name for s in evaluation.sets if s.kind == "ood"])]
    fig, axes = plt.subplots(len(PREDICTORS), len(SCORES), figsize=(3.3 * len(SCORES), 2.4 * len(PREDICTORS)))
    for row, predictor in enumerate(PREDICTORS):
        by_set = evaluation.predictions[predictor]
        for col, score in enumerate(SCORES):
            axis = axes[row][col]
            if by_set["clean"].score(score) is None:
                axis.axis("off")
                axis.text(0.5, 0.5, f"{NAMES[predictor]}: no {NAMES[score]}", ha="center", va="center", fontsize=8)
                continue
            values = {label: np.concatenate([by_set[n].score(score) for n in names]) for label, names in groups if names}
            top = max(np.percentile(v, 99.5) for v in values.values())
            bins = np.linspace(0, top if top > 0 else 1, 40)
            for label, value in values.items():
                axis.hist(np.clip(value, 0, bins[-1]), bins=bins, density=True, histtype="step", lw=1.3, label=label)
            axis.set_title(f"{NAMES[predictor]}: {NAMES[score]}", fontsize=9)
            axis.tick_params(labelsize=7)
    axes[-1][-1].legend(fontsize=7)  # the PFP row has every score
    fig.suptitle(f"{evaluation.model}: OOD scores, clean vs ambiguous vs OOD", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


METHOD = """\
Predictors: **deterministic** = the posterior-mean network (onnxruntime); **SVI** = {samples}
weight samples w ~ q(w) drawn in NumPy, one onnxruntime run each, p = mean of the softmaxes;
**PFP** = the C generated by `pfpc.compile`, built and run on the host, giving the logits'
mean and variance in one pass, and p by the mean-field approximation of E[softmax(l)], l ~ N(mean, var)
(Lu, Ie & Sha 2020; the default output stage, computed by the generated C as its `probs` output).
Predictive entropy = H[p]. Expected entropy and mutual information: SVI from its weight samples
(MI = H[p] − mean_s H[p_s]); PFP from 1000 draws of its Gaussian logits N(mean, var) on the host
(MI = H[mean_s softmax(l_s)] − mean_s H[softmax(l_s)], so MI ≥ 0 and both terms use the same
draws). Mean logit variance: the variance of each logit (SVI: sample variance; PFP: propagated),
averaged over classes. The deterministic network has no weight uncertainty: no expected entropy,
MI or logit variance; its only OOD score is the predictive entropy. AUROCs, risk-coverage and
abstain thresholds rank entropy and MI by their logs computed in float64 log space (no ties among
confident inputs); the thresholds are given for both (the log ones for the C's `log_entropy` /
`log_mutual_information` outputs).
"""


def write_report(evaluation: Evaluation, report_dir: str, command: str = "") -> str:
    """Write ``report.md`` and the PNGs into ``report_dir``; returns the Markdown path."""
    os.makedirs(report_dir, exist_ok=True)
    stem = evaluation.model
    reliability_png, scores_png = f"{stem}_reliability.png", f"{stem}_scores.png"
    plot_reliability(evaluation, os.path.join(report_dir, reliability_png))
    plot_scores(evaluation, os.path.join(report_dir, scores_png))
    sets = _table(["set", "kind", "images", "how it is made"],
                  [[s.name, s.kind, len(s.x), s.description] for s in evaluation.sets])
    parts = [f"# Uncertainty evaluation: {stem}", ""]
    if command:
        parts += ["Reproduce:", "", f"    {command}", ""]
    parts += [METHOD.format(samples=evaluation.samples), "## Data (dirty digits, see `pfpc/evaluate/datasets.py`)", "", sets, "",
              "## Targets", "", targets_table(evaluation), ""]
    if len(evaluation.svi_runs) > 1:
        parts += [f"How much SVI-{evaluation.samples} itself moves with the weight samples (seeds {0}…{len(evaluation.svi_runs) - 1} "
                  "offset from the main run's):", "", svi_spread_table(evaluation), ""]
    parts += ["Where the PFP's probabilities differ from SVI's, step by step (1 → 2: dropping the "
              "correlations between logits; 2 → 3: the PFP's moment errors, see the per-layer table; 3 → 4: the mean-field "
              "approximation of the Gaussian-softmax integral):", "", approximation_table(evaluation), ""]
    parts += ["## Abstaining", "", threshold_table(evaluation), ""]
    parts += ["## Metrics", "", metric_tables(evaluation), "",
              f"![reliability]({reliability_png})", "", f"![scores]({scores_png})", ""]
    if evaluation.per_layer:
        parts += ["## PFP vs Monte Carlo per layer", "",
                  f"The first {PER_LAYER_IMAGES} images of every set, {PER_LAYER_SAMPLES} Monte Carlo samples; the PFP of a layer is "
                  "the compiled C of the graph truncated at its output. Aggregate errors weight values by their spread "
                  "(sum of |error| / sum of MC std or variance); errors near the MC noise column are sampling noise.", "",
                  per_layer_table(evaluation.per_layer), ""]
    path = os.path.join(report_dir, f"{stem}.md")
    with open(path, "w") as handle:
        handle.write("\n".join(parts))
    return path


def per_layer_table(rows) -> str:
    """Per layer, PFP against Monte Carlo: the mean's error in MC standard deviations and the
    variance's relative error, per value (median over the layer) and in aggregate
    (sum |error| / sum of the MC std or variance: values weighted by their spread, so units that
    almost never fire, whose MC variance is mostly noise, do not dominate), and the MC's own
    aggregate relative standard error of the variance: errors at that level are sampling noise;
    and the median PFP/MC variance ratio, which says the error's side (below 1: the PFP claims
    less spread than sampling)."""
    return _table(["layer output", "op", "Δmean / MC std: median", "aggregate", "rel. var error: median", "aggregate",
                   "MC noise of var (aggregate)", "var PFP/MC: median"],
                  [[f"`{r['output']}`", r["op"], _fmt(r["mean_err_in_std_median"], 3), _fmt(r["mean_err_total"], 3),
                    _fmt(r["var_rel_err_median"], 3), _fmt(r["var_err_total"], 3), _fmt(r["mc_var_stderr_total"], 3),
                    _fmt(r["var_ratio_median"], 3)] for r in rows])


def threshold_table(evaluation: Evaluation) -> str:
    """Per predictor and OOD score: the threshold that accepts 99/95/90 % of the clean set and the
    share of each OOD set it rejects (abstains on)."""
    from . import metrics

    ood = [s.name for s in evaluation.sets if s.kind == "ood"]
    rows = []
    for (predictor, score, coverage), (threshold, rejected) in evaluation.thresholds.items():
        rows.append([NAMES[predictor], NAMES.get(score, score), f"{100 * coverage:.0f} %", _fmt(threshold)] + [_fmt(rejected[name]) for name in ood])
    text = _table(["predictor", "score", "clean accepted", "threshold (accept if score <=)"] + [f"{name} rejected" for name in ood], rows)
    curves = [[NAMES[predictor], NAMES.get(score, score)] + [_fmt(risk) for _, risk in curve] for (predictor, score), curve in evaluation.risk_coverage.items()]
    header = ["predictor", "score"] + [f"risk at {100 * c:.0f} %" for c in metrics.RISK_COVERAGES]
    return ("Abstain thresholds (accept when score <= threshold; per OOD set the share rejected):\n\n" + text +
            "\n\nRisk-coverage (error rate on the clean inputs kept, lowest scores first):\n\n" + _table(header, curves))


def _c_float(value: float) -> str:
    """A float32 C literal of ``value``: 0.0f when it underflows (an entropy threshold of 1e-60; its log
    score's define keeps the order), the lowest finite float for log 0."""
    value = float(np.clip(value, -np.finfo(np.float32).max, np.finfo(np.float32).max))
    if abs(value) < np.finfo(np.float32).tiny:
        return "0.0f"
    text = f"{value:.9g}"
    return text + ("f" if any(c in text for c in ".e") else ".0f")


def threshold_defines(evaluation: Evaluation, predictor: str = "pfp") -> list[str]:
    """#define lines of the PFP's thresholds for the generated header (for the plain scores and, for
    entropy and mutual information, their log-space outputs ``log_entropy`` / ``log_mutual_information``)."""
    return [f"#define {{UPPER}}_ABSTAIN_{score.upper()}_COV{round(100 * coverage)} {_c_float(threshold)}"
            for (who, score, coverage), (threshold, _) in evaluation.thresholds.items() if who == predictor]


def write_threshold_defines(evaluation: Evaluation, out_dir: str) -> str:
    """Put the PFP's thresholds (`threshold_defines`) into the compiled model's header, below its
    ``pfpc evaluate thresholds`` marker (replacing earlier ones); returns the header's path."""
    import re

    from ..compiler import read_metadata
    from ..errors import PfpcError

    name = read_metadata(out_dir)["name"]
    path = os.path.join(out_dir, f"{name}.h")
    marker = "/* pfpc evaluate thresholds */\n"
    text = open(path).read()
    if marker not in text:
        raise PfpcError(f"{path}: no thresholds marker; compile the model with --outputs (e.g. probs,entropy) first")
    head, tail = text.split(marker, 1)
    tail = re.sub(r"\A(#define \w+_ABSTAIN_\w+ [^\n]*\n)*", "", tail)
    lines = [line.replace("{UPPER}", name.upper()) for line in threshold_defines(evaluation)]
    with open(path, "w") as handle:
        handle.write(head + marker + "".join(line + "\n" for line in lines) + tail)
    return path
