"""What `pfpc run` tells a person (or, as JSON, a program) about each example: the predicted
class, its probability, the uncertainty scores and a one-line reading.

NumPy only (no TVM). Uses the predictive outputs compiled in (``--outputs probs,entropy,ood``)
when there are; otherwise computes the same quantities from the logits' mean M and variance V
with the formulas of `pfpc.ops.predictive`'s default: the mean-field approximation of E[softmax]
(Lu, Ie & Sha 2020; `pfpc.evaluate.metrics.meanfield_log_probs`), the entropy -sum_k p_k log p_k,
the OOD score mean_k V_k.
"""

from __future__ import annotations

import math

import numpy as np

from .evaluate.metrics import meanfield_log_probs

# the reading's thresholds on the predicted class's probability
CONFIDENT = 0.9
ABSTAIN_BELOW = 0.5


def describe(meta: dict, outputs: list, extras: dict, logits: dict | None = None) -> dict:
    """Per example of the first output: class, probability, entropy, OOD score and a reading
    (a classifier: [N, K] logits, K >= 2, or a softmax over their last axis); for any other output
    its mean and standard deviation (a softmax output over another axis: its value)."""
    (mean, var), name = outputs[0], meta["outputs"][0][0]
    softmax = next((entry for entry in meta.get("output_softmax", []) if entry["output"] == 0), None) if var is None else None
    if softmax is not None:  # the model's own probabilities (or their logs), and its logits' moments
        value = np.asarray(mean, np.float64)
        if value.ndim != 2 or value.shape[1] < 2 or softmax["axis"] != 1:
            return {"output": name, "kind": "regression", "examples": [
                {"index": i, "mean": m.reshape(-1).tolist(), "std": [0.0] * m.size} for i, m in enumerate(value)]}
        extras = {"probs": np.exp(value) if softmax["function"] == "log_softmax" else value, **extras}
        mean, var = logits[0]
    if mean.ndim != 2 or mean.shape[1] < 2:
        return {"output": name, "kind": "regression", "examples": [
            {"index": i, "mean": m.reshape(-1).tolist(), "std": np.sqrt(np.maximum(v, 0)).reshape(-1).tolist()}
            for i, (m, v) in enumerate(zip(mean, var))]}
    probs = np.asarray(extras["probs"], np.float64) if "probs" in extras else np.exp(meanfield_log_probs(mean, var))
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = (np.asarray(extras["entropy"], np.float64) if "entropy" in extras
                   else -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1))
    ood_extra = extras.get("logit_var", extras.get("ood"))
    ood = np.asarray(ood_extra, np.float64) if ood_extra is not None else np.asarray(var, np.float64).mean(axis=1)
    classes = probs.shape[1]
    examples = []
    for i in range(probs.shape[0]):
        order = np.argsort(-probs[i], kind="stable")
        best, second = int(order[0]), int(order[1])
        p = float(probs[i, best])
        if p >= CONFIDENT:
            reading = f"accept: class {best}"
        elif p >= ABSTAIN_BELOW:
            reading = f"unsure: class {best} or {second} (p {probs[i, second]:.2f})"
        else:
            reading = f"abstain: no class reaches {ABSTAIN_BELOW} (most likely {best}, then {second})"
        examples.append({"index": i, "class": best, "probability": p, "probabilities": probs[i].tolist(),
                         "entropy": float(entropy[i]), "ood_score": float(ood[i]), "reading": reading})
    return {"output": name, "kind": "classifier", "classes": classes,
            "probabilities_from": (f"model's {softmax['function']} output ({softmax['method']} over the Gaussian logits)" if softmax
                                   else "compiled probs output" if "probs" in extras else "mean-field approximation of the logit moments"),
            "max_entropy": math.log(classes), "examples": examples}


def readable(report: dict) -> str:
    """The report as text, one line per example and a legend."""
    if report["kind"] == "regression":
        lines = [f"output '{report['output']}': mean ± standard deviation per example"]
        for ex in report["examples"]:
            pairs = ", ".join(f"{m:.4g} ± {s:.3g}" for m, s in list(zip(ex["mean"], ex["std"]))[:8])
            lines.append(f"  {ex['index']:>4}: {pairs}{' ...' if len(ex['mean']) > 8 else ''}")
        return "\n".join(lines)
    lines = [f"{'example':>7}  {'class':>5}  {'prob':>6}  {'entropy':>7}  {'ood':>9}  reading"]
    for ex in report["examples"]:
        lines.append(f"{ex['index']:>7}  {ex['class']:>5}  {ex['probability']:>6.3f}  {ex['entropy']:>7.3f}  "
                     f"{ex['ood_score']:>9.3g}  {ex['reading']}")
    lines.append(f"prob: predictive probability of the class, from the {report['probabilities_from']}; entropy: predictive "
                 f"entropy in nats (0 = certain, {report['max_entropy']:.2f} = uniform over {report['classes']}); ood: mean "
                 f"logit variance (compare with your in-distribution data); reading: accept at p >= {CONFIDENT}, abstain "
                 f"below {ABSTAIN_BELOW}")
    return "\n".join(lines)
