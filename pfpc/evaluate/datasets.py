"""The dirty-digits evaluation suite: real handwritten digits, made harder in stated ways.

Modelled on Dirty-MNIST (Mukhoti et al., 2021): an in-distribution set, an ambiguous set (for
aleatoric uncertainty) and out-of-distribution sets (for epistemic uncertainty). Everything is
derived deterministically (fixed seeds) from the clean test images, so two runs give the same
sets. Pixels are float32 in [0, 1] (the digits' 0..16 grey levels divided by 16), 64 per image,
row-major 8x8.

- ``clean``: the held-out test split of scikit-learn's digits (`load_digits_split`, 450 images),
  or the images of MNIST IDX files (`load_idx_digits`). In distribution.
- ``ambiguous``: pixel-wise blends of two clean images of different classes,
  x = (a + b) / 2 rescaled to the brighter parent's peak value. Every blend appears twice, once
  labelled with a's class and once with b's (as Ambiguous-MNIST gives one input several labels),
  so no predictor can exceed 50 % accuracy and a calibrated one is about 50 % confident: the
  set measures aleatoric uncertainty. In distribution for the OOD scores' purposes: its
  uncertainty should show up in the entropy, not in the mutual information.
- ``rotated``: clean images rotated by 90 degrees. Out of distribution (a few digits, e.g. 0
  and 8, still look like digits after rotation; that is part of what the set measures).
- ``inverted``: 1 - x, dark strokes on a bright background. Far out of distribution.
- ``noisy``: clean images plus Gaussian pixel noise of std 0.5, clipped to [0, 1]: corrupted
  digits, a near-OOD shift.
- ``uniform_noise``: i.i.d. uniform [0, 1] pixels, no digit at all.
- ``held_out_classes`` (only with ``ood_classes``): the clean images of those classes, removed
  from ``clean``. A true semantic OOD set, but only for a model trained without those classes;
  the example models were trained on all ten, so the default suite leaves it out.
"""

from __future__ import annotations

import gzip
import re
import os
from dataclasses import dataclass

import numpy as np

from ..errors import PfpcError

TEST_SIZE = 0.25
SPLIT_SEED = 0
SUITE_SEED = 0
NOISE_STD = 0.5
OOD_SETS = ("rotated", "inverted", "noisy", "uniform_noise")


@dataclass
class EvalSet:
    name: str
    x: np.ndarray  # [N, 64] float32 in [0, 1]
    labels: np.ndarray | None  # [N] int64, None for out-of-distribution sets
    kind: str  # "id" | "ambiguous" | "ood"
    description: str


def load_digits_split(flatten: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of scikit-learn's digits, the split the examples use.

    Pixels / 16.0 as float32; ``flatten`` gives [N, 64], else [N, 1, 8, 8]; labels int64;
    ``train_test_split(test_size=0.25, random_state=0, stratify=y)``: 1,347 train, 450 test.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn, no download
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    return tuple(np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test))


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format, optionally gzipped) of unsigned bytes, as a uint8 array."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise PfpcError(f"{path}: cannot read the IDX file: {err.strerror or err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PfpcError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    body = data[4 + 4 * rank :]
    if len(body) != int(np.prod(dims)):
        raise PfpcError(f"{path}: IDX header says {dims} ({int(np.prod(dims))} bytes), the file has {len(body)}")
    return np.frombuffer(body, np.uint8).reshape(dims)


def downsample_like_digits(images: np.ndarray) -> np.ndarray:
    """[N, H, W] uint8 grey images (MNIST 28x28) -> [N, 64] float32 like scikit-learn's digits.

    The digits were made (UCI, NIST preprocessing) from 32x32 binary bitmaps of the digit
    scaled to fill the box, by counting the set pixels in each 4x4 block (0..16). Here: threshold
    at 128, crop to the ink's bounding box, scale the longer side to 32 (nearest neighbour,
    aspect kept, centred), count per 4x4 block, divide by 16.
    """
    out = np.zeros((len(images), 64), np.float32)
    for index, image in enumerate(images):
        ink = image >= 128
        rows, cols = np.nonzero(ink)
        if rows.size == 0:
            continue
        crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        scale = 32.0 / max(crop.shape)
        height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
        src_r = np.minimum((np.arange(height) / scale).astype(int), crop.shape[0] - 1)
        src_c = np.minimum((np.arange(width) / scale).astype(int), crop.shape[1] - 1)
        bitmap = np.zeros((32, 32), bool)
        top, left = (32 - height) // 2, (32 - width) // 2
        bitmap[top : top + height, left : left + width] = crop[np.ix_(src_r, src_c)]
        out[index] = bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3)).reshape(64) / 16.0
    return out


def load_idx_digits(images_path: str, labels_path: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST IDX images and labels, downsampled to the digits' 8x8 format (`downsample_like_digits`)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise PfpcError(f"{images_path}, {labels_path}: expected [N, H, W] images and [N] labels, got {list(images.shape)} and {list(labels.shape)}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return downsample_like_digits(images), labels.astype(np.int64)


def _peak_rescaled_blend(a, b):
    blend = (a + b) / 2
    peak = np.maximum(a.max(axis=1), b.max(axis=1))
    return blend * (peak / np.maximum(blend.max(axis=1), 1e-12))[:, None]


def build_suite(x: np.ndarray, labels: np.ndarray, ood_classes=(), seed: int = SUITE_SEED) -> list[EvalSet]:
    """The dirty-digits sets derived from clean images ``x`` [N, 64] with ``labels`` [N]."""
    x = np.asarray(x, np.float32).reshape(len(x), 64)
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng(seed)
    held_out = np.isin(labels, list(ood_classes))
    x_id, y_id = x[~held_out], labels[~held_out]
    if len(x_id) < 2 or len(set(y_id.tolist())) < 2:
        raise PfpcError(f"the evaluation needs at least two clean images of two classes, got {len(x_id)} of classes {sorted(set(y_id.tolist()))}")
    sets = [EvalSet("clean", x_id, y_id, "id", "held-out test images")]
    first = rng.permutation(len(x_id))[: len(x_id) // 2]
    second = np.array([rng.choice(np.flatnonzero(y_id != y_id[i])) for i in first], np.int64)
    blends = _peak_rescaled_blend(x_id[first], x_id[second]).astype(np.float32)
    sets.append(EvalSet(
        "ambiguous", np.concatenate([blends, blends]), np.concatenate([y_id[first], y_id[second]]), "ambiguous",
        "blends (a + b) / 2 of two classes; each blend twice, labelled with either class",
    ))
    images = x_id.reshape(-1, 8, 8)
    sets.append(EvalSet("rotated", np.rot90(images, 1, axes=(1, 2)).reshape(-1, 64).copy(), None, "ood", "clean images rotated by 90 degrees"))
    sets.append(EvalSet("inverted", 1.0 - x_id, None, "ood", "1 - x: bright background, dark strokes"))
    noisy = np.clip(x_id + NOISE_STD * rng.standard_normal(x_id.shape), 0.0, 1.0).astype(np.float32)
    sets.append(EvalSet("noisy", noisy, None, "ood", f"clean images + Gaussian noise (std {NOISE_STD}), clipped to [0, 1]"))
    sets.append(EvalSet("uniform_noise", rng.uniform(0.0, 1.0, x_id.shape).astype(np.float32), None, "ood", "i.i.d. uniform [0, 1] pixels"))
    if held_out.any():
        sets.append(EvalSet("held_out_classes", x[held_out], None, "ood", f"clean images of classes {sorted(set(ood_classes))}, left out of 'clean'"))
    return sets


def default_suite(idx_images: str | None = None, idx_labels: str | None = None, limit: int | None = None, ood_classes=()) -> list[EvalSet]:
    """The suite on scikit-learn's digits test split, or on MNIST IDX files if given."""
    if (idx_images is None) != (idx_labels is None):
        raise PfpcError("MNIST IDX input needs both the images and the labels file")
    if idx_images is not None:
        x, labels = load_idx_digits(os.fspath(idx_images), os.fspath(idx_labels), limit)
    else:
        _, _, x, labels = load_digits_split(flatten=True)
        if limit is not None:
            x, labels = x[:limit], labels[:limit]
    return build_suite(x, labels, ood_classes)


# ---- the user's own data: `pfpc evaluate --test ... --ood NAME=PATH` ----

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff")


@dataclass
class Preprocess:
    """x -> ((x * scale) - mean[c]) / std[c] per channel c, then ``layout`` nhwc -> the model's
    nchw if asked. Saved as JSON (``preprocess.json`` beside a compiled model) and read back."""

    scale: float = 1.0
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    layout: str = "nchw"  # the layout of the data: nchw (as the model) or nhwc (channels last, images)

    def apply(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x, np.float64) * self.scale
        if self.layout == "nhwc" and x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        if np.any(std <= 0):
            raise PfpcError(f"{name}: --std must be positive")
        if max(mean.size, std.size) > 1:  # per channel: axis 1 of [N, C, H, W]
            channels = x.shape[1] if x.ndim == 4 else None
            if channels is None or {mean.size, std.size} - {1, channels}:
                raise PfpcError(f"{name}: --mean/--std give {mean.size}/{std.size} values per channel, the data "
                                f"{list(x.shape)} has {channels or 'no'} channel axis (--layout nchw or nhwc for [N, C, H, W] / [N, H, W, C])")
            mean, std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
        x = (x - mean) / std
        return np.ascontiguousarray(x, np.float32)

    @classmethod
    def load(cls, path: str) -> "Preprocess":
        import json

        try:
            with open(path) as handle:
                spec = json.load(handle)
            return cls(float(spec.get("scale", 1.0)), tuple(float(v) for v in spec.get("mean", [0.0])),
                       tuple(float(v) for v in spec.get("std", [1.0])), str(spec.get("layout", "nchw")))
        except OSError as err:
            raise PfpcError(f"{path}: cannot read the preprocessing spec: {err.strerror}") from None
        except (ValueError, TypeError, AttributeError) as err:
            raise PfpcError(f"{path}: not a preprocessing spec (JSON with scale, mean, std, layout): {err}") from None

    def save(self, path: str) -> None:
        import json

        with open(path, "w") as handle:
            json.dump({"scale": self.scale, "mean": list(self.mean), "std": list(self.std), "layout": self.layout}, handle, indent=1)


def load_array_set(spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, labels or None) from ``spec``: a .npy of inputs; a .npz with ``x`` (and ``y``); IDX images
    (gzipped or not) optionally followed by ``,LABELS`` (IDX labels); or a folder of images (sorted by
    name, read as grey or RGB by Pillow into [N, C, H, W]; labels from sub-folders named by class number)."""
    path, _, labels_path = spec.partition(",")
    if os.path.isdir(path):
        return _load_image_folder(path)
    if not os.path.exists(path):
        raise PfpcError(f"{path}: no such file")
    labels = None
    if path.endswith(".npy"):
        x = _load_npy(path)
    elif path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                if "x" not in data.files:
                    raise PfpcError(f"{path}: a set .npz needs an array 'x' (and 'y' for labels), it has {', '.join(data.files) or 'none'}")
                x, labels = data["x"], (data["y"] if "y" in data.files else None)
        except (OSError, ValueError) as err:
            raise PfpcError(f"{path}: not a readable .npz ({err})") from None
    else:
        x = read_idx(path)
    if labels_path:
        labels = read_idx(labels_path) if not labels_path.endswith(".npy") else _load_npy(labels_path)
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise PfpcError(f"{path}: expected [N, ...] real numbers, got shape {list(x.shape)} of {x.dtype}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(x) or labels.dtype.kind not in "iu":
            raise PfpcError(f"{labels_path or path}: expected {len(x)} integer labels, got shape {list(labels.shape)} of {labels.dtype}")
        labels = labels.astype(np.int64)
    return x, labels


def _load_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PfpcError(f"{path}: not a readable .npy ({err})") from None


def _load_image_folder(folder):
    try:
        from PIL import Image
    except ImportError:
        raise PfpcError(f"{folder}: reading a folder of images needs Pillow: pip install 'pfpc[eval]'") from None

    entries = sorted(os.listdir(folder))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    files = [(os.path.join(folder, e), None) for e in entries if e.lower().endswith(IMAGE_SUFFIXES)]
    for name in classes:
        if not name.isdigit():
            raise PfpcError(f"{folder}: sub-folder '{name}' is not a class number")
        files += [(os.path.join(folder, name, e), int(name)) for e in sorted(os.listdir(os.path.join(folder, name))) if e.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise PfpcError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("L" if image.mode in ("L", "1", "P", "I;16") else "RGB")))
        except OSError as err:
            raise PfpcError(f"{path}: not a readable image ({err})") from None
    if len({im.shape for im in images}) != 1:
        raise PfpcError(f"{folder}: images of different sizes {sorted({im.shape for im in images})[:3]}")
    x = np.stack(images)
    labelled = [label for _, label in files]
    if any(label is None for label in labelled) and any(label is not None for label in labelled):
        raise PfpcError(f"{folder}: images both at the top and in class sub-folders")
    x = (x[..., None] if x.ndim == 3 else x).transpose(0, 3, 1, 2)  # [N, C, H, W] like the models (--layout is for array files)
    return np.ascontiguousarray(x), (None if labelled[0] is None else np.array(labelled, np.int64))


def user_suite(test: str, ood: list[str], preprocess: Preprocess, limit: int | None = None) -> list[EvalSet]:
    """The user's in-distribution test set (``clean``, labelled) and named OOD sets (``NAME=PATH``)."""
    x, labels = load_array_set(test)
    if labels is None:
        raise PfpcError(f"{test}: the in-distribution test set needs labels (y in the .npz, ',LABELS' after IDX images, or class sub-folders)")
    if not ood:
        raise PfpcError("--test needs at least one --ood NAME=SET to measure out-of-distribution detection against")
    sets = [EvalSet("clean", preprocess.apply(x[:limit], test), labels[:limit], "id", f"in-distribution test set {test}")]
    for spec in ood:
        name, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", name) or name in {s.name for s in sets}:
            raise PfpcError(f"--ood {spec}: expected NAME=PATH with a new name of letters, digits, _ or -")
        x_ood, _ = load_array_set(path)
        sets.append(EvalSet(name, preprocess.apply(x_ood[:limit], path), None, "ood", f"out-of-distribution set {path}"))
    return sets
