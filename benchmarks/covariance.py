"""PFP vs Monte Carlo per layer on CNNs with global pooling: how much variance the diagonal PFP
loses to the correlation of a convolution's output positions, and what the per-channel shared
noise propagation ("channel", tests/reference_covariance.py) recovers.

    PYTHONPATH=.:tests nice -n 10 python benchmarks/covariance.py [--samples 1000] [--inputs 3] [models...]

Per model: the architectures of tests/architectures.py with random weights and the stated
posterior std = 0.1 |mu| + 1e-3 on standard-normal inputs, and the seed paper's pretrained MNIST
MLP and LeNet-5 (../shared/data/seed-checkpoints) on MNIST and Fashion-MNIST test images.
Monte Carlo: whole weight draws from the posterior (pfpc.verify's sampler, float64 draws) run in
onnxruntime with every layer output a graph output; its own noise is printed as the median
relative standard error of the MC variance (`mc_se`).
Columns per layer (medians over the layer's units and the inputs):
  none     PFP variance / MC variance, diagonal PFP (today's pfpc; float64 reference)
  channel  the same for the per-channel shared-noise propagation
  pooled   the cheap variant: diagonal variances, the loadings enter only pooled variances
  local    the diagonal PFP op fed MC's exact marginals of its inputs: its own error, i.e. the part
           due to the covariance of its inputs that the op cannot see
  mean_err median |PFP mean - MC mean| / MC std (none / channel)
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import architectures as A  # noqa: E402
import reference_covariance as RC  # noqa: E402
from pfpc.frontends.onnx_model import fold_constants  # noqa: E402
from pfpc.frontends.posterior import Posterior  # noqa: E402
from pfpc.verify import VIEW_OPS, sampling_session, weight_sampler  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data")
CNNS = ["resnet8", "dscnn", "mobilenetv1", "dscnn1d", "mobilenetv2"]
SEEDS = ["seed_mlp", "seed_lenet"]


def seed_model(name):
    """The seed paper's pretrained network: means = Pyro guide locs, std = softplus(scales)."""
    import torch

    path = os.path.join(DATA, "seed-checkpoints", f"vi_model_20240730_e40_{name.split('_')[1]}.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)["params"]
    net = A.ARCHITECTURES[name]()
    stds = {}
    with torch.no_grad():
        for key, tensor in net.state_dict().items():
            tensor.copy_(state[f"ScaledAutoNormal.locs.{key}"].reshape(tensor.shape))
            stds[key] = torch.nn.functional.softplus(state[f"ScaledAutoNormal.scales.{key}"]).reshape(tensor.shape).numpy()
    model = fold_constants(A.export(net.eval()))
    posterior = {}
    for init in model.graph.initializer:  # the exporter may rename initializers: match by name or shape
        key = init.name if init.name in stds else None
        if key is None:
            candidates = [k for k, s in stds.items() if s.shape == numpy_helper.to_array(init).shape]
            key = candidates[0] if len(candidates) == 1 else None
        if key is not None:
            posterior[init.name] = stds[key].astype(np.float64) ** 2
    return model, posterior


def mnist(kind, count):
    """The first `count` test images of MNIST / Fashion-MNIST, normalised as the seed authors did."""
    path = os.path.join(DATA, "mnist", f"{kind}-t10k-images-idx3-ubyte.gz")
    with gzip.open(path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:count] / 255.0
    mean, std = (0.1307, 0.3081) if kind == "mnist" else (0.2860, 0.3530)
    return ((images - mean) / std).astype(np.float32)


def layer_outputs(model):
    return [(n.output[0], n.op_type) for n in model.graph.node if n.op_type not in VIEW_OPS]


def monte_carlo_all(model, variances, x, samples, seed=0):
    """MC mean, variance and the variance's standard error at every layer output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in (n.output[0] for n in model.graph.node):
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    means = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    posterior = Posterior({k: means[k] for k in variances}, {k: v.astype(np.float32) for k, v in variances.items()})
    session, stochastic = sampling_session(probe, posterior)
    draw = weight_sampler(posterior, stochastic, seed)
    names = [o.name for o in session.get_outputs()]
    feed = {model.graph.input[0].name: x}
    sums = None
    for _ in range(samples):
        values = [np.asarray(v, np.float64) for v in session.run(names, {**feed, **draw()})]
        if sums is None:
            shift = values
            sums = [[np.zeros_like(v) for _ in range(4)] for v in values]
        for s, value, k in zip(sums, values, shift):
            d = value - k
            s[0] += d
            s[1] += d * d
            s[2] += d**3
            s[3] += d**4
    result = {}
    for name, s, k in zip(names, sums, shift):
        m1, m2, m3, m4 = (t / samples for t in s)
        c2 = np.maximum(m2 - m1 * m1, 0.0)
        c4 = np.maximum(m4 - 4 * m3 * m1 + 6 * m2 * m1 * m1 - 3 * m1**4, 0.0)
        result[name] = (k + m1, c2 * samples / (samples - 1), np.sqrt(np.maximum(c4 - c2 * c2, 0.0) / samples))
    return result


def ratios(pfp_var, mc_var, floor=1e-3):
    """PFP/MC variance of the units whose MC variance is above `floor` x the layer's mean."""
    keep = mc_var > floor * np.mean(mc_var)
    return (pfp_var[keep] / mc_var[keep]).ravel()


def local_ratio(model, variances, mc, name, x):
    """The diagonal PFP of the node producing `name`, fed MC's exact marginals of its inputs."""
    node = next(n for n in model.graph.node if n.output[0] == name)
    replace = {i: mc[i][:2] for i in node.input if i in mc}
    replace.update({i: (x, np.zeros(x.shape)) for i in node.input if i == model.graph.input[0].name})
    if not replace:
        return None
    sub = onnx.helper.make_model(onnx.helper.make_graph([node], "one", [], []), opset_imports=model.opset_import)
    for init in model.graph.initializer:
        if init.name in node.input:
            sub.graph.initializer.append(init)
    env = RC.pfp_covariance(sub, {k: v for k, v in variances.items() if k in node.input}, {}, "none", replace=replace)
    return env[name][1]


def run_model(label, model, variances, inputs, samples, per_layer=True):
    rows = {}
    outputs = [o.name for o in model.graph.output]
    summary = {"none": [], "channel": [], "pooled": [], "mean_none": [], "mean_channel": [], "se": []}
    for index, x in enumerate(inputs):
        mc = monte_carlo_all(model, variances, x, samples, seed=index)
        feed = {model.graph.input[0].name: x}
        none = RC.pfp_covariance(model, variances, feed, "none")
        channel = RC.pfp_covariance(model, variances, feed, "channel")
        pooled = RC.pfp_covariance(model, variances, feed, "pooled")
        for name, op in layer_outputs(model):
            if name not in mc or name not in none:
                continue
            mc_mean, mc_var, var_se = mc[name]
            row = rows.setdefault(name, {"op": op, "none": [], "channel": [], "pooled": [], "local": [], "mean_none": [], "mean_channel": [], "se": []})
            row["none"].append(ratios(none[name][1], mc_var))
            row["channel"].append(ratios(channel[name][1], mc_var))
            row["pooled"].append(ratios(pooled[name][1], mc_var))
            if per_layer:
                local = local_ratio(model, variances, mc, name, x)
                if local is not None:
                    row["local"].append(ratios(local, mc_var))
            std = np.sqrt(np.maximum(mc_var, 1e-3 * np.mean(mc_var)))
            row["mean_none"].append((np.abs(none[name][0] - mc_mean) / std).ravel())
            row["mean_channel"].append((np.abs(channel[name][0] - mc_mean) / std).ravel())
            row["se"].append(ratios(var_se, mc_var))
        for name in outputs:
            for key in ("none", "channel", "pooled", "mean_none", "mean_channel", "se"):
                summary[key].append(rows[name][key][-1])
    med = lambda values: float(np.median(np.concatenate(values))) if values else float("nan")  # noqa: E731
    if per_layer:
        print(f"\n## {label}: per layer (median over units and {len(inputs)} inputs; MC {samples} samples)")
        print(f"{'layer':28s} {'op':18s} {'none':>7s} {'channel':>7s} {'pooled':>7s} {'local':>7s} {'mean_err':>13s} {'mc_se':>6s}")
        for name, row in rows.items():
            print(f"{name[:28]:28s} {row['op']:18s} {med(row['none']):7.3f} {med(row['channel']):7.3f} {med(row['pooled']):7.3f} {med(row['local']):7.3f}"
                  f" {med(row['mean_none']):6.3f}/{med(row['mean_channel']):6.3f} {med(row['se']):6.3f}")
    result = {key: med(values) for key, values in summary.items()}
    print(f"OUTPUT {label:24s} var ratio none {result['none']:.3f}  channel {result['channel']:.3f}  pooled {result['pooled']:.3f}"
          f"  mean err (MC std) {result['mean_none']:.3f}/{result['mean_channel']:.3f}  MC var rel. s.e. {result['se']:.3f}", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=CNNS + SEEDS)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--no-per-layer", action="store_true")
    args = parser.parse_args(argv)
    for name in args.models:
        if name in SEEDS:
            if not os.path.isdir(os.path.join(DATA, "seed-checkpoints")):
                print(f"{name}: skipped, {DATA} is absent")
                continue
            model, variances = seed_model(name)
            for kind in ("mnist", "fashion"):
                images = mnist(kind, args.inputs)
                run_model(f"{name} {kind}", model, variances, [im[None] for im in images], args.samples, not args.no_per_layer)
            continue
        model = fold_constants(A.build_onnx(name))
        variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in A.posterior(model).items()}
        inputs = [A.sample_input(name, seed) for seed in range(args.inputs)]
        run_model(name, model, variances, inputs, args.samples, not args.no_per_layer)


if __name__ == "__main__":
    main()
