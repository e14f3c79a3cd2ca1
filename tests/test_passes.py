"""Each pass alone: what it rewrites, and that every prefix of the pipeline computes the same PFP."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import pfpc.compiler as compiler
import reference
from pfpc.ir import kernel_of, main_bindings
from pfpc.passes.pipeline import default_passes

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
LENET = os.path.join(EXAMPLES, "lenet", "model.onnx")
LENET_POST = os.path.join(EXAMPLES, "lenet", "post.npz")


def _specs(mod):
    return [kernel_of(mod, b.value)[0] for b in main_bindings(mod["main"]) if kernel_of(mod, b.value)]


def _through(name):
    """The default pipeline up to and including the pass ``name``."""
    passes = default_passes()
    return passes[: [n for n, _ in passes].index(name) + 1]


def _compile(passes, tmp_path=None, posterior=LENET_POST):
    out = str(tmp_path / "out") if tmp_path is not None else None
    return compiler.compile(LENET, posterior, out_dir=out, batch=2, passes=passes)


@pytest.mark.parametrize("count", range(len(_through("substitute_layers")), len(default_passes()) + 1))
def test_every_pipeline_prefix_matches_reference(tmp_path, count):
    x = np.load(os.path.join(EXAMPLES, "lenet", "sample.npy"))[:2]
    post = dict(np.load(LENET_POST))
    expected = reference.pfp_onnx(onnx.load(LENET), {k[:-4]: v.astype(np.float64) ** 2 for k, v in post.items()}, {"input": x})["logits"]
    _compile(default_passes()[:count], tmp_path)
    (mean, var), = compiler.run_host(str(tmp_path / "out"), [x])
    scale_mean, scale_var = np.abs(expected[0]).max(), np.abs(expected[1]).max()
    np.testing.assert_allclose(mean, expected[0], rtol=1e-4, atol=1e-4 * scale_mean)
    np.testing.assert_allclose(var, expected[1], rtol=1e-4, atol=1e-4 * scale_var)


def test_substitution_makes_one_canonical_kernel_per_operator():
    specs = _specs(_compile(_through("substitute_layers")).mod)
    # ReLU -> MaxPool arrives as MaxPool -> ReLU (`pool_before_relu`)
    assert [s.ops for s in specs] == [["pad"], ["conv2d"], ["add"], ["maxpool2d"], ["relu"]] * 2 + [["matmul"], ["add"], ["relu"], ["matmul"], ["add"]]
    assert specs[0].output == "none" and all(s.output == "var" for s in specs[1:])  # the padded model input is deterministic


def test_eliminate_zero_variance_without_posterior_is_deterministic():
    mod = _compile(_through("eliminate_zero_variance"), posterior=None).mod
    assert all(s.output == "none" and set(s.operands) == {"none"} for s in _specs(mod))
    assert not any(str(k).endswith(".var") for k in mod["main"].attrs["pfp.params"].keys())


def test_fusion_merges_linear_bias_relu():
    specs = _specs(_compile(_through("fuse_operators")).mod)
    assert [s.ops for s in specs] == [["pad"], ["conv2d", "add"], ["maxpool2d", "relu"]] * 2 + [["matmul", "add", "relu"], ["matmul", "add"]]


def test_padded_convolutions_read_a_padded_copy():
    specs = _specs(_compile(_through("substitute_layers")).mod)
    pads = [s for s in specs if s.ops == ["pad"]]
    assert [s.stages[0][1]["width"] for s in pads] == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2
    assert all(s.stages[0][1]["pads"] == [0, 0, 0, 0] for s in specs if s.ops == ["conv2d"])


def test_moment_representation_per_edge():
    specs = _specs(_compile(_through("choose_moment_representation")).mod)
    conv1, maxpool, pad, conv2, fc1 = (specs[i] for i in (1, 2, 3, 4, 6))
    assert [s.ops[0] for s in (conv1, maxpool, pad, conv2, fc1)] == ["conv2d", "maxpool2d", "pad", "conv2d", "matmul"]
    # every nonlinearity computes the variance directly (a second moment E[y^2] would have to be
    # turned back into a variance by E[y^2] - E[y]^2, which cancels for concentrated posteriors)
    assert all(s.output in ("var", "none") for s in specs)
    assert maxpool.output == "var" and pad.operands[0] == pad.output == "var" and conv2.operands[0] == "var"


def test_weight_second_moments_not_differenced():
    mod = _compile(default_passes()).mod
    params = {str(k): v.numpy() for k, v in mod["main"].attrs["pfp.params"].items()}
    post = dict(np.load(LENET_POST))
    np.testing.assert_allclose(params["conv2.weight.var"], post["conv2.weight.std"].astype(np.float64) ** 2, rtol=1e-6)
    # variance inputs: the layers read the weight variance, never q x q_w - (m mu)^2 (which cancels
    # in float32 when the posterior is concentrated); the 3x3 conv2 at stride 1 reads mu^2 + s^2
    # beside it for v_x (mu^2 + s^2) + m_x^2 s^2 (FoldWeightMoments), the deterministic conv1 not
    conv1, conv2 = [s for s in _specs(mod) if s.ops[0] == "conv2d"]
    assert conv1.operands[:2] == ("none", "var") and not conv1.stages[0][1].get("weight_second")
    assert conv2.operands[:3] == ("var", "var", "none") and conv2.stages[0][1]["weight_second"]
    second = params["conv2.weight"].astype(np.float64) ** 2 + post["conv2.weight.std"].astype(np.float64) ** 2
    np.testing.assert_allclose(params["conv2.weight.second_moment"], second, rtol=1e-6)
    assert [name for name in params if name.endswith(".second_moment")] == ["conv2.weight.second_moment"]


def test_weight_second_moments_folded_where_read_at_several_positions(tmp_path):
    """A 3x3 convolution of a Gaussian input with a 2 x 2 output reads mu^2 + s^2 from a folded
    tensor; the one after it, with a single output position, forms them (the tensor's flash would
    save one instruction per weight there). Both against the float64 reference."""
    from onnx import helper

    from helpers import assert_posterior_matches_reference, make_model, random_std

    rng = np.random.default_rng(14)
    inits = {"w1": rng.standard_normal((3, 2, 3, 3)), "w2": rng.standard_normal((4, 3, 3, 3)), "w3": rng.standard_normal((2, 4, 2, 2))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"])]
    model = make_model(nodes, [("x", [1, 2, 6, 6])], ["y"], inits)
    stds = random_std({k: np.asarray(v, np.float32) for k, v in inits.items()}, rng)
    mod = compiler.compile(model, stds, out_dir=str(tmp_path / "ir"), covariance="none").mod
    convs = [s for s in _specs(mod) if s.ops[0] == "conv2d"]
    assert [bool(s.stages[0][1].get("weight_second")) for s in convs] == [False, True, False]
    assert convs[1].operands == ("var", "var", "none")
    params = {str(k) for k in mod["main"].attrs["pfp.params"].keys()}
    assert [name for name in params if name.endswith(".second_moment")] == ["w2.second_moment"]
    assert_posterior_matches_reference(model, stds, rng.standard_normal((1, 2, 6, 6)).astype(np.float32), tmp_path)


def test_dump_ir_writes_every_pass(tmp_path):
    compiler.compile(LENET, LENET_POST, batch=1, dump_ir=str(tmp_path / "ir"))
    names = sorted(os.listdir(tmp_path / "ir"))
    assert names[0] == "00_import.py" and len(names) == 1 + len(default_passes())
    assert "pfp.kernel" in (tmp_path / "ir" / names[-1]).read_text() or "call_tir" in (tmp_path / "ir" / names[-1]).read_text()


def test_compile_is_deterministic(tmp_path):
    for name in ("a", "b"):
        compiler.compile(LENET, LENET_POST, out_dir=str(tmp_path / name), batch=1)
    for file_name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / file_name).read_bytes() == (tmp_path / "b" / file_name).read_bytes(), file_name
    meta = json.loads((tmp_path / "a" / "pfpc.json").read_text())
    assert meta["arena_bytes"] >= meta["arena_lower_bound_bytes"] > 0


def _bn_model(relu_between):
    from onnx import helper

    from helpers import make_model

    rng = np.random.default_rng(9)
    inits = {
        "w": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
        "gamma": np.array([2.0, -0.5, 1.0], np.float32),
        "beta": np.array([0.1, 0.2, 0.3], np.float32),
        "mean": np.array([0.5, -1.0, 0.0], np.float32),
        "var": np.array([3.0, 0.25, 1.0], np.float32),
    }
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"])]
    if relu_between:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    nodes.append(helper.make_node("BatchNormalization", ["r" if relu_between else "c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-5))
    return make_model(nodes, [("x", [1, 2, 5, 5])], ["y"], inits), inits


def _through_fold_batch_norm(model, posterior):
    """The module after the passes up to fold_batch_norm (before any code generation)."""
    from pfpc.frontends.posterior import bind_posterior
    from pfpc.frontends.relax_import import import_model

    model = compiler._load_proto(model, None)
    mod = import_model(model, bind_posterior(model, posterior))
    for _, transform in _through("fold_batch_norm"):
        mod = transform(mod)
    return mod


def test_batch_norm_folds_into_the_conv_weights_and_posterior():
    model, inits = _bn_model(relu_between=False)
    std = np.full(inits["w"].shape, 0.1, np.float32)
    mod = _through_fold_batch_norm(model, {"w.std": std, "beta.std": np.full(3, 0.2, np.float32)})
    ops = [str(b.value.op.name) for b in main_bindings(mod["main"]) if hasattr(b.value, "op") and hasattr(b.value.op, "name")]
    assert "relax.nn.batch_norm" not in ops and "relax.multiply" not in ops and ops.count("relax.nn.conv2d") == 1
    params = {str(k): v.numpy() for k, v in mod["main"].attrs["pfp.params"].items()}
    variances = {str(k): v.numpy() for k, v in mod["main"].attrs["pfp.weight_var"].items()}
    g = inits["gamma"].astype(np.float64) / np.sqrt(inits["var"].astype(np.float64) + 1e-5)
    np.testing.assert_allclose(params["w"], inits["w"] * g[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(variances["w"], 0.01 * (g * g)[:, None, None, None] * np.ones_like(std), rtol=1e-5)
    bias = next(name for name in params if name.endswith("batch_norm_bias"))
    np.testing.assert_allclose(params[bias].reshape(-1), inits["beta"] - inits["mean"] * g, rtol=1e-6)
    np.testing.assert_allclose(variances[bias].reshape(-1), np.full(3, 0.04), rtol=1e-5)


def test_batch_norm_after_a_nonlinearity_is_an_affine_map():
    model, _ = _bn_model(relu_between=True)
    mod = _through_fold_batch_norm(model, {})
    ops = [str(b.value.op.name) for b in main_bindings(mod["main"]) if hasattr(b.value, "op") and hasattr(b.value.op, "name")]
    assert "relax.nn.batch_norm" not in ops and ops.count("relax.multiply") == 1 and ops.count("relax.add") == 1


def _relu_pool_model(pool_attrs, relu_also_output=False):
    from onnx import helper

    from helpers import make_model

    weight = np.random.default_rng(3).normal(0, 0.4, (4, 2, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], **pool_attrs)]
    return make_model(nodes, [("x", [1, 2, 6, 6])], ["y", "r"] if relu_also_output else ["y"], {"w": weight})


@pytest.mark.parametrize("pool_attrs,relu_also_output,moved", [
    ({"kernel_shape": [2, 2], "strides": [2, 2]}, False, True),
    ({"kernel_shape": [3, 3], "strides": [1, 1]}, False, True),  # overlapping windows
    ({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]}, False, False),  # padded windows stay
    ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, False, False),  # partial windows stay
    ({"kernel_shape": [2, 2], "strides": [2, 2]}, True, False),  # the ReLU has another user
])
def test_pool_before_relu_rewrites_only_whole_windows_of_a_sole_user(tmp_path, pool_attrs, relu_also_output, moved):
    """The rewrite happens exactly where the conditions hold, and the result equals the reference
    (which applies the same order) and, with zero variance, onnxruntime."""
    import onnxruntime as ort

    model = _relu_pool_model(pool_attrs, relu_also_output)
    result = compiler.compile(model, {"w.std": np.full((4, 2, 3, 3), 0.2, np.float32)}, out_dir=str(tmp_path / "pfp"),
                              passes=_through("fuse_operators"))
    ops = [s.ops for s in _specs(result.mod)]
    assert (["maxpool2d", "relu"] in ops) == moved, ops
    x = np.random.default_rng(4).normal(0, 1, (1, 2, 6, 6)).astype(np.float32)
    outs = compiler.run_host(str(tmp_path / "pfp"), [x])
    expected = reference.pfp_onnx(model, {"w": np.full((4, 2, 3, 3), 0.04)}, {"x": x})
    for (mean, var), (ref_mean, ref_var) in zip(outs, expected.values()):
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5 * np.abs(ref_mean).max())
        np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-5 * np.abs(ref_var).max())
    compiler.compile(model, None, out_dir=str(tmp_path / "det"))
    (mean, var), *_ = compiler.run_host(str(tmp_path / "det"), [x])
    (onnx_out,) = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})
    np.testing.assert_allclose(mean, onnx_out, rtol=1e-6, atol=1e-6)
    assert not var.any()


def test_pool_before_relu_is_closer_to_monte_carlo():
    """On the LeNet example the order the compiler uses (Clark's max on the Gaussian
    pre-activations, then ReLU) is closer to Monte Carlo than ReLU-then-pool, in mean and variance."""
    x = np.load(os.path.join(EXAMPLES, "lenet", "sample.npy"))
    post = dict(np.load(LENET_POST))
    stds = {k[:-4]: v.astype(np.float64) for k, v in post.items()}
    model = onnx.load(LENET)
    mc_mean, mc_var = reference.monte_carlo(model, stds, {"input": x}, samples=4000, seed=5)["logits"][:2]
    errors = {}
    for label, pools_first in (("pool_first", True), ("relu_first", False)):
        mean, var = reference.pfp_onnx(model, {k: v**2 for k, v in stds.items()}, {"input": x}, pools_before_relus=pools_first)["logits"]
        errors[label] = (np.median(np.abs(mean - mc_mean) / np.sqrt(mc_var)), np.median(np.abs(var - mc_var) / mc_var))
    assert errors["pool_first"][0] < errors["relu_first"][0] and errors["pool_first"][1] < errors["relu_first"][1], errors
