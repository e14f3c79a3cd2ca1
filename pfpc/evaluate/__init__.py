"""``pfpc evaluate``: uncertainty quality of the deterministic mean network, SVI and the PFP on the
dirty-digits suite (`datasets`), with the metrics of `metrics` and a Markdown report (`report`).

Per predictor and set: accuracy, NLL, ECE (15 bins), Brier (labelled sets only), mean predictive
entropy, expected entropy, mutual information and logit variance; per out-of-distribution set:
AUROC against the clean set for each OOD score (mean logit variance, predictive entropy, mutual
information). Entropy and mutual information are ranked by their logs computed in log space
(`metrics.Prediction.ranking`: the exact order, where the float64 values of confident inputs round
to ties), for the AUROCs, risk-coverage curves and abstain thresholds; the thresholds come for both
the log score (``log_entropy``, ``log_mutual_information``, the generated C's log-space outputs)
and the plain one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import PfpcError
from . import metrics
from .datasets import EvalSet, default_suite

PREDICTORS = ("deterministic", "svi", "pfp")
SCORES = ("logit_var", "entropy", "mutual_information")
LABELLED_METRICS = ("accuracy", "nll", "ece", "brier")
SUMMARY_METRICS = ("entropy", "expected_entropy", "mutual_information", "logit_var")

#: ``per_layer``: images taken from the start of every set, and Monte Carlo samples.
PER_LAYER_IMAGES, PER_LAYER_SAMPLES = 16, 2000


def require_extras(plots: bool) -> None:
    """One clear error if the [eval] extra (scikit-learn, tqdm; matplotlib for plots) is missing."""
    import importlib.util

    needed = ["sklearn", "tqdm"] + (["matplotlib"] if plots else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join("scikit-learn" if m == "sklearn" else m for m in missing)
        raise PfpcError(f"pfpc evaluate needs {names}: pip install 'pfpc[eval]'")


@dataclass
class Evaluation:
    model: str
    samples: int
    sets: list  # EvalSet
    predictions: dict  # predictor -> set name -> metrics.Prediction
    table: dict = field(default_factory=dict)  # (predictor, set) -> {metric: value}
    auroc: dict = field(default_factory=dict)  # (predictor, score, ood set) -> value; "all_ood" pools them
    per_layer: list | None = None
    #: SVI rerun with other seeds: one {"accuracy", "ece", score: pooled AUROC} per run (the first is the main run)
    svi_runs: list = field(default_factory=list)
    #: (predictor, score, coverage) -> (threshold, {OOD set: rejection rate}); coverage of the clean set
    thresholds: dict = field(default_factory=dict)
    #: (predictor, score) -> [(coverage, risk)]: error rate on the clean inputs accepted by score
    risk_coverage: dict = field(default_factory=dict)


def summarize(evaluation: Evaluation) -> Evaluation:
    """Fill ``table`` and ``auroc`` from the predictions."""
    for predictor, by_set in evaluation.predictions.items():
        for eval_set in evaluation.sets:
            pred = by_set[eval_set.name]
            row = {}
            if eval_set.labels is not None:
                row["accuracy"] = metrics.accuracy(pred.probs, eval_set.labels)
                row["nll"] = metrics.nll(pred.probs, eval_set.labels, pred.log_probs)
                row["ece"] = metrics.ece(pred.probs, eval_set.labels)
                row["brier"] = metrics.brier(pred.probs, eval_set.labels)
            for name in SUMMARY_METRICS:
                value = pred.entropy if name == "entropy" else getattr(pred, name)
                row[name] = None if value is None else float(np.mean(value))
            evaluation.table[(predictor, eval_set.name)] = row
        clean = by_set["clean"]
        ood_sets = [s for s in evaluation.sets if s.kind == "ood"]
        for score in SCORES:
            if clean.score(score) is None:
                continue
            ranked = {s.name: by_set[s.name].ranking(score) for s in evaluation.sets}
            for eval_set in ood_sets:
                evaluation.auroc[(predictor, score, eval_set.name)] = metrics.auroc(ranked["clean"], ranked[eval_set.name])
            if ood_sets:
                pooled = np.concatenate([ranked[s.name] for s in ood_sets])
                evaluation.auroc[(predictor, score, "all_ood")] = metrics.auroc(ranked["clean"], pooled)
            clean_set = next(s for s in evaluation.sets if s.name == "clean")
            evaluation.risk_coverage[(predictor, score)] = metrics.risk_coverage(clean.probs, clean_set.labels, ranked["clean"])
            log_space = ranked["clean"] is not clean.score(score)
            for coverage in metrics.COVERAGES:
                threshold = metrics.coverage_threshold(ranked["clean"], coverage)
                if log_space:  # the log score's threshold, and its exp for the plain score (rejecting what that score can tell apart)
                    evaluation.thresholds[(predictor, "log_" + score, coverage)] = (
                        threshold, {s.name: float(np.mean(ranked[s.name] > threshold)) for s in ood_sets})
                    threshold = float(np.exp(threshold))
                evaluation.thresholds[(predictor, score, coverage)] = (
                    threshold, {s.name: float(np.mean(by_set[s.name].score(score) > threshold)) for s in ood_sets})
    return evaluation


def _headline(evaluation: Evaluation, predictor: str) -> dict:
    """The numbers the targets compare: clean accuracy and ECE, pooled OOD AUROC per score."""
    clean = evaluation.table[(predictor, "clean")]
    row = {"accuracy": clean["accuracy"], "ece": clean["ece"]}
    row.update({score: evaluation.auroc[(predictor, score, "all_ood")] for score in SCORES if (predictor, score, "all_ood") in evaluation.auroc})
    return row


def evaluate(
    model_path: str,
    posterior_path: str,
    samples: int = 100,
    sets: list[EvalSet] | None = None,
    seed: int = 0,
    logit_samples: int = 1000,
    progress: bool = True,
    work_dir: str | None = None,
    per_layer: bool = False,
    svi_repeats: int = 0,
) -> Evaluation:
    """Run the three predictors on every set (``sets`` defaults to the dirty-digits suite).

    ``per_layer``: also compare the PFP with Monte Carlo at every layer output
    (`pfpc.verify.per_layer`) on the first `PER_LAYER_IMAGES` images of every set.
    ``svi_repeats``: rerun SVI with that many other seeds, to show how much SVI's own metrics
    move with the weight samples (``Evaluation.svi_runs``)."""
    from ..frontends.onnx_model import load_model
    from ..frontends.posterior import load_posterior
    from .predictors import check_classifier, check_labels, deterministic_logits, pfp_outputs, shape_inputs, svi_logits

    sets = sets if sets is not None else default_suite()
    x = np.concatenate([np.asarray(s.x).reshape(len(s.x), -1) for s in sets])
    model = load_model(model_path, len(x))
    check_labels(sets, check_classifier(model, model_path), model_path)
    posterior = load_posterior(model, posterior_path)
    x = shape_inputs(model, x, model_path)
    bounds = np.cumsum([0] + [len(s.x) for s in sets])
    rows = {s.name: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(sets)}

    def split(prediction):
        return {name: prediction.subset(part) for name, part in rows.items()}

    predictions = {"deterministic": split(metrics.from_logits(deterministic_logits(model, posterior, x)))}
    predictions["svi"] = split(metrics.from_logit_samples(svi_logits(model, posterior, x, samples, seed, progress)))
    mean, var, probs = pfp_outputs(model_path, posterior, x, work_dir)
    predictions["pfp"] = split(metrics.from_logit_moments(mean, var, logit_samples, seed, probs=probs, method="meanfield"))
    name = os.path.basename(os.path.dirname(os.path.abspath(model_path))) or model_path
    evaluation = summarize(Evaluation(name, samples, sets, predictions))
    evaluation.svi_runs.append(_headline(evaluation, "svi"))
    for repeat in range(1, svi_repeats + 1):
        rerun = {"svi": split(metrics.from_logit_samples(svi_logits(model, posterior, x, samples, seed + repeat, progress)))}
        evaluation.svi_runs.append(_headline(summarize(Evaluation(name, samples, sets, rerun)), "svi"))
    if per_layer:
        from ..frontends.onnx_model import graph_inputs
        from ..verify import per_layer as per_layer_errors

        subset = np.concatenate([x[part][:PER_LAYER_IMAGES] for part in rows.values()])
        small = load_model(model_path, len(subset))
        evaluation.per_layer = per_layer_errors(small, posterior, {graph_inputs(small)[0].name: subset}, PER_LAYER_SAMPLES, seed, progress)
    return evaluation
