"""Sampling (SVI) builds (``mode="svi"``): the generated C against independent Monte Carlo
(tests/reference.py, onnxruntime), the on-device Gaussian generator, zero posteriors, strict and
cross builds, QEMU, and the option errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from scipy import stats

import pfpc
import pfpc.compiler as compiler
import reference
from helpers import make_model, random_std
from pfpc.cli import main
from pfpc.frontends.posterior import bind_posterior
from pfpc.frontends.relax_import import import_model
from pfpc.ir import kernel_of, main_bindings
from pfpc.passes.pipeline import default_passes, svi_passes

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
needs_arm = pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")),
                               reason="arm-none-eabi-gcc or qemu-system-arm missing (.ci/run installs them)")
# Two independent estimates (the C's S samples, the reference's S samples) of the same moment differ
# by at most Z standard errors of their difference; over the few dozen outputs of a test, a correct
# implementation exceeds 4.5 with probability below 1e-3, a wrong layout or formula by far more.
Z = 4.5


def _small_model(rng):
    """Gemm with transB (weight transposed at compile time), alpha, a negative beta (bias scaled
    by -2 at compile time: its std by 2), ReLU, then MatMul: the layouts the stds must follow."""
    inits = {
        "w1": rng.standard_normal((5, 6)).astype(np.float32) * 0.6,
        "b1": rng.standard_normal((5,)).astype(np.float32) * 0.3,
        "w2": rng.standard_normal((5, 4)).astype(np.float32) * 0.6,
        "b2": rng.standard_normal((4,)).astype(np.float32) * 0.3,
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, alpha=0.5, beta=-2.0),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["y"]),
    ]
    return make_model(nodes, [("x", [3, 6])], ["y"], inits), inits


def test_detach_weight_std_follows_the_weight_layout():
    """After fold_weight_layout and detach_weight_std: no variance left in the network; the stds are
    those of the posterior, transposed like w1 (Gemm transB) and scaled by |beta| like b1."""
    rng = np.random.default_rng(2)
    model, inits = _small_model(rng)
    stds = random_std(inits, rng)
    mod = import_model(model, bind_posterior(model, stds))
    for name, transform in svi_passes():
        mod = transform(mod)
        if name == "detach_weight_std":
            break
    attrs = mod["main"].attrs
    assert len(attrs["pfp.weight_var"]) == 0
    got = {str(k): v.numpy() for k, v in attrs["pfp.sampled_std"].items()}
    expected = {"w1.permute_dims": stds["w1.std"].T, "b1.multiply": 2 * stds["b1.std"], "w2": stds["w2.std"], "b2": stds["b2.std"]}
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)
    final = pfpc.compile(model, stds, mode="svi").mod
    specs = [kernel_of(final, b.value)[0] for b in main_bindings(final["main"]) if kernel_of(final, b.value)]
    assert specs and all(s.output == "none" and set(s.operands) == {"none"} for s in specs)


def _svi(model, posterior, inputs, out, samples, seed=0, **options):
    pfpc.compile(model, posterior, out_dir=str(out), mode="svi", samples=samples, seed=seed, **options)
    return compiler.run_host(str(out), inputs)


def _check_against_monte_carlo(mean, var, mc, samples):
    mc_mean, mc_var, mean_stderr, var_stderr = mc
    mean, var = mean.reshape(mc_mean.shape), var.reshape(mc_var.shape)
    mean_z = np.abs(mean - mc_mean) / (np.sqrt(2) * mean_stderr)
    var_z = np.abs(var - mc_var) / (np.sqrt(2) * var_stderr)
    var_rel = np.abs(var - mc_var) / mc_var
    assert mean_z.max() < Z, mean_z.max()
    assert var_z.max() < Z, var_z.max()
    # stated relative tolerance: one variance estimate from S samples of a Gaussian output has a
    # relative standard error of sqrt(2/S), the difference of two sqrt(4/S); allow Z of those
    # (14% at S = 4000, 20% at S = 2000)
    assert var_rel.max() < Z * np.sqrt(4 / samples), var_rel.max()
    return mean_z.max(), var_rel.max()


def test_small_model_matches_monte_carlo(tmp_path):
    rng = np.random.default_rng(11)
    model, inits = _small_model(rng)
    stds = random_std(inits, rng, scale=0.5)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    samples = 4000
    (mean, var), = _svi(model, stds, [x], tmp_path / "out", samples, seed=5)
    mc = reference.monte_carlo(model, {k[:-4]: v for k, v in stds.items()}, {"x": x}, samples, seed=6, with_var_stderr=True)["y"]
    _check_against_monte_carlo(mean, var, mc, samples)


@pytest.mark.parametrize("example,samples", [("mlp", 4000), ("lenet", 2000)])
def test_examples_match_monte_carlo(tmp_path, example, samples):
    model_path, post_path = (os.path.join(EXAMPLES, example, f) for f in ("model.onnx", "post.npz"))
    x = np.load(os.path.join(EXAMPLES, example, "sample.npy"))
    (mean, var), = _svi(model_path, post_path, [x], tmp_path / "out", samples, seed=1, batch=1)
    stds = {k[:-4]: v for k, v in np.load(post_path).items()}
    mc = reference.monte_carlo(onnx.load(model_path), stds, {"input": x}, samples, seed=2, with_var_stderr=True)["logits"]
    _check_against_monte_carlo(mean, var, mc, samples)


@pytest.mark.parametrize("posterior", ["zero_std", "none"])
@pytest.mark.parametrize("example", ["small", "mlp"])
def test_zero_posterior_reproduces_onnxruntime(tmp_path, example, posterior):
    rng = np.random.default_rng(3)
    if example == "small":
        model, inits = _small_model(rng)
        x = rng.standard_normal((3, 6)).astype(np.float32)
        feed = {"x": x}
    else:
        model = onnx.load(os.path.join(EXAMPLES, "mlp", "model.onnx"))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        x = np.load(os.path.join(EXAMPLES, "mlp", "sample.npy"))
        feed = {"input": x}
    # zero_std: every weight is drawn (mean + 0 * eps); none: nothing is drawn, no generator emitted
    stds = {f"{k}.std": np.zeros_like(v) for k, v in inits.items()} if posterior == "zero_std" else None
    out = tmp_path / "out"
    (mean, var), = _svi(model, stds, [x], out, 7, batch=x.shape[0])
    expected, = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(mean.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.all(var == 0)
    source = (out / "pfp_model.c").read_text()
    assert ("pfp_model_normal(" in source) == (posterior == "zero_std")


def _harness_draws(tmp_path, out, seed, count):
    """Draws of the generated generator: a test program that includes the generated C."""
    harness = tmp_path / f"draws_{seed}.c"
    harness.write_text(f"""#include <stdio.h>
#include "pfp_model.c"
int main(void) {{
  static float draws[{count}];
  pfp_model_rng rng;
  long i;
  pfp_model_rng_seed(&rng, {seed}u);
  for (i = 0; i < {count}; i++) draws[i] = pfp_model_normal(&rng);
  fwrite(draws, sizeof(float), {count}, stdout);
  return 0;
}}
""")
    program = str(tmp_path / f"draws_{seed}")
    subprocess.run(["cc", "-std=c99", "-O2", "-I", str(out), str(harness), "-lm", "-o", program], check=True)
    return np.frombuffer(subprocess.run([program], capture_output=True, check=True).stdout, np.float32).astype(np.float64)


def test_generator_draws_standard_normals(tmp_path):
    rng = np.random.default_rng(0)
    model, inits = _small_model(rng)
    out = tmp_path / "out"
    pfpc.compile(model, random_std(inits, rng), out_dir=str(out), mode="svi", samples=2)
    count = 200_000
    draws = _harness_draws(tmp_path, out, 7, count)
    assert np.all(np.isfinite(draws))
    assert abs(draws.mean()) < Z / np.sqrt(count)
    assert abs(draws.var() - 1) < Z * np.sqrt(2 / count)
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    # consecutive draws, and the two halves of a Box-Muller pair, are uncorrelated
    assert abs(np.corrcoef(draws[:-1], draws[1:])[0, 1]) < Z / np.sqrt(count)
    assert abs(np.corrcoef(draws[0::2], draws[1::2])[0, 1]) < Z / np.sqrt(count / 2)
    assert abs(np.corrcoef(draws[0::2] ** 2, draws[1::2] ** 2)[0, 1]) < Z / np.sqrt(count / 2)
    again, other = _harness_draws(tmp_path, out, 7, 1000), _harness_draws(tmp_path, out, 8, 1000)
    assert np.array_equal(again, draws[:1000]) and not np.array_equal(other, again)


def test_single_weight_outputs_are_the_weight_samples(tmp_path):
    """y = x @ W with x = 1: output k is a draw of W[0, k], so its sample mean and variance must be
    mu_k and sigma_k^2 up to sampling error (independent of any network code)."""
    rng = np.random.default_rng(4)
    count, samples = 64, 4000
    mu = rng.standard_normal((1, count)).astype(np.float32)
    sigma = rng.uniform(0.1, 3.0, (1, count)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, 1])], ["y"], {"w": mu})
    (mean, var), = _svi(model, {"w.std": sigma}, [np.ones((1, 1), np.float32)], tmp_path / "out", samples, seed=9)
    assert np.all(np.abs(mean - mu) < Z * sigma / np.sqrt(samples))
    # (S - 1) var / sigma^2 is chi-square with S - 1 degrees of freedom: relative sd sqrt(2 / (S - 1))
    assert np.all(np.abs(var / sigma ** 2 - 1) < Z * np.sqrt(2 / (samples - 1)))


def test_moments_of_known_draws(tmp_path):
    """One weight, x = 1: sample s of the output is mu + sigma * z_s, z the generator's draws in order
    (read by the harness). The C must return their mean and unbiased variance (ddof = 1) exactly."""
    samples, mu, sigma = 5, 0.75, 1.5
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, 1])], ["y"], {"w": np.full((1, 1), mu, np.float32)})
    out = tmp_path / "out"
    (mean, var), = _svi(model, {"w.std": np.full((1, 1), sigma, np.float32)}, [np.ones((1, 1), np.float32)], out, samples, seed=12)
    draws = mu + sigma * _harness_draws(tmp_path, out, 12, samples)
    np.testing.assert_allclose(mean.item(), draws.mean(), rtol=1e-6)
    np.testing.assert_allclose(var.item(), draws.var(ddof=1), rtol=1e-5)


def _run_built(out, x, tmp_path, flags):
    """Build the runner with extra compiler flags and run it on x."""
    subprocess.run(["make", "-B", "-s", "-C", str(out), "pfp_model_main", "CC=cc", f"TARGET_FLAGS={flags}"], check=True)
    x.astype(np.float32).tofile(tmp_path / "in.f32")
    subprocess.run([str(out / "pfp_model_main"), str(tmp_path / "in.f32"), str(tmp_path / "out.f32")], check=True)
    return np.fromfile(tmp_path / "out.f32", np.float32)


def test_samples_and_seed_macros_and_calls_are_deterministic(tmp_path):
    rng = np.random.default_rng(5)
    model, inits = _small_model(rng)
    stds = random_std(inits, rng)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    pfpc.compile(model, stds, out_dir=str(tmp_path / "a"), mode="svi", samples=10, seed=1)
    pfpc.compile(model, stds, out_dir=str(tmp_path / "b"), mode="svi", samples=20, seed=2)
    header = (tmp_path / "a" / "pfp_model.h").read_text()
    assert "#ifndef PFP_MODEL_SAMPLES\n#define PFP_MODEL_SAMPLES 10\n" in header and "#define PFP_MODEL_SEED 1u" in header
    overridden = _run_built(tmp_path / "a", x, tmp_path, "-DPFP_MODEL_SAMPLES=20 -DPFP_MODEL_SEED=2u")
    assert np.array_equal(overridden, _run_built(tmp_path / "b", x, tmp_path, ""))
    assert not np.array_equal(overridden, _run_built(tmp_path / "a", x, tmp_path, ""))
    # the generator restarts on every call: the same input twice gives the same output twice
    (mean, var), = compiler.run_host(str(tmp_path / "a"), [np.concatenate([x, x])])
    assert np.array_equal(mean[:3], mean[3:]) and np.array_equal(var[:3], var[3:]) and np.all(var > 0)
    build = subprocess.run(["cc", "-std=c99", "-DPFP_MODEL_SAMPLES=1", "-c", "pfp_model.c", "-o", "/dev/null"], cwd=tmp_path / "a",
                           capture_output=True, text=True)
    assert build.returncode != 0 and "at least 2" in build.stderr


def test_sampled_weights_are_counted_in_the_arena(tmp_path, capsys):
    model_path, post_path = (os.path.join(EXAMPLES, "mlp", f) for f in ("model.onnx", "post.npz"))
    out = tmp_path / "out"
    result = pfpc.compile(model_path, post_path, out_dir=str(out), batch=1, mode="svi", samples=10)
    sampled_bytes = 4 * sum(v.size for v in np.load(post_path).values())  # every tensor the posterior names
    meta = json.loads((out / "pfpc.json").read_text())
    assert meta["mode"] == "svi" and meta["samples"] == 10 and meta["sampled_weights_bytes"] == sampled_bytes
    header = (out / "pfp_model.h").read_text()
    assert f"#define PFP_MODEL_SAMPLED_WEIGHTS_SIZE {sampled_bytes}\n" in header
    # activations of the MLP: at most 64 + 32 + 10 floats live beside the drawn weights
    assert sampled_bytes < result.program.arena_size <= sampled_bytes + 4 * (64 + 32 + 10) + 3 * 16
    source = (out / "pfp_model.c").read_text()
    assert "malloc" not in source and "static float pfp_model_fc1_weight" not in source
    assert "static const float pfp_model_fc1_weight_std[4096]" in (out / "pfp_model_weights.h").read_text()
    # no state outside the arena: the static RAM (.bss) is the arena alone
    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["svi"] == {"samples": 10, "draws_per_sample": sampled_bytes // 4}
    if report["measured_with"]:
        assert report["bss_bytes"] == report["arena_bytes"] == result.program.arena_size


def test_generated_c_builds_strictly_with_gcc_clang_and_arm(tmp_path):
    out = tmp_path / "out"
    pfpc.compile(os.path.join(EXAMPLES, "lenet", "model.onnx"), os.path.join(EXAMPLES, "lenet", "post.npz"), out_dir=str(out),
                 batch=2, mode="svi", samples=10)
    compilers = [[cc] for cc in ("gcc", "clang") if shutil.which(cc)]
    if shutil.which("arm-none-eabi-gcc"):
        compilers.append(["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"])
    assert compilers
    for command in compilers:
        for flags in ("-std=c99 -O2 -Wall -Wextra -Werror -pedantic",
                      "-std=c99 -O0 -Wall -Wextra -Werror -Wshadow -Wconversion -Wno-sign-conversion -Wno-float-conversion"):
            result = subprocess.run([*command, *flags.split(), "-c", "pfp_model.c", "-o", "/dev/null"], cwd=out, capture_output=True, text=True)
            assert result.returncode == 0, f"{command[0]} {flags}: {result.stderr[:2000]}"


@needs_arm
def test_cortex_m4_under_qemu_matches_host(tmp_path):
    out = str(tmp_path / "out")
    x = np.load(os.path.join(EXAMPLES, "mlp", "sample.npy"))
    pfpc.compile(os.path.join(EXAMPLES, "mlp", "model.onnx"), os.path.join(EXAMPLES, "mlp", "post.npz"), out_dir=out, batch=1,
                 target="cortex-m4", mode="svi", samples=30, seed=3)
    device, host = compiler.run(out, [x], emulate=True), compiler.run(out, [x])
    (device_mean, device_var), = device.outputs
    (host_mean, host_var), = host.outputs
    # integer generator: the same uniforms; logf/sinf/cosf of newlib and glibc may differ in the last bit
    np.testing.assert_allclose(device_mean, host_mean, rtol=1e-4, atol=1e-4 * np.abs(host_mean).max())
    np.testing.assert_allclose(device_var, host_var, rtol=1e-4, atol=1e-4 * np.abs(host_var).max())
    assert np.all(host_var > 0) and len(device.cycles) == x.shape[0]


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("options,expected", [
    (["--samples", "10"], "need mode svi (--mode svi)"),
    (["--seed", "3"], "need mode svi (--mode svi)"),
    (["--mode", "svi", "--samples", "1"], "must be an integer of at least 2"),
    (["--mode", "svi", "--seed", "-1"], "seed (--seed) must be an integer in [0, 2**32)"),
    (["--mode", "svi", "--covariance", "channel"], "covariance options are for mode pfp"),
    (["--mode", "svi", "--covariance-budget", "2"], "covariance options are for mode pfp"),
])
def test_sampling_option_errors(tmp_path, capsys, options, expected):
    model, post = os.path.join(EXAMPLES, "mlp", "model.onnx"), os.path.join(EXAMPLES, "mlp", "post.npz")
    code, err = _cli([model, "--posterior", post, "--batch", "1", "-o", str(tmp_path / "out"), *options], capsys)
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_sampling_api_errors():
    model = os.path.join(EXAMPLES, "mlp", "model.onnx")
    for options, expected in [({"samples": 10}, "need mode svi"), ({"mode": "svi", "samples": 1}, "at least 2"),
                              ({"mode": "mcmc"}, "unknown mode 'mcmc'"),
                              ({"mode": "svi", "passes": default_passes()}, "no DetachWeightStd"),
                              # silently ignored before: the given pass list decides
                              ({"passes": default_passes(), "covariance": "channel"}, "put CarryChannelCovariance"),
                              ({"passes": default_passes(), "covariance_budget": 1.0}, "put CarryChannelCovariance")]:
        with pytest.raises(pfpc.PfpcError, match=expected):
            pfpc.compile(model, None, batch=1, **options)


def test_weight_read_once_as_stored_and_once_scaled_is_refused(tmp_path, capsys):
    """Two layouts of one initializer are drawn once (tests/test_tied_weights.py); a copy whose
    values a pass changed (here the bias scaled by Gemm's beta at compile time) cannot be gathered
    from that draw."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], beta=-2.0), helper.make_node("Add", ["h", "b"], ["y"])]
    path = tmp_path / "m.onnx"
    path.write_bytes(make_model(nodes, [("x", [1, 4])], ["y"], {"w": w, "b": b}).SerializeToString())
    np.savez(tmp_path / "post.npz", **{"b.std": np.ones(4, np.float32)})
    code, err = _cli([str(path), "--posterior", str(tmp_path / "post.npz"), "--mode", "svi", "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "initializer 'b' is read by several nodes in forms a pass changed" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    # the PFP treats the two uses as independent Gaussians by design; it still compiles
    code, _ = _cli([str(path), "--posterior", str(tmp_path / "post.npz"), "-o", str(tmp_path / "pfp")], capsys)
    assert code == 0


def test_conv_with_a_folded_batch_norm_matches_monte_carlo(tmp_path):
    """Conv (stochastic weight and bias) -> BatchNormalization (stochastic beta), the layout of
    every ResNet: the folded bias is made from the conv's bias and beta, not a second
    form of the conv's weight, so `--mode svi` draws it on its own (it refused the model, naming
    the weight as "read by several nodes", which stopped `pfpc bench` on ResNet-8)."""
    rng = np.random.default_rng(21)
    channels = 3
    inits = {
        "w": rng.standard_normal((channels, 2, 3, 3)).astype(np.float32) * 0.4,
        "b": rng.standard_normal((channels,)).astype(np.float32) * 0.2,
        "gamma": (1 + 0.2 * rng.standard_normal(channels)).astype(np.float32),
        "beta": rng.standard_normal((channels,)).astype(np.float32) * 0.2,
        "running_mean": rng.standard_normal((channels,)).astype(np.float32) * 0.1,
        "running_var": (1 + 0.3 * rng.random(channels)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "running_mean", "running_var"], ["y"]),
    ]
    model = make_model(nodes, [("x", [1, 2, 4, 4])], ["y"], inits)
    stds = {f"{k}.std": (np.abs(inits[k]) * 0.3 + 0.05).astype(np.float32) for k in ("w", "b", "beta")}
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    samples = 4000
    (mean, var), = _svi(model, stds, [x], tmp_path / "out", samples, seed=3)
    mc = reference.monte_carlo(model, {k[:-4]: v for k, v in stds.items()}, {"x": x}, samples, seed=4, with_var_stderr=True)["y"]
    _check_against_monte_carlo(mean, var, mc, samples)
