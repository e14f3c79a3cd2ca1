"""Names from the ONNX file never reach C unsanitised: a model whose every name is hostile compiles
warning-free (gcc and clang, C99, pedantic, trigraph warnings) and computes what the same model
with plain names computes, and what the NumPy reference computes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import pfpc.compiler as compiler
import reference
from helpers import assert_close, random_std

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Wtrigraphs", "-fno-math-errno"]

#: role -> hostile name; the plain model uses the role itself
HOSTILE = {
    "image": 'in*/put /* "quoted" \\ back\nslash ??= trigraph ??/ é中',
    "vector": "input0",  # its macro would be <NAME>_INPUT0_SIZE: taken by the first input's alias
    "conv_w": "int",
    "conv_b": "1conv.bias",
    "fc_w": 'w*/"\\\n??/',
    "fc_b": "x",  # kernel parameters for activations are x, x1, ...
    "side_w": "W.weight",
    "side_b": "a" * 3000,
    "scale": "w_*/_\"_\\_\n_??/",  # the same C identifier as fc_w after replacing the characters
    "conv_out": "return",
    "relu_out": "é",
    "pool_out": "/*",
    "flat_out": "??=",
    "fc_out": "ARENA",  # <NAME>_ARENA_SIZE
    "logits": "Num_Inputs",  # <NAME>_NUM_INPUTS
    "side": "num_inputs",
    "side_out": "float",
}


def _model(names):
    n = names.get
    rng = np.random.default_rng(7)
    inits = {
        n("conv_w"): rng.normal(0, 0.5, (3, 1, 3, 3)), n("conv_b"): rng.normal(0, 0.1, 3),
        n("fc_w"): rng.normal(0, 0.3, (27, 5)), n("fc_b"): rng.normal(0, 0.1, 5),
        n("side_w"): rng.normal(0, 0.3, (4, 5)), n("side_b"): rng.normal(0, 0.1, 5),
        n("scale"): rng.normal(0, 0.3, 5),
    }
    inits = {k: np.asarray(v, np.float32) for k, v in inits.items()}
    inits["shape"] = np.array([1, 27], np.int64)
    nodes = [
        helper.make_node("Conv", [n("image"), n("conv_w"), n("conv_b")], [n("conv_out")], name=n("conv_out") + " node */", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [n("conv_out")], [n("relu_out")], name="\n"),
        helper.make_node("MaxPool", [n("relu_out")], [n("pool_out")], name="??=", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", [n("pool_out"), "shape"], [n("flat_out")], name='"'),
        helper.make_node("MatMul", [n("flat_out"), n("fc_w")], [n("fc_out") + "_mm"], name="int"),
        helper.make_node("Add", [n("fc_out") + "_mm", n("fc_b")], [n("fc_out")], name="*/"),
        helper.make_node("MatMul", [n("vector"), n("side_w")], [n("side") + "_mm"]),
        helper.make_node("Add", [n("side") + "_mm", n("side_b")], [n("side")]),
        helper.make_node("Mul", [n("side"), n("scale")], [n("side_out")]),
        helper.make_node("Add", [n("fc_out"), n("side_out")], [n("logits")]),
    ]
    graph = helper.make_graph(
        nodes, "hostile */ graph",
        [helper.make_tensor_value_info(n("image"), TensorProto.FLOAT, [1, 1, 6, 6]),
         helper.make_tensor_value_info(n("vector"), TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(n("logits"), TensorProto.FLOAT, [1, 5]),
         helper.make_tensor_value_info(n("fc_out"), TensorProto.FLOAT, [1, 5]),
         helper.make_tensor_value_info(n("side"), TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {k: v for k, v in inits.items() if k != "shape"}


def _compile(tmp_path, label, names, posterior):
    model, inits = _model(names)
    out = tmp_path / label
    compiler.compile(model, posterior(inits), out_dir=str(out))
    return model, inits, out


def _strict_build(out, cc):
    for source in ("pfp_model.c", "pfp_model_main.c"):
        result = subprocess.run([cc, *STRICT, "-c", source, "-o", os.devnull], cwd=out, capture_output=True, text=True)
        assert result.returncode == 0, f"{cc} {source}:\n{result.stderr}"


def _posterior_for(hostile_inits):
    """The same random std for the plain and the hostile model, by role."""
    rng = np.random.default_rng(3)
    plain = random_std({role: hostile_inits[HOSTILE[role]] for role in HOSTILE if HOSTILE[role] in hostile_inits}, rng)
    return plain


def test_hostile_names_give_valid_equivalent_c(tmp_path):
    plain_names = {role: role for role in HOSTILE}
    _, hostile_inits = _model(HOSTILE)
    stds_by_role = _posterior_for(hostile_inits)
    hostile_post = {f"{HOSTILE[k[:-4]]}.std": v for k, v in stds_by_role.items()}
    hostile_model, _, hostile_out = _compile(tmp_path, "hostile", HOSTILE, lambda inits: hostile_post)
    _, _, plain_out = _compile(tmp_path, "plain", plain_names, lambda inits: stds_by_role)

    for cc in ("gcc", "clang"):
        if shutil.which(cc):
            _strict_build(hostile_out, cc)

    header = (hostile_out / "pfp_model.h").read_text()
    macros = re.findall(r"^#define (\w+)", header, re.M)
    assert len(macros) == len(set(macros)), sorted(m for m in macros if macros.count(m) > 1)
    assert all(len(m) <= 63 for m in macros)
    for path in hostile_out.rglob("*"):
        if path.is_file() and path.suffix in (".c", ".h"):
            text = path.read_text()
            assert text.isascii() and "??" not in text, path.name

    rng = np.random.default_rng(0)
    image, vector = rng.normal(size=(1, 1, 6, 6)).astype(np.float32), rng.normal(size=(1, 4)).astype(np.float32)
    hostile = compiler.run_host(str(hostile_out), [image, vector])
    plain = compiler.run_host(str(plain_out), [image, vector])
    variances = {k[:-4]: v.astype(np.float64) ** 2 for k, v in hostile_post.items()}
    expected = reference.pfp_onnx(hostile_model, variances, {HOSTILE["image"]: image, HOSTILE["vector"]: vector})
    assert list(expected) == [HOSTILE["logits"], HOSTILE["fc_out"], HOSTILE["side"]]
    for (mean, var), (plain_mean, plain_var), (name, (ref_mean, ref_var)) in zip(hostile, plain, expected.items()):
        np.testing.assert_array_equal(mean, plain_mean)
        np.testing.assert_array_equal(var, plain_var)
        assert_close(mean.reshape(ref_mean.shape), ref_mean, what=f"{name!r} mean")
        assert_close(var.reshape(ref_var.shape), ref_var, rtol=3e-5, what=f"{name!r} var")


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_example_compiles_strictly(tmp_path, cc):
    if not shutil.which(cc):
        pytest.skip(f"{cc} not installed")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "lenet")
    out = tmp_path / "lenet"
    compiler.compile(os.path.join(root, "model.onnx"), os.path.join(root, "post.npz"), out_dir=str(out), batch=1, outputs=["probs", "entropy", "ood"])
    _strict_build(out, cc)


def test_hostile_names_in_sampling_mode(tmp_path):
    model, inits = _model(HOSTILE)
    out = tmp_path / "svi"
    compiler.compile(model, {f"{k}.std": 0.1 * np.abs(v) for k, v in inits.items()}, out_dir=str(out), mode="svi", samples=4)
    for cc in ("gcc", "clang"):
        if shutil.which(cc):
            _strict_build(out, cc)


def test_pytorch_style_onnx_prefix_initializer(tmp_path):
    """PyTorch names folded weights 'onnx::MatMul_5'; TVM's importer strips the prefix."""
    from helpers import make_model

    weight = np.arange(6, dtype=np.float32).reshape(3, 2) / 4
    model = make_model([helper.make_node("MatMul", ["x", "onnx::MatMul_5"], ["y"])], [("x", [1, 3])], ["y"], {"onnx::MatMul_5": weight})
    std = np.full((3, 2), 0.1, np.float32)
    compiler.compile(model, {"onnx::MatMul_5.std": std}, out_dir=str(tmp_path / "out"))
    x = np.array([[1.0, -2.0, 0.5]], np.float32)
    ((mean, var),) = compiler.run_host(str(tmp_path / "out"), [x])
    ((ref_mean, ref_var),) = reference.pfp_onnx(model, {"onnx::MatMul_5": std.astype(np.float64) ** 2}, {"x": x}).values()
    assert_close(mean, ref_mean)
    assert_close(var, ref_var)
