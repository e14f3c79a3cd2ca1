"""SVI's predictions on MNIST test + Fashion-MNIST test (onnxruntime, one run per weight sample),
kept as running sums so 1000 samples of 20,000 images fit in memory; cached in
``generated/<net>/svi.npz`` (per sample count S in CHECKPOINTS: mean softmax and its log (log-sum-exp over samples), mean entropy of the
softmax, logit mean and variance; and the deterministic mean network's logits)."""

from __future__ import annotations

import os

import numpy as np

CHECKPOINTS = (100, 1000)


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def entropy_of_logits(logits):
    """H[softmax(l)] = logsumexp(l) - sum_k p_k l_k, in float64, no log of a probability."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=-1)
    return np.log(total) - np.sum(exp * shifted, axis=-1) / total


def svi_predictions(model_path, post_path, x, cache, seed=0, progress=True):
    """{S: {"probs", "expected_entropy", "logit_mean", "logit_var"}} and the deterministic logits."""
    if os.path.exists(cache):
        saved = np.load(cache)
        return {s: {k: saved[f"{k}_{s}"] for k in ("probs", "log_probs", "expected_entropy", "logit_mean", "logit_var")} for s in CHECKPOINTS}, saved["deterministic"]
    from tqdm import tqdm

    from pfpc.evaluate.predictors import deterministic_logits
    from pfpc.frontends.onnx_model import load_model
    from pfpc.frontends.posterior import load_posterior
    from pfpc.verify import sampled_outputs

    model = load_model(model_path, len(x))
    posterior = load_posterior(model, post_path)
    deterministic = deterministic_logits(model, posterior, x)
    stream = sampled_outputs(model, posterior, {"x": x}, max(CHECKPOINTS), seed)
    next(stream)
    log_probs = np.full((len(x), 10), -np.inf)  # running log sum_s softmax(l_s): the NLL needs no floor
    probs = np.zeros((len(x), 10))
    expected = np.zeros(len(x))
    total = np.zeros((len(x), 10))
    squares = np.zeros((len(x), 10))
    out = {}
    for s, (logits,) in enumerate(tqdm(stream, total=max(CHECKPOINTS), desc=os.path.basename(os.path.dirname(cache)), disable=not progress), 1):
        logits = logits.astype(np.float64)
        probs += softmax(logits)
        log_probs = np.logaddexp(log_probs, logits - (logits.max(axis=-1, keepdims=True) + np.log(np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1, keepdims=True))))
        expected += entropy_of_logits(logits)
        total += logits
        squares += logits * logits
        if s in CHECKPOINTS:
            mean = total / s
            out[s] = {"probs": probs / s, "log_probs": log_probs - np.log(s), "expected_entropy": expected / s, "logit_mean": mean,
                      "logit_var": (squares - s * mean * mean) / (s - 1)}
    np.savez(cache, deterministic=deterministic, **{f"{k}_{s}": v for s, row in out.items() for k, v in row.items()})
    return out, deterministic
