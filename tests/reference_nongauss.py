"""Float64 prototypes for the seed LeNet-5's non-Gaussian dense tail (benchmarks/nongauss_lenet.py)."""

from __future__ import annotations


def variants(model, variances, images):
    return {}
