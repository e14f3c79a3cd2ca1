"""Train the example Bayesian neural networks on scikit-learn's digits and export them.

    pip install torch==2.13.0        # optional dependency, only this script needs it
    python examples/train_digits.py  # writes examples/mlp/ and examples/lenet/

Mean-field Gaussian posterior q(w) = N(mu, std^2) for every weight and bias, with
std = softplus(rho), trained by Bayes by backprop with the local reparameterisation trick.
Prior N(0, prior_std^2). Loss per mini-batch = mean cross-entropy + kl_weight * KL(q || prior) / N_train:
kl_weight = 1 is the negative ELBO per training example; kl_weight < 1 is a tempered ("cold")
posterior, the likelihood counted 1/kl_weight times.

prior_std and kl_weight are chosen per model on a validation split of the TRAINING data
(VAL_FRACTION of it, stratified, fixed seed; the test split is never looked at): every pair of
PRIOR_STDS x KL_WEIGHTS is trained on the rest, the pair with the lowest validation NLL of the
MC_SELECT-sample predictive wins, and the model is retrained on the whole training split with it.
--prior-std and --kl-weight skip the selection.

For each model, examples/<name>/ gets:
  model.onnx          the posterior-MEAN network (plain Linear/Conv2d with the mu weights)
  post.npz            "<initializer name>.std" for every weight and bias (float32)
  sample.npy          the first 4 test inputs (float32), sample_labels.npy their labels
  metrics.json        accuracies (mean network, 100-sample MC), sizes, epochs, seed, time,
                      the selection table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_split import load_digits_split  # noqa: E402

from pfpc.evaluate import metrics  # noqa: E402

PRIOR_STDS = (0.3, 1.0)  # candidate priors N(0, prior_std^2) on every weight and bias
KL_WEIGHTS = (1.0, 0.1, 0.03, 0.01, 0.003)  # candidate KL weights (1 = Bayes' rule, < 1 = tempered posterior)
VAL_FRACTION = 0.2  # of the training split, held out to choose prior_std and kl_weight
MC_SELECT = 30  # weight samples of the validation predictive
INIT_STD = 5e-3  # initial posterior std (rho = softplus^-1(INIT_STD))
SEED = 0
BATCH_SIZE = 64
LR = 1e-2  # Adam, cosine-annealed to 0 over the run
MC_SAMPLES = 100
N_SAMPLE = 4  # test inputs saved to sample.npy
OPSET = 17

# name -> (layer spec, input is flattened, epochs)
MODELS = {
    "mlp": {
        "flatten": True,
        "epochs": 150,
        "layers": [
            ("fc1", "linear", (64, 64)),
            ("relu1", "relu", None),
            ("fc2", "linear", (64, 32)),
            ("relu2", "relu", None),
            ("fc3", "linear", (32, 10)),
        ],
    },
    "lenet": {
        "flatten": False,
        "epochs": 150,
        "layers": [
            ("conv1", "conv", (1, 6, 3, 1)),  # in, out, kernel, padding
            ("relu1", "relu", None),
            ("pool1", "maxpool", 2),
            ("conv2", "conv", (6, 16, 3, 1)),
            ("relu2", "relu", None),
            ("pool2", "maxpool", 2),
            ("flatten", "flatten", None),
            ("fc1", "linear", (64, 32)),
            ("relu3", "relu", None),
            ("fc2", "linear", (32, 10)),
        ],
    },
}


def softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


class _Bayes(nn.Module):
    """Mean-field Gaussian weight and bias; subclasses define the deterministic op."""

    def __init__(self, det: nn.Module):
        super().__init__()
        # start the means at torch's default initialisation of the same layer
        self.mu_weight = nn.Parameter(det.weight.detach().clone())
        self.mu_bias = nn.Parameter(det.bias.detach().clone())
        rho0 = softplus_inv(INIT_STD)
        self.rho_weight = nn.Parameter(torch.full_like(self.mu_weight, rho0))
        self.rho_bias = nn.Parameter(torch.full_like(self.mu_bias, rho0))

    def std_weight(self) -> torch.Tensor:
        return F.softplus(self.rho_weight)

    def std_bias(self) -> torch.Tensor:
        return F.softplus(self.rho_bias)

    def op(self, x, w, b):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # local reparameterisation: sample the pre-activation, not the weights
        mean = self.op(x, self.mu_weight, self.mu_bias)
        var = self.op(x * x, self.std_weight() ** 2, self.std_bias() ** 2)
        return mean + torch.sqrt(var + 1e-12) * torch.randn_like(mean)

    def kl(self, prior_std: float) -> torch.Tensor:
        total = torch.zeros(())
        for mu, std in ((self.mu_weight, self.std_weight()), (self.mu_bias, self.std_bias())):
            total = total + (
                math.log(prior_std) - torch.log(std) + (std**2 + mu**2) / (2 * prior_std**2) - 0.5
            ).sum()
        return total


class BayesLinear(_Bayes):
    def __init__(self, n_in: int, n_out: int):
        super().__init__(nn.Linear(n_in, n_out))

    def op(self, x, w, b):
        return F.linear(x, w, b)


class BayesConv2d(_Bayes):
    def __init__(self, c_in: int, c_out: int, k: int, padding: int):
        super().__init__(nn.Conv2d(c_in, c_out, k, padding=padding))
        self.padding = padding

    def op(self, x, w, b):
        return F.conv2d(x, w, b, padding=self.padding)


def build(layers, bayes: bool) -> nn.Sequential:
    mods = OrderedDict()
    for name, kind, arg in layers:
        if kind == "linear":
            mods[name] = BayesLinear(*arg) if bayes else nn.Linear(*arg)
        elif kind == "conv":
            c_in, c_out, k, p = arg
            mods[name] = BayesConv2d(c_in, c_out, k, p) if bayes else nn.Conv2d(c_in, c_out, k, padding=p)
        elif kind == "relu":
            mods[name] = nn.ReLU()
        elif kind == "maxpool":
            mods[name] = nn.MaxPool2d(arg)
        elif kind == "flatten":
            mods[name] = nn.Flatten()
        else:
            raise ValueError(kind)
    return nn.Sequential(mods)


def bayes_layers(model: nn.Sequential):
    return [(n, m) for n, m in model.named_children() if isinstance(m, _Bayes)]


def mean_network(layers, model: nn.Sequential) -> nn.Sequential:
    """Deterministic copy of the model with the posterior means as weights."""
    det = build(layers, bayes=False)
    with torch.no_grad():
        for name, m in bayes_layers(model):
            getattr(det, name).weight.copy_(m.mu_weight)
            getattr(det, name).bias.copy_(m.mu_bias)
    return det.eval()


def sampled_network(layers, model: nn.Sequential, gen: torch.Generator) -> nn.Sequential:
    """Deterministic copy with one weight sample w = mu + std * eps (no LRT)."""
    det = build(layers, bayes=False)
    with torch.no_grad():
        for name, m in bayes_layers(model):
            for attr, mu, std in (
                ("weight", m.mu_weight, m.std_weight()),
                ("bias", m.mu_bias, m.std_bias()),
            ):
                eps = torch.randn(mu.shape, generator=gen)
                getattr(getattr(det, name), attr).copy_(mu + std * eps)
    return det.eval()


def fit(name: str, spec: dict, x_tr: np.ndarray, y_tr: np.ndarray, prior_std: float, kl_weight: float,
        log: bool = True) -> nn.Sequential:
    """Bayes by backprop on (x_tr, y_tr) with prior N(0, prior_std^2) and the KL scaled by kl_weight."""
    torch.manual_seed(SEED)
    layers = spec["layers"]
    x_tr_t, y_tr_t = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    n_train = len(x_tr)

    model = build(layers, bayes=True)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec["epochs"])
    shuffle_gen = torch.Generator().manual_seed(SEED)

    model.train()
    for epoch in range(spec["epochs"]):
        perm = torch.randperm(n_train, generator=shuffle_gen)
        tot_nll = tot_kl = 0.0
        for i in range(0, n_train, BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            logits = model(x_tr_t[idx])
            nll = F.cross_entropy(logits, y_tr_t[idx])
            kl = sum(m.kl(prior_std) for _, m in bayes_layers(model))
            loss = nll + kl_weight * kl / n_train
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot_nll += nll.item() * len(idx)
            tot_kl = kl.item()
        sched.step()
        if log and ((epoch + 1) % 50 == 0 or epoch == 0):
            print(f"[{name}] epoch {epoch + 1:4d}  nll {tot_nll / n_train:.4f}  kl/N {tot_kl / n_train:.4f}")
    return model.eval()


def mc_probs(layers, model: nn.Sequential, x: torch.Tensor, samples: int) -> torch.Tensor:
    """Mean softmax over `samples` whole-weight samples (what SVI evaluation does; no LRT)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    probs = torch.zeros(len(x), 10)
    with torch.no_grad():
        for _ in range(samples):
            probs += F.softmax(sampled_network(layers, model, gen)(x), dim=1)
    return probs / samples


def select(name: str, spec: dict, x_tr: np.ndarray, y_tr: np.ndarray) -> list[dict]:
    """Validation NLL/ECE/accuracy of every (prior_std, kl_weight) candidate, trained on the rest
    of the training split; the validation split is stratified and fixed (seed SEED)."""
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_tr, y_tr, test_size=VAL_FRACTION, random_state=SEED, stratify=y_tr)
    x_val_t = torch.from_numpy(x_val)
    rows = []
    for prior_std in PRIOR_STDS:
        for kl_weight in KL_WEIGHTS:
            model = fit(name, spec, x_fit, y_fit, prior_std, kl_weight, log=False)
            probs = mc_probs(spec["layers"], model, x_val_t, MC_SELECT).numpy()
            with torch.no_grad():
                det_probs = F.softmax(mean_network(spec["layers"], model)(x_val_t), dim=1).numpy()
            rows.append({
                "prior_std": prior_std, "kl_weight": kl_weight,
                "val_nll": round(metrics.nll(probs, y_val), 4),
                "val_ece": round(metrics.ece(probs, y_val), 4),
                "val_accuracy": round(metrics.accuracy(probs, y_val), 4),
                "val_ece_mean_network": round(metrics.ece(det_probs, y_val), 4),
            })
            print(f"[{name}] select prior_std {prior_std:<4} kl_weight {kl_weight:<4} " +
                  "  ".join(f"{k} {v}" for k, v in rows[-1].items() if k.startswith("val")))
    return rows


def train(name: str, spec: dict, out_dir: str, exclude_classes=(), prior_std=None, kl_weight=None) -> dict:
    np.random.seed(SEED)
    layers = spec["layers"]
    x_tr, y_tr, x_te, y_te = load_digits_split(flatten=spec["flatten"])
    if exclude_classes:  # held out of training and of the test split: OOD for `pfpc evaluate --ood-classes`
        keep_tr, keep_te = ~np.isin(y_tr, exclude_classes), ~np.isin(y_te, exclude_classes)
        x_tr, y_tr, x_te, y_te = x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], y_te[keep_te]
    x_te_t = torch.from_numpy(x_te)
    n_train = len(x_tr)

    t0 = time.perf_counter()
    selection = []
    if prior_std is None or kl_weight is None:
        selection = select(name, spec, x_tr, y_tr)
        best = min(selection, key=lambda r: r["val_nll"])
        prior_std, kl_weight = best["prior_std"], best["kl_weight"]
        print(f"[{name}] chosen prior_std {prior_std} kl_weight {kl_weight} (lowest validation NLL)")
    select_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = fit(name, spec, x_tr, y_tr, prior_std, kl_weight)
    train_time = time.perf_counter() - t0

    # --- evaluation in torch -----------------------------------------------------------
    det = mean_network(layers, model)
    with torch.no_grad():
        mean_logits = det(x_te_t)
    acc_mean = float((mean_logits.argmax(1).numpy() == y_te).mean())
    probs = mc_probs(layers, model, x_te_t, MC_SAMPLES)
    acc_mc = float((probs.argmax(1).numpy() == y_te).mean())
    nll_mc = float(-torch.log(probs[torch.arange(len(y_te)), torch.from_numpy(y_te)] + 1e-12).mean())

    # --- export -------------------------------------------------------------------------
    os.makedirs(out_dir, exist_ok=True)
    onnx_path = os.path.join(out_dir, "model.onnx")
    torch.onnx.export(
        det,
        (x_te_t[:1],),
        onnx_path,
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        do_constant_folding=True,
    )
    onnx_model = onnx.load(onnx_path)
    onnx.checker.check_model(onnx_model, full_check=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx_model.graph.initializer}

    # posterior std keyed by initializer name (shape checked against the initializer)
    post = {}
    stds = {}
    for lname, m in bayes_layers(model):
        for attr, mu, std in (("weight", m.mu_weight, m.std_weight()), ("bias", m.mu_bias, m.std_bias())):
            stds[f"{lname}.{attr}"] = (mu.detach().numpy(), std.detach().numpy().astype(np.float32))
    for pname, (mu, std) in stds.items():
        if pname not in inits:
            raise RuntimeError(f"{name}: no ONNX initializer named {pname!r}; have {sorted(inits)}")
        init = inits[pname]
        if init.shape == mu.shape and np.array_equal(init, mu):
            post[f"{pname}.std"] = std
        elif init.shape == mu.T.shape and np.array_equal(init, mu.T):
            post[f"{pname}.std"] = np.ascontiguousarray(std.T)  # exporter transposed it
        else:
            raise RuntimeError(f"{name}: initializer {pname} {init.shape} does not match mu {mu.shape}")
    post_path = os.path.join(out_dir, "post.npz")
    np.savez(post_path, **post)

    # verify what is on disk
    with np.load(post_path, allow_pickle=False) as z:
        assert len(z.files) == len(post) == len(inits), (z.files, sorted(inits))
        for key in z.files:
            assert key.endswith(".std"), key
            init_name = key[: -len(".std")]
            assert init_name in inits, key
            assert z[key].shape == inits[init_name].shape, (key, z[key].shape)
            assert z[key].dtype == np.float32 and (z[key] > 0).all(), key
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_te})[0]
    max_diff = float(np.abs(ort_logits - mean_logits.numpy()).max())
    assert max_diff < 1e-4, max_diff
    acc_ort = float((ort_logits.argmax(1) == y_te).mean())
    assert acc_ort == acc_mean, (acc_ort, acc_mean)

    np.save(os.path.join(out_dir, "sample.npy"), x_te[:N_SAMPLE].astype(np.float32))
    np.save(os.path.join(out_dir, "sample_labels.npy"), y_te[:N_SAMPLE].astype(np.int64))

    all_std = np.concatenate([s.ravel() for s in post.values()])
    metrics = {
        "model": name,
        "test_accuracy_mean_network": acc_mean,
        "test_accuracy_mc": acc_mc,
        "test_nll_mc": round(nll_mc, 6),
        "mc_samples": MC_SAMPLES,
        "n_test": int(len(y_te)),
        "n_train": int(n_train),
        "excluded_classes": sorted(int(c) for c in exclude_classes),
        "n_params": int(sum(v.size for v in inits.values())),
        "n_stochastic_tensors": len(post),
        "posterior_std_min": float(all_std.min()),
        "posterior_std_median": float(np.median(all_std)),
        "posterior_std_max": float(all_std.max()),
        "onnxruntime_max_abs_diff": max_diff,
        "epochs": spec["epochs"],
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "prior_std": prior_std,
        "kl_weight": kl_weight,
        "init_std": INIT_STD,
        "kl_weight_per_example": f"{kl_weight}/{n_train}",
        "seed": SEED,
        "train_time_s": round(train_time, 2),
        "selection_time_s": round(select_time, 2),
        "selection": {"criterion": f"lowest validation NLL, {MC_SELECT}-sample MC predictive",
                      "val_fraction": VAL_FRACTION, "candidates": selection},
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    print(
        f"[{name}] acc mean {acc_mean:.4f}  acc MC{MC_SAMPLES} {acc_mc:.4f}  "
        f"params {metrics['n_params']}  time {train_time:.1f}s  ort diff {max_diff:.2e}"
    )
    return metrics


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--exclude-classes", nargs="+", type=int, default=[], metavar="C",
                    help="leave these digits out of training and testing (the outputs stay 10 classes)")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="directory that receives <model>/ (default: examples/)")
    ap.add_argument("--prior-std", type=float, help="skip the selection: this prior std (with --kl-weight)")
    ap.add_argument("--kl-weight", type=float, help="skip the selection: this KL weight (with --prior-std)")
    args = ap.parse_args(argv)
    if (args.prior_std is None) != (args.kl_weight is None):
        ap.error("--prior-std and --kl-weight go together")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.models:
        train(name, MODELS[name], os.path.join(args.out, name), args.exclude_classes, args.prior_std, args.kl_weight)


if __name__ == "__main__":
    main()
