"""A batch-1 export (fixed leading dimension 1, torch.onnx.export's default) with --batch N:
compiled at N where its batch items are shown independent, refused with one line where the
graph has its batch size written into it; --batch was ignored in silence before."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pfpc.compiler as compiler
import reference
from helpers import assert_close
from pfpc.cli import main

RNG = np.random.default_rng(5)
W1, B1 = RNG.standard_normal((5, 6)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)
W2 = RNG.standard_normal((3, 5)).astype(np.float32)


def _save(tmp_path, nodes, inputs, outputs, inits, file="m.onnx"):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / file
    onnx.save(model, path)
    return str(path)


def _mlp(tmp_path, output_shape=(1, 3), flatten=None):
    """x [1, 2, 3] -> flatten -> Gemm -> Relu -> Gemm, exported at batch 1; ``flatten``: a Reshape
    target written into the graph instead of Flatten."""
    first = (helper.make_node("Flatten", ["x"], ["f"], axis=1) if flatten is None
             else helper.make_node("Reshape", ["x", "shape"], ["f"]))
    nodes = [first, helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    inits = {"w1": W1, "b1": B1, "w2": W2}
    if flatten is not None:
        inits["shape"] = np.array(flatten, np.int64)
    return _save(tmp_path, nodes, [("x", [1, 2, 3])], [("y", list(output_shape))], inits)


def _posterior(tmp_path):
    path = tmp_path / "post.npz"
    np.savez(path, **{"w1.std": np.abs(W1) * 0.2 + 0.01, "b1.std": np.full(5, 0.05, np.float32), "w2.std": np.abs(W2) * 0.1})
    return str(path)


def _reference(x, post):
    """tests/reference.py's float64 PFP on the whole batch."""
    stds = np.load(post)
    mean, var = reference.gemm(x.reshape(len(x), -1), None, W1, stds["w1.std"] ** 2, B1, stds["b1.std"] ** 2, transB=1)
    mean, var = reference.relu(mean, var)
    return reference.gemm(mean, var, W2, stds["w2.std"] ** 2, transB=1)


@pytest.mark.parametrize("output_shape, flatten", [((1, 3), None), (("N", 3), None), ((1, 3), [1, -1]), ((1, 3), [1, 6])],
                         ids=["fixed_output", "symbolic_output", "view_folded_by_the_exporter", "reshape_to_its_features"])
def test_batch_one_export_compiled_at_another_batch(tmp_path, output_shape, flatten):
    """``flatten``: torch's ``x.view(x.size(0), -1)`` as a batch-1 export folds it, a Reshape to the
    constant [1, -1] (or [1, 6]): re-batched as [0, ...], the input's own batch."""
    post = _posterior(tmp_path)
    model = _mlp(tmp_path, output_shape, flatten)
    out = tmp_path / "out"
    compiler.compile(model, post, out_dir=str(out), batch=4, covariance="none")
    assert [list(shape) for _, shape in json.loads((out / "pfpc.json").read_text())["inputs"]] == [[4, 2, 3]]
    x = RNG.standard_normal((4, 2, 3)).astype(np.float32)
    (mean, var), = compiler.run_host(str(out), [x])
    expected_mean, expected_var = _reference(x, post)
    assert_close(mean, expected_mean, what="mean")
    assert_close(var, expected_var, what="var")


def test_batch_one_export_without_batch_option(tmp_path):
    """A fixed input batch with a symbolic output batch (some torch exports) compiles at the
    input's batch; asking for a symbolic --batch was the error before."""
    out = tmp_path / "out"
    assert main([_mlp(tmp_path, ("N", 3)), "--posterior", _posterior(tmp_path), "-o", str(out)]) == 0
    assert [list(shape) for _, shape in json.loads((out / "pfpc.json").read_text())["inputs"]] == [[1, 2, 3]]


def _refused(tmp_path, capsys, model, batch="4"):
    code = main([model, "--posterior", _posterior(tmp_path), "--batch", batch, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    return err


def test_batch_written_into_a_reshape_refused(tmp_path, capsys):
    """x [1, 2, 3] reshaped to [2, 3] (the batch dropped): 24 values at batch 4 do not fit."""
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "flat"], ["y"])]
    model = _save(tmp_path, nodes, [("x", [1, 2, 3])], [("y", [1, 10])],
                  {"rows": np.array([2, 3], np.int64), "w": W1[:3].T.copy(), "flat": np.array([1, 10], np.int64)})
    err = _refused(tmp_path, capsys, model)
    assert "m.onnx" in err and "--batch 4" in err and "batch size written into it" in err


def test_output_keeping_batch_one_refused(tmp_path, capsys):
    """A mean over the batch axis: at batch 4 the output still has one row."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), helper.make_node("Flatten", ["m"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["y"], transB=1)]
    model = _save(tmp_path, nodes, [("x", [1, 2, 3])], [("y", [1, 5])], {"w1": W1, "b1": B1})
    err = _refused(tmp_path, capsys, model)
    assert "output 'y' has leading dimension 1 when the inputs take 4" in err


def test_graph_mixing_batch_items_refused(tmp_path, capsys):
    """x - mean over the batch: every shape is right at batch 4, but an item's output depends on
    the others' (zero at batch 1): only running the items side by side shows it."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "m"], ["c"]),
             helper.make_node("Flatten", ["c"], ["f"], axis=1), helper.make_node("Gemm", ["f", "w1", "b1"], ["y"], transB=1)]
    model = _save(tmp_path, nodes, [("x", [1, 2, 3])], [("y", [1, 5])], {"w1": W1, "b1": B1})
    err = _refused(tmp_path, capsys, model)
    assert "output 'y'" in err and "mixes its batch items" in err


def test_fixed_batch_other_than_one_refused(tmp_path, capsys):
    model = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 3])], [("y", [2, 3])], {})
    err = _refused(tmp_path, capsys, model, batch="4")
    assert "input 'x' has the fixed batch dimension 2" in err and "dynamic_axes" in err


def test_verify_runs_a_batch_one_export_on_several_inputs(tmp_path, capsys):
    """`pfpc verify --input` with three items (and `pfpc evaluate`, which batches a whole test set)
    load the model at the inputs' batch: a batch-1 export is re-batched, not refused."""
    x = tmp_path / "x.npy"
    np.save(x, RNG.standard_normal((3, 2, 3)).astype(np.float32))
    assert main(["verify", _mlp(tmp_path), "--posterior", _posterior(tmp_path), "--input", str(x), "--samples", "200"]) == 0
    out = capsys.readouterr().out
    assert "batch 3" in out and "y " in out


def test_bench_on_a_fixed_batch_other_than_one_names_batches(tmp_path, capsys):
    """`pfpc bench` times every batch of --batches: a fixed batch of 2 refuses --batches 1,8 before
    any compile, naming bench's own option (the compiler's message named --batch)."""
    model = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 3])], [("y", [2, 3])], {})
    post = tmp_path / "post.npz"
    np.savez(post)
    assert main(["bench", model, "--posterior", str(post), "--batches", "1,8", "--no-tvm", "--cycles-target", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fixed batch 2" in err and "--batches can only be 2" in err
