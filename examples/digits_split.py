"""The fixed train/test split of scikit-learn's bundled digits data set.

The split is defined once, in `pfpc.evaluate.datasets.load_digits_split` (numpy + scikit-learn,
no torch), so training and evaluation use exactly the same images:

    from digits_split import load_digits_split
    x_train, y_train, x_test, y_test = load_digits_split(flatten=True)

Pixels are divided by 16.0 (the data set's 0..16 grey levels), so inputs are float32 in
[0, 1]. flatten=True gives [N, 64] (MLP input), flatten=False gives [N, 1, 8, 8] (CNN
input). Labels are int64 in 0..9. The split is
train_test_split(..., test_size=0.25, random_state=0, stratify=y): 1,347 train and
450 test images.
"""

from pfpc.evaluate.datasets import load_digits_split  # noqa: F401
