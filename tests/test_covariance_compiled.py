"""The compiled per-channel shared-noise PFP (``covariance=``, pfpc/passes/carry_channel_covariance.py):
the generated C (host build) against the float64 reference tests/reference_covariance.py, and
the networks it must leave untouched."""

import json
import os
import re
import shutil
import sys

import numpy as np
import onnx
import pytest

import architectures as A
import reference as R
import reference_covariance as RC
import test_covariance as TC
import pfpc
import torch
from pfpc.frontends.onnx_model import fold_constants
from torch import nn
from torch.nn import functional as F


class TinyInvertedResidual(nn.Module):
    """MobileNetV2's layout in miniature: a strided 3x3 stem, one inverted residual block
    (1x1 expansion, depthwise 3x3, linear 1x1 projection, residual add) with ReLU6 (Clip),
    global average pool, dense."""

    input_shape = (1, 3, 12, 12)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
                                   nn.Conv2d(24, 24, 3, 1, 1, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
                                   nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        stem = self.stem(x)
        return self.fc(torch.flatten(nn.functional.avg_pool2d(stem + self.block(stem), 6), 1))


class TinyLeNet(nn.Module):
    """LeNet-5's layout in miniature: conv 5x5 -> ReLU -> max-pool 2x2 twice (the second with
    a padded 3x3 window, stride 2, as ONNX allows), flatten, dense, ReLU, dense."""

    input_shape = (1, 1, 16, 16)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc1 = nn.Linear(6 * 2 * 2, 10)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 3, 2, 1)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class TinyPoolThenGlobal(nn.Module):
    """A Keras-style CNN: conv -> ReLU, a depthwise-separable residual block, max-pool 2x2, conv
    -> ReLU -> global average pool -> dense: the earlier convolutions' shared noise reaches the
    global pool only through the max-pool."""

    input_shape = (1, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.conv = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = nn.functional.max_pool2d(x + torch.relu(self.pointwise(torch.relu(self.depthwise(x)))), 2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))


def _compiled(cls, covariance, out_dir=None):
    model, stds, inputs = TC._onnx(cls)
    post = {k + ".std": v for k, v in stds.items()}
    compiled = pfpc.compile(model, post, covariance=covariance, batch=1, out_dir=out_dir)
    return model, stds, inputs, compiled


@pytest.mark.parametrize("cls,covariance", [(TC.LinearConvNet, "channel"), (TC.TinyDSCNN, "channel"), (TC.TinyResNet, "channel"),
                                           (TC.TinyResNet, "pooled"), (TinyInvertedResidual, "channel")])
def test_generated_c_matches_the_float64_reference(cls, covariance):
    """conv (+ depthwise/pointwise, strided, residual, ReLU, ReLU6, batch norm) -> global average pool ->
    dense with every convolution's loadings: the C's output moments equal reference_covariance's
    ("channel": its "channel_box", "pooled": its "pooled") with the compiler's spread of the
    loadings by the output variance (spread_variance) to 1e-5, and differ from the diagonal PFP."""
    model, stds, inputs, compiled = _compiled(cls, covariance)
    (mean, var), = compiled.run([inputs["x"]]).outputs
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    mode = "channel_box" if covariance == "channel" else covariance
    expected = RC.pfp_covariance(model, variances, inputs, mode, spread_variance=True)["y"]
    diagonal = RC.pfp_covariance(model, variances, inputs, "none")["y"]
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1], rtol=1e-5)
    assert np.median(var / diagonal[1]) > 1.1  # the pooled covariance is there


def test_max_pool_reads_the_loadings_as_the_float64_reference(tmp_path):
    """conv -> ReLU -> max-pool (2x2, then a padded 3x3 stride 2) -> flatten -> dense: every
    convolution gets a loading that its max-pool reads as the correlation of the window's
    elements (Clark's max of correlated Gaussians, `reference.maxpool2d_correlated`); the C's
    output moments equal reference_covariance's with the max-pool dropping the loading to 1e-5,
    and differ from the diagonal PFP. ``auto`` leaves max-pool networks to the diagonal PFP
    (the same C as ``none``)."""
    model, stds, inputs, compiled = _compiled(TinyLeNet, "channel", out_dir=str(tmp_path / "channel"))
    (mean, var), = compiled.run([inputs["x"]]).outputs
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = RC.pfp_covariance(model, variances, inputs, "channel_box", spread_variance=True, max_keeps_loading=False)["y"]
    diagonal = RC.pfp_covariance(model, variances, inputs, "none")["y"]
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1], rtol=1e-5)
    assert np.max(np.abs(var / diagonal[1] - 1)) > 0.01  # the correlation inside the windows is there
    record = json.loads((tmp_path / "channel" / "pfpc.json").read_text())["covariance"]
    assert len(record["convolutions"]) == 2
    for mode in ("none", "auto"):
        _compiled(TinyLeNet, mode, out_dir=str(tmp_path / mode))
    assert (tmp_path / "auto" / "pfp_model.c").read_text() == (tmp_path / "none" / "pfp_model.c").read_text()
    # the max-pools of correlated inputs are named after their ONNX nodes, as the diagonal PFP's
    # (the first was k_Relu, the second k_maxpool2d_correlated with no provenance)
    kernels = {mode: {layer["function"]: layer["onnx_nodes"] for layer in json.loads((tmp_path / mode / "pfpc.json").read_text())["layers"]}
               for mode in ("none", "channel")}
    pools = {mode: {name: nodes for name, nodes in found.items() if any("MaxPool" in node for node in nodes)} for mode, found in kernels.items()}
    assert len(pools["none"]) == 2 and pools["channel"] == pools["none"]


def test_max_pool_passes_the_loadings_on_to_a_global_pool():
    """A max-pool between convolutions and a global average pool reads its input's loadings and
    passes its maxima's loadings on (`maxpool2d_loading`), under ``channel`` and ``auto``: the C
    (``channel``) equals the float64 reference with the max-pool passing its loading on
    ("compiled") to 1e-5; against Monte Carlo (2000 draws) ``auto`` is within [0.8, 1.25] and
    closer than with the loadings ended at the max-pool (the reference's 0.875 here)."""
    model, stds, inputs, compiled = _compiled(TinyPoolThenGlobal, "channel")
    (mean, var), = compiled.run([inputs["x"]]).outputs
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = RC.pfp_covariance(model, variances, inputs, "channel_box", spread_variance=True, max_keeps_loading="compiled")["y"]
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1], rtol=1e-5)
    ended = RC.pfp_covariance(model, variances, inputs, "channel_box", spread_variance=True, max_keeps_loading=False)["y"]
    (_, auto_var), = _compiled(TinyPoolThenGlobal, "auto")[3].run([inputs["x"]]).outputs
    _, mc_var, _, var_se = R.monte_carlo(model, stds, inputs, 2000, seed=1, with_var_stderr=True)["y"]
    assert np.median(var_se / mc_var) < 0.05
    assert abs(np.log(np.median(auto_var / mc_var))) < abs(np.log(np.median(ended[1] / mc_var))) - 0.05
    assert 0.8 < np.median(auto_var / mc_var) < 1.25


class StridedDilatedNet(nn.Module):
    """Window sums of every kind of window: a 3x3 conv with stride 2, dilation (2, 1) and padding
    (1, 2) on a 13x11 input, ReLU, a 3x3 conv with dilation 2 (padding 1: the output grid's
    windows miss input rows), global average pool, dense."""

    input_shape = (1, 3, 13, 11)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=(1, 2), dilation=(2, 1))
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, dilation=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv2(torch.relu(self.conv1(x))), 1), 1))


@pytest.mark.parametrize("cls", [TC.LinearConvNet, TC.TinyResNet, TC.TinyDSCNN, TinyInvertedResidual, StridedDilatedNet])
def test_separable_window_sums_match_the_float64_reference(cls, tmp_path):
    """Cores without SIMD sum the covariance form's windows along rows, then columns
    (`pipeline.for_target`: ``separable_sums``): the C built with the Cortex-M4 pass list (here for
    the host) equals reference_covariance to 1e-5 as the one-kernel window sums do, and has the
    row and column kernels (weights of ones [C, 1, 1, out_w] and [C, 1, out_h, 1])."""
    from pfpc.codegen.targets import get_target
    from pfpc.passes.carry_channel_covariance import CarryChannelCovariance
    from pfpc.passes.pipeline import default_passes, for_target

    model, stds, inputs = TC._onnx(cls)
    passes = for_target(default_passes("channel"), get_target("cortex-m4"))
    assert any(isinstance(t, CarryChannelCovariance) and t.separable_sums for _, t in passes)
    compiled = pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, batch=1, passes=passes, out_dir=str(tmp_path / "out"))
    (mean, var), = compiled.run([inputs["x"]]).outputs
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = RC.pfp_covariance(model, variances, inputs, "channel_box", spread_variance=True)["y"]
    np.testing.assert_allclose(mean, expected[0].reshape(mean.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1].reshape(var.shape), rtol=1e-5)
    source = (tmp_path / "out" / "pfp_model.c").read_text()
    assert re.search(r"k_window_ones_\d+x1x\d+", source) and re.search(r"k_window_ones_\d+x\d+x1_", source)


def test_host_sums_narrow_rows_separably(tmp_path):
    """On the host ("channel_rows") the window sums whose rows have fewer than NARROW_SUM_ROW taps
    are summed along rows, then columns (`pipeline.for_target`: ``separable_sums="narrow"``): the
    tiny DS-CNN's 25x5 maps get the row and column kernels and equal reference_covariance to
    1e-5; the tiny ResNet's maps (rows of 16 and 8) keep one kernel per window sum."""
    from pfpc.codegen.targets import get_target
    from pfpc.passes.carry_channel_covariance import CarryChannelCovariance
    from pfpc.passes.pipeline import default_passes, for_target

    passes = for_target(default_passes("channel"), get_target("host"))
    assert any(isinstance(t, CarryChannelCovariance) and t.separable_sums == "narrow" for _, t in passes)
    model, stds, inputs, compiled = _compiled(TC.TinyDSCNN, "channel", out_dir=str(tmp_path / "dscnn"))
    (mean, var), = compiled.run([inputs["x"]]).outputs
    expected = RC.pfp_covariance(model, {k: v.astype(np.float64) ** 2 for k, v in stds.items()}, inputs, "channel_box", spread_variance=True)["y"]
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1], rtol=1e-5)
    source = (tmp_path / "dscnn" / "pfp_model.c").read_text()
    assert re.search(r"k_window_ones_\d+x1x5_", source) and re.search(r"k_window_ones_\d+x25x1_", source)
    assert not re.search(r"k_window_ones_\d+x25x5_", source)
    _compiled(TC.TinyResNet, "channel", out_dir=str(tmp_path / "resnet"))
    source = (tmp_path / "resnet" / "pfp_model.c").read_text()
    assert re.search(r"k_window_ones_\d+x16x16_", source) and not re.search(r"k_window_ones_\d+x1x\d+_", source)


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("arm-none-eabi-gcc", "qemu-system-arm")),
                    reason="arm-none-eabi-gcc or qemu-system-arm missing (.ci/run installs them)")
def test_cortex_m4_build_matches_the_float64_reference(tmp_path):
    """TinyResNet with every convolution's loadings built for the Cortex-M4 and run under QEMU: its
    schedule (register blocks of outputs, the taps of a window row innermost where the input is
    Gaussian or the border is tested: `schedule._inputs_per_tap`) and the separable window sums
    give reference_covariance's moments to 1e-5, as the host build does."""
    model, stds, inputs = TC._onnx(TC.TinyResNet)
    out = str(tmp_path / "m4")
    pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, covariance="channel", batch=1, target="cortex-m4", out_dir=out)
    (mean, var), = pfpc.compiler.run(out, [inputs["x"]], emulate=True).outputs
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = RC.pfp_covariance(model, variances, inputs, "channel_box", spread_variance=True)["y"]
    np.testing.assert_allclose(mean, expected[0].reshape(mean.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1].reshape(var.shape), rtol=1e-5)


@pytest.mark.parametrize("cls", [TC.LinearMLP, TC.ConvPointwise])
def test_auto_leaves_networks_without_a_pool_untouched(cls, tmp_path):
    """No loading can reach a mean over positions: auto and channel generate the same C as none."""
    sources = {}
    for mode in ("none", "auto", "channel"):
        _compiled(cls, mode, out_dir=str(tmp_path / mode))
        sources[mode] = open(tmp_path / mode / "pfp_model.c").read()
    assert sources["auto"] == sources["none"] and sources["channel"] == sources["none"]


def test_none_is_the_diagonal_pfp_bit_for_bit(tmp_path):
    """covariance="none" runs no rewrite: the same C as a pass list without the pass."""
    from pfpc.passes.pipeline import default_passes

    model, stds, inputs = TC._onnx(TC.LinearConvNet)
    post = {k + ".std": v for k, v in stds.items()}
    without = [p for p in default_passes() if p[0] != "carry_channel_covariance"]
    pfpc.compile(model, post, covariance="none", out_dir=str(tmp_path / "none"))
    pfpc.compile(model, post, passes=without, out_dir=str(tmp_path / "without"))
    assert open(tmp_path / "none" / "pfp_model.c").read() == open(tmp_path / "without" / "pfp_model.c").read()


@pytest.mark.parametrize("cls", [TC.TinyResNet, TC.TinyDSCNN])
def test_compiled_auto_keeps_the_pooled_variance(cls, tmp_path):
    """The default (auto) against Monte Carlo (onnxruntime, 600 weight draws, a unit's variance
    to about 6 %): median PFP/MC output variance in [0.8, 1.25] where the diagonal PFP (covariance
    none) is below 0.7; means as close to MC as the diagonal PFP's. pfpc.json records the choice."""
    model, stds, inputs, compiled = _compiled(cls, "auto", out_dir=str(tmp_path / "auto"))
    (mean, var), = compiled.run([inputs["x"]]).outputs
    (diag_mean, diag_var), = _compiled(cls, "none")[3].run([inputs["x"]]).outputs
    mc_mean, mc_var, _, var_se = R.monte_carlo(model, stds, inputs, 600, seed=1, with_var_stderr=True)["y"]
    assert np.median(var_se / mc_var) < 0.1
    assert np.median(diag_var / mc_var) < 0.7
    assert 0.8 < np.median(var / mc_var) < 1.25
    std = np.sqrt(mc_var)
    assert np.max(np.abs(mean - mc_mean) / std) <= np.max(np.abs(diag_mean - mc_mean) / std) + 0.05
    record = json.loads((tmp_path / "auto" / "pfpc.json").read_text())["covariance"]
    assert record["option"] == "auto" and record["mode"] == "channel" and record["convolutions"]


def test_compiled_linear_network_exact_within_monte_carlo_error():
    """conv -> global average pool -> dense (no activation): the compiled default matches MC's
    variance within 4 standard errors per unit (2000 draws), where the diagonal PFP is low."""
    model, stds, inputs, compiled = _compiled(TC.LinearConvNet, "auto")
    (mean, var), = compiled.run([inputs["x"]]).outputs
    mc_mean, mc_var, mean_se, var_se = R.monte_carlo(model, stds, inputs, 2000, seed=1, with_var_stderr=True)["y"]
    assert np.all(np.abs(mean - mc_mean) < 4 * mean_se + 1e-6)
    assert np.all(np.abs(var - mc_var) < 4 * var_se + 0.02 * mc_var)
    (_, diag_var), = _compiled(TC.LinearConvNet, "none")[3].run([inputs["x"]]).outputs
    assert np.median(diag_var / mc_var) < 0.9


@pytest.mark.parametrize("name", ["seed_mlp", "seed_lenet"])
def test_auto_leaves_the_seed_networks_untouched(name, tmp_path):
    """The seed MLP and LeNet-5 have no mean over positions: auto generates the C of none, and
    pfpc.json has no covariance record."""
    model = fold_constants(A.build_onnx(name))
    posterior = A.posterior(model)
    sources = {}
    for mode in ("none", "auto"):
        pfpc.compile(model, posterior, covariance=mode, batch=1, out_dir=str(tmp_path / mode))
        sources[mode] = (tmp_path / mode / "pfp_model.c").read_text()
        assert "covariance" not in json.loads((tmp_path / mode / "pfpc.json").read_text())
    assert sources["auto"] == sources["none"]


DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "seed-checkpoints")) or not os.path.isdir(os.path.join(DATA, "mnist")),
                    reason=f"{DATA} (the MNIST test sets and the seed checkpoints) is absent: a fresh clone has no data")
def test_seed_lenet_channel_matches_the_float64_reference(tmp_path):
    """The seed paper's pretrained LeNet-5 under ``channel`` (both convolutions' loadings read by
    their max-pools) on 8 MNIST and 8 Fashion-MNIST test images: the C's logit moments equal
    reference_covariance's in what the max-pools' correlation changes (the C's and the
    reference's moments with ``channel`` less those with ``none``) to 1 % of the change: the
    diagonal C and the diagonal reference already differ on this model (its logit variances by
    ~0.0066 each, before this rule), so the 1e-5 check is the synthetic TinyLeNet's above; and
    the argmax of the means is the diagonal PFP's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "examples", "seed_mnist"))
    from build_models import build
    from data import load

    model_path, post_path = build("lenet", DATA, str(tmp_path))
    x = np.concatenate([load(DATA, "mnist", 8)[0], load(DATA, "fashion", 8)[0]])
    (mean, var), = pfpc.compile(model_path, post_path, covariance="channel", batch=1).run([x]).outputs
    (diag_mean, diag_var), = pfpc.compile(model_path, post_path, covariance="none", batch=1).run([x]).outputs
    mean, var, diag_mean, diag_var = (np.asarray(a, np.float64).reshape(len(x), -1) for a in (mean, var, diag_mean, diag_var))
    model = fold_constants(onnx.load(model_path))
    variances = {k[: -len(".std")]: np.asarray(v, np.float64) ** 2 for k, v in np.load(post_path).items()}
    name = model.graph.input[0].name
    for index, image in enumerate(x):
        (expected,) = [value for key, value in RC.pfp_covariance(model, variances, {name: image[None]}, "channel_box", spread_variance=True,
                                                                 max_keeps_loading=False).items() if key == model.graph.output[0].name]
        diagonal = RC.pfp_covariance(model, variances, {name: image[None]}, "none")[model.graph.output[0].name]
        for got, want in ((mean[index] - diag_mean[index], expected[0] - diagonal[0]), (var[index] - diag_var[index], expected[1] - diagonal[1])):
            np.testing.assert_allclose(got, want.ravel(), atol=0.01 * np.abs(want).max())
        assert np.max(np.abs(expected[1] - diagonal[1])) > 1e-3 * var[index].max()  # the rule changes the variances
        assert np.argmax(mean[index]) == np.argmax(diag_mean[index])


def test_bad_covariance_option_is_one_error():
    with pytest.raises(pfpc.PfpcError, match="--covariance 'full'"):
        _compiled(TC.LinearConvNet, "full")


def _arena_buffers(program) -> list:
    """[(offset, bytes, first step, last step)] of the arena's buffers, from the steps' arguments
    alone: a tensor lives from the first step that names it (its write) to the last (its read);
    a tensor written in place over another (same offset, written at the step that last reads the
    other) continues that buffer. Fails if two tensors live at one step share bytes otherwise."""
    steps = {}
    for index, step in enumerate(program.steps):
        for arg in step.args:
            if arg.kind == "arena":
                first, last = steps.get(arg.c_name, (index, index))
                steps[arg.c_name] = (min(first, index), max(last, index))
    tensors = sorted((t for t in program.tensors if t.kind == "arena" and t.c_name in steps), key=lambda t: steps[t.c_name][0])
    buffers = []  # [offset, bytes, first, last]
    for tensor in tensors:
        first, last = steps[tensor.c_name]
        start, end = tensor.offset, tensor.offset + tensor.nbytes
        continued = None
        for buffer in buffers:
            if buffer[2] <= first <= buffer[3] and buffer[0] < end and start < buffer[0] + buffer[1]:
                # sharing bytes with a live buffer: only as its continuation written in place
                assert buffer[3] == first and buffer[0] == start and buffer[1] == tensor.nbytes and continued is None, tensor.c_name
                continued = buffer
        if continued is not None:
            continued[3] = last
        else:
            buffers.append([start, tensor.nbytes, first, last])
    return buffers


def test_residual_network_arena_at_its_lower_bound():
    """The arena of a small ResNet with every convolution's loadings (Cortex-M4) is the most bytes its buffers
    (computed here from the steps' arguments) ever hold at once, and the element-wise kernels of
    the covariance form write in place: the first residual block's peak is 8 feature maps (the
    block input's mean, variance and loading; the second convolution's input mean, variance and
    independent variance; its output mean, and its variance written over the coherent term), where
    separate buffers for the ReLU, its loading and the coherent term needed 9."""
    model, stds, _ = TC._onnx(TC.TinyResNet)
    # Cortex-M4: its 3x3 convolutions read no padded copies (host builds add those buffers)
    program = pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, covariance="channel", batch=1, target="cortex-m4").program
    buffers = _arena_buffers(program)
    steps = range(max(b[3] for b in buffers) + 1)
    bound = max(sum((b[1] + 15) // 16 * 16 for b in buffers if b[2] <= step <= b[3]) for step in steps)
    assert program.arena_size == bound
    feature_map = 4 * 8 * 16 * 16  # float32 bytes of a stem / first-block tensor (8 channels of 16x16)
    assert 8 * feature_map <= program.arena_size < 9 * feature_map


def _stochastic_bias_stack(batch):
    """Conv -> Conv -> GlobalAveragePool with stochastic biases only (the differential fuzzer's
    seed 14 of its covariance batch, shrunk): the output variance does not depend on the input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(14)
    inits = {"w1": rng.standard_normal((4, 4, 3, 3)), "b1": rng.standard_normal(4), "w2": rng.standard_normal((2, 4, 3, 3)),
             "b2": rng.standard_normal(2)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 7, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 1, 1])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    stds = {"b1": np.full(4, 0.5, np.float32), "b2": np.full(2, 0.1, np.float32)}
    return model, stds, {"x": rng.standard_normal((batch, 4, 7, 3)).astype(np.float32)}, {"c2"}  # c1's loading reaches no pool


def _batch_of(cls, batch):
    """``cls``'s model (`test_covariance._onnx`) exported for a batch of ``batch`` rows, the last
    row a copy of the first; every convolution gets a loading (None)."""
    model, stds, inputs = TC._onnx(type(cls.__name__, (cls,), {"input_shape": (batch, *cls.input_shape[1:])}))
    inputs["x"][-1] = inputs["x"][0]
    return model, stds, inputs, None


@pytest.mark.parametrize("build,covariance", [
    (lambda: _stochastic_bias_stack(2), "auto"), (lambda: _stochastic_bias_stack(3), "channel"),
    (lambda: _batch_of(TC.LinearConvNet, 3), "channel"),
    pytest.param(lambda: _batch_of(TC.TinyResNet, 3), "auto", marks=pytest.mark.slow),
    pytest.param(lambda: _batch_of(TinyInvertedResidual, 2), "channel", marks=pytest.mark.slow)],
    ids=["bias-stack-2-auto", "bias-stack-3-channel", "linear-conv-3-channel", "resnet-3-auto", "inverted-residual-2-channel"])
def test_batch_of_several_rows_matches_the_float64_reference_in_every_row(build, covariance, tmp_path):
    """The covariance form at a batch of several rows: every row's output moments equal
    reference_covariance's (the convolutions the compiled plan names get loadings) to 1e-5; rows
    with the same input get the same moments, rows with different inputs different variances
    (unless the variance does not depend on the input: stochastic biases only). The compiled
    loadings gave every row but the first the diagonal PFP's variance (a convolution's pooled bias
    variance, one row, was read for every row: the differential fuzzer, seed 14 of its covariance
    batch: conv -> conv -> pool, row 1 0.0011 vs 0.0077)."""
    model, stds, inputs, loaded = build()
    out_dir = str(tmp_path / "out")
    (mean, var), = pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, covariance=covariance, out_dir=out_dir).run([inputs["x"]]).outputs
    planned = json.loads(open(os.path.join(out_dir, "pfpc.json")).read())["covariance"]["convolutions"]
    assert len(planned) == (len(loaded) if loaded else sum(n.op_type == "Conv" for n in model.graph.node))
    variances = {k: v.astype(np.float64) ** 2 for k, v in stds.items()}
    expected = RC.pfp_covariance(model, variances, inputs, "channel_box", spread_variance=True, loaded=loaded)
    expected = expected[model.graph.output[0].name]
    diagonal = RC.pfp_covariance(model, variances, inputs, "none")[model.graph.output[0].name]
    np.testing.assert_allclose(mean, expected[0].reshape(mean.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected[1].reshape(var.shape), rtol=1e-5)
    for row in range(len(var)):
        assert np.max(np.abs(var[row] / diagonal[1][row].reshape(var[row].shape) - 1)) > 0.01  # the covariance form in every row
    np.testing.assert_allclose(var[-1], var[0], rtol=1e-6)
    if np.ptp(expected[1], axis=0).max() > 1e-3 * expected[1].max():  # the variance depends on the input
        assert not np.allclose(var[1], var[0], rtol=1e-3)
