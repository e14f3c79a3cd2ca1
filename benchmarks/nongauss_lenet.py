"""Why the diagonal PFP keeps only 0.55-0.7 of the seed LeNet-5's logit variance on Fashion-MNIST
(issue 16's last missed target), measured: a Monte Carlo reference with enough draws to resolve
0.8 (bootstrap confidence intervals), per-layer shape and loss, and what closes the gap.

    PYTHONPATH=.:tests:benchmarks nice -n 10 python benchmarks/nongauss_lenet.py [--images 40] [--samples 20000]
        [--resamples 200] [--kinds fashion mnist] [--mechanism 2000] [--accuracy 1000] [--cache DIR]

The seed paper's pretrained checkpoint (../shared/data/seed-checkpoints, std = softplus(scale)),
the first --images test images of MNIST and Fashion-MNIST (normalised as the seed authors did).
Monte Carlo: whole weight draws from the posterior (pfpc.verify's sampler, float64 draws cast to
float32), the ONNX graph run in onnxruntime with every layer output a graph output and all images
of a data set as one batch per draw (the draws are independent; the images share them).
Printed per data set:
  * the median over logits (images x 10) of PFP variance / MC variance for the diagonal PFP
    (float64 reference, tests/reference.py) and the other propagations below, with 95 %
    bootstrap intervals: over the MC draws (the reference's own noise) and over the images;
    and the ratio with the first 1000 / 2000 / 5000 draws (a heavy-tailed variance estimated from
    few draws depends on the rare draws it catches);
  * per layer: median skewness and excess kurtosis of the units over the MC draws, the diagonal
    PFP's variance ratio (`none`), the layer's op fed MC's exact marginals (`local`: the op's own
    error) and the logits' ratio when the PFP starts from MC's exact marginals of that layer
    (`from here`: what the rest of the network loses);
  * the hybrid oracles `sampled to L`: every weight up to layer L drawn (MC's exact per-draw
    activation), the rest propagated by the diagonal PFP given it, the draws mixed (law of total
    variance): how much of the network must be sampled, and whether the loss is a scale mixture
    (upstream randomness setting the variance of the dense tail);
  * the prototypes of tests/reference_nongauss.py: the fourth moment carried through the dense
    tail, and one scale shared by fc1's units in two scenarios (`shared fc1 scale`, its Var
    predicted from conv2's per-channel latents with 3-7 Gauss-Hermite nodes; `column alpha`: the
    cheaper weighting), with their estimated extra Cortex-M4 instructions (printed first);
  * --mechanism N: from N stored draws of the dense tail, where its heavy tails come from (see
    `mechanism`); --accuracy N: the argmax accuracy of the prototype's means on N test images.
--samples 0 skips the Monte Carlo tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for _threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # small matrices: one thread
    os.environ.setdefault(_threads, "1")  # is 10-30x faster than a multi-threaded BLAS on a busy machine

import numpy as np  # noqa: E402
import onnx
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]

import covariance as B  # noqa: E402
import reference as R  # noqa: E402
import reference_covariance as RC  # noqa: E402
from pfpc.frontends.posterior import Posterior  # noqa: E402
from pfpc.verify import sampling_session, weight_sampler  # noqa: E402

DENSE = ["fc1", "fc2", "fc3"]


def batched_probe(model):
    """The model with every node output a graph output and a free batch dimension."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    del probe.graph.output[:]
    del probe.graph.value_info[:]
    for node in model.graph.node:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    return probe


class Moments:
    """Running sums of the first four powers (shifted by the first draw) of every unit."""

    def __init__(self):
        self.sums, self.shift, self.count = None, None, 0

    def add(self, values):
        if self.sums is None:
            self.shift = [v.copy() for v in values]
            self.sums = [[np.zeros_like(v) for _ in range(4)] for v in values]
        for s, value, k in zip(self.sums, values, self.shift):
            d = value - k
            d2 = d * d
            s[0] += d
            s[1] += d2
            s[2] += d2 * d
            s[3] += d2 * d2
        self.count += 1

    def central(self, index):
        """mean, variance (unbiased), skewness, excess kurtosis, the variance's standard error."""
        n = self.count
        m1, m2, m3, m4 = (t / n for t in self.sums[index])
        c2 = np.maximum(m2 - m1 * m1, 0.0)
        c3 = m3 - 3 * m2 * m1 + 2 * m1**3
        c4 = np.maximum(m4 - 4 * m3 * m1 + 6 * m2 * m1 * m1 - 3 * m1**4, 0.0)
        safe = np.maximum(c2, 1e-300)
        return (self.shift[index] + m1, c2 * n / (n - 1), c3 / safe**1.5, c4 / safe**2 - 3.0,
                np.sqrt(np.maximum(c4 - c2 * c2, 0.0) / n))


def dense_tail(weights, variances, start, mean, var):
    """The diagonal PFP (tests/reference.py's formulas, as matrix products) of the dense layers
    from DENSE[start] on, ReLU between: mean = m mu^T + mu_b, var = (m^2 + v) s2^T + v (mu^2)^T + s2_b."""
    for name in DENSE[start:]:
        w_mean, w_var = weights[f"{name}.weight"], variances[f"{name}.weight"]
        mean, var = (mean @ w_mean.T + weights[f"{name}.bias"],
                     (mean * mean + var) @ w_var.T + var @ (w_mean * w_mean).T + variances[f"{name}.bias"])
        if name != DENSE[-1]:
            mean, var = R.relu(mean, var)
    return mean, var


def monte_carlo(model, variances, images, samples, seed, oracles):
    """MC over whole weight draws; returns (Moments of every node output, per-draw logits, and the
    hybrid oracles' mixtures {name: (mean, var)}): `oracles` maps a name to (node output, first
    dense layer to propagate) — the activation is MC's exact one for that draw."""
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    probe = batched_probe(model)
    posterior = Posterior({k: weights[k].astype(np.float32) for k in variances},
                          {k: v.astype(np.float32) for k, v in variances.items()})
    session, stochastic = sampling_session(probe, posterior)
    draw = weight_sampler(posterior, stochastic, seed)
    names = [o.name for o in session.get_outputs()]
    feed = {model.graph.input[0].name: images}
    moments = Moments()
    logits = np.empty((samples, len(images), 10), np.float32)
    mix = {name: [0.0, 0.0, 0.0] for name in oracles}  # sums of conditional mean, mean^2, var
    for d in range(samples):
        values = [np.asarray(v, np.float64) for v in session.run(names, {**feed, **draw()})]
        moments.add(values)
        logits[d] = values[-1].reshape(len(images), -1)
        for name, (tensor, start) in oracles.items():
            given = values[names.index(tensor)].reshape(len(images), -1)
            m, v = dense_tail(weights, variances, start, given, np.zeros_like(given))
            s = mix[name]
            s[0] = s[0] + m
            s[1] = s[1] + m * m
            s[2] = s[2] + v
    mixtures = {}
    for name, (s0, s1, s2) in mix.items():
        mean = s0 / samples
        mixtures[name] = (mean, s2 / samples + np.maximum(s1 / samples - mean * mean, 0.0) * samples / (samples - 1))
    return names, moments, logits, mixtures


def median_ratio(pfp_var, mc_var):
    return float(np.median(pfp_var / mc_var))


def bootstrap(pfp_vars, logits, mc_var, resamples, rng):
    """95 % intervals of the median ratio: resampling the MC draws, and resampling the images."""
    draws, images = logits.shape[0], logits.shape[1]
    over_draws = {name: [] for name in pfp_vars}
    for _ in range(resamples):
        index = rng.integers(0, draws, draws)
        var = np.var(logits[index].astype(np.float64), axis=0, ddof=1)
        for name, pfp_var in pfp_vars.items():
            over_draws[name].append(median_ratio(pfp_var, var))
    over_images = {name: [] for name in pfp_vars}
    for _ in range(resamples):
        index = rng.integers(0, images, images)
        for name, pfp_var in pfp_vars.items():
            over_images[name].append(median_ratio(pfp_var[index], mc_var[index]))
    interval = lambda v: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975)))  # noqa: E731
    return {name: (interval(over_draws[name]), interval(over_images[name])) for name in pfp_vars}


def per_layer(model, variances, names, moments, images, none_env, logit_name):
    """Shape of every layer's units over the draws, the diagonal PFP's ratio, its op fed MC's
    exact marginals, and the logits when the PFP starts from this layer's exact marginals."""
    feed = {model.graph.input[0].name: images}
    mc = {}
    for index, name in enumerate(names):
        mean, var, skew, kurt, se = moments.central(index)
        mc[name] = (mean, var, skew, kurt)
    logit_var = mc[logit_name][1]
    rows = []
    for node in model.graph.node:
        name = node.output[0]
        if node.op_type in ("Flatten",) or name not in none_env:  # ReLU -> MaxPool is computed as MaxPool -> ReLU
            continue
        mean, var, skew, kurt = mc[name]
        keep = var > 1e-3 * np.mean(var)
        local = B.local_ratio(model, variances, {k: (v[0], v[1], None) for k, v in mc.items()}, name, images)
        start = RC.pfp_covariance(model, variances, feed, "none", replace={name: (mean, var)})
        rows.append((name, node.op_type, float(np.median(skew[keep])), float(np.median(kurt[keep])),
                     float(np.quantile(kurt[keep], 0.9)),
                     float(np.median(none_env[name][1][keep] / var[keep])),
                     float(np.median(local[keep] / var[keep])) if local is not None else float("nan"),
                     median_ratio(start[logit_name][1], logit_var) if name != logit_name else float("nan")))
    return rows


# Cortex-M4 instructions of the seed LeNet-5 (QEMU profile, `pfpc run --emulate --profile`, batch 1,
# this session's build): `--covariance none` per kernel, and the kernels `--covariance channel` adds for
# conv2's loading (window sums, coherent term, root, sums, projection gain, multiply) and what its
# second max-pool adds when it reads the loading.
M4_DIAGONAL = 2_965_640  # profiled build, none
M4_KERNELS = {"fc1 Gemm+ReLU": 365_640, "fc2 Gemm+ReLU": 96_240, "fc3 Gemm": 6_640,
              "max-pool 2 + ReLU (1200 Clark steps + 400 ReLUs)": 205_880}
M4_CONV2_LOADING = 43_200 + 43_160 + 27_960 + 15_480 + 7_160 + 10_800 + 440 + 9_120
M4_MAXPOOL2_CORRELATED = 231_000 - 205_880


def shared_scale_cost(nodes=5, alpha="column"):
    """Estimated extra Cortex-M4 instructions of the shared-scale prototype over the diagonal PFP,
    from the measured kernels above: conv2's loading and the correlated second max-pool (as
    `--covariance channel` compiles them), `nodes` x 400 ReLU raw-moment evaluations at the cost of
    one of the second max-pool's Gaussian evaluations, alpha (exact: one pass over fc1's 48,000
    weights at a quarter of fc1's PFP kernel, which does ~4 multiply-adds per weight; column: ~400
    operations), and the tail after fc1 once more (fc1's ReLU, fc2, fc3)."""
    per_evaluation = M4_KERNELS["max-pool 2 + ReLU (1200 Clark steps + 400 ReLUs)"] / 1600
    parts = {"conv2 loading (measured kernels)": M4_CONV2_LOADING,
             "max-pool 2 correlated (measured)": M4_MAXPOOL2_CORRELATED,
             f"Gauss-Hermite, {nodes} x 400 ReLU moments + channel sums": nodes * 400 * per_evaluation + 2 * nodes * 400 * 2,
             f"alpha ({alpha})": M4_KERNELS["fc1 Gemm+ReLU"] / 4 if alpha == "exact" else 400 * 4,
             "second scenario: fc1 ReLU, fc2, fc3": 120 * per_evaluation + M4_KERNELS["fc2 Gemm+ReLU"] + M4_KERNELS["fc3 Gemm"]}
    return parts, sum(parts.values())


def mechanism(model, variances, kind, count, samples, seed=3):
    """Where the dense tail's heavy tails come from, from `samples` stored draws of its activations:
    per dense layer u = W h + b, given h (one draw) u is Gaussian with conditional mean mu h + mu_b
    and conditional variance c = s2 h^2 + s2_b; the share of Var(u) from the conditional mean, u's
    excess kurtosis and the part 3 Var(c) / Var(u)^2 from the varying conditional variance (a scale
    mixture), the share of c's relative variation that one scale per draw (shared by the layer's
    units) explains, and the excess kurtosis of independent inputs (reference_nongauss.dense_fourth
    fed MC's raw moments). Then the ReLUs fed MC's exact marginals, Gaussian vs the two-component
    mixture with MC's kurtosis, and the logits when fc1's units share one scale in two scenarios
    with MC's Var(scale) (the shared-scale prototype with an exact kappa)."""
    import reference_nongauss as NG

    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    probe = batched_probe(model)
    posterior = Posterior({k: weights[k].astype(np.float32) for k in variances}, {k: v.astype(np.float32) for k, v in variances.items()})
    session, stochastic = sampling_session(probe, posterior)
    draw = weight_sampler(posterior, stochastic, seed)
    images = B.mnist(kind, count)
    tensors = ["/Flatten_output_0", "/fc1/Gemm_output_0", "/Relu_2_output_0", "/fc2/Gemm_output_0", "/Relu_3_output_0", model.graph.output[0].name]
    runs = [session.run(tensors, {model.graph.input[0].name: images, **draw()}) for _ in range(samples)]
    act = {name: np.stack([r[k] for r in runs]).reshape(samples, count, -1).astype(np.float64) for k, name in enumerate(tensors)}
    logit_var = act[tensors[-1]].var(0, ddof=1)
    print(f"\nmechanism, {kind}: {samples} draws x {count} images (medians over units and images)")
    for given, layer, out in ((tensors[0], "fc1", tensors[1]), (tensors[2], "fc2", tensors[3]), (tensors[4], "fc3", tensors[5])):
        h, mu, s2 = act[given], weights[f"{layer}.weight"], variances[f"{layer}.weight"]
        cond_mean = h @ mu.T + weights[f"{layer}.bias"]
        cond_var = (h * h) @ s2.T + variances[f"{layer}.bias"]
        total = cond_mean.var(0) + cond_var.mean(0)
        u = act[out]
        excess = ((u - u.mean(0)) ** 4).mean(0) / u.var(0) ** 2 - 3
        relative = cond_var / cond_var.mean(0)
        shared = relative.mean(-1, keepdims=True)
        explained = 1 - ((relative - shared) ** 2).mean(0) / relative.var(0)
        raw = [(h**k).mean(0) for k in (1, 2, 3, 4)]
        _, ind_var, ind_fourth = NG.dense_fourth(raw, mu, s2, weights[f"{layer}.bias"], variances[f"{layer}.bias"])
        print(f"{layer}: Var from the conditional mean {np.median(cond_mean.var(0) / total):.3f}; excess kurtosis {np.median(excess):.2f} "
              f"(90 % {np.quantile(excess, 0.9):.1f}), of which the varying conditional variance {np.median(3 * cond_var.var(0) / total**2):.2f}; "
              f"one shared scale explains {np.median(explained):.2f} of that variance's variation; "
              f"independent inputs would give excess kurtosis {np.median(ind_fourth / ind_var**2 - 3):.2f}")
    for pre, post in ((tensors[1], tensors[2]), (tensors[3], tensors[4])):
        u, h = act[pre], act[post]
        m, v = u.mean(0), u.var(0)
        fourth = ((u - m) ** 4).mean(0)
        keep = h.var(0) > 1e-3 * h.var(0).mean()
        gaussian = R.relu(m, v)[1]
        mixed = NG.relu_fourth(m, v, fourth)
        print(f"ReLU after {pre}: fed MC's exact (mean, var) keeps {np.median(gaussian[keep] / h.var(0)[keep]):.3f} of MC's variance; "
              f"the two-component mixture with MC's kurtosis {np.median((mixed[1] - mixed[0] ** 2)[keep] / h.var(0)[keep]):.3f}")
    cond_var = (act[tensors[0]] ** 2) @ variances["fc1.weight"].T + variances["fc1.bias"]
    kappa = (cond_var / cond_var.mean(0)).mean(-1).var(0)
    env = RC.pfp_covariance(model, variances, {model.graph.input[0].name: images}, "none")
    _, oracle_var, _ = NG.lenet_scale_mixture(model, variances, images, kappa=kappa, base_env=env)
    _, predicted_var, predicted = NG.lenet_scale_mixture(model, variances, images, 5, base_env=env)
    print(f"fc1's shared scale: Var(scale) from MC median {np.median(kappa):.3f} (10-90 % {np.quantile(kappa, 0.1):.3f}-{np.quantile(kappa, 0.9):.3f}), "
          f"predicted (5 nodes, exact alpha) / MC median {np.median(predicted / kappa):.2f}, log correlation over images {np.corrcoef(np.log(predicted), np.log(kappa))[0, 1]:.2f}; "
          f"logits' median PFP/MC variance: diagonal {np.median(env[tensors[-1]][1] / logit_var):.3f}, two scenarios with MC's Var(scale) "
          f"{np.median(oracle_var / logit_var):.3f}, with the predicted one {np.median(predicted_var / logit_var):.3f} (against these {samples} draws)", flush=True)


def accuracy(model, variances, kind, count):
    """Argmax of the logits' means on the first `count` test images: diagonal PFP vs the prototype."""
    import covariance_lenet as CL
    import reference_nongauss as NG

    images, truth = B.mnist(kind, count), CL.labels(kind, count)
    env = RC.pfp_covariance(model, variances, {model.graph.input[0].name: images}, "none")
    diagonal = np.argmax(env[model.graph.output[0].name][0].reshape(count, -1), 1)
    line = f"{kind}, {count} images: argmax accuracy diagonal PFP {np.mean(diagonal == truth):.4f}"
    for alpha in ("exact", "column"):
        mean = NG.lenet_scale_mixture(model, variances, images, 5, base_env=env, alpha=alpha)[0]
        chosen = np.argmax(mean, 1)
        line += f"; shared fc1 scale (5 nodes, {alpha} alpha) {np.mean(chosen == truth):.4f}, same class as diagonal {np.mean(chosen == diagonal):.4f}"
    print(line, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--kinds", nargs="*", default=["fashion", "mnist"])
    parser.add_argument("--cache", default=None, help="directory to save the MC logits in")
    parser.add_argument("--mechanism", type=int, default=0, help="also: the mechanism analysis on this many stored draws")
    parser.add_argument("--accuracy", type=int, default=0, help="also: argmax accuracy of the means on this many test images")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(B.DATA, "seed-checkpoints")):
        print(f"skipped: {B.DATA} is absent")
        return
    import reference_nongauss as NG

    for nodes, alpha in ((5, "column"), (5, "exact"), (7, "column")):
        parts, total = shared_scale_cost(nodes, alpha)
        print(f"shared fc1 scale, {nodes} nodes, {alpha} alpha: estimated extra Cortex-M4 instructions {total:,.0f} "
              f"({total / M4_DIAGONAL:+.1%} of the diagonal PFP's {M4_DIAGONAL:,}): "
              + "; ".join(f"{k} {v:,.0f}" for k, v in parts.items()))
    model, variances = B.seed_model("seed_lenet")
    input_name, logit_name = model.graph.input[0].name, model.graph.output[0].name
    oracles = {"sampled to conv2 (features exact)": ("/Flatten_output_0", 0),
               "sampled to fc1 (fc1's ReLU exact)": ("/Relu_2_output_0", 1),
               "sampled to fc2 (check: exact)": ("/Relu_3_output_0", 2)}
    rng = np.random.default_rng(1)
    print(f"MC: {args.samples} weight draws x {args.images} images per data set (onnxruntime, one batch per draw)")
    for kind in args.kinds if args.mechanism else []:
        mechanism(model, variances, kind, args.images, args.mechanism)
    for kind in args.kinds if args.accuracy else []:
        accuracy(model, variances, kind, args.accuracy)
    for kind in args.kinds if args.samples else []:
        images = B.mnist(kind, args.images)
        start = time.time()
        names, moments, logits, mixtures = monte_carlo(model, variances, images, args.samples, seed=7, oracles=oracles)
        seconds = time.time() - start
        mc_mean, mc_var, _, mc_kurt, mc_se = moments.central(names.index(logit_name))
        mc_mean, mc_var, mc_kurt, mc_se = (a.reshape(len(images), -1) for a in (mc_mean, mc_var, mc_kurt, mc_se))
        if args.cache:
            np.savez(os.path.join(args.cache, f"{kind}.npz"), logits=logits, images=images)
        feed = {input_name: images}
        none_env = RC.pfp_covariance(model, variances, feed, "none")
        pfp = {"diagonal PFP": none_env[logit_name],
               "max-pools correlated (--covariance channel)": RC.pfp_covariance(model, variances, feed, "channel", max_keeps_loading=False)[logit_name]}
        pfp.update(mixtures)
        pfp.update(NG.variants(model, variances, images))
        pfp_vars = {name: np.asarray(v[1]).reshape(len(images), -1) for name, v in pfp.items()}
        intervals = bootstrap(pfp_vars, logits, mc_var, args.resamples, rng)
        print(f"\n## seed LeNet-5, {kind}: {len(images)} images x 10 logits, MC {args.samples} draws ({seconds:.0f} s)")
        print(f"MC logit variance: median rel. s.e. {np.median(mc_se / mc_var):.3f}; logits' excess kurtosis over draws: median {np.median(mc_kurt):.1f}, 90 % {np.quantile(mc_kurt, 0.9):.1f}")
        print(f"{'propagation':48s} {'median PFP/MC var':>17s} {'95% CI (draws)':>16s} {'95% CI (images)':>16s} {'mean err':>8s}   at 1000 / 2000 / 5000 draws")
        for name, pfp_var in pfp_vars.items():
            (d_lo, d_hi), (i_lo, i_hi) = intervals[name]
            mean_err = np.median(np.abs(np.asarray(pfp[name][0]).reshape(mc_mean.shape) - mc_mean) / np.sqrt(mc_var))
            subsets = " / ".join(f"{median_ratio(pfp_var, np.var(logits[:n].astype(np.float64), axis=0, ddof=1)):.3f}"
                                 for n in (1000, 2000, 5000) if n < args.samples)
            print(f"{name[:48]:48s} {median_ratio(pfp_var, mc_var):17.3f} {d_lo:7.3f}-{d_hi:6.3f}  {i_lo:7.3f}-{i_hi:6.3f}  {mean_err:8.3f}   {subsets}")
        print(f"\nper layer (median over units with MC variance above 1e-3 x the layer's mean, and images)")
        print(f"{'layer':28s} {'op':8s} {'skew':>6s} {'ex.kurt':>7s} {'kurt90%':>7s} {'none':>6s} {'local':>6s} {'from here':>9s}")
        for row in per_layer(model, variances, names, moments, images, none_env, logit_name):
            print(f"{row[0][:28]:28s} {row[1]:8s} {row[2]:6.2f} {row[3]:7.2f} {row[4]:7.2f} {row[5]:6.3f} {row[6]:6.3f} {row[7]:9.3f}", flush=True)


if __name__ == "__main__":
    main()
