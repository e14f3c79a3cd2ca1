"""Closed forms of E[softmax(l)], l ~ N(M, diag V), in float64 on the compiled PFP's logit moments of the
seed paper's two MNIST networks (MNIST test in distribution, Fashion-MNIST test out of distribution;
`examples/seed_mnist/moments.py` caches the moments): accuracy, NLL (log space), ECE and the OOD AUROC
by the log of the predictive entropy, against Monte Carlo over the same logit Gaussian with many draws
(the quantity the closed forms approximate) and on-device-style Gaussian logit sampling with S draws.

    python benchmarks/predictive_closed_forms.py [--nets mlp,lenet] [--draws 2000] [--trend] [--check]

The "converged" row is E[softmax(l)] itself (and the exact MI of the logit Gaussian), by importance sampling
tilted towards each class's tail (`tilted_reference`): accurate for the tiny minor-class probabilities that
plain Monte Carlo cannot resolve (`--check` compares it with 2,000,000 plain draws on a few rows).

Candidates (log q_k; p = q / sum q):
- meanfield_own (pfpc's `meanfield` until session 8): -LSE_j -(M_k - M_j) / sqrt(1 + pi V_k / 8)
- meanfield_pair: -LSE_j -(M_k - M_j) / sqrt(1 + pi (V_k + V_j) / 8)   (j = k gives 0; Lu, Ie & Sha's pairwise form)
- meanfield_pair_3/pi^2: the same with lambda = 3 / pi^2 instead of pi / 8
- laplace_bridge (Hobbhahn et al. 2022, with their sum-to-zero correction of the Gaussian):
  alpha_k = (1 - 2/K + e^{M_k} sum_j e^{-M_j} / K^2) / V_k; p = alpha / sum alpha
- conditional mean field: l_k integrated by Gauss-Hermite, the other classes by the probit rule given l_k
- unscented (sigma points): the mean softmax at M and M +- sqrt((K + kappa) V_k) e_k (weights kappa / (K + kappa),
  1 / (2 (K + kappa))): 2K + 1 softmaxes per row, deterministic
- sampling_S: the device's S draws (`numpy_standard_normal`)
- pairwise sigmoid, truncated at b std: the tail-exact pairwise bound E[min(1, e^d)] with d's Gaussian cut at
  mu +- b s (what S draws see of it, b ~ sqrt(2 log S)), combined as the mf2 rows
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "seed_mnist"))
sys.path.insert(0, ROOT)

from pfpc.evaluate import metrics  # noqa: E402
from pfpc.evaluate.metrics import _logsumexp, log_softmax  # noqa: E402


def meanfield(mean, var, pairwise, lam=np.pi / 8):
    scale_var = var[:, :, None] + (var[:, None, :] if pairwise else 0.0)
    exponent = -(mean[:, :, None] - mean[:, None, :]) / np.sqrt(1.0 + lam * scale_var)
    return log_softmax(-_logsumexp(exponent, 2))


def laplace_bridge(mean, var):
    """log alpha (Hobbhahn et al. 2022, eq. 11, after the sum-to-zero correction of their section 3.2)."""
    k = mean.shape[1]
    # correction: the logits' Gaussian projected onto sum_k l_k = 0 (diagonal part kept)
    mean = mean - mean.mean(1, keepdims=True)
    var = var * ((k - 2) / k) + var.sum(1, keepdims=True) / k**2
    log_sum = mean + _logsumexp(-mean, 1)[:, None] - 2 * np.log(k)  # log(e^{M_k} sum_j e^{-M_j} / K^2)
    log_alpha = np.logaddexp(np.log(1 - 2 / k), log_sum) - np.log(var)
    return log_alpha


def dirichlet_log_mi(log_alpha):
    """log (H[E p] - E H[p]) under Dir(alpha), by digamma (float64; not log-space exact)."""
    from scipy.special import digamma

    alpha = np.exp(np.minimum(log_alpha, 600.0))  # MI ~ (K - 1) / (2 alpha_0) is ~0 long before
    total = alpha.sum(1)
    p = alpha / total[:, None]
    expected = digamma(total + 1) - np.sum(p * digamma(alpha + 1), 1)
    return np.log(np.maximum(metrics.entropy(p) - expected, 1e-300))


def log_expected_sigmoid(mu, var, form):
    """log E[sigmoid(d)], d ~ N(mu, var), elementwise:
    - "logistic": the probit rule in sigmoid form, log sigmoid(mu / sqrt(1 + pi var / 8)) (logistic tails);
    - "gauss": the probit rule in Phi form, log Phi(lam mu / sqrt(1 + lam^2 var)), lam^2 = pi / 8 (E[Phi(lam d)]
      exactly: Gaussian tails in mu);
    - "bound": E[min(1, e^d)] for mu < 0 (sigmoid <= min(1, e^d) <= 2 sigmoid), mirrored for mu > 0:
      Phi(mu / s) + e^(mu + s^2 / 2) Phi(-(mu + s^2) / s)."""
    from scipy.special import log_ndtr

    lam2 = np.pi / 8
    if form == "logistic":
        return -np.logaddexp(0.0, -mu / np.sqrt(1 + lam2 * var))
    if form == "gauss":
        return log_ndtr(np.sqrt(lam2) * mu / np.sqrt(1 + lam2 * var))
    s = np.sqrt(np.maximum(var, 1e-300))
    neg = -np.abs(mu)
    log_lower = np.logaddexp(log_ndtr(neg / s), neg + var / 2 + log_ndtr(-(neg + var) / s))
    return np.where(mu <= 0, log_lower, np.log(-np.expm1(np.minimum(log_lower, -1e-300))))


def meanfield_pairwise_sigmoid(mean, var, form):
    """Lu, Ie & Sha's pairwise mean field with each pair's expected sigmoid:
    q_k = 1 / (2 - K + sum_{j != k} 1 / E[sigmoid(l_k - l_j)]), l_k - l_j ~ N(M_k - M_j, V_k + V_j);
    ``form`` a `log_expected_sigmoid` form or a number b (`log_expected_sigmoid_truncated`)."""
    k = mean.shape[1]
    gap, gap_var = mean[:, :, None] - mean[:, None, :], var[:, :, None] + var[:, None, :]
    log_sig = log_expected_sigmoid(gap, gap_var, form) if isinstance(form, str) else log_expected_sigmoid_truncated(gap, gap_var, form)
    off = ~np.eye(k, dtype=bool)
    log_inv = np.where(off[None], -log_sig, -np.inf)
    # log(2 - K + sum_j 1/E sigma) = log(1 + sum_j (1/E sigma - 1)), each term >= 0
    log_excess = np.where(off[None], log_inv + np.log(-np.expm1(np.minimum(log_sig, -1e-300))), -np.inf)
    return log_softmax(-np.logaddexp(0.0, _logsumexp(log_excess, 2)))


def conditional_meanfield(mean, var, nodes=4):
    """E[softmax_k] = E_x[ E[1 / (1 + sum_{j != k} e^(l_j - x))] | l_k = x ]: given l_k = x the pairs are
    independent; each by the probit rule, 1 / E[sigmoid(x - l_j)] - 1 ~ e^(-(x - M_j) / sqrt(1 + pi V_j / 8)),
    and x ~ N(M_k, V_k) by Gauss-Hermite quadrature with ``nodes`` nodes: K (K - 1) ``nodes`` exponentials."""
    t, w = np.polynomial.hermite.hermgauss(nodes)
    k = mean.shape[1]
    r = 1 / np.sqrt(1 + np.pi / 8 * var)
    x = mean[:, :, None] + np.sqrt(2 * var)[:, :, None] * t
    exponent = np.where(~np.eye(k, dtype=bool)[None, :, :, None], -(x[:, :, None, :] - mean[:, None, :, None]) * r[:, None, :, None], -np.inf)
    return log_softmax(_logsumexp(-np.logaddexp(0, _logsumexp(exponent, 2)) + np.log(w / np.sqrt(np.pi)), 2))


def tilted_reference(mean, var, draws, seed=0, chunk=500):
    """(log E[softmax(l)] [N, K], log MI [N]) of l ~ N(M, diag V) by importance sampling, c = argmax M.
    For a class j != c and d = l_j - l_c ~ N(mu, s^2), mu = M_j - M_c, s^2 = V_j + V_c, the draws are shifted
    by t V_j (l_j) and -t V_c (l_c), t = clip(-mu / s^2, 0, 1) (d's mean moved to min(mu + s^2, 0), where
    E[softmax_j] <= E[min(1, e^d)] gets its mass), and weighted by p/q = exp(-t (d - mu) + t^2 s^2 / 2):
    unbiased, with a relative error that does not grow with the gap (plain draws see a minor class's mass
    only once it exceeds ~1/S). Class c: plain draws. MI = sum_k E[softmax_k (log softmax_k - log pbar_k)],
    each class's term from its own draws (the c term as E[pbar_c phi(softmax_c / pbar_c)], phi(r) = r log r
    - r + 1, second order in the minor classes)."""
    n, k = mean.shape
    eps = np.random.default_rng(seed).standard_normal((draws, k))
    std, top = np.sqrt(var), mean.argmax(1)
    log_p, log_mi = np.empty_like(mean), np.empty(n)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        m, v, s, c = mean[rows], var[rows], std[rows], top[rows]
        at = np.arange(len(m))
        log_top = log_softmax(m[None] + s[None] * eps[:, None, :])[:, at, c]  # [S, n]
        log_pc = _logsumexp(log_top, 0) - np.log(draws)
        d = log_top - log_pc
        phi = np.where(np.abs(d) < 1e-3, d * d * (0.5 + d / 3 + d * d / 8), np.exp(d) * d - np.expm1(d))
        out = np.full_like(m, -np.inf)
        out[at, c] = log_pc
        log_terms = [np.log(np.maximum(np.exp(log_pc) * phi.mean(0), 1e-300))]
        for j in range(k):
            minor = c != j
            mu, s2 = m[:, j] - m[at, c], v[:, j] + v[at, c]
            t = np.clip(-mu / s2, 0.0, 1.0)
            shifted = m.copy()
            shifted[:, j] += t * v[:, j]
            shifted[at, c] -= t * v[at, c]
            z = shifted[None] + s[None] * eps[:, None, :]
            log_j = log_softmax(z)[:, :, j]
            log_weight = -t * (z[:, :, j] - z[:, at, c] - mu) + t * t * s2 / 2
            log_pj = _logsumexp(log_j + log_weight, 0) - np.log(draws)
            out[minor, j] = log_pj[minor]
            inner = np.mean(np.exp(log_j + log_weight - log_pj) * (log_j - log_pj), 0)
            log_terms.append(np.where(minor & (inner > 0), log_pj + np.log(np.maximum(inner, 1e-300)), -np.inf))
        log_p[rows] = log_softmax(out)  # sum to 1 (each class estimated separately)
        log_mi[rows] = _logsumexp(np.stack(log_terms), 0)
    return log_p, log_mi


def check_tilted(mean, var, reference, rows=6, draws=2_000_000, seed=5):
    """Max |log p| difference between `tilted_reference` and plain Monte Carlo with ``draws`` draws, over the
    classes whose probability plain draws resolve (> 1000 / draws), on ``rows`` random rows."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for r in rng.choice(len(mean), rows, replace=False):
        plain = np.full(mean.shape[1], -np.inf)
        for block in range(0, draws, 250_000):
            z = mean[r] + np.sqrt(var[r]) * rng.standard_normal((250_000, mean.shape[1]))
            plain = np.logaddexp(plain, _logsumexp(log_softmax(z), 0))
        plain -= np.log(draws)
        resolved = plain > np.log(1000 / draws)
        worst = max(worst, float(np.abs(plain - reference[r])[resolved].max()))
    return worst


def log_expected_sigmoid_truncated(mu, var, b):
    """log E[min(1, e^d)], d ~ N(mu, s^2) cut to mu +- b s and renormalised (mu <= 0; mirrored for mu > 0):
    P(0 < d < mu + b s) + e^(mu + s^2/2) (Phi((min(mu + b s, 0) - mu - s^2) / s) - Phi(-b - s))."""
    from scipy.special import log_ndtr

    def log_diff(a, b_):  # log(e^a - e^b_), a >= b_
        return a + np.log(-np.expm1(np.minimum(b_ - a, -1e-300)))

    s = np.sqrt(np.maximum(var, 1e-300))
    neg = -np.abs(mu)
    with np.errstate(all="ignore"):
        above = np.where(neg + b * s > 0, log_diff(np.full_like(neg, log_ndtr(b)), log_ndtr(-neg / s)), -np.inf)
        below = neg + var / 2 + log_diff(log_ndtr((np.minimum(neg + b * s, 0.0) - neg - var) / s), log_ndtr(-b - s))
    log_lower = np.minimum(np.logaddexp(above, below) - np.log(2 * np.exp(log_ndtr(b)) - 1), 0.0)
    return np.where(mu <= 0, log_lower, np.log(-np.expm1(np.minimum(log_lower, -1e-300))))


def sampled(mean, var, eps, chunk=500):
    """(log mean_s softmax, log MI) over draws eps [S, K]."""
    out, log_mi = np.empty_like(mean), np.empty(len(mean))
    std = np.sqrt(np.maximum(var, 0.0))
    for start in range(0, len(mean), chunk):
        rows = slice(start, start + chunk)
        log_p = log_softmax(mean[rows][None] + std[rows][None] * eps[:, None, :])
        out[rows] = _logsumexp(log_p, 0) - np.log(len(eps))
        log_mi[rows] = metrics.log_mutual_information(log_p)
    return out, log_mi


def unscented(mean, var, kappa):
    k = mean.shape[1]
    spread = np.sqrt((k + kappa) * var)
    points = [mean] + [mean + sign * spread * np.eye(k)[c] for c in range(k) for sign in (1.0, -1.0)]
    weights = np.array([kappa / (k + kappa)] + [1.0 / (2 * (k + kappa))] * (2 * k))
    log_p = np.stack([log_softmax(p) for p in points])
    if kappa == 0:
        log_p, weights = log_p[1:], weights[1:]
    return _logsumexp(log_p + np.log(weights)[:, None, None], 0)


def candidates(mean, var, draws):
    from pfpc.ops.predictive import numpy_standard_normal

    cache = os.path.join(ROOT, "examples", "seed_mnist", "generated", f"logit_mc_{len(mean)}_{draws}_{float(mean[0, 0])!r}.npz")
    if not os.path.exists(cache):
        rng = np.random.default_rng(0)
        np.savez(cache, *sampled(mean, var, rng.standard_normal((draws, mean.shape[1]))))
    reference, reference_mi = np.load(cache)["arr_0"], np.load(cache)["arr_1"]
    rows = {f"Monte Carlo, {draws} Gaussian logit draws (reference)": (reference, reference_mi)}
    tilted = os.path.join(ROOT, "examples", "seed_mnist", "generated", f"logit_tilted_{len(mean)}_256_{float(mean[0, 0])!r}.npz")
    if not os.path.exists(tilted):
        np.savez(tilted, *tilted_reference(mean, var, 256))
    rows["converged E[softmax]: tilted importance sampling, 256 draws per class"] = (np.load(tilted)["arr_0"], np.load(tilted)["arr_1"])
    rows["meanfield_own (pi/8)"] = (meanfield(mean, var, False), None)
    rows["meanfield_pair (pi/8)"] = (meanfield(mean, var, True), None)
    rows["meanfield_pair (3/pi^2)"] = (meanfield(mean, var, True, 3 / np.pi**2), None)
    rows["meanfield_own (3/pi^2)"] = (meanfield(mean, var, False, 3 / np.pi**2), None)
    for form in ("logistic", "gauss", "bound"):
        rows[f"pairwise sigmoid, mf2 combination, {form}"] = (meanfield_pairwise_sigmoid(mean, var, form), None)
    for b in (2.0, 3.0, 4.0, 5.0):
        rows[f"pairwise sigmoid, mf2 combination, bound truncated at {b:g} std"] = (meanfield_pairwise_sigmoid(mean, var, b), None)
    rows["conditional mean field, 4 Gauss-Hermite nodes"] = (conditional_meanfield(mean, var), None)
    log_alpha = laplace_bridge(mean, var)
    rows["laplace_bridge (Dirichlet MI)"] = (log_softmax(log_alpha), dirichlet_log_mi(log_alpha))
    for kappa in (0.0, 1.0):
        rows[f"unscented, kappa={kappa:g} ({2 * mean.shape[1] + (kappa > 0)} points)"] = (unscented(mean, var, kappa), None)
    for s in (16, 64):
        rows[f"sampling, {s} device draws"] = sampled(mean, var, numpy_standard_normal(s, mean.shape[1]))
    return rows, reference


def draws_trend(mean, var, n, counts=(16, 64, 256, 1024), seeds=2):
    """OOD AUROC by the log entropy of S-draw Monte Carlo over the logit Gaussian, per S (mean and range
    over ``seeds`` generators): how the ranking moves as the estimate converges to E[softmax]."""
    std = np.sqrt(np.maximum(var, 0.0))
    rows = []
    for count in counts:
        values = []
        for seed in range(seeds if count < max(counts) else 1):
            rng = np.random.default_rng(100 + seed)
            log_p = np.empty_like(mean)
            chunk = 250 if count <= 1024 else max(10, 256_000 // count)  # 250: the stream of the earlier results
            for start in range(0, len(mean), chunk):
                rows_ = slice(start, start + chunk)
                draws = log_softmax(mean[rows_][None] + std[rows_][None] * rng.standard_normal((count,) + mean[rows_].shape))
                log_p[rows_] = _logsumexp(draws, 0) - np.log(count)
            h = metrics.log_entropy(log_p)
            values.append(metrics.auroc(h[:n], h[n:]))
        rows.append((count, np.mean(values), min(values), max(values), len(values)))
    return rows


def main(argv=None) -> int:
    from moments import pfp_moments

    from build_models import DEFAULT_DATA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="mlp,lenet")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--trend", action="store_true", help="only the AUROC of S-draw Monte Carlo per S (`draws_trend`)")
    parser.add_argument("--counts", default="16,64,256,1024", help="--trend: the draw counts S")
    parser.add_argument("--check", action="store_true", help="only `check_tilted` against 2,000,000 plain draws")
    parser.add_argument("--out", default=os.path.join(ROOT, "examples", "seed_mnist", "generated"))
    args = parser.parse_args(argv)
    if args.trend:
        print("| network | Gaussian logit draws S | AUROC log entropy: mean | min – max | generators |\n|---|---:|---:|---:|---:|")
        for net in args.nets.split(","):
            mean, var, _, n = pfp_moments(net, args.data, args.out)
            for count, average, low, high, seeds in draws_trend(mean, var, n, tuple(int(c) for c in args.counts.split(","))):
                print(f"| {net} | {count} | {average:.4f} | {low:.4f} – {high:.4f} | {seeds} |", flush=True)
        return 0
    if args.check:
        for net in args.nets.split(","):
            mean, var, _, _ = pfp_moments(net, args.data, args.out)
            worst = check_tilted(mean, var, tilted_reference(mean, var, 256)[0])
            print(f"{net}: tilted importance sampling (256 draws per class) vs 2,000,000 plain draws, 6 random rows, "
                  f"classes above 1000 / 2,000,000: max |log p difference| {worst:.3f}", flush=True)
        return 0
    print("| network | E[softmax] by | accuracy | NLL | ECE | AUROC log entropy | AUROC log MI | max abs p error vs reference | "
          "median log-entropy error vs reference (MNIST / Fashion) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for net in args.nets.split(","):
        mean, var, y, n = pfp_moments(net, args.data, args.out)
        rows, reference = candidates(mean, var, args.draws)
        reference_entropy = metrics.log_entropy(reference)
        for name, (log_p, log_mi) in rows.items():
            p = np.exp(log_p)
            h = metrics.log_entropy(log_p)
            err = h - reference_entropy
            mi = "–" if log_mi is None else f"{metrics.auroc(log_mi[:n], log_mi[n:]):.4f}"
            print(f"| {net} | {name} | {100 * metrics.accuracy(p[:n], y):.2f} % | {metrics.nll(p[:n], y, log_p[:n]):.4f} | "
                  f"{metrics.ece(p[:n], y):.4f} | {metrics.auroc(h[:n], h[n:]):.4f} | {mi} | {np.abs(p - np.exp(reference)).max():.3f} | "
                  f"{np.median(err[:n]):+.2f} / {np.median(err[n:]):+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
