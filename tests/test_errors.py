"""Bad input: one line naming the file, node or tensor, exit code 2, no output written."""

from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import helper

from helpers import make_model
from pfpc.cli import main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
MLP = os.path.join(EXAMPLES, "mlp", "model.onnx")
MLP_POST = os.path.join(EXAMPLES, "mlp", "post.npz")


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _write_post(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_unsupported_nodes_listed_at_once(tmp_path, capsys):
    nodes = [
        helper.make_node("Sin", ["x"], ["a"], name="my_sin"),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Cos", ["b"], ["y"], name="my_cos"),
    ]
    path = tmp_path / "m.onnx"
    path.write_bytes(make_model(nodes, [("x", [1, 3])], ["y"], {}).SerializeToString())
    out = tmp_path / "out"
    code, err = _run([str(path), "-o", str(out), "--deterministic"], capsys)
    assert code == 2
    assert "my_sin (Sin)" in err and "my_cos (Cos)" in err and len(err.splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".pfpc-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("content,expected", [(b"", "empty"), (b"not onnx at all \x00\x01", "not a valid ONNX"), (None, "truncated")])
def test_invalid_model_files(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.onnx"
    path.write_bytes(open(MLP, "rb").read()[:300] if content is None else content)
    code, err = _run([str(path), "-o", str(tmp_path / "out"), "--batch", "1", "--deterministic"], capsys)
    assert code == 2 and "bad.onnx" in err and len(err.splitlines()) == 1
    assert expected in err or "not a valid ONNX" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arrays,expected",
    [
        ({"nope.weight.std": np.ones(3, np.float32)}, "'nope.weight.std' names no initializer"),
        ({"fc1.weight.std": np.ones((3, 3), np.float32)}, "'fc1.weight.std' has shape"),
        ({"fc1.bias.var": -np.ones(64, np.float32)}, "'fc1.bias.var' holds negative"),
        ({"fc1.bias.std": np.full(64, np.nan, np.float32)}, "'fc1.bias.std' holds NaN"),
        ({"fc1.bias.std": np.ones(64, np.float32), "fc1.bias.rho": np.ones(64, np.float32)}, "two parameterisations"),
        ({"fc1.bias.sigma": np.ones(64, np.float32)}, "'fc1.bias.sigma' is not"),
    ],
)
def test_bad_posteriors(tmp_path, capsys, arrays, expected):
    post = _write_post(tmp_path / "post.npz", **arrays)
    code, err = _run([MLP, "--posterior", post, "--batch", "1", "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_pickled_posterior_refused(tmp_path, capsys):
    path = tmp_path / "post.npz"
    np.savez(path, **{"fc1.bias.std": np.array([object()], dtype=object)})
    code, err = _run([MLP, "--posterior", str(path), "--batch", "1", "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "pickled" in err


def test_symbolic_batch_needs_batch(tmp_path, capsys):
    code, err = _run([MLP, "--posterior", MLP_POST, "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "--batch" in err and "'input'" in err


def test_existing_output_refused_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(out)], capsys)
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    # --force replaces only a directory pfpc wrote (its manifest), never the user's own files
    code, err = _run([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(out), "--force"], capsys)
    assert code == 2 and "not a directory written by pfpc" in err and (out / "keep.txt").read_text() == "mine"
    pfpc_out = tmp_path / "pfpc_out"
    assert _run([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(pfpc_out)], capsys)[0] == 0
    (pfpc_out / "stale.txt").write_text("from an earlier build")
    code, _ = _run([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(pfpc_out), "--force"], capsys)
    assert code == 0 and not (pfpc_out / "stale.txt").exists() and (pfpc_out / "pfp_model.h").exists()


def _model_file(tmp_path, nodes, inputs, inits, outputs=("y",)):
    path = tmp_path / "m.onnx"
    path.write_bytes(make_model(nodes, inputs, list(outputs), inits).SerializeToString())
    return str(path)


def test_softmax_inside_the_graph_is_named(tmp_path, capsys):
    nodes = [
        helper.make_node("Softmax", ["x"], ["s"], name="inner_softmax", axis=1),
        helper.make_node("MatMul", ["s", "w"], ["y"]),
    ]
    path = _model_file(tmp_path, nodes, [("x", [1, 3])], {"w": np.ones((3, 2), np.float32)})
    code, err = _run([path, "-o", str(tmp_path / "out"), "--deterministic"], capsys)
    assert code == 2 and "inner_softmax (Softmax: supported only as a last node" in err and len(err.splitlines()) == 1


def test_wrap_pad_and_4d_conv_listed_together(tmp_path, capsys):
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="mirror", mode="wrap"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="volume"),
    ]
    inits = {"pads": np.array([0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1], np.int64), "w": np.ones((1, 1, 1, 1, 1, 1), np.float32)}
    path = _model_file(tmp_path, nodes, [("x", [1, 1, 3, 3, 3, 3])], inits)
    code, err = _run([path, "-o", str(tmp_path / "out"), "--deterministic"], capsys)
    assert code == 2 and "mirror (Pad: mode wrap" in err and "volume (Conv: 4-D" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "node,inits,stochastic,expected",
    [
        (helper.make_node("Div", ["x", "k"], ["y"]), {"k": np.ones((1, 3), np.float32)}, "k", "operand 1 is a Gaussian tensor"),
        (helper.make_node("PRelu", ["x", "k"], ["y"]), {"k": np.ones((3,), np.float32)}, "k", "operand 1 is a Gaussian tensor"),
        (helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"]),
         {k: np.ones((3,), np.float32) for k in "gbmv"}, "g", "BatchNormalization parameter 'g' has a posterior variance"),
    ],
)
def test_stochastic_operand_without_rule(tmp_path, capsys, node, inits, stochastic, expected):
    path = _model_file(tmp_path, [node], [("x", [2, 3])], inits)
    post = _write_post(tmp_path / "post.npz", **{f"{stochastic}.std": np.ones_like(inits[stochastic])})
    code, err = _run([path, "--posterior", post, "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_operator_without_gaussian_rule_names_its_onnx_node(tmp_path, capsys, monkeypatch):
    """An operator the front door accepts but no Gaussian rule covers (here: Tanh's rule taken away)
    is refused in one line naming the ONNX node, not only the Relax operator."""
    from pfpc.ops import registry

    stage_of = registry.stage_of
    monkeypatch.setattr(registry, "stage_of", lambda call, op: None if op == "relax.tanh" else stage_of(call, op))
    w = np.eye(3, dtype=np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
                        helper.make_node("Tanh", ["h"], ["y"], name="squash")], [("x", [1, 3])], ["y"], {"w": w})
    path = tmp_path / "model.onnx"
    import onnx

    onnx.save(model, path)
    out = tmp_path / "out"
    code, err = _run([str(path), "--deterministic", "-o", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "relax.tanh" in err and "'squash' Tanh" in err, err
    assert not out.exists()
