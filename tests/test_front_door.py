"""ONNX files of every age: opsets 1-6 (upgraded by onnx's version converter), initializers listed
as graph inputs (IR version 3), nodes out of topological order, float64/float16 models. Each
compiles and matches onnxruntime (zero variance) and the NumPy reference (random posterior)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import reference
from helpers import assert_close, compile_and_run, random_std
from pfpc.errors import PfpcError

X_SHAPE = [2, 3, 6, 6]


def _weights(rng):
    return {
        "w": (rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32),
        "b": (rng.standard_normal(4) * 0.5).astype(np.float32),
        "w2": (rng.standard_normal((5, 36)) * 0.3).astype(np.float32),
        "b2": (rng.standard_normal(5) * 0.3).astype(np.float32),
    }


def _network(opset, weights, reverse=False, elem_type=TensorProto.FLOAT, weights_as_inputs=True):
    """Conv -> + bias -> Relu -> MaxPool -> Flatten -> Gemm, written as an exporter of ``opset``
    would: before opset 7 the bias is added with the legacy ``broadcast=1, axis=1`` attributes
    (B aligned with A's axes from 1 on), from 7 on with a [4, 1, 1] tensor through Unsqueeze."""
    legacy = {"broadcast": 1} if opset < 7 else {}
    add = helper.make_node("Add", ["c", "b"], ["a"], axis=1, **legacy) if opset < 7 else helper.make_node("Add", ["c", "b4"], ["a"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
    if opset >= 7:
        nodes.append(helper.make_node("Unsqueeze", ["b", "axes"], ["b4"]) if opset >= 13 else helper.make_node("Unsqueeze", ["b"], ["b4"], axes=[1, 2]))
    nodes += [add, helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, **legacy)]
    inits = [numpy_helper.from_array(v.astype(helper.tensor_dtype_to_np_dtype(elem_type)), k) for k, v in weights.items()]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    inputs = [helper.make_tensor_value_info("x", elem_type, X_SHAPE)]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes[::-1] if reverse else nodes, "net", inputs, [helper.make_tensor_value_info("y", elem_type, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if weights_as_inputs else 8
    return model


def _check(model, weights, tmp_path, capsys, notice):
    """Zero variance against onnxruntime on the same network written for opset 13 (onnxruntime
    has no kernels for opsets below 7), a random posterior against the NumPy reference."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    modern = _network(13, weights, weights_as_inputs=False)
    expected = ort.InferenceSession(modern.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (mean, var), = compile_and_run(model, None, [x], tmp_path, "zero")
    np.testing.assert_allclose(mean.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.all(var == 0)
    if notice:
        err = capsys.readouterr().err
        assert notice in err and len([line for line in err.splitlines() if notice in line]) == 1, err
    stds = random_std(weights, rng)
    (mean, var), = compile_and_run(model, stds, [x], tmp_path, "posterior")
    ref_mean, ref_var = reference.pfp_onnx(modern, {k[:-4]: v.astype(np.float64) ** 2 for k, v in stds.items()}, {"x": x})["y"]
    assert_close(mean.reshape(ref_mean.shape), ref_mean)
    assert_close(var.reshape(ref_var.shape), ref_var, rtol=3e-5)


@pytest.mark.parametrize("opset", [1, 3, 5, 6])
def test_old_opsets_with_weights_as_inputs(tmp_path, capsys, opset):
    weights = _weights(np.random.default_rng(opset))
    _check(_network(opset, weights), weights, tmp_path, capsys, f"ONNX opset {opset} upgraded to 13 with onnx's version converter")


@pytest.mark.parametrize("opset", [9, 13])
def test_ir3_initializers_listed_as_inputs(tmp_path, capsys, opset):
    """The importer used to stop: 'the importer made more weight parameters than there are initializers'."""
    weights = _weights(np.random.default_rng(opset))
    _check(_network(opset, weights), weights, tmp_path, capsys, None)


def test_reversed_node_order_is_sorted(tmp_path, capsys):
    """keras2onnx writes nodes reversed: onnxruntime runs them, the ONNX checker does not."""
    weights = _weights(np.random.default_rng(11))
    model = _network(13, weights, reverse=True, weights_as_inputs=False)
    x = np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)
    assert ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    _check(model, weights, tmp_path, capsys, "the nodes were not in topological order; sorted")


def test_node_order_kept_when_valid_and_reversed_branches_sorted_in_file_order():
    """A valid order with parallel branches is left alone (it used to be regrouped into rounds of
    ready nodes and announced as unsorted: every PyTorch export of a residual network); a reversed
    one comes out in the earliest valid order of the file."""
    from pfpc.frontends.onnx_model import sort_nodes

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["a"], ["b"], name="b"),
             helper.make_node("Abs", ["x"], ["c"], name="c"), helper.make_node("Add", ["b", "c"], ["y"], name="y")]

    def model(order):
        graph = helper.make_graph([nodes[i] for i in order], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        return helper.make_model(graph)

    valid = model([0, 1, 2, 3])
    sort_nodes(valid, "m.onnx")
    assert [n.name for n in valid.graph.node] == ["a", "b", "c", "y"]
    reversed_ = model([3, 2, 1, 0])
    sort_nodes(reversed_, "m.onnx")
    assert [n.name for n in reversed_.graph.node] == ["c", "a", "b", "y"]  # c is the file's first ready node


@pytest.mark.parametrize("elem_type,name", [(TensorProto.DOUBLE, "float64"), (TensorProto.FLOAT16, "float16")])
def test_float64_and_float16_models_become_float32(tmp_path, capsys, elem_type, name):
    weights = _weights(np.random.default_rng(13))
    # the float32 network sees the weights as the file holds them (float16 rounds them)
    stored = {k: v.astype(helper.tensor_dtype_to_np_dtype(elem_type)).astype(np.float32) for k, v in weights.items()}
    model = _network(13, weights, elem_type=elem_type, weights_as_inputs=False)
    x = np.random.default_rng(2).standard_normal(X_SHAPE)
    # onnxruntime has no float64 Conv: onnx's reference evaluator runs the file in its own types
    typed = ReferenceEvaluator(model).run(None, {"x": x.astype(helper.tensor_dtype_to_np_dtype(elem_type))})[0]
    (mean, var), = compile_and_run(model, None, [x.astype(np.float32)], tmp_path, "typed")
    assert f"{name} tensors converted to float32" in capsys.readouterr().err
    tolerance = 1e-4 if elem_type == TensorProto.DOUBLE else 2e-2  # float16 arithmetic in the evaluator
    np.testing.assert_allclose(mean.reshape(typed.shape), typed.astype(np.float64), rtol=tolerance, atol=tolerance * np.abs(typed).max())
    _check(model, stored, tmp_path, capsys, None)


def _graph(nodes):
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]),
                              opset_imports=[helper.make_opsetid("", 13)])
    return model


def test_cycle_is_one_line_naming_the_node(tmp_path):
    import pfpc.compiler as compiler

    model = _graph([helper.make_node("Relu", ["x2"], ["x1"], name="first"), helper.make_node("Relu", ["x1"], ["x2"], name="second"),
                    helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(PfpcError, match="the graph has a cycle through node 'first'"):
        compiler.compile(model, None, out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unconvertible_old_node_is_named(tmp_path):
    """A node onnx's converter cannot upgrade: one line naming it, no output."""
    import pfpc.compiler as compiler

    model = _graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Upsample", ["r"], ["y"], name="old_upsample", scales=[1.0, 1.0])])
    model.opset_import[0].version = 6
    with pytest.raises(PfpcError, match="ONNX opset 6 cannot be upgraded to 13: node 'old_upsample' \\(Upsample\\)"):
        compiler.compile(model, None, out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_external_data_model(tmp_path):
    weights = _weights(np.random.default_rng(17))
    model = _network(13, weights, weights_as_inputs=False)
    path = tmp_path / "external.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="external.data", size_threshold=64)
    assert (tmp_path / "external.data").exists()
    import pfpc.compiler as compiler

    x = np.random.default_rng(3).standard_normal(X_SHAPE).astype(np.float32)
    compiler.compile(str(path), None, out_dir=str(tmp_path / "out"))
    (mean, _), = compiler.run_host(str(tmp_path / "out"), [x])
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(mean.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_verify_takes_several_inputs_and_reports_every_output(tmp_path, capsys):
    from pfpc.cli import main

    rng = np.random.default_rng(19)
    inits = {"w1": rng.standard_normal((4, 3)).astype(np.float32), "w2": rng.standard_normal((2, 3)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x1", "w1"], ["h1"]), helper.make_node("MatMul", ["x2", "w2"], ["h2"]),
             helper.make_node("Add", ["h1", "h2"], ["sum"]), helper.make_node("Relu", ["sum"], ["act"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x1", TensorProto.FLOAT, [3, 4]),
                                             helper.make_tensor_value_info("x2", TensorProto.FLOAT, [3, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 3]) for n in ("sum", "act")],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = tmp_path / "two.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    np.savez(tmp_path / "post.npz", **random_std(inits, rng))
    for name, shape in (("x1", [3, 4]), ("x2", [3, 2])):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal(shape).astype(np.float32))
    args = ["verify", str(path), "--posterior", str(tmp_path / "post.npz"), "--samples", "4000",
            "--input", str(tmp_path / "x1.npy"), "--input", str(tmp_path / "x2.npy")]
    assert main(args) == 0
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"sum", "act"}
    assert rows["sum"][2] < 5, rows  # max z of the mean (linear: exact); relu's z divides by 0 where all samples are 0
    assert rows["act"][0] < 0.05, rows  # max z of the mean: the PFP agrees with sampling
    assert main(args[:-2]) == 2
    assert "1 --input given, the model takes 2 (x1, x2)" in capsys.readouterr().err
