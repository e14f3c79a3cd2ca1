"""Posterior importers (pfpc/frontends/importers, pfpc.export) against the training libraries' own sampling.

Every test builds a small BNN with a library, trains it for a few steps on synthetic data (with
non-trivial posterior spreads, so that softplus and exp give clearly different stds), exports the
mean network to ONNX, imports the posterior, compiles it with pfpc and compares the compiled PFP with
Monte Carlo done by the LIBRARY's sampled forward passes (bayesian-torch/blitz/torchbnn/
torch-uncertainty layers, Pyro's Predictive, TyXe's predict). A network with one hidden ReLU layer
and a deterministic input has an exact PFP (hidden units are independent given the input), so its
means and variances must agree within 5 Monte Carlo standard errors; CNNs (conv outputs share
kernels, hence are correlated) get bounds on the approximation's error like tests/test_compile.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import pfpc.cli  # noqa: E402
from pfpc.errors import PfpcError  # noqa: E402
from pfpc.frontends import importers  # noqa: E402
from pfpc.frontends.importers import checkpoint  # noqa: E402
from mc_checks import check_approximate, check_exact, compile_pfp  # noqa: E402

SAMPLES = 4000


# ---------------------------------------------------------------------------------------------
# shared helpers


def sampled(forward, x, count=SAMPLES):
    """``count`` outputs of the library's stochastic forward pass on ``x`` (seeded; one thread:
    thousands of tiny forward passes are many times slower with a thread pool on a shared machine)."""
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return np.stack([_first(forward(torch.from_numpy(x))).numpy() for _ in range(count)])
    finally:
        torch.set_num_threads(threads)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def export_onnx(model, x):
    """ONNX of a deterministic torch model (TorchScript exporter; batch norm folded in eval mode)."""
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.from_numpy(x),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def spread(parameters, amount=0.5):
    """Add N(0, amount^2) to the unconstrained spreads (rho, log sigma, Pyro's unconstrained scales):
    libraries initialise them nearly uniform, and a posterior whose std varies from weight to weight
    makes a permuted or transposed std visible to the Monte Carlo check."""
    with torch.no_grad():
        for _, parameter in parameters:
            parameter.add_(amount * torch.randn(parameter.shape))


def spreads(model):
    leaves = ("rho", "sigma", "log_sigma")
    return [(n, p) for n, p in model.named_parameters() if n.rpartition(".")[2].endswith(leaves) and "_sampler." not in n]


def train(model, loss_fn, x, y, steps=20, lr=1e-3):
    """A few Adam steps of the library's own objective: the checkpoints are trained, not initial."""
    spread(spreads(model))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(model, torch.from_numpy(x), torch.from_numpy(y)).backward()
        optimiser.step()
    model.eval()


def copy_means(mean_model, means):
    with torch.no_grad():
        for name, value in means.items():
            mean_model.get_parameter(name).copy_(value)
    return mean_model


class PlainMLP(nn.Module):
    def __init__(self, sizes=(6, 8, 4)):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class PlainCNN(nn.Module):
    def __init__(self, batch_norm=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if batch_norm else None
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        h = self.conv(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.fc(torch.relu(h).flatten(1))


def _data(shape, outputs, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return x, rng.standard_normal((shape[0], outputs)).astype(np.float32)


MLP_X, MLP_Y = _data((3, 6), 4)
CNN_X, CNN_Y = _data((2, 1, 6, 6), 4)


def _mse_plus(kl_weight, kl):
    return lambda model, x, y: ((_first(model(x)) - y) ** 2).mean() + kl_weight * kl(model)


# ---------------------------------------------------------------------------------------------
# bayesian-torch


class BayesianTorchMLP(nn.Module):
    def __init__(self, flipout=False):
        super().__init__()
        layers = pytest.importorskip("bayesian_torch.layers")
        layer = layers.LinearFlipout if flipout else layers.LinearReparameterization
        self.fc1 = layer(6, 8, posterior_rho_init=-1.0)
        self.fc2 = layer(8, 4, posterior_rho_init=-1.0)

    def forward(self, x):
        h, _ = self.fc1(x)
        out, _ = self.fc2(torch.relu(h))
        return out


class BayesianTorchCNN(nn.Module):
    def __init__(self, batch_norm=False):
        super().__init__()
        layers = pytest.importorskip("bayesian_torch.layers")
        self.conv = layers.Conv2dReparameterization(1, 3, 3, padding=1, posterior_rho_init=-1.0)
        self.bn = nn.BatchNorm2d(3) if batch_norm else None
        self.fc = layers.LinearReparameterization(3 * 6 * 6, 4, posterior_rho_init=-1.0)

    def forward(self, x):
        h, _ = self.conv(x)
        if self.bn is not None:
            h = self.bn(h)
        out, _ = self.fc(torch.relu(h).flatten(1))
        return out


def _bayesian_torch_kl(model):
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    return get_kl_loss(model)


def _trained_bayesian_torch(model, x, y):
    torch.manual_seed(0)
    train(model, _mse_plus(1e-3, _bayesian_torch_kl), x, y)
    return model


@pytest.fixture(scope="module")
def bayesian_torch_mlp(tmp_path_factory):
    """A trained bayesian-torch MLP, its saved state dict and the ONNX of its means."""
    torch.manual_seed(0)
    model = _trained_bayesian_torch(BayesianTorchMLP(), MLP_X, MLP_Y)
    directory = tmp_path_factory.mktemp("bayesian_torch")
    path = str(directory / "bnn.pt")
    torch.save(model.state_dict(), path)
    means = {f"{layer}.{role}": getattr(getattr(model, layer), f"mu_{role}") for layer in ("fc1", "fc2") for role in ("weight", "bias")}
    onnx_path = str(directory / "model.onnx")
    import onnx

    onnx.save(export_onnx(copy_means(PlainMLP(), means), MLP_X), onnx_path)
    return model, path, onnx_path


def test_bayesian_torch_mlp_via_cli_matches_its_own_sampling(tmp_path, bayesian_torch_mlp, capsys):
    model, path, onnx_path = bayesian_torch_mlp
    out = str(tmp_path / "post.npz")
    assert pfpc.cli.main(["import-posterior", "--from", "bayesian-torch", path, "--onnx", onnx_path, "-o", out]) == 0
    report = capsys.readouterr().out
    assert "fc1.weight [8, 6] <- fc1.mu_weight, fc1.rho_weight (std = log1p(exp(rho_weight))) [by name]" in report
    arrays = dict(np.load(out))
    assert sorted(arrays) == ["fc1.bias.std", "fc1.weight.std", "fc2.bias.std", "fc2.weight.std"]
    check_exact(compile_pfp(onnx_path, arrays, MLP_X, tmp_path), sampled(model, MLP_X))


def test_a_wrong_transform_fails_the_check(tmp_path, bayesian_torch_mlp, monkeypatch):
    """The same import with exp instead of softplus (the README's import table: std = log1p(exp(rho)))
    is caught."""
    model, path, onnx_path = bayesian_torch_mlp
    monkeypatch.setitem(checkpoint.TRANSFORMS, "softplus", np.exp)
    arrays = importers.import_posterior("bayesian-torch", path, onnx_path)
    with pytest.raises(AssertionError):
        check_exact(compile_pfp(onnx_path, arrays, MLP_X, tmp_path), sampled(model, MLP_X))


def test_bayesian_torch_flipout_export_helper(tmp_path):
    """pfpc.export.export_bnn on a Flipout model: one call writes the mean ONNX and the posterior."""
    from pfpc.export import export_bnn

    torch.manual_seed(1)
    model = _trained_bayesian_torch(BayesianTorchMLP(flipout=True), MLP_X, MLP_Y)
    onnx_path, npz_path = str(tmp_path / "m.onnx"), str(tmp_path / "p.npz")
    result = export_bnn(model, torch.from_numpy(MLP_X), onnx_path, npz_path, input_names=["x"])
    assert {m.initializer for m in result.matches} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    check_exact(compile_pfp(onnx_path, dict(np.load(npz_path)), MLP_X, tmp_path), sampled(model, MLP_X))


def test_bayesian_torch_cnn_with_batch_norm_folded_by_the_exporter(tmp_path):
    """The exporter folds the batch norm into the conv: the posterior std is scaled by the same factor."""
    from pfpc.export import export_bnn

    torch.manual_seed(2)
    model = BayesianTorchCNN(batch_norm=True)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -1.5, 2.0]))
        model.bn.running_var.copy_(torch.tensor([0.7, 1.3, 2.5]))
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model = _trained_bayesian_torch(model, CNN_X, CNN_Y)  # eval mode: running statistics
    onnx_path, npz_path = str(tmp_path / "m.onnx"), str(tmp_path / "p.npz")
    result = export_bnn(model, torch.from_numpy(CNN_X), onnx_path, npz_path)
    assert "batch norm folded by the exporter" in result.report()
    import onnx

    assert not any(node.op_type == "BatchNormalization" for node in onnx.load(onnx_path).graph.node)
    check_approximate(compile_pfp(onnx_path, dict(np.load(npz_path)), CNN_X, tmp_path), sampled(model, CNN_X))


# ---------------------------------------------------------------------------------------------
# blitz, torchbnn, torch-uncertainty: the same MLP and CNN built from each library's layers


def _blitz_layers():
    modules = pytest.importorskip("blitz.modules")
    return (lambda i, o: modules.BayesianLinear(i, o, posterior_rho_init=-1.0),
            lambda: modules.BayesianConv2d(1, 3, (3, 3), padding=1, posterior_rho_init=-1.0),
            ("weight_mu", "bias_mu"))


def _torchbnn_layers():
    bnn = pytest.importorskip("torchbnn")
    return (lambda i, o: bnn.BayesLinear(prior_mu=0.0, prior_sigma=0.35, in_features=i, out_features=o),
            lambda: bnn.BayesConv2d(prior_mu=0.0, prior_sigma=0.35, in_channels=1, out_channels=3, kernel_size=3, padding=1),
            ("weight_mu", "bias_mu"))


def torch_uncertainty_bayesian_layers():
    """``torch_uncertainty.layers.bayesian``. The package's __init__ imports lightning and
    torchvision (whose PyPI build does not load against the CPU torch here), but the Bayesian layers
    need only torch: load that subpackage under stub parents when the normal import fails."""
    try:
        return importlib.import_module("torch_uncertainty.layers.bayesian")
    except ImportError:
        pass
    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None:
        pytest.skip("torch-uncertainty is not installed")
    root = spec.submodule_search_locations[0]
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.startswith("torch_uncertainty")}
    for name, path in (("torch_uncertainty", root), ("torch_uncertainty.layers", os.path.join(root, "layers"))):
        stub = types.ModuleType(name)
        stub.__path__ = [path]
        sys.modules[name] = stub
    try:
        return importlib.import_module("torch_uncertainty.layers.bayesian")
    finally:
        for name in [n for n in sys.modules if n.startswith("torch_uncertainty")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _torch_uncertainty_layers():
    layers = torch_uncertainty_bayesian_layers()
    return (lambda i, o: layers.BayesLinear(i, o, sigma_init=-1.0),
            lambda: layers.BayesConv2d(1, 3, 3, padding=1, sigma_init=-1.0),
            ("weight_mu", "bias_mu"))


LIBRARIES = {"blitz": _blitz_layers, "torchbnn": _torchbnn_layers, "torch-uncertainty": _torch_uncertainty_layers}


class LibraryMLP(nn.Module):
    def __init__(self, linear, sizes=(6, 8, 4)):
        super().__init__()
        self.fc1, self.fc2 = linear(sizes[0], sizes[1]), linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class LibraryCNN(nn.Module):
    def __init__(self, linear, conv):
        super().__init__()
        self.conv, self.fc = conv(), linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _means(model, mean_keys):
    return {f"{layer}.{key.split('_')[0]}": value for layer, module in model.named_children()
            for key in mean_keys if (value := getattr(module, key, None)) is not None}


@pytest.mark.parametrize("library", sorted(LIBRARIES))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_library_posterior_matches_its_own_sampling(tmp_path, library, kind):
    linear, conv, mean_keys = LIBRARIES[library]()
    torch.manual_seed(3 + sorted(LIBRARIES).index(library))
    if kind == "mlp":
        model, plain, (x, y) = LibraryMLP(linear), PlainMLP(), (MLP_X, MLP_Y)
    else:
        model, plain, (x, y) = LibraryCNN(linear, conv), PlainCNN(), (CNN_X, CNN_Y)
    train(model, _mse_plus(0.0, lambda m: 0.0), x, y)
    path = str(tmp_path / "bnn.pt")
    torch.save(model.state_dict(), path)
    onnx_model = export_onnx(copy_means(plain, _means(model, mean_keys)), x)
    result = importers.match_posterior(library, path, onnx_model)
    assert len(result.matches) == 4 and not result.unmatched
    pfp = compile_pfp(onnx_model, result.arrays, x, tmp_path)
    samples = sampled(model, x)
    check_exact(pfp, samples) if kind == "mlp" else check_approximate(pfp, samples)


def test_matmul_export_transposed_and_renamed(tmp_path):
    """Linear on a 3-D input exports as MatMul with the weight pre-transposed to [in, out] under a new
    name ('onnx::MatMul_*'): matched by shape and order, checked by value, std transposed. Putting the
    square layer's std back untransposed fails the comparison."""
    linear, _, mean_keys = _torchbnn_layers()
    torch.manual_seed(4)
    model = LibraryMLP(linear, (6, 6, 4))
    with torch.no_grad():  # std varies by output unit: its transpose gives other hidden variances
        model.fc1.weight_log_sigma.copy_(torch.linspace(-3.0, 0.0, 6)[:, None].expand(6, 6))
    x = np.random.default_rng(5).standard_normal((1, 3, 6)).astype(np.float32)
    onnx_model = export_onnx(copy_means(PlainMLP((6, 6, 4)), _means(model, mean_keys)), x)
    result = importers.match_posterior("torchbnn", model, onnx_model)
    renamed = [m for m in result.matches if m.initializer.startswith("onnx::MatMul")]
    assert len(renamed) == 2 and all("by shape and order" in m.how and "transposed" in " ".join(m.notes) for m in renamed)
    samples = sampled(model, x)
    check_exact(compile_pfp(onnx_model, result.arrays, x, tmp_path), samples)
    square = next(m.initializer for m in renamed if m.std.shape == (6, 6))
    wrong = dict(result.arrays, **{f"{square}.std": result.arrays[f"{square}.std"].T.copy()})
    with pytest.raises(AssertionError):
        check_exact(compile_pfp(onnx_model, wrong, x, tmp_path, "wrong"), samples)


# ---------------------------------------------------------------------------------------------
# Pyro and TyXe


def _pyro_model(prior_scale=1.0):
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist
    from pyro.nn import PyroModule, PyroSample

    class PyroMLP(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc1 = PyroModule[nn.Linear](6, 8)
            self.fc1.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([8, 6]).to_event(2))
            self.fc1.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([8]).to_event(1))
            self.fc2 = PyroModule[nn.Linear](8, 4)
            self.fc2.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([4, 8]).to_event(2))
            self.fc2.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([4]).to_event(1))

        def forward(self, x, y=None):
            out = self.fc2(torch.relu(self.fc1(x)))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(out, 0.5).to_event(1), obs=y)
            return out

    return PyroMLP()


def _fit_pyro(guide_class, steps=30):
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = _pyro_model()
    guide = guide_class(model, init_scale=0.3)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(torch.from_numpy(MLP_X), torch.from_numpy(MLP_Y))  # sets the guide up
    _spread_pyro_scales()
    for _ in range(steps):
        svi.step(torch.from_numpy(MLP_X), torch.from_numpy(MLP_Y))
    return model, guide


def _spread_pyro_scales():
    import pyro

    spread([(n, p) for n, p in pyro.get_param_store().named_parameters() if n.rpartition(".")[2].startswith("scale")
            or ".scales." in n])


def _pyro_samples(model, guide, x, count=2000):
    from pyro.infer import Predictive

    import pyro

    pyro.set_rng_seed(7)
    with torch.no_grad():
        return Predictive(model, guide=guide, num_samples=count, return_sites=("_RETURN",))(torch.from_numpy(x))["_RETURN"].numpy()


def _pyro_mean_onnx(guide):
    with torch.no_grad():
        median = guide.median(torch.from_numpy(MLP_X))
    return export_onnx(copy_means(PlainMLP(), {name: median[name] for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}), MLP_X)


def test_pyro_autonormal_param_store_file(tmp_path, capsys):
    """A saved param store: scales are stored unconstrained with their constraint (softplus_positive)."""
    import onnx
    import pyro
    from pyro.infer.autoguide import AutoNormal

    model, guide = _fit_pyro(AutoNormal)
    store, onnx_path, out = str(tmp_path / "params.pt"), str(tmp_path / "m.onnx"), str(tmp_path / "post.npz")
    pyro.get_param_store().save(store)
    onnx.save(_pyro_mean_onnx(guide), onnx_path)
    assert pfpc.cli.main(["import-posterior", "--from", "pyro", store, "--onnx", onnx_path, "-o", out]) == 0
    assert "AutoNormal.scales.fc1.weight (std = the param store's constrained value" in capsys.readouterr().out
    check_exact(compile_pfp(onnx_path, dict(np.load(out)), MLP_X, tmp_path), _pyro_samples(model, guide, MLP_X))


def test_pyro_autodiagonalnormal_from_the_guide(tmp_path, capsys):
    """One flat loc/scale: unflattened in the guide's site order; the param store file alone is refused."""
    import onnx
    import pyro
    from pyro.infer.autoguide import AutoDiagonalNormal

    model, guide = _fit_pyro(AutoDiagonalNormal)
    onnx_model = _pyro_mean_onnx(guide)
    arrays = importers.import_posterior("pyro", guide, onnx_model)
    check_exact(compile_pfp(onnx_model, arrays, MLP_X, tmp_path), _pyro_samples(model, guide, MLP_X))
    store, onnx_path = str(tmp_path / "params.pt"), str(tmp_path / "m.onnx")
    pyro.get_param_store().save(store)
    onnx.save(onnx_model, onnx_path)
    assert pfpc.cli.main(["import-posterior", "--from", "pyro", store, "--onnx", onnx_path, "-o", str(tmp_path / "p.npz")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "AutoDiagonalNormal" in error and "guide" in error
    assert not os.path.exists(tmp_path / "p.npz")


def test_tyxe_variational_bnn(tmp_path):
    """TyXe's AutoNormal stores scales with a `positive` constraint (exp): read from its param store."""
    pyro = pytest.importorskip("pyro")
    tyxe = pytest.importorskip("tyxe")
    import pyro.distributions as dist
    from functools import partial

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    net = PlainMLP()
    bnn = tyxe.VariationalBNN(net, tyxe.priors.IIDPrior(dist.Normal(0.0, 1.0)),
                              tyxe.likelihoods.HomoskedasticGaussian(len(MLP_X), scale=0.5),
                              partial(tyxe.guides.AutoNormal, init_scale=0.3))
    data = [(torch.from_numpy(MLP_X), torch.from_numpy(MLP_Y))]
    bnn.fit(data, pyro.optim.Adam({"lr": 1e-3}), 1)  # sets the guide up
    _spread_pyro_scales()
    bnn.fit(data, pyro.optim.Adam({"lr": 1e-3}), 30)
    store = str(tmp_path / "params.pt")
    pyro.get_param_store().save(store)
    means = {name: bnn.net_guide.get_loc(f"net.{name}").detach() for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    onnx_model = export_onnx(copy_means(PlainMLP(), means), MLP_X)
    result = importers.match_posterior("tyxe", store, onnx_model)
    assert all("GreaterThan" in m.gaussian.source and m.how == "by name suffix" for m in result.matches)
    pyro.set_rng_seed(7)
    with torch.no_grad():
        samples = bnn.predict(torch.from_numpy(MLP_X), num_predictions=2000, aggregate=False).numpy()
    check_exact(compile_pfp(onnx_model, result.arrays, MLP_X, tmp_path), samples)


# ---------------------------------------------------------------------------------------------
# plain PyTorch with a posterior dict, and errors


def test_export_plain_model_with_posterior_dict(tmp_path):
    """Any PyTorch model plus {parameter: (mean, std)}; Monte Carlo by torch.func with sampled weights."""
    from pfpc.export import export_bnn

    torch.manual_seed(6)
    model = PlainMLP()
    generator = torch.Generator().manual_seed(8)
    posterior = {name: (p.detach().clone(), 0.1 + 0.3 * torch.rand(p.shape, generator=generator)) for name, p in model.named_parameters()}
    del posterior["fc2.bias"]  # stays deterministic
    onnx_path, npz_path = str(tmp_path / "m.onnx"), str(tmp_path / "p.npz")
    result = export_bnn(model, torch.from_numpy(MLP_X), onnx_path, npz_path, posterior=posterior)
    assert "fc2.bias" in result.deterministic
    torch.manual_seed(9)
    x = torch.from_numpy(MLP_X)
    with torch.no_grad():
        samples = np.stack([
            torch.func.functional_call(model, {n: m + s * torch.randn_like(s) for n, (m, s) in posterior.items()}, (x,)).numpy()
            for _ in range(SAMPLES)])
    check_exact(compile_pfp(onnx_path, dict(np.load(npz_path)), MLP_X, tmp_path), samples)


def test_unknown_checkpoint_layout_lists_the_keys(tmp_path, bayesian_torch_mlp, capsys):
    _, _, onnx_path = bayesian_torch_mlp
    path, out = str(tmp_path / "plain.pt"), str(tmp_path / "post.npz")
    torch.save(PlainMLP().state_dict(), path)
    assert pfpc.cli.main(["import-posterior", "--from", "bayesian-torch", path, "--onnx", onnx_path, "-o", out]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no bayesian-torch posterior found" in error
    assert "'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias' (4 keys)" in error
    assert not os.path.exists(out)
    with pytest.raises(PfpcError, match="it looks like --from bayesian-torch"):
        importers.import_posterior("blitz", bayesian_torch_mlp[1], onnx_path)


def test_onnx_from_other_weights_is_refused(tmp_path, bayesian_torch_mlp):
    model, path, _ = bayesian_torch_mlp
    other = export_onnx(PlainMLP(), MLP_X)  # same names and shapes, other values
    with pytest.raises(PfpcError, match="does not hold the checkpoint's mean of 'fc1.weight'"):
        importers.import_posterior("bayesian-torch", path, other)


def test_pickled_module_checkpoint_is_refused(tmp_path, bayesian_torch_mlp):
    """torch.save(model) pickles code; pfpc reads with weights_only=True and says what to save instead."""
    model, _, onnx_path = bayesian_torch_mlp
    path = str(tmp_path / "whole.pt")
    torch.save(model, path)
    with pytest.raises(PfpcError, match=r"pickled Python objects .*state_dict\(\)"):
        importers.import_posterior("bayesian-torch", path, onnx_path)


def test_unmatched_tensors_fail_unless_allowed(tmp_path, bayesian_torch_mlp):
    model, _, _ = bayesian_torch_mlp
    means = {"fc1.weight": model.fc1.mu_weight, "fc1.bias": model.fc1.mu_bias}
    smaller = export_onnx(_FirstLayer(means), MLP_X)
    with pytest.raises(PfpcError, match="2 stochastic tensors match no initializer.*--allow-unmatched"):
        importers.import_posterior("bayesian-torch", model, smaller)
    result = importers.match_posterior("bayesian-torch", model, smaller, allow_unmatched=True)
    assert sorted(result.arrays) == ["fc1.bias.std", "fc1.weight.std"] and len(result.unmatched) == 2
    assert "NOT matched (2" in result.report()


class _FirstLayer(nn.Module):
    def __init__(self, means):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        copy_means(self, means)

    def forward(self, x):
        return self.fc1(x)
