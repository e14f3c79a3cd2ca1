"""Where the seed networks' output uncertainty is lost, in float64: (a) the covariance the PFP drops
(between the hidden units of the dense tail, and across the logits), (b) the output stage's
approximation of E[softmax(l)], (c) float32 underflow and ties of the on-device scores.

    PYTHONPATH=. nice -n 10 python benchmarks/logit_covariance.py [--draws 1000] [--lenet-images 1000]

Reference: Monte Carlo over the weights in float64 (NumPy; whole draws of the posterior).
  MLP 784-100-100-10: all 10,000 MNIST + 10,000 Fashion-MNIST test images; each dense layer's
  outputs sampled given its sampled inputs (local reparameterisation: with independent weights
  this is the exact joint distribution of the logits of each image), ``--draws`` draws; the NLL's
  few dominant images get ``--tail-draws`` more (log-mean-exp over all draws: the NLL converges
  from above, so 100 or 1000 draws overstate it).
  LeNet-5: the first ``--lenet-images`` images of each set, whole weight draws (torch, float64).
Moments compared (all float64):
  diagonal    today's PFP (mean and variance per unit; tests/reference.py's operators)
  logit-cov   the same hidden moments, plus the logits' KxK covariance the last dense layer
              creates from its shared inputs: Cov(l) = W diag(var h) W^T + diag(sum_k s2_ik E[h_k^2] + s2_b)
  tail-cov    the full covariance carried through the dense tail: Cov(a) = W Cov(h) W^T + diag(...)
              at each dense layer, ReLU's cross-covariance linearised, Cov(relu a_i, relu a_j)
              = Phi(m_i / s_i) Phi(m_j / s_j) Cov(a_i, a_j), its variance exact
  MC-diag / MC-full  MC's own logit mean with its diagonal / full covariance (Gaussian logits)
Output stages: Gaussian logit draws (``--draws``, float64, the reference for every closed form);
mean-field with the class's own variance (today's default), with var_k + var_j, and with the
pairwise difference variance var_k + var_j - 2 cov_kj. Scores: entropy of p, mutual information
H[p] - mean_s H[softmax(l_s)], both exact in float64 log space (`pfpc.evaluate.metrics.log_entropy`,
`log_mutual_information`); the last column is the AUROC of the float64 -sum p log p, whose rounding
ties confident inputs (p_top rounds to 1) the way float32 does at larger gaps. Variance ratio:
median over images and classes of PFP / MC.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.special import ndtr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "examples", "seed_mnist")]

import reference as R  # noqa: E402
from build_models import DEFAULT_DATA, build  # noqa: E402
from data import load  # noqa: E402
from pfpc.evaluate import metrics  # noqa: E402


def layers_of(model_path, post_path):
    """[(name, mean, std)] of every initializer, in the ONNX file's order."""
    model, post = onnx.load(model_path), np.load(post_path)
    return {i.name: (numpy_helper.to_array(i).astype(np.float64), post[i.name + ".std"].astype(np.float64)) for i in model.graph.initializer}


MLP = (("input_layer", True), ("hidden_layers.0", True), ("out_layer", False))
LENET_DENSE = (("fc1", True), ("fc2", True), ("fc3", False))


# ---------------------------------------------------------------- moments of the dense tail

def dense_diag(mean, var, w, b):
    return R.linear(mean, var, w[0], w[1] ** 2, b[0], b[1] ** 2)


def relu_cov(mean, cov):
    """ReLU of correlated Gaussians: exact marginal mean/variance, linearised cross-covariance."""
    var = np.einsum("nii->ni", cov)
    out_mean, out_var = R.relu(mean, var)
    slope = ndtr(mean / np.sqrt(np.maximum(var, 1e-300)))
    out_cov = slope[:, :, None] * cov * slope[:, None, :]
    idx = np.arange(cov.shape[1])
    out_cov[:, idx, idx] = out_var
    return out_mean, out_cov


def dense_cov(mean, cov, w, b):
    """Cov(W h + b) for independent Gaussian weights and inputs with covariance ``cov``."""
    (wm, ws), (bm, bs) = w, b
    out_mean = mean @ wm.T + bm
    if cov.ndim == 2:  # independent inputs: cov is their variance [N, D]
        second = mean ** 2 + cov
        out_cov = np.einsum("ik,nk,jk->nij", wm, cov, wm, optimize=True)
    else:
        second = mean ** 2 + np.einsum("nii->ni", cov)
        out_cov = np.einsum("ik,nkl,jl->nij", wm, cov, wm, optimize=True)
    idx = np.arange(wm.shape[0])
    out_cov[:, idx, idx] += second @ (ws ** 2).T + bs ** 2
    return out_mean, out_cov


def tail_moments(mean, var, params, names, mode, chunk=1000):
    """Logit (mean, cov [N, K, K]) from the (independent) input moments of the first dense layer, by ``mode``."""
    if len(mean) > chunk:
        parts = [tail_moments(mean[i:i + chunk], var[i:i + chunk], params, names, mode) for i in range(0, len(mean), chunk)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if mode == "tail-cov":
        cov = var
        for name, relu in names:
            mean, cov = dense_cov(mean, cov, params[name + ".weight"], params[name + ".bias"])
            if relu:
                mean, cov = relu_cov(mean, cov)
        return mean, cov
    for name, relu in names[:-1]:
        mean, var = dense_diag(mean, var, params[name + ".weight"], params[name + ".bias"])
        if relu:
            mean, var = R.relu(mean, var)
    last = names[-1][0]
    if mode == "diagonal":
        mean, var = dense_diag(mean, var, params[last + ".weight"], params[last + ".bias"])
        return mean, var[:, :, None] * np.eye(var.shape[1])[None]
    return dense_cov(mean, var, params[last + ".weight"], params[last + ".bias"])


def lenet_features(x, params):
    """Diagonal PFP of LeNet's convolutional part -> (mean, var) of the 400 flattened features."""
    c = lambda n: (params[n + ".weight"], params[n + ".bias"])  # noqa: E731
    m, v = x.astype(np.float64), np.zeros(x.shape)
    for name, pads in (("conv1", (2, 2, 2, 2)), ("conv2", (0, 0, 0, 0))):
        (wm, ws), (bm, bs) = c(name)
        m, v = R.conv2d(m, v, wm, ws ** 2, bm, bs ** 2, pads=pads)
        m, v = R.relu(m, v)
        m, v = R.maxpool2d(m, v, (2, 2), (2, 2))
    return m.reshape(len(m), -1), v.reshape(len(v), -1)


# ---------------------------------------------------------------- Monte Carlo over the weights

class Accumulator:
    """Running float64 sums over draws of the logits l_s [N, K]: mean, covariance, log mean softmax,
    mean entropy."""

    def __init__(self, n, k):
        self.count, self.total, self.outer = 0, np.zeros((n, k)), np.zeros((n, k, k))
        self.log_sum, self.entropy = np.full((n, k), -np.inf), np.zeros(n)

    def add(self, logits, rows=slice(None)):
        log_p = metrics.log_softmax(logits)
        self.total[rows] += logits
        self.outer[rows] += logits[:, :, None] * logits[:, None, :]
        self.log_sum[rows] = np.logaddexp(self.log_sum[rows], log_p)
        self.entropy[rows] -= (np.exp(log_p) * log_p).sum(-1)

    def result(self, count):
        mean = self.total / count
        cov = (self.outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
        log_probs = self.log_sum - np.log(count)
        h = metrics.entropy(np.exp(log_probs))
        return dict(mean=mean, cov=cov, log_probs=log_probs, entropy=metrics.log_entropy(log_probs), entropy_naive=h,
                    mi_naive=np.maximum(h - self.entropy / count, 0.0))


def mi_pass(draw, x, params, draws, seed, log_pbar, chunk=5000):
    """log MI of the same draws (the seed repeats them) given their log mean softmax, in log space
    (`metrics.log_mutual_information`'s terms, accumulated by log-sum-exp)."""
    rng = np.random.default_rng(seed)
    log_sum = np.full(len(x), -np.inf)
    for _ in range(draws):
        for start in range(0, len(x), chunk):
            rows = slice(start, start + chunk)
            d = metrics.log_softmax(draw(x[rows], params, rng)) - log_pbar[rows]
            phi = np.where(np.abs(d) < 1e-3, d * d / 2 + d ** 3 / 3 + d ** 4 / 8, np.exp(d) * d - np.expm1(d))
            with np.errstate(divide="ignore"):
                terms = log_pbar[rows] + np.log(np.maximum(phi, 0.0))
            log_sum[rows] = np.logaddexp(log_sum[rows], np.logaddexp.reduce(terms, axis=1))
    return log_sum - np.log(draws)


def mlp_first_layer(x, params):
    """[N, 2, 100]: the first layer's pre-activation mean and variance (its input is deterministic)."""
    (wm, ws), (bm, bs) = params["input_layer.weight"], params["input_layer.bias"]
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.stack([flat @ wm.T + bm, (flat * flat) @ (ws ** 2).T + bs ** 2], axis=1)


def mlp_draw(first, params, rng):
    """One draw of the logits, given the first layer's pre-activation moments (`mlp_first_layer`)."""
    h = np.maximum(first[:, 0] + np.sqrt(first[:, 1]) * rng.standard_normal(first[:, 0].shape), 0.0)
    for name, relu in MLP[1:]:
        (wm, ws), (bm, bs) = params[name + ".weight"], params[name + ".bias"]
        mean, var = h @ wm.T + bm, (h * h) @ (ws ** 2).T + bs ** 2
        h = mean + np.sqrt(var) * rng.standard_normal(mean.shape)
        if relu:
            h = np.maximum(h, 0.0)
    return h


def lenet_draw(x, params, rng):
    import torch
    from torch.nn import functional as F

    def w(name):
        m, s = params[name]
        return torch.from_numpy(m + s * rng.standard_normal(m.shape))

    h = torch.from_numpy(x.astype(np.float64))
    h = F.max_pool2d(F.relu(F.conv2d(h, w("conv1.weight"), w("conv1.bias"), padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, w("conv2.weight"), w("conv2.bias"))), 2)
    h = F.relu(F.linear(h.flatten(1), w("fc1.weight"), w("fc1.bias")))
    h = F.relu(F.linear(h, w("fc2.weight"), w("fc2.bias")))
    return F.linear(h, w("fc3.weight"), w("fc3.bias")).numpy()


def monte_carlo(draw, x, params, draws, seed, chunk=5000, block=100):
    """(all draws' accumulator, its result, the results of each disjoint block of ``block`` draws)."""
    rng = np.random.default_rng(seed)
    acc, blocks, part = Accumulator(len(x), 10), [], Accumulator(len(x), 10)
    for index in range(draws):
        for start in range(0, len(x), chunk):
            rows = slice(start, start + chunk)
            logits = draw(x[rows], params, rng)
            acc.add(logits, rows)
            part.add(logits, rows)
        if (index + 1) % block == 0:
            blocks.append(part.result(block))
            part = Accumulator(len(x), 10)
    return acc, acc.result(draws), blocks


def converged_log_probs(draw, x, y, params, acc, draws, extra, worst, seed):
    """log p(y) of the ``worst`` images with ``extra`` more draws (NLL: the tail dominates)."""
    log_p = acc.log_sum[np.arange(len(y)), y] - np.log(draws)
    rows = np.argsort(log_p)[:worst]
    rng = np.random.default_rng(seed + 1)
    log_sum = acc.log_sum[rows, y[rows]].copy()
    for _ in range(extra):
        log_sum = np.logaddexp(log_sum, metrics.log_softmax(draw(x[rows], params, rng))[np.arange(len(rows)), y[rows]])
    out = log_p.copy()
    out[rows] = log_sum - np.log(draws + extra)
    return out


# ---------------------------------------------------------------- output stages on Gaussian logits

def gaussian_draws(mean, cov, draws, seed, y=None, chunk=500):
    """Draws l ~ N(mean, cov) per row: (log mean softmax, entropy of the mean, MI), float64."""
    rng = np.random.default_rng(seed)
    k = mean.shape[1]
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(k)[None] * np.maximum(np.einsum("nii->n", cov), 1e-30)[:, None, None] / k)
    log_probs, mi, naive = np.empty(mean.shape), np.empty(len(mean)), np.empty(len(mean))
    for start in range(0, len(mean), chunk):
        rows = slice(start, start + chunk)
        eps = rng.standard_normal((draws, len(mean[rows]), k))
        log_p = metrics.log_softmax(mean[rows][None] + np.einsum("nij,snj->sni", chol[rows], eps))
        peak = log_p.max(0)
        log_probs[rows] = peak + np.log(np.exp(log_p - peak).mean(0))
        mi[rows] = metrics.log_mutual_information(log_p)
        naive[rows] = metrics.entropy(np.exp(log_probs[rows]))
    return log_probs, metrics.log_entropy(log_probs), mi, naive


def meanfield(mean, cov, variant):
    """log p of the mean-field form q_k = 1 / sum_j exp(-(M_k - M_j) / sqrt(1 + pi D_kj / 8)) with
    D_kj = V_k ("own", today's), V_k + V_j ("sum") or V_k + V_j - 2 C_kj ("pair")."""
    var = np.einsum("nii->ni", cov)
    if variant == "own":
        spread = np.repeat(var[:, :, None], var.shape[1], axis=2)
    elif variant == "sum":
        spread = var[:, :, None] + var[:, None, :]
    else:
        spread = np.maximum(var[:, :, None] + var[:, None, :] - 2 * cov, 0.0)
    exponent = -(mean[:, :, None] - mean[:, None, :]) / np.sqrt(1.0 + np.pi / 8.0 * spread)
    peak = exponent.max(axis=2, keepdims=True)
    return metrics.log_softmax(-(peak[:, :, 0] + np.log(np.exp(exponent - peak).sum(axis=2))))


def scores(log_probs, y, n, entropy=None, mi=None, naive=None):
    """Metrics; entropy and MI exact in log space (`metrics.log_entropy`), ``naive`` the float64 -sum p log p."""
    probs = np.exp(log_probs)
    h = metrics.log_entropy(log_probs) if entropy is None else entropy
    naive = metrics.entropy(probs) if naive is None else naive
    return dict(acc=metrics.accuracy(probs[:n], y), nll=-np.mean(log_probs[np.arange(n), y]), ece=metrics.ece(probs[:n], y),
                auroc_h=metrics.auroc(h[:n], h[n:]), auroc_mi=None if mi is None else metrics.auroc(mi[:n], mi[n:]),
                auroc_naive=metrics.auroc(naive[:n], naive[n:]))


def var_ratio(cov, ref_cov, n):
    v, r = np.einsum("nii->ni", cov), np.einsum("nii->ni", ref_cov)
    return np.median(v[:n] / r[:n]), np.median(v[n:] / r[n:])


def float32_ties(mean, cov, n):
    """(c): today's on-device float32 formulas, emulated in NumPy float32 with the device's 64 draws:
    AUROC and the share of exact zeros, sampling entropy and MI; and the float64 value."""
    from pfpc.ops.predictive import numpy_standard_normal

    eps = numpy_standard_normal(64, 10).astype(np.float32)
    m, s = mean.astype(np.float32), np.sqrt(np.einsum("nii->ni", cov)).astype(np.float32)
    z = m[None] + s[None] * eps[:, None, :]
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(-1, keepdims=True)
    p_s = e / total
    log_p_s = z - np.log(total)
    pbar = p_s.mean(0)
    h = -(pbar * np.log(np.maximum(pbar, np.float32(1e-37)))).sum(-1)
    mi = np.maximum((p_s * (log_p_s - np.log(np.maximum(pbar, np.float32(1e-37))))).sum(-1).mean(0), 0)
    return dict(auroc_h32=metrics.auroc(h[:n], h[n:]), zero_h=float(np.mean(h == 0)), auroc_mi32=metrics.auroc(mi[:n], mi[n:]),
                zero_mi=float(np.mean(mi == 0)))


# ---------------------------------------------------------------- the report

def evaluate(net, x, y, n, params, draw, moments, args):
    t0 = time.time()
    acc, mc, blocks = monte_carlo(draw, x, params, args.draws, args.seed)
    mc["mi"] = mi_pass(draw, x, params, args.draws, args.seed, mc["log_probs"])
    log_py = converged_log_probs(draw, x[:n], y, params, acc, args.draws, args.tail_draws, args.worst, args.seed)
    print(f"\n## {net}: {n} MNIST + {len(x) - n} Fashion-MNIST images, {args.draws} weight draws "
          f"({time.time() - t0:.0f} s); NLL of the {args.worst} worst images with {args.tail_draws} more draws\n")
    rows = [("MC over weights", "-", var_ratio(mc["cov"], mc["cov"], n),
             scores(mc["log_probs"], y, n, mc["entropy"], mc["mi"], mc["entropy_naive"]) | {"nll_conv": -np.mean(log_py)})]
    sources = {name: fn() for name, fn in moments.items()}
    sources["MC-diag"] = (mc["mean"], mc["cov"] * np.eye(10)[None])
    sources["MC-full"] = (mc["mean"], mc["cov"])
    for name, (mean, cov) in sources.items():
        ratio = var_ratio(cov, mc["cov"], n)
        g_log, g_h, g_mi, g_naive = gaussian_draws(mean, cov, args.draws, args.seed + 7)
        rows.append((name, "Gaussian draws", ratio, scores(g_log, y, n, g_h, g_mi, g_naive)))
        for variant in ("own", "sum", "pair"):
            if variant == "pair" and name in ("diagonal", "MC-diag"):
                continue
            rows.append((name, f"mean-field ({variant})", ratio, scores(meanfield(mean, cov, variant), y, n)))
        if name == "diagonal":
            ties = float32_ties(mean, cov, n)
    if len(blocks) > 1:
        spread = {key: [metrics.auroc(b[key][:n], b[key][n:]) for b in blocks] for key in ("entropy", "entropy_naive", "mi_naive")}
        nll = [-np.mean(b["log_probs"][np.arange(n), y]) for b in blocks]
        text = lambda v: f"{min(v):.4f} / {np.median(v):.4f} / {max(v):.4f}"  # noqa: E731
        print(f"MC with 100 draws, over the {len(blocks)} disjoint blocks of 100 of these draws (min / median / max): "
              f"AUROC entropy {text(spread['entropy'])} (float64 -sum p log p: {text(spread['entropy_naive'])}; "
              f"MI as a difference of entropies: {text(spread['mi_naive'])}), NLL {text(nll)}\n")
    print("| moments | output stage | var ratio MNIST / Fashion | accuracy | NLL | ECE | AUROC entropy | AUROC MI | AUROC float64 -sum p log p |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, stage, (r_in, r_out), s in rows:
        nll = f"{s['nll']:.4f}" + (f" (converged: {s['nll_conv']:.4f})" if "nll_conv" in s else "")
        mi = "–" if s["auroc_mi"] is None else f"{s['auroc_mi']:.4f}"
        print(f"| {name} | {stage} | {r_in:.3f} / {r_out:.3f} | {100 * s['acc']:.2f} % | {nll} | {s['ece']:.4f} | {s['auroc_h']:.4f} | {mi} | "
              f"{s['auroc_naive']:.4f} |")
    print(f"\nfloat32 (today's on-device formulas, 64 draws, diagonal moments): AUROC entropy {ties['auroc_h32']:.4f} "
          f"({100 * ties['zero_h']:.1f} % of images exactly 0), AUROC MI {ties['auroc_mi32']:.4f} ({100 * ties['zero_mi']:.1f} % exactly 0)",
          flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--tail-draws", type=int, default=20000)
    parser.add_argument("--worst", type=int, default=100)
    parser.add_argument("--lenet-images", type=int, default=1000)
    parser.add_argument("--lenet-draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nets", default="mlp,lenet")
    args = parser.parse_args(argv)
    out = os.path.join(ROOT, "examples", "seed_mnist", "generated")
    print(f"python benchmarks/logit_covariance.py --draws {args.draws} --tail-draws {args.tail_draws} --worst {args.worst} "
          f"--lenet-images {args.lenet_images} --lenet-draws {args.lenet_draws} --nets {args.nets}")
    for net in args.nets.split(","):
        params = layers_of(*build(net, args.data, out))
        limit = None if net == "mlp" else args.lenet_images
        x_in, y = load(args.data, "mnist", limit)
        x = np.concatenate([x_in, load(args.data, "fashion", limit)[0]])
        n = len(x_in)
        if net == "mlp":
            flat = x.reshape(len(x), -1).astype(np.float64)
            features = (flat, np.zeros(flat.shape))
            names, draw = MLP, mlp_draw
            x = mlp_first_layer(x, params)
        else:
            features = lenet_features(x, params)
            names, draw = LENET_DENSE, lenet_draw
            args = argparse.Namespace(**{**vars(args), "draws": args.lenet_draws, "tail_draws": args.tail_draws // 10})
        moments = {mode: (lambda mode=mode: tail_moments(*features, params, names, mode)) for mode in ("diagonal", "logit-cov", "tail-cov")}
        evaluate(net, x, y, n, params, draw, moments, args)


if __name__ == "__main__":
    main()
