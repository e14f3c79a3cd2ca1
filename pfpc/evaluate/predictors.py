"""The three predictors compared by ``pfpc evaluate``, each giving logits for inputs x [N, ...]:

- deterministic: the posterior-mean network in onnxruntime;
- SVI: S weight samples w ~ q(w) drawn in NumPy (`pfpc.verify.sampled_outputs`), one
  onnxruntime run each;
- PFP: the C that `pfpc.compile` generates, built and run on the host (`pfpc.runner.run`).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import PfpcError
from ..verify import sampled_outputs, sampling_session


def check_classifier(model, path) -> int:
    """The number of classes K of a model with one input and one [N, K] output."""
    from ..frontends.onnx_model import graph_inputs, output_shapes

    outputs = list(output_shapes(model).items())
    if len(graph_inputs(model)) != 1 or len(outputs) != 1 or len(outputs[0][1]) != 2:
        raise PfpcError(f"{path}: evaluation needs a classifier with one input and one [N, classes] output, got outputs {outputs}")
    return int(outputs[0][1][1])


def check_labels(sets, classes: int, path) -> None:
    """One-line error when a set's labels do not fit a K-class model (e.g. the digits' 0..9 for K = 3)."""
    for eval_set in sets:
        if eval_set.labels is not None and len(eval_set.labels) and (eval_set.labels.min() < 0 or eval_set.labels.max() >= classes):
            raise PfpcError(f"{path}: the model has {classes} classes, the labels of set '{eval_set.name}' go from "
                            f"{eval_set.labels.min()} to {eval_set.labels.max()}; give a test set labelled 0..{classes - 1} (--test)")


def shape_inputs(model, x, path) -> np.ndarray:
    """``x`` [N, ...] reshaped to the model's input shape [N, ...] (e.g. [N, 64] to [N, 1, 8, 8])."""
    from ..frontends.onnx_model import input_shapes

    (name, shape), = input_shapes(model).items()
    per_example = int(np.prod(shape[1:]))
    x = np.asarray(x).reshape(len(x), -1)
    if per_example != x.shape[1]:
        raise PfpcError(f"{path}: input '{name}' {list(shape[1:])} takes {per_example} values per example, the data has {x.shape[1]} "
                        f"(give --test/--ood sets of that shape)")
    return np.ascontiguousarray(x.reshape([len(x)] + list(shape[1:])), np.float32)


def deterministic_logits(model, posterior, x) -> np.ndarray:
    """The mean network: every stochastic weight at its posterior mean."""
    session, stochastic = sampling_session(model, posterior)
    feed = {session.get_inputs()[0].name: x}
    feed.update({name: posterior.means[name] for name in stochastic})
    return session.run(None, feed)[0]


def svi_logits(model, posterior, x, samples: int, seed: int = 0, progress: bool = True) -> np.ndarray:
    """[S, N, K] logits, one weight sample per row of S."""
    from tqdm import tqdm

    from ..frontends.onnx_model import graph_inputs

    stream = sampled_outputs(model, posterior, {graph_inputs(model)[0].name: x}, samples, seed)
    next(stream)
    return np.stack([values[0] for values in tqdm(stream, total=samples, desc="SVI samples", disable=not progress, leave=False)])


def pfp_outputs(model_path, posterior, x, work_dir: str | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compile the PFP (batch 1) with the default output stage's probabilities (mean-field,
    `pfpc.ops.predictive`) as an extra output, build it for the host and run it on every row of
    ``x``: (logits mean, logits var, probabilities). A model that ends in a softmax gives its
    logits' moments (the metrics apply the softmax once, to them)."""
    from ..compiler import compile as compile_model
    from ..frontends.onnx_model import batch_or_default
    from ..runner import run

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(work_dir or tmp, "pfp")
        compile_model(model_path, posterior, out_dir=out, batch=batch_or_default(model_path), force=True, outputs=("probs",))
        result = run(out, [x])
    mean, var = result.logits[0] if result.logits else result.outputs[0]
    return mean, var, result.extras["probs"]
