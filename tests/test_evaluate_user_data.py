"""`pfpc evaluate` on the user's own data: any input shape and class count, an in-distribution
test set and named OOD sets from .npy/.npz/IDX, preprocessing on the command line, the
threshold table and its #defines; NLL in log space, risk-coverage and thresholds against
hand-worked cases, scikit-learn and a float64 log-sum-exp reference."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from onnx import helper

from helpers import make_model
from pfpc.cli import main
from pfpc.evaluate import metrics


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as handle:
        handle.write(data)


def _classifier(tmp_path, input_shape, classes, seed):
    """Flatten + Gemm with a dynamic batch; a posterior with sizeable stds; saved as files."""
    rng = np.random.default_rng(seed)
    features = int(np.prod(input_shape))
    inits = {"w": (rng.standard_normal((features, classes)) / np.sqrt(features) * 3).astype(np.float32),
             "b": rng.standard_normal(classes).astype(np.float32)}
    model = make_model([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["y"])],
                       [("x", ["N"] + list(input_shape))], ["y"], inits)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "post.npz", **{"w.std": np.full(inits["w"].shape, 0.05, np.float32), "b.std": np.full(classes, 0.3, np.float32)})
    return str(path), str(tmp_path / "post.npz"), inits


def test_three_classes_with_npz_test_set_and_npy_ood_set(tmp_path, capsys):
    model, post, inits = _classifier(tmp_path, [6], 3, 0)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 10, (40, 6)).astype(np.float32)
    logits = ((x * 0.1 - 0.5) / 2.0) @ inits["w"] + inits["b"]
    np.savez(tmp_path / "test.npz", x=x, y=logits.argmax(1))
    np.save(tmp_path / "far.npy", rng.uniform(200, 300, (30, 6)).astype(np.float32))
    header_dir = tmp_path / "compiled"
    assert main([model, "--posterior", post, "--batch", "1", "-o", str(header_dir), "--outputs", "probs,entropy"]) == 0
    code = main(["evaluate", model, "--posterior", post, "--samples", "4", "--quiet", "--test", str(tmp_path / "test.npz"),
                 "--ood", f"far={tmp_path / 'far.npy'}", "--scale", "0.1", "--mean", "0.5", "--std", "2",
                 "--save-preprocess", str(tmp_path / "preprocess.json"), "--thresholds-into", str(header_dir)])
    out = capsys.readouterr().out
    assert code == 0
    # the preprocessing reached the model: the deterministic network classifies its own argmax labels
    assert "| clean | deterministic | 1.0000 |" in out
    assert "far rejected" in out and "risk at 95 %" in out
    header = (header_dir / "pfp_model.h").read_text()
    defines = [line for line in header.splitlines() if "_ABSTAIN_ENTROPY_COV" in line]
    assert len(defines) == 3 and defines[0].startswith("#define PFP_MODEL_ABSTAIN_ENTROPY_COV99 ")
    assert '"scale": 0.1' in (tmp_path / "preprocess.json").read_text()


def test_28x28_model_with_idx_test_set_and_idx_ood_set(tmp_path, capsys):
    model, post, _ = _classifier(tmp_path, [1, 28, 28], 4, 2)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (24, 28, 28), dtype=np.uint8)
    _write_idx(str(tmp_path / "images.gz"), images)
    _write_idx(str(tmp_path / "labels"), rng.integers(0, 4, 24).astype(np.uint8))
    _write_idx(str(tmp_path / "ood-images"), 255 - images)
    code = main(["evaluate", model, "--posterior", post, "--samples", "4", "--quiet", "--test", f"{tmp_path / 'images.gz'},{tmp_path / 'labels'}",
                 "--ood", f"inverted={tmp_path / 'ood-images'}", "--scale", str(1 / 255)])
    out = capsys.readouterr().out
    assert code == 0 and "inverted rejected" in out


def test_digits_suite_on_a_three_class_model_is_a_one_line_error(tmp_path, capsys):
    model, post, _ = _classifier(tmp_path, [64], 3, 4)
    code = main(["evaluate", model, "--posterior", post, "--samples", "4", "--quiet", "--limit", "20"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "3 classes" in err and len(err.splitlines()) == 1


def test_nll_in_log_space_with_extreme_logits():
    """Logits of +-1000: the probability of the label underflows to 0 in float64, its log does not."""
    logits = np.array([[1000.0, -1000.0, 0.0], [5.0, 1.0, -2.0], [-800.0, 800.0, 0.0]])
    labels = np.array([1, 0, 0])
    prediction = metrics.from_logits(logits)
    # float64 log-sum-exp written here: log p_y = l_y - (max l + log sum exp(l - max l))
    shift = logits.max(1)
    reference = -np.mean(logits[np.arange(3), labels] - (shift + np.log(np.exp(logits - shift[:, None]).sum(1))))
    assert metrics.nll(prediction.probs, labels, prediction.log_probs) == pytest.approx(reference, rel=1e-12)
    assert reference > 600  # the old 2.2e-16 floor would have reported (2 * 36.04 + 0.02) / 3
    # and from samples: log of the mean softmax over S draws, against log-sum-exp over the draws
    samples = np.stack([logits, logits + np.array([0.0, 2000.0, 0.0])])
    pred = metrics.from_logit_samples(samples, gaussian_samples=2)
    per_draw = samples - (samples.max(2, keepdims=True) + np.log(np.exp(samples - samples.max(2, keepdims=True)).sum(2, keepdims=True)))
    picked = per_draw[:, np.arange(3), labels]
    expected = -np.mean(np.logaddexp(picked[0], picked[1]) - np.log(2))
    assert metrics.nll(pred.probs, labels, pred.log_probs) == pytest.approx(expected, rel=1e-12)


def test_nll_matches_scikit_learn_where_no_clipping_applies():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(5)
    logits = rng.standard_normal((50, 4))
    labels = rng.integers(0, 4, 50)
    prediction = metrics.from_logits(logits)
    assert metrics.nll(prediction.probs, labels, prediction.log_probs) == pytest.approx(log_loss(labels, prediction.probs, labels=range(4)), rel=1e-9)


def test_thresholds_and_risk_coverage_hand_worked():
    scores_in = np.array([0.1, 0.4, 0.2, 0.9, 0.3, 0.5, 0.6, 0.7, 0.8, 0.05])
    # 90 % of 10 = 9 accepted: the 9th smallest score; 99 %: ceil(9.9) = 10th
    assert metrics.coverage_threshold(scores_in, 0.90) == 0.8
    assert metrics.coverage_threshold(scores_in, 0.99) == 0.9
    probs = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]]
    labels = np.array([0, 1, 2, 1, 1, 2, 0, 1, 0, 0])  # wrong at inputs 3 (score 0.9) and 8 (0.8)
    curve = dict(metrics.risk_coverage(probs, labels, scores_in, (1.0, 0.9, 0.8, 0.5)))
    assert curve == {1.0: 0.2, 0.9: 1 / 9, 0.8: 0.0, 0.5: 0.0}


def test_image_folder_and_preprocessing(tmp_path):
    """Class sub-folders give the labels; images come as [N, C, H, W]; per-channel mean/std; errors are one line."""
    from PIL import Image

    from pfpc.errors import PfpcError
    from pfpc.evaluate.datasets import Preprocess, load_array_set

    rng = np.random.default_rng(6)
    pixels = {}
    for label in (0, 2):
        (tmp_path / str(label)).mkdir()
        for index in range(2):
            image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / str(label) / f"{index}.png")
            pixels[(label, index)] = image
    x, labels = load_array_set(str(tmp_path))
    assert x.shape == (4, 3, 5, 7) and labels.tolist() == [0, 0, 2, 2]
    np.testing.assert_array_equal(x[2], pixels[(2, 0)].transpose(2, 0, 1))
    spec = Preprocess(scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    expected = (x.astype(np.float64) * 0.5 - np.array([1.0, 2.0, 3.0])[:, None, None]) / np.array([2.0, 4.0, 8.0])[:, None, None]
    np.testing.assert_allclose(spec.apply(x, "set"), expected, rtol=1e-6)
    with pytest.raises(PfpcError, match="2/1 values per channel"):
        Preprocess(mean=(1.0, 2.0)).apply(x, "set")
