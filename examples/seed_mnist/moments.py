"""The compiled PFP's logit moments (mean, var) [20,000, 10] of a seed network on MNIST test followed by
Fashion-MNIST test, from the generated C run on the host (batch 1, the default `--covariance`), cached in
``generated/<net>/pfp_moments.npz`` with the labels: what the float64 output-stage studies start from."""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from build_models import build  # noqa: E402
from data import load  # noqa: E402


def pfp_moments(net: str, data: str, out: str):
    """(mean, var, labels of the MNIST rows, number of MNIST rows); float64."""
    cache = os.path.join(out, net, "pfp_moments.npz")
    if not os.path.exists(cache):
        import pfpc.compiler as compiler

        model, post = build(net, data, out)
        x_id, y = load(data, "mnist")
        x_ood, _ = load(data, "fashion")
        folder = os.path.join(out, net, "pfp_moments")
        compiler.compile(model, post, out_dir=folder, batch=1, force=True, outputs=())
        ((mean, var),) = compiler.run_host(folder, [np.concatenate([x_id, x_ood])])
        np.savez(cache, mean=mean, var=var, labels=y)
    saved = np.load(cache)
    return saved["mean"].astype(np.float64), saved["var"].astype(np.float64), saved["labels"], len(saved["labels"])
