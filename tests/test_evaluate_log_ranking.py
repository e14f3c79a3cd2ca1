"""`pfpc evaluate` ranks and thresholds entropy and mutual information by their log-space twins:
hand-built inputs whose float64 entropy / MI round to ties (logit gaps beyond float64's exp range),
AUROCs against scikit-learn's roc_auc_score on an independent ordering (the logit gap; MI in
mpmath at 60 digits), and the threshold #defines for the log scores."""

from __future__ import annotations

import numpy as np
import pytest

from pfpc.evaluate import Evaluation, metrics, summarize
from pfpc.evaluate.datasets import EvalSet
from pfpc.evaluate.report import threshold_defines


def _sets(clean, ood):
    return [EvalSet("clean", np.zeros((clean, 1)), np.zeros(clean, np.int64), "id", ""), EvalSet("far", np.zeros((ood, 1)), None, "ood", "")]


def test_entropy_auroc_and_thresholds_rank_ties_in_log_space():
    from sklearn.metrics import roc_auc_score

    # two classes, logits [0, -gap]: the entropy falls with the gap; gaps of 800 and more make
    # p_minor = 0 in float64, so -sum p log p ties those inputs at exactly 0
    gaps_clean, gaps_ood = np.array([900.0, 5.0, 1000.0, 3.0]), np.array([800.0, 1.0])
    logits = np.stack([np.zeros(6), -np.concatenate([gaps_clean, gaps_ood])], 1)
    prediction = metrics.from_logits(logits)
    assert np.count_nonzero(prediction.entropy == 0) == 3  # the ties the log scores remove
    evaluation = summarize(Evaluation("m", 0, _sets(4, 2), {"deterministic": {"clean": prediction.subset(slice(0, 4)),
                                                                              "far": prediction.subset(slice(4, 6))}}))
    truth = np.r_[np.zeros(4), np.ones(2)]
    exact = roc_auc_score(truth, -np.concatenate([gaps_clean, gaps_ood]))  # higher entropy = smaller gap
    tied = roc_auc_score(truth, prediction.entropy)
    assert exact != tied
    assert evaluation.auroc[("deterministic", "entropy", "far")] == pytest.approx(exact, abs=1e-12)
    # coverage c of the clean set accepted: the ceil(4 c)-th smallest log entropy; exp of it for the entropy
    for coverage in metrics.COVERAGES:
        log_threshold, rejected = evaluation.thresholds[("deterministic", "log_entropy", coverage)]
        accepted = int(np.ceil(coverage * 4))
        gap = np.sort(gaps_clean)[::-1][accepted - 1]  # the accepted-th largest gap = accepted-th smallest entropy
        # H of [0, -gap] = log(1 + e^-g) + g e^-g / (1 + e^-g); its log for large g: log(1 + g) - g
        assert log_threshold == pytest.approx(np.log1p(gap) - gap if gap > 50 else np.log(np.log1p(np.exp(-gap)) + gap * np.exp(-gap) / (1 + np.exp(-gap))), rel=1e-9)
        assert rejected["far"] == np.mean(gaps_ood < gap)
        threshold, _ = evaluation.thresholds[("deterministic", "entropy", coverage)]
        assert threshold == pytest.approx(np.exp(log_threshold), rel=1e-12)


def test_mutual_information_auroc_against_mpmath():
    """MI of two equally weighted draws per input, [0, -a] and [0, -b]: ties at 0 in float64 for large
    gaps; ranked in log space as mpmath ranks the exact MI."""
    import mpmath
    from sklearn.metrics import roc_auc_score

    mpmath.mp.dps = 60
    pairs = [(800.0, 900.0), (1.0, 1.5), (760.0, 1000.0), (900.0, 905.0), (2.0, 30.0), (850.0, 1200.0)]
    samples = np.array([[[0.0, -a] for a, _ in pairs], [[0.0, -b] for _, b in pairs]])
    prediction = metrics.from_logit_samples(samples, gaussian_samples=2)

    def exact_mi(a, b):
        def h(p):
            return -sum(q * mpmath.log(q) for q in p if q > 0)
        p = [[1 / (1 + mpmath.exp(-g)), mpmath.exp(-g) / (1 + mpmath.exp(-g))] for g in (a, b)]
        mean = [(p[0][k] + p[1][k]) / 2 for k in range(2)]
        return h(mean) - (h(p[0]) + h(p[1])) / 2

    log_mi = np.array([float(mpmath.log(exact_mi(a, b))) for a, b in pairs])
    truth = np.array([0, 0, 0, 1, 1, 1])
    assert np.count_nonzero(prediction.mutual_information == 0) >= 3
    evaluation = summarize(Evaluation("m", 0, _sets(3, 3), {"svi": {"clean": prediction.subset(slice(0, 3)), "far": prediction.subset(slice(3, 6))}}))
    assert roc_auc_score(truth, log_mi) != roc_auc_score(truth, prediction.mutual_information)
    assert evaluation.auroc[("svi", "mutual_information", "far")] == pytest.approx(roc_auc_score(truth, log_mi), abs=1e-12)
    np.testing.assert_allclose(prediction.log_mutual_information, log_mi, rtol=1e-9)


def test_threshold_defines_for_log_scores_are_c_floats():
    logits = np.stack([np.zeros(4), -np.array([900.0, 800.0, 950.0, 3.0])], 1)
    prediction = metrics.from_logits(logits)
    evaluation = summarize(Evaluation("m", 0, _sets(2, 2), {"pfp": {"clean": prediction.subset(slice(0, 2)), "far": prediction.subset(slice(2, 4))}}))
    defines = dict(line.split()[1:] for line in threshold_defines(evaluation))
    # the clean entropies underflow float32 (e^-800): 0.0f, a valid C literal; the log ones keep the order
    assert defines["{UPPER}_ABSTAIN_ENTROPY_COV99"] == "0.0f"
    assert float(defines["{UPPER}_ABSTAIN_LOG_ENTROPY_COV99"].rstrip("f")) == pytest.approx(np.log1p(800.0) - 800.0, rel=1e-6)
    assert all(value.endswith("f") and ("." in value or "e" in value) for value in defines.values())
