"""Shared posteriors (stochastic weight sharing): the .npz format, `pfpc compress`, and the generated C
that reads weights through codebooks, against the NumPy reference of the expanded posterior."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import pfpc.compiler as compiler
import reference
from helpers import assert_close, make_model
from pfpc.cli import main
from pfpc.frontends import shared_posterior as sp
from pfpc.passes.fold_weight_moments import FoldWeightMoments
from pfpc.passes.pipeline import default_passes

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
LENET = os.path.join(EXAMPLES, "lenet", "model.onnx")
LENET_POST = os.path.join(EXAMPLES, "lenet", "post.npz")


def _random_shared(rng, shape, components, blends=0, exceptions=0, scale=False):
    size = int(np.prod(shape))
    positions = rng.permutation(size)
    tensor = sp.SharedTensor(
        tuple(shape), rng.uniform(-0.2, 0.6, components).astype(np.float32), rng.uniform(0.05, 0.4, components).astype(np.float32),
        rng.integers(0, components, shape).astype(np.uint8 if components <= 256 else np.uint16))
    if blends:
        tensor.blend_position = np.sort(positions[:blends])
        tensor.blend_component = rng.integers(0, components, (blends, 2)).astype(np.uint8)
        tensor.blend_alpha = rng.uniform(0, 1, blends).astype(np.float32)
    if exceptions:
        tensor.exception_position = np.sort(positions[blends : blends + exceptions])
        tensor.exception_mean = rng.normal(0, 1, exceptions).astype(np.float32)
        tensor.exception_std = rng.uniform(0.01, 0.5, exceptions).astype(np.float32)
    if scale:
        tensor.channel_scale = rng.uniform(-2, 2, shape[0]).astype(np.float32)
    return tensor


def _expanded_by_loops(tensor):
    """The format's semantics, weight by weight (independent of `shared_posterior.expand_tensor`)."""
    mu, sigma = np.zeros(tensor.size), np.zeros(tensor.size)
    index = tensor.component_index.reshape(-1)
    blends = {} if tensor.blend_position is None else {int(p): i for i, p in enumerate(tensor.blend_position)}
    exceptions = {} if tensor.exception_position is None else {int(p): i for i, p in enumerate(tensor.exception_position)}
    channel_stride = int(np.prod(tensor.shape[1:]))
    for j in range(tensor.size):
        if j in exceptions:
            mu[j], sigma[j] = tensor.exception_mean[exceptions[j]], tensor.exception_std[exceptions[j]]
        elif j in blends:
            (a, b), alpha = tensor.blend_component[blends[j]], float(tensor.blend_alpha[blends[j]])
            mu[j] = alpha * float(tensor.component_mean[a]) + (1 - alpha) * float(tensor.component_mean[b])
            sigma[j] = alpha * float(tensor.component_std[a]) + (1 - alpha) * float(tensor.component_std[b])
        else:
            mu[j], sigma[j] = tensor.component_mean[index[j]], tensor.component_std[index[j]]
        if tensor.channel_scale is not None:
            scale = float(tensor.channel_scale[j // channel_stride])
            mu[j], sigma[j] = scale * mu[j], abs(scale) * sigma[j]
    return mu.reshape(tensor.shape), sigma.reshape(tensor.shape)


def test_round_trip_and_expansion(tmp_path):
    rng = np.random.default_rng(0)
    tensor = _random_shared(rng, (4, 3, 3, 3), 7, blends=10, exceptions=5, scale=True)
    shared = sp.SharedPosterior("independent", {"w": tensor}, {"b.std": np.full(4, 0.1, np.float32)})
    path = tmp_path / "shared.npz"
    sp.save(shared, path)
    with np.load(path, allow_pickle=False) as archive:  # every array is plain data
        assert str(archive["format"]) == "pfpc-shared-posterior" and int(archive["version"]) == 1
    back = sp.read(path)
    assert back.semantics == "independent" and set(back.rest) == {"b.std"}
    for field in sp.FIELDS:
        np.testing.assert_array_equal(getattr(back.tensors["w"], field), getattr(tensor, field))
    mu, sigma = sp.expand_tensor(back.tensors["w"])
    expected_mu, expected_sigma = _expanded_by_loops(tensor)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-12, atol=1e-12)


def _lenet_arrays(**overrides):
    rng = np.random.default_rng(1)
    tensor = _random_shared(rng, (32, 64), 5, blends=3, exceptions=2)
    arrays = sp.to_arrays(sp.SharedPosterior("independent", {"fc1.weight": tensor}, {}))
    arrays.update(overrides)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize("overrides,expected", [
    ({"format": np.array("something-else")}, "'format' is 'something-else'"),
    ({"format": np.array(3)}, "'format' must be a string"),
    ({"version": np.array(2)}, "version 2 is not supported"),
    ({"semantics": np.array("sometimes")}, "'semantics' is 'sometimes'"),
    ({"fc1.weight.component_std": None}, "tensor 'fc1.weight' has no 'fc1.weight.component_std'"),
    ({"fc1.weight.component_index": np.full((32, 64), 9, np.uint8)}, "'fc1.weight.component_index' holds 9, not a component in [0, 5)"),
    ({"fc1.weight.component_index": np.zeros((32, 64), np.float32)}, "'fc1.weight.component_index' has dtype float32"),
    ({"fc1.weight.component_index": np.zeros((64, 32), np.uint8)}, "'fc1.weight.component_index' has shape [64, 32], expected [32, 64]"),
    ({"fc1.weight.component_std": -np.ones(5, np.float32)}, "'fc1.weight.component_std' holds negative values"),
    ({"fc1.weight.component_mean": np.full(5, np.nan, np.float32)}, "'fc1.weight.component_mean' holds NaN"),
    ({"fc1.weight.exception_std": None}, "'fc1.weight.exception_position' needs 'fc1.weight.exception_std' too"),
    ({"fc1.weight.exception_position": np.array([3, 3])}, "'fc1.weight.exception_position' lists a position twice"),
    ({"fc1.weight.blend_position": np.array([0, 1, 5000])}, "'fc1.weight.blend_position' holds 5000, not a flat position"),
    ({"fc1.weight.blend_alpha": np.array([0.5, 1.5, 0.0], np.float32)}, "'fc1.weight.blend_alpha' holds values outside [0, 1]"),
    ({"fc9.weight.component_mean": np.ones(2, np.float32)}, "'fc9.weight.component_mean' names no initializer"),
    ({"fc1.weight.std": np.ones((32, 64), np.float32)}, "tensor 'fc1.weight' is covered by the shared posterior"),
    ({"fc1.weight.channel_scale": np.ones(7, np.float32)}, "'fc1.weight.channel_scale' has shape [7], expected [32]"),
])
def test_invalid_shared_posteriors(tmp_path, capsys, overrides, expected):
    path = tmp_path / "bad_shared.npz"
    np.savez(path, **_lenet_arrays(**overrides))
    out = tmp_path / "out"
    code = main([LENET, "--posterior", str(path), "-o", str(out), "--batch", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "bad_shared.npz" in err and expected in err, err
    assert not out.exists()


def test_w2_against_quantile_integral():
    """W2 between 1-D Gaussians from its definition: the L2 distance of the quantile functions."""
    from scipy.stats import norm

    from pfpc.compress import w2

    rng = np.random.default_rng(2)
    u = (np.arange(200000) + 0.5) / 200000
    for _ in range(5):
        mu_a, mu_b = rng.normal(0, 1, 2)
        s_a, s_b = rng.uniform(0.05, 2, 2)
        integral = np.sqrt(np.mean((norm.ppf(u, mu_a, s_a) - norm.ppf(u, mu_b, s_b)) ** 2))
        assert w2(mu_a, s_a, mu_b, s_b) == pytest.approx(integral, rel=2e-3)


def test_merge_is_moment_matching():
    from scipy.integrate import quad
    from scipy.stats import norm

    from pfpc.compress import merge

    centres = np.array([[0.3, 0.2], [0.35, 0.25], [3.0, 1.0]])
    labels = np.array([0] * 3 + [1] * 5 + [2] * 4)
    merged, new_labels = merge(centres, labels, threshold=0.1)
    assert len(merged) == 2 and list(new_labels) == [0] * 8 + [1] * 4
    density = lambda x: (3 * norm.pdf(x, 0.3, 0.2) + 5 * norm.pdf(x, 0.35, 0.25)) / 8  # noqa: E731
    mean = quad(lambda x: x * density(x), -5, 5)[0]
    var = quad(lambda x: (x - mean) ** 2 * density(x), -5, 5)[0]
    assert merged[0, 0] == pytest.approx(mean, rel=1e-6) and merged[0, 1] == pytest.approx(np.sqrt(var), rel=1e-6)
    np.testing.assert_array_equal(merged[1], centres[2])


def test_compress_is_deterministic_and_reports(tmp_path, capsys):
    outputs = []
    for run in range(2):
        out = tmp_path / f"shared{run}.npz"
        code = main(["compress", LENET, "--posterior", LENET_POST, "-o", str(out), "--components", "8", "--outliers", "0.01",
                     "--no-evaluate", "--report", str(tmp_path / "report.md")])
        assert code == 0
        outputs.append(dict(np.load(out, allow_pickle=False)))
    text = capsys.readouterr().out
    assert "fc1.weight" in text and "bytes before" in text
    assert set(outputs[0]) == set(outputs[1])
    for key in outputs[0]:
        np.testing.assert_array_equal(outputs[0][key], outputs[1][key])
    shared = sp.parse(outputs[0], {"conv2.weight": (16, 6, 3, 3), "fc1.weight": (32, 64), "fc2.weight": (10, 32), "conv1.weight": (6, 1, 3, 3),
                                   "conv1.bias": (6,), "conv2.bias": (16,), "fc1.bias": (32,), "fc2.bias": (10,)}, "x")
    assert set(shared.tensors) == {"conv2.weight", "fc1.weight", "fc2.weight"}  # --min-size 64 leaves the rest
    assert all(t.components <= 8 and t.exceptions == int(0.01 * t.size) for t in shared.tensors.values())
    assert "conv1.weight.std" in shared.rest
    # the outliers are the weights farthest (W2) from their component, kept exactly
    model = onnx.load(LENET)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    stds = dict(np.load(LENET_POST))
    tensor = shared.tensors["fc1.weight"]
    mu, sigma = weights["fc1.weight"].reshape(-1), stds["fc1.weight.std"].reshape(-1)
    index = tensor.component_index.reshape(-1)
    distance = np.hypot(mu - tensor.component_mean[index], sigma - tensor.component_std[index])
    assert set(tensor.exception_position) == set(np.argsort(-distance)[: tensor.exceptions])
    np.testing.assert_array_equal(tensor.exception_mean, mu[tensor.exception_position])


def test_max_w2_budget_is_met():
    from pfpc.compress import Options, compress

    rng = np.random.default_rng(3)
    means = {"w": rng.normal(0, 1, 500).astype(np.float32)}
    stds = {"w": rng.uniform(0.1, 1, 500).astype(np.float32)}
    shared, rows = compress(means, stds, Options(components=None, max_w2=0.05))
    fewer, _ = compress(means, stds, Options(components=shared.tensors["w"].components - 1))
    assert rows[0]["rms_w2"] <= 0.05
    mu, sigma = sp.expand_tensor(fewer.tensors["w"])
    assert np.sqrt(np.mean((mu - means["w"]) ** 2 + (sigma - stds["w"]) ** 2)) > 0.05  # the fewest that meet it


def _small_network(rng, components, blends=0, exceptions=0, scale=False):
    """Conv -> Relu -> Flatten -> Gemm (transB: the layout pass transposes it) -> Relu -> MatMul,
    with shared posteriors on all three weights; the ONNX weights are the expanded means."""
    shapes = {"conv.w": (4, 2, 3, 3), "fc.w": (8, 64), "out.w": (8, 5)}
    tensors = {name: _random_shared(rng, shape, components, blends, exceptions, scale and name == "conv.w") for name, shape in shapes.items()}
    initializers = {name: sp.expand_tensor(t)[0].astype(np.float32) for name, t in tensors.items()}
    initializers["conv.b"] = rng.normal(0, 0.1, 4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["g"]),
        helper.make_node("MatMul", ["g", "out.w"], ["y"]),
    ]
    model = make_model(nodes, [("x", [2, 2, 8, 8])], ["y"], initializers)
    shared = sp.SharedPosterior("independent", tensors, {"conv.b.std": np.full(4, 0.05, np.float32)})
    return model, shared


def _check_shared_model(model, shared, x, tmp_path, rtol=1e-5):
    """Compiled shared posterior == compiled expanded posterior, and == the NumPy reference."""
    arrays = sp.to_arrays(shared)
    result = compiler.compile(model, arrays, out_dir=str(tmp_path / "shared"))
    expanded = sp.expand(shared)
    compiler.compile(model, expanded, out_dir=str(tmp_path / "expanded"))
    (mean, var), = compiler.run_host(str(tmp_path / "shared"), [x])
    (full_mean, full_var), = compiler.run_host(str(tmp_path / "expanded"), [x])
    np.testing.assert_array_equal(mean, full_mean)
    np.testing.assert_array_equal(var, full_var)
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in expanded.items() if k.endswith(".std")}
    (ref_mean, ref_var), = reference.pfp_onnx(model, variances, {"x": x}).values()
    assert_close(mean, ref_mean, rtol, "mean")
    assert_close(var, ref_var, rtol, "var")
    return result, open(tmp_path / "shared" / "pfp_model.c").read()


@pytest.mark.parametrize("components,blends,exceptions,bits", [(6, 2, 0, 4), (16, 0, 0, 4), (12, 2, 7, 4), (40, 2, 3, 8)])
def test_generated_c_reads_through_codebooks(tmp_path, components, blends, exceptions, bits):
    rng = np.random.default_rng(components)
    model, shared = _small_network(rng, components, blends, exceptions)
    x = rng.uniform(0, 1, (2, 2, 8, 8)).astype(np.float32)
    result, source = _check_shared_model(model, shared, x, tmp_path)
    meta = result.program.shared.metadata()
    assert {o["initializer"] for o in meta["operands"]} == {"conv.w", "fc.w", "out.w"} and not meta["kept_full"]
    fc = next(o for o in meta["operands"] if o["initializer"] == "fc.w")
    assert fc["index_bits"] == bits
    # TVM's kernels take the codes and tables as arguments and gather the weights themselves
    assert re.search(r"PFP_KERNEL void k_\w*codebook\([^)]*const uint8_t\* restrict \w*_index,\s+const float\* restrict \w*_mean_table", source)
    # 4-bit: 15 codes and the escape; the single-use entries (blends, exceptions) beyond them are exceptions
    assert (fc["exceptions"] > 0) == (bits == 4 and components + blends + exceptions > 16)
    assert meta["shared_bytes"] < meta["full_bytes"] / 3


def test_clustered_exceptions_match_reference(tmp_path):
    """A run of 40 neighbouring exceptions in the kernel's layout: blocks of 16 weights hold 16 of
    them each, the longest chain the escape branch compares; the first and last weights too."""
    rng = np.random.default_rng(9)
    model, shared = _small_network(rng, 15)
    fc = shared.tensors["fc.w"]  # [8, 64], read transposed: kernel position f is (f % 8, f // 8)
    final = np.concatenate([[0], np.arange(100, 140), [fc.size - 1]])
    fc.exception_position = np.sort((final % 8) * 64 + final // 8).astype(np.int64)
    fc.exception_mean = rng.normal(0, 1, fc.exception_position.size).astype(np.float32)
    fc.exception_std = rng.uniform(0.01, 0.5, fc.exception_position.size).astype(np.float32)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "fc.w"))
    model.graph.initializer.append(numpy_helper.from_array(sp.expand_tensor(fc)[0].astype(np.float32), "fc.w"))
    x = rng.uniform(0, 1, (2, 2, 8, 8)).astype(np.float32)
    result, _ = _check_shared_model(model, shared, x, tmp_path)
    book = next(b for b in result.program.shared.codebooks if b.source == "fc.w")
    assert book.width == 4 and list(book.exception_position) == list(final)
    assert book.layout.block == 16 and book.layout.chain == 16


@pytest.mark.parametrize("target", ["host", "cortex-m4"])
def test_wide_codebook_operand_decodes_without_workspace(tmp_path, target):
    """600 x 3 weights: neither the whole weight nor a column fits the decode scratch
    (`schedule.DECODE_SCRATCH`); the gather goes inside the reduction (M4) or per row of 3 (host)."""
    rng = np.random.default_rng(10)
    tensor = _random_shared(rng, (600, 3), 9, exceptions=20)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [("x", [2, 600])], ["y"], {"w": sp.expand_tensor(tensor)[0].astype(np.float32)})
    shared = sp.SharedPosterior("independent", {"w": tensor}, {})
    compiler.compile(model, sp.to_arrays(shared), out_dir=str(tmp_path / "out"), target=target)
    x = rng.uniform(0, 1, (2, 600)).astype(np.float32)
    (mean, var), = compiler.run_host(str(tmp_path / "out"), [x])
    mu, sigma = sp.expand_tensor(tensor)
    (ref_mean, ref_var), = reference.pfp_onnx(model, {"w": sigma ** 2}, {"x": x}).values()
    assert_close(mean, ref_mean, 1e-5, "mean")
    assert_close(var, ref_var, 1e-5, "var")


def test_channel_scaled_tensor_matches_reference(tmp_path):
    """A per-channel scale multiplies the codebook per channel: still exact, stored as a larger codebook."""
    rng = np.random.default_rng(5)
    model, shared = _small_network(rng, 4, scale=True)
    x = rng.uniform(0, 1, (2, 2, 8, 8)).astype(np.float32)
    result, _ = _check_shared_model(model, shared, x, tmp_path)
    conv = next(o for o in result.program.shared.metadata()["operands"] if o["initializer"] == "conv.w")
    assert 4 < conv["entries"] <= 16


def test_codebook_widths_and_escape():
    from pfpc.codegen.shared_weights import choose_codebook

    rng = np.random.default_rng(6)
    for entries, width in ((3, 4), (16, 4), (200, 8), (3000, 16)):
        table = rng.normal(0, 1, (2, entries)).astype(np.float32)
        codes = np.concatenate([np.arange(entries), rng.integers(0, entries, 6000 - entries)])
        book = choose_codebook([table[0][codes], table[1][codes]], "w", "w", [("a", "mean"), ("b", "var")])
        assert book.width == width and book.exception_position.size == 0
        np.testing.assert_array_equal(book.table[:, book.codes.astype(int)], table[:, codes])
    # 17 entries, one of them rare: 15 in the table, the escape code for the other two entries' weights
    codes = np.concatenate([np.repeat(np.arange(15), 40), [15, 16]])
    values = rng.normal(0, 1, 17).astype(np.float32)[codes]
    book = choose_codebook([values], "w", "w", [("a", "mean")])
    assert book.width == 4 and list(book.exception_position) == [600, 601]
    assert np.all(book.codes[600:] == 15)
    np.testing.assert_array_equal(book.exception_value[0], values[600:])


@pytest.mark.parametrize("extra", [[], ["--blend", "0.5"], ["--channel-scale"]])
def test_lenet_shared_matches_reference_and_saves_flash(tmp_path, capsys, extra):
    shared_path = str(tmp_path / "shared.npz")
    assert main(["compress", LENET, "--posterior", LENET_POST, "-o", shared_path, "--components", "15", "--outliers", "0.02",
                 "--no-evaluate", *extra]) == 0
    shared = sp.read(shared_path)
    assert all(t.blends > 0 for t in shared.tensors.values()) == ("--blend" in extra)
    assert all(t.channel_scale is not None for t in shared.tensors.values()) == ("--channel-scale" in extra)
    out = str(tmp_path / "lenet")
    assert main([LENET, "--posterior", shared_path, "-o", out, "--batch", "1"]) == 0
    report = capsys.readouterr().out
    assert "shared posterior: 3 weight operands as codebooks" in report and "bytes of flash saved" in report
    x = np.load(os.path.join(EXAMPLES, "lenet", "sample.npy"))
    (mean, var), = compiler.run_host(out, [x])
    expanded = sp.expand(sp.read(shared_path))
    model = onnx.load(LENET)
    for init in model.graph.initializer:  # the reference reads means from the initializers
        if f"{init.name}.mean" in expanded:
            init.CopyFrom(numpy_helper.from_array(expanded[f"{init.name}.mean"], init.name))
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in expanded.items() if k.endswith(".std")}
    (ref_mean, ref_var), = reference.pfp_onnx(model, variances, {"input": x}).values()
    # three layers of float32 accumulation: the whole-network tolerance of the full examples (test_firmware)
    assert_close(mean, ref_mean, 1e-4, "mean")
    assert_close(var, ref_var, 1e-4, "var")
    np.savez(tmp_path / "expanded.npz", **expanded)
    # codebooks form a convolution's weight second moments in the kernel (FoldWeightMoments'
    # weight_second is off for a shared posterior): the float build the same way, for bit equality
    same_passes = [(label, FoldWeightMoments(weight_second=False) if isinstance(transform, FoldWeightMoments) else transform)
                   for label, transform in default_passes()]
    compiler.compile(LENET, str(tmp_path / "expanded.npz"), out_dir=str(tmp_path / "expanded"), batch=1, passes=same_passes)
    (full_mean, full_var), = compiler.run_host(str(tmp_path / "expanded"), [x])
    np.testing.assert_array_equal(mean, full_mean)
    np.testing.assert_array_equal(var, full_var)


@pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")), reason="arm-none-eabi-gcc or qemu-system-arm missing")
def test_shared_model_on_cortex_m4_matches_host(tmp_path):
    rng = np.random.default_rng(7)
    model, shared = _small_network(rng, 12, blends=2, exceptions=5)
    out = str(tmp_path / "m4")
    compiler.compile(model, sp.to_arrays(shared), out_dir=out, target="cortex-m4")
    x = rng.uniform(0, 1, (4, 2, 8, 8)).astype(np.float32)
    (device_mean, device_var), = compiler.run(out, [x], emulate=True).outputs
    (host_mean, host_var), = compiler.run(out, [x]).outputs
    assert_close(device_mean, host_mean, 1e-5, "mean")
    assert_close(device_var, host_var, 1e-5, "var")


@pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")), reason="arm-none-eabi-gcc or qemu-system-arm missing")
def test_codebook_reads_cost_little_on_cortex_m4(tmp_path, capsys):
    """The gathers decode each conv output channel's and matmul column's weights once, the mean
    and second moment of a weight from one code read: LeNet with the example shared posterior
    stays within 25 % of the float weights' cycles on Cortex-M4 (QEMU instruction count; measured
    +20 % after the float kernels got 2.6x faster, the dense layers decoding each weight once per
    call at batch 1; reading through the tables at every use cost +86 %). Both builds read padded
    copies, the convolutions' schedule when the bound was set: in the default Cortex-M4 build
    the PFP's 3x3 convolutions test their border instead (`pipeline.for_target`), which makes
    both 21-24 K instructions faster, leaves the codebook reads' cost as it was (45,720 -> 48,360)
    and raises it to 29 % of the faster float build. Session 14: the float build folds conv2's
    weight second moments into an array of their own (`FoldWeightMoments`' weight_second), which
    codebooks do not (they form them after the gather): float 195,400 -> 181,840, codebooks
    243,760 -> 233,040 (the reads' own cost 48,360 -> 51,200), +28 %; hence the bound of 30 %."""

    x = np.load(os.path.join(EXAMPLES, "lenet", "sample.npy"))[:1]
    cycles = {}
    for label, post in (("full", LENET_POST), ("shared", os.path.join(EXAMPLES, "lenet_shared", "shared.npz"))):
        out = str(tmp_path / label)
        compiler.compile(LENET, post, out_dir=out, target="cortex-m4", batch=1, passes=default_passes())
        cycles[label] = compiler.run(out, [x], emulate=True).cycles[0]
    with capsys.disabled():
        print(f"\nLeNet on Cortex-M4: {cycles['shared']:,} cycles with codebooks, {cycles['full']:,} with float weights")
    assert cycles["shared"] <= 1.30 * cycles["full"]


def test_precision_weighted_centre():
    """One component: k-means with weights 1/sigma^2 puts it at the precision-weighted mean point."""
    from pfpc.compress import Options, compress

    rng = np.random.default_rng(8)
    means = {"w": rng.normal(0, 1, 100).astype(np.float32)}
    stds = {"w": rng.uniform(0.1, 1, 100).astype(np.float32)}
    shared, _ = compress(means, stds, Options(components=1, precision_weighted=True))
    weights = 1.0 / stds["w"].astype(np.float64) ** 2
    tensor = shared.tensors["w"]
    assert tensor.component_mean[0] == pytest.approx(np.sum(weights * means["w"]) / weights.sum(), rel=1e-5)
    assert tensor.component_std[0] == pytest.approx(np.sum(weights * stds["w"]) / weights.sum(), rel=1e-5)


@pytest.mark.parametrize("args,expected", [
    (["--components", "0"], "--components must be in [1, 65536]"),
    (["--outliers", "1.5"], "--outliers must be a fraction"),
    (["--gmm", "--precision-weighted"], "--precision-weighted applies to k-means"),
    (["--min-size", "100000"], "no stochastic initializer has at least 100000 weights"),
    (["--blend", "1.5"], "--blend must be a fraction in (0, 1)"),
    (["--global", "--channel-scale"], "--channel-scale refits every tensor's components"),
])
def test_compress_option_errors(tmp_path, capsys, args, expected):
    out = tmp_path / "shared.npz"
    code = main(["compress", LENET, "--posterior", LENET_POST, "-o", str(out), "--no-evaluate", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_blends_reduce_w2():
    """Points on the W2 geodesics between three components: blends recover them; without blends
    they cost their distance to the nearest component. Alpha and the second component are
    checked against a brute-force search over both."""
    from pfpc.compress import Options, compress

    rng = np.random.default_rng(11)
    corners = np.array([[-1.0, 0.2], [0.5, 0.1], [1.5, 0.8]])
    first, second = rng.integers(0, 3, 600), rng.integers(0, 3, 600)
    alpha = rng.choice([0.0, 1.0, 0.3, 0.5, 0.8], 600)
    points = alpha[:, None] * corners[first] + (1 - alpha[:, None]) * corners[second] + rng.normal(0, 0.003, (600, 2))
    means, stds = {"w": points[:, 0].astype(np.float32)}, {"w": np.abs(points[:, 1]).astype(np.float32)}
    plain, plain_rows = compress(means, stds, Options(components=3))
    blended, rows = compress(means, stds, Options(components=3, blend_gain=0.5))
    assert rows[0]["blends"] > 100 and rows[0]["rms_w2"] < 0.7 * plain_rows[0]["rms_w2"], (rows[0], plain_rows[0])
    tensor = blended.tensors["w"]
    comps = np.stack([tensor.component_mean, tensor.component_std], axis=1).astype(np.float64)
    grid = np.linspace(0, 1, 2001)
    target = np.stack([means["w"], stds["w"]], axis=1).astype(np.float64)
    for j, position in enumerate(tensor.blend_position[:40]):
        a, b = tensor.blend_component[j]
        candidates = [np.min(np.hypot(*(grid[:, None] * comps[a] + (1 - grid[:, None]) * comps[c] - target[position]).T))
                      for c in range(3) if c != a]
        mu, sigma = sp.expand_tensor(tensor)
        assert np.hypot(mu[position] - target[position, 0], sigma[position] - target[position, 1]) <= min(candidates) + 1e-6
    # alphas rounded to quarters: fewer distinct weights (table entries in the C), still less distortion
    quarters, quarter_rows = compress(means, stds, Options(components=3, blend_gain=0.5, blend_levels=4))
    alphas = quarters.tensors["w"].blend_alpha
    np.testing.assert_array_equal(alphas * 4, np.round(alphas * 4))
    assert quarter_rows[0]["rms_w2"] < 0.8 * plain_rows[0]["rms_w2"], (quarter_rows[0], plain_rows[0])
    distinct = [np.unique(np.stack(sp.expand_tensor(t.tensors["w"]), axis=-1).reshape(-1, 2), axis=0).shape[0] for t in (blended, quarters)]
    assert distinct[1] < distinct[0] / 4, distinct


def test_channel_scale_reduces_w2():
    """A layer whose channels are one codebook scaled per channel (what batch-norm folding does):
    with --channel-scale four components fit it almost exactly; without, they cannot."""
    from pfpc.compress import Options, compress

    rng = np.random.default_rng(12)
    base = np.array([[-0.5, 0.1], [0.2, 0.05], [0.6, 0.3], [1.2, 0.2]])
    labels = rng.integers(0, 4, (8, 36))
    scale = rng.uniform(0.2, 5, 8)
    points = base[labels] * scale[:, None, None]
    means, stds = {"w": points[..., 0].reshape(8, 4, 3, 3).astype(np.float32)}, {"w": points[..., 1].reshape(8, 4, 3, 3).astype(np.float32)}
    _, plain = compress(means, stds, Options(components=4))
    shared, fitted = compress(means, stds, Options(components=4, channel_scale=True))
    assert fitted[0]["rms_w2"] < 1e-3 < 0.1 < plain[0]["rms_w2"], (fitted[0], plain[0])
    assert fitted[0]["channel_scales"] == 8
    mu, sigma = sp.expand_tensor(shared.tensors["w"])
    np.testing.assert_allclose(mu, means["w"], atol=1e-3)
    np.testing.assert_allclose(sigma, stds["w"], atol=1e-3)


def test_compression_effect_matches_numpy_and_reuses_the_full_outputs():
    """`evaluate.compression.compare` (the end-to-end part of `pfpc compress`): its deltas are the
    shared PFP's metrics minus the full one's, accuracy as a plain argmax count, the output W2 as
    NumPy computes it from both PFPs' outputs; outputs of the full posterior computed once
    (`suite_outputs`, as benchmarks/compress_sweep.py does) give the same result; a posterior
    compared with itself changes nothing."""
    from pfpc.evaluate.compression import compare, suite_outputs
    from pfpc.evaluate.datasets import default_suite
    from pfpc.frontends.onnx_model import load_model
    from pfpc.frontends.posterior import load_posterior

    sets = default_suite(limit=40)
    model = load_model(LENET, 1)
    full = load_posterior(model, LENET_POST)
    shared = load_posterior(model, os.path.join(EXAMPLES, "lenet_shared", "shared.npz"))
    outputs = {"full": suite_outputs(LENET, full, sets), "shared": suite_outputs(LENET, shared, sets)}
    effect = compare(LENET, full, shared, sets)
    assert effect == compare(LENET, full, shared, sets, full_outputs=outputs["full"])
    clean = sets[[s.name for s in sets].index("clean")]
    for name, (mean, var, probs) in outputs.items():
        clean_probs = probs[: len(clean.x)].astype(np.float64)
        assert effect["accuracy"][name] == pytest.approx(np.mean(np.argmax(clean_probs, axis=1) == clean.labels))
        clean_probs /= clean_probs.sum(axis=1, keepdims=True)
        assert effect["nll"][name] == pytest.approx(-np.mean(np.log(clean_probs[np.arange(len(clean.x)), clean.labels])), rel=1e-5)
    assert effect["nll"]["full"] != effect["nll"]["shared"]
    assert effect["accuracy"]["delta"] == pytest.approx(effect["accuracy"]["shared"] - effect["accuracy"]["full"])
    (m1, v1, _), (m2, v2, _) = outputs["full"], outputs["shared"]
    w2 = np.mean(np.sqrt((m1.astype(np.float64) - m2) ** 2 + (np.sqrt(v1.astype(np.float64)) - np.sqrt(v2)) ** 2))
    assert effect["output_w2"] == pytest.approx(w2, rel=1e-6) and w2 > 0
    assert effect["images"] == sum(len(s.x) for s in sets)
    itself = compare(LENET, full, full, sets, full_outputs=outputs["full"])
    assert itself["output_w2"] == 0 and all(itself[m]["delta"] == 0 for m in ("accuracy", "nll", "ece"))
