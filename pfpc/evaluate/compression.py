"""What compressing a posterior costs end to end, measured with the compiled PFP (`pfpc compress`).

Both posteriors, the full one and the shared one, are compiled to C (the shared one with its
codebooks, `codegen.shared_weights`), built for the host and run on the dirty-digits suite
(`datasets.default_suite`). Compared: clean accuracy, NLL and ECE, pooled OOD AUROC of the
predictive entropy and the mean logit variance, and the mean over inputs and logits of the W2
distance between the two PFPs' output Gaussians, sqrt((m1 - m2)^2 + (s1 - s2)^2).
"""

from __future__ import annotations

import numpy as np

from . import metrics
from .datasets import default_suite

ROWS = ("accuracy", "nll", "ece", "auroc_entropy", "auroc_logit_var")


def compare(model_path: str, full, shared, sets=None, full_outputs=None) -> dict:
    """``full``, ``shared``: `Posterior` objects (``shared.shared`` set). Returns per metric
    {"full", "shared", "delta"}, plus ``output_w2`` and the number of images. ``full_outputs``:
    `suite_outputs` of ``full`` on the same ``sets``, when a caller comparing several shared
    posteriors computed them once (``full`` is then not compiled again)."""
    sets = sets if sets is not None else default_suite()
    runs = {"full": full_outputs if full_outputs is not None else suite_outputs(model_path, full, sets),
            "shared": suite_outputs(model_path, shared, sets)}
    result = {}
    values = {name: _metrics(sets, *outputs) for name, outputs in runs.items()}
    for metric in ROWS:
        result[metric] = {"full": values["full"][metric], "shared": values["shared"][metric],
                          "delta": values["shared"][metric] - values["full"][metric]}
    (m1, v1, _), (m2, v2, _) = runs["full"], runs["shared"]
    w2 = np.sqrt((m1.astype(np.float64) - m2) ** 2 + (np.sqrt(np.maximum(v1, 0.0)) - np.sqrt(np.maximum(v2, 0.0))) ** 2)
    result["output_w2"] = float(w2.mean())
    result["images"] = int(len(m1))
    return result


def suite_outputs(model_path: str, posterior, sets=None) -> tuple:
    """The compiled PFP's (mean, var, probs) on every image of ``sets`` (default: the dirty-digits
    suite), in order."""
    from ..frontends.onnx_model import load_model
    from .predictors import check_classifier, check_labels, pfp_outputs, shape_inputs

    sets = sets if sets is not None else default_suite()
    model = load_model(model_path, 1, shapes_only=True)
    check_labels(sets, check_classifier(model, model_path), model_path)
    return pfp_outputs(model_path, posterior, shape_inputs(model, np.concatenate([np.asarray(s.x).reshape(len(s.x), -1) for s in sets]), model_path))


def _metrics(sets, mean, var, probs) -> dict:
    bounds = np.cumsum([0] + [len(s.x) for s in sets])
    parts = {s.name: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(sets)}
    prediction = metrics.from_logit_moments(mean, var, samples=1, probs=probs, method="meanfield")  # MI not used: one draw is enough
    clean_set = next(s for s in sets if s.name == "clean")
    clean = prediction.subset(parts["clean"])
    ood = [prediction.subset(parts[s.name]) for s in sets if s.kind == "ood"]
    row = {"accuracy": metrics.accuracy(clean.probs, clean_set.labels), "nll": metrics.nll(clean.probs, clean_set.labels, clean.log_probs),
           "ece": metrics.ece(clean.probs, clean_set.labels)}
    for score in ("entropy", "logit_var"):
        row[f"auroc_{score}"] = metrics.auroc(clean.ranking(score), np.concatenate([p.ranking(score) for p in ood]))
    return row


def format_report(layers: list, effect: dict | None, footprint: dict | None = None) -> str:
    """The compress report as Markdown: per layer, totals, the end-to-end effect."""
    lines = ["| initializer | weights | components | exceptions / blends | index bits | mean W2 | RMS W2 | max W2 | parameters before → after | bytes before → after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in layers:
        scales = f" (+ {row['channel_scales']} channel scales)" if row.get("channel_scales") else ""
        lines.append(f"| {row['initializer']} | {row['weights']:,} | {row['components']}{scales} | {row['exceptions']} / {row.get('blends', 0)} | "
                     f"{row['index_bits']} | "
                     f"{row['mean_w2']:.4f} | {row['rms_w2']:.4f} | {row['max_w2']:.4f} | {row['parameters_before']:,} → {row['parameters_after']:,} | "
                     f"{row['bytes_before']:,} → {row['bytes_after']:,} |")
    before, after = sum(r["bytes_before"] for r in layers), sum(r["bytes_after"] for r in layers)
    params_before, params_after = sum(r["parameters_before"] for r in layers), sum(r["parameters_after"] for r in layers)
    lines.append(f"| **total** | {sum(r['weights'] for r in layers):,} | | | | | | | {params_before:,} → {params_after:,} "
                 f"({params_before / max(params_after, 1):.0f}x) | {before:,} → {after:,} ({before / max(after, 1):.1f}x) |")
    lines.append("")
    lines.append("Bytes: mean and std as float32 before; after, the component indices (4-bit packed up to 16 components), "
                 "two float32 per component and per exception plus its position, per blend its position, two indices and "
                 "a float32 alpha, a float32 per channel scale. Parameters: floats (indices not counted).")
    if footprint is not None:
        lines += ["", f"Compiled weights (all tensors, as the kernels read them: mean and variance or second moment): "
                  f"{footprint['full']:,} bytes with the full posterior, {footprint['shared']:,} with the shared one "
                  f"({footprint['full'] / max(footprint['shared'], 1):.2f}x smaller)."]
    if effect is not None:
        lines += ["", f"End-to-end, compiled PFP on the dirty-digits suite ({effect['images']:,} images; AUROC: clean vs all OOD sets):", "",
                  "| metric | full posterior | shared posterior | delta |", "|---|---|---|---|"]
        for metric in ROWS:
            value = effect[metric]
            lines.append(f"| {metric.replace('_', ' ')} | {value['full']:.4f} | {value['shared']:.4f} | {value['delta']:+.4f} |")
        lines.append(f"| mean W2 between the output Gaussians | | | {effect['output_w2']:.4f} |")
    return "\n".join(lines) + "\n"
