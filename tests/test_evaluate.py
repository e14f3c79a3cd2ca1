"""`pfpc evaluate` and `pfpc verify --per-layer`: metric functions against independent
computations (hand-worked examples, loops, direct formulas), the dirty-digits suite, the CLI
end to end on a small subset."""

from __future__ import annotations

import gzip
import os

import numpy as np
import onnxruntime as ort
import pytest

from pfpc.cli import main
from pfpc.errors import PfpcError
from pfpc.evaluate import datasets, metrics

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
MLP, MLP_POST = os.path.join(EXAMPLES, "mlp", "model.onnx"), os.path.join(EXAMPLES, "mlp", "post.npz")


def _random_probs(rng, n, k):
    logits = 3 * rng.standard_normal((n, k))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_ece_hand_worked():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.35 (wrong) with 15 bins:
    # bin (13/15, 14/15]: acc 0.5, conf 0.9 -> 2/4 * 0.4; bin (8/15, 9/15]: 1 vs 0.6 -> 1/4 * 0.4;
    # bin (5/15, 6/15]: 0 vs 0.35 -> 1/4 * 0.35.  ECE = 0.2 + 0.1 + 0.0875 = 0.3875
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.35, 0.325, 0.325]])
    labels = np.array([0, 1, 1, 2])
    assert metrics.ece(probs, labels) == pytest.approx(0.3875, abs=1e-12)


def test_ece_matches_a_loop_over_bins():
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, 500, 10)
    labels = rng.integers(0, 10, 500)
    confidence, predicted = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = [i for i in range(500) if (lo < confidence[i] <= hi) or (b == 0 and confidence[i] == 0)]
        if inside:
            acc = np.mean([predicted[i] == labels[i] for i in inside])
            conf = np.mean([confidence[i] for i in inside])
            total += len(inside) / 500 * abs(acc - conf)
    assert metrics.ece(probs, labels) == pytest.approx(total, abs=1e-12)


def test_nll_brier_accuracy_entropy_against_formulas():
    rng = np.random.default_rng(1)
    probs = _random_probs(rng, 50, 4)
    labels = rng.integers(0, 4, 50)
    onehot = np.eye(4)[labels]
    assert metrics.nll(probs, labels) == pytest.approx(-np.mean(np.log(probs[np.arange(50), labels])), rel=1e-9)
    assert metrics.brier(probs, labels) == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, 1)), rel=1e-9)
    assert metrics.accuracy(probs, labels) == np.mean(probs.argmax(1) == labels)
    assert metrics.entropy(np.array([[0.5, 0.5, 0.0]]))[0] == pytest.approx(np.log(2))


def test_auroc_is_the_probability_an_ood_score_beats_an_id_score():
    rng = np.random.default_rng(2)
    scores_in, scores_out = rng.normal(0, 1, 40), rng.normal(1, 1, 30)
    wins = sum((o > i) + 0.5 * (o == i) for o in scores_out for i in scores_in)
    assert metrics.auroc(scores_in, scores_out) == pytest.approx(wins / (40 * 30))


def test_predictive_summaries_against_loops():
    rng = np.random.default_rng(3)
    samples = rng.normal(0, 2, (7, 5, 3))
    pred = metrics.from_logit_samples(samples)
    for n in range(5):
        per_sample = [np.exp(s) / np.exp(s).sum() for s in samples[:, n]]
        mean = np.mean(per_sample, 0)
        entropy = -np.sum(mean * np.log(mean))
        expected = np.mean([-np.sum(p * np.log(p)) for p in per_sample])
        assert pred.probs[n] == pytest.approx(mean)
        assert pred.mutual_information[n] == pytest.approx(entropy - expected)
        assert pred.logit_var[n] == pytest.approx(np.mean(np.var(samples[:, n], axis=0, ddof=1)))
    mean, var = rng.normal(0, 2, (5, 3)), rng.uniform(0, 4, (5, 3))
    pfp = metrics.from_logit_moments(mean, var, samples=20000, seed=0)
    scaled = mean / np.sqrt(1 + np.pi * var / 8)
    np.testing.assert_allclose(pfp.probs, np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True), rtol=1e-12)
    # the sampled expected entropy converges to E[H[softmax(l)]], l ~ N(mean, var): check by a
    # second, independent set of draws
    draws = mean + np.sqrt(var) * np.random.default_rng(9).standard_normal((20000, 5, 3))
    p = np.exp(draws) / np.exp(draws).sum(-1, keepdims=True)
    np.testing.assert_allclose(pfp.expected_entropy, (-(p * np.log(p)).sum(-1)).mean(0), atol=0.01)
    deterministic = metrics.from_logit_moments(mean, np.zeros_like(var), samples=10)
    np.testing.assert_allclose(deterministic.mutual_information, 0, atol=1e-12)


def test_suite_is_deterministic_and_made_as_documented():
    first, second = datasets.default_suite(), datasets.default_suite()
    for a, b in zip(first, second):
        assert a.name == b.name and np.array_equal(a.x, b.x)
    sets = {s.name: s for s in first}
    _, _, x_test, y_test = datasets.load_digits_split(flatten=True)
    assert np.array_equal(sets["clean"].x, x_test) and np.array_equal(x_test[:4], np.load(os.path.join(EXAMPLES, "mlp", "sample.npy")))
    amb = sets["ambiguous"]
    half = len(amb.x) // 2
    assert np.array_equal(amb.x[:half], amb.x[half:]) and np.all(amb.labels[:half] != amb.labels[half:])
    np.testing.assert_array_equal(sets["inverted"].x, 1 - x_test)
    np.testing.assert_array_equal(sets["rotated"].x[0].reshape(8, 8), np.rot90(x_test[0].reshape(8, 8)))
    assert all(s.x.dtype == np.float32 and s.x.min() >= 0 and s.x.max() <= 1 for s in first)
    held = {s.name: s for s in datasets.default_suite(ood_classes=[8, 9])}
    assert not np.isin(held["clean"].labels, [8, 9]).any() and len(held["held_out_classes"].x) == np.isin(y_test, [8, 9]).sum()
    with pytest.raises(PfpcError, match="two clean images of two classes"):
        datasets.build_suite(x_test[:5], np.zeros(5, np.int64))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_downsampled_like_the_digits(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 4:24, 9:19] = 255  # a filled 20 x 10 bar: fills the middle half of the 32 x 32 box
    images[1, 10:12, 3:25] = 200  # a 2 x 22 horizontal stroke
    _write_idx(tmp_path / "img.gz", images)
    _write_idx(tmp_path / "lab.gz", np.array([1, 7]))
    x, labels = datasets.load_idx_digits(str(tmp_path / "img.gz"), str(tmp_path / "lab.gz"))
    assert labels.tolist() == [1, 7] and x.shape == (2, 64)
    bar = x[0].reshape(8, 8)
    np.testing.assert_array_equal(bar[:, 2:6], 1.0)  # 16 columns of 32 = block columns 2..5
    np.testing.assert_array_equal(bar[:, [0, 1, 6, 7]], 0.0)
    stroke = x[1].reshape(8, 8)
    # scaled by 32/22 to 3 x 32 pixels at rows 14..16 (centred): block row 3 gets 2 rows, row 4 one
    np.testing.assert_array_equal(stroke.sum(1), [0, 0, 0, 2 * 32 / 16, 32 / 16, 0, 0, 0])
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(PfpcError, match="not an IDX file"):
        datasets.read_idx(str(tmp_path / "bad"))


def test_evaluate_cli_end_to_end(tmp_path, capsys):
    report = tmp_path / "report"
    code = main(["evaluate", MLP, "--posterior", MLP_POST, "--samples", "8", "--limit", "24", "--report", str(report), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("mlp.md", "mlp_reliability.png", "mlp_scores.png"):
        assert (report / name).stat().st_size > 0
    text = (report / "mlp.md").read_text()
    assert "## Targets" in text and "| clean | PFP |" in text and "pfpc evaluate" in text
    # the deterministic row is onnxruntime's mean network, computed here independently
    x = datasets.load_digits_split(flatten=True)[2][:24]
    y = datasets.load_digits_split(flatten=True)[3][:24]
    logits = ort.InferenceSession(MLP, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    accuracy = np.mean(logits.argmax(1) == y)
    assert f"| clean | deterministic | {accuracy:.4f} |" in out


def test_evaluate_pfp_matches_the_reference_and_svi_matches_sampling():
    from pfpc.evaluate import evaluate

    import reference
    import onnx

    sets = datasets.default_suite(limit=12)
    evaluation = evaluate(MLP, MLP_POST, samples=400, sets=sets, progress=False)
    x = np.concatenate([s.x for s in sets])
    post = dict(np.load(MLP_POST))
    variances = {k[:-4]: v.astype(np.float64) ** 2 for k, v in post.items()}
    mean, var = reference.pfp_onnx(onnx.load(MLP), variances, {"input": x})["logits"]
    pfp = np.concatenate([evaluation.predictions["pfp"][s.name].probs for s in sets])
    # the generated C's probabilities by the default output stage (mean-field), from the reference's moments
    np.testing.assert_allclose(pfp, np.exp(metrics.meanfield_log_probs(mean, var)), atol=1e-4)
    mc_mean, mc_var, _ = reference.monte_carlo(onnx.load(MLP), {k[:-4]: v for k, v in post.items()}, {"input": x}, 400, seed=7)["logits"]
    svi_var = np.concatenate([evaluation.predictions["svi"][s.name].logit_var for s in sets])
    # sample variances from two independent 400-sample runs: agree to about 2 * sqrt(2 / 400) = 14 %
    assert np.median(np.abs(svi_var / mc_var.mean(1) - 1)) < 0.15


def test_evaluate_needs_matplotlib_for_the_report(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code = main(["evaluate", MLP, "--posterior", MLP_POST, "--report", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "matplotlib" in err and "pfpc[eval]" in err and len(err.splitlines()) == 1


def test_verify_per_layer_on_the_mlp(capsys):
    assert main(["verify", MLP, "--posterior", MLP_POST, "--per-layer", "--digits", "2", "--samples", "600"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [r.split("|")[2].strip() for r in rows] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]


def test_per_layer_first_layer_is_exact_within_monte_carlo_noise():
    """A linear layer on deterministic inputs is exactly Gaussian: its per-layer error must be MC noise."""
    from pfpc.frontends.onnx_model import load_model
    from pfpc.frontends.posterior import load_posterior
    from pfpc.verify import per_layer

    x = datasets.load_digits_split(flatten=True)[2][:6]
    model = load_model(MLP, len(x))
    rows = per_layer(model, load_posterior(model, MLP_POST), {"input": x}, 800, seed=3)
    first = rows[0]
    assert first["op"] == "Gemm"
    assert first["var_rel_err_median"] < 2 * first["mc_var_rel_stderr_median"]
    assert abs(first["var_ratio_median"] - 1) < 2 * first["mc_var_rel_stderr_median"]
    assert first["mean_z_max"] < 5
    # the logits: the diagonal PFP drops the hidden layers' covariance, so it claims less spread
    # than sampling (README: 20 % below Monte Carlo, median), and the ratio says which side
    last = rows[-1]
    assert last["var_ratio_median"] < 1 - last["mc_var_rel_stderr_median"]
    assert abs(last["var_ratio_median"] - 1) <= last["var_rel_err_median"] + 1e-12
