"""The fixed train/test split of scikit-learn's bundled digits data set.

No torch here (numpy + scikit-learn only), so evaluation code can reuse exactly the
split the example models were trained on:

    from digits_split import load_digits_split
    x_train, y_train, x_test, y_test = load_digits_split(flatten=True)

Pixels are divided by 16.0 (the data set's 0..16 grey levels), so inputs are float32 in
[0, 1]. flatten=True gives [N, 64] (MLP input), flatten=False gives [N, 1, 8, 8] (CNN
input). Labels are int64 in 0..9. The split is
train_test_split(..., test_size=0.25, random_state=0, stratify=y): 1,347 train and
450 test images.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_SIZE = 0.25
SPLIT_SEED = 0


def load_digits_split(flatten: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test) of the fixed digits split."""
    digits = load_digits()  # bundled with scikit-learn, no download
    x = (digits.data / 16.0).astype(np.float32)  # [1797, 64], row-major 8x8
    y = digits.target.astype(np.int64)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )
