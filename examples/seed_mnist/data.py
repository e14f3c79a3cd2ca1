"""MNIST test (in distribution) and Fashion-MNIST test (out of distribution) as the seed paper's
networks take them: pixels / 255, then (x - mean) / std with each set's own statistics."""

from __future__ import annotations

import os

import numpy as np

NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion": (0.2860, 0.3530)}


def load(data: str, name: str, limit: int | None = None):
    """(x [N, 1, 28, 28] float32, labels [N] int64) of ``name`` in NORMALISATION."""
    from pfpc.evaluate.datasets import read_idx

    images = read_idx(os.path.join(data, "mnist", f"{name}-t10k-images-idx3-ubyte.gz"))[:limit]
    labels = read_idx(os.path.join(data, "mnist", f"{name}-t10k-labels-idx1-ubyte.gz"))[:limit]
    mean, std = NORMALISATION[name]
    x = ((images.astype(np.float32) / 255.0 - mean) / std).reshape(-1, 1, 28, 28)
    return np.ascontiguousarray(x, np.float32), labels.astype(np.int64)
