"""A corpus of bad inputs, each through the CLI: exit code 2, one line on stderr naming the file,
node or tensor, no traceback (the exception itself with --debug), no output directory and no
leftover ``.pfpc-*`` staging directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model
from pfpc.cli import COMMANDS, main
from pfpc.errors import PfpcError

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MLP = os.path.join(ROOT, "examples", "mlp", "model.onnx")

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
B = np.ones(3, np.float32)


def tiny_model(opset=17, weight=W, batch_dim=1, ir_version=8, input_type=TensorProto.FLOAT):
    """x [batch, 4] -> relu(x @ w + b) -> y; the weight's dtype is ``weight``'s."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", input_type, [batch_dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3])],
        [numpy_helper.from_array(np.asarray(weight), "w"), numpy_helper.from_array(B, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


class Case:
    """Files for one bad input in ``tmp``; ``args`` for the CLI (``{out}`` is the output directory)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.out = str(tmp / "out")

    def model(self, model=None, name="m.onnx", raw=None):
        path = self.tmp / name
        path.write_bytes(raw if raw is not None else (model or tiny_model()).SerializeToString())
        return str(path)

    def posterior(self, name="post.npz", **arrays):
        path = self.tmp / name
        np.savez(path, **arrays)
        return str(path)

    def compiled(self):
        """A compiled tiny model (for `pfpc run` / `pfpc report`)."""
        out = str(self.tmp / "compiled")
        assert main([self.model(), "-o", out, "--deterministic"]) == 0
        return out


def _checker_failure(case):
    model = tiny_model()
    model.graph.node[0].output[0] = "x"  # x assigned twice: not single static assignment
    model.graph.node[1].input[0] = "x"
    return [case.model(model), "-o", case.out]


def _undefined_input(case):
    model = tiny_model()
    model.graph.node[1].input[0] = "undefined_tensor"
    return [case.model(model), "-o", case.out]


def _custom_op(case):
    model = tiny_model()
    model.graph.node[2].op_type, model.graph.node[2].domain = "Gelu", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return [case.model(model), "-o", case.out]


def _no_default_opset(case):
    model = tiny_model()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return [case.model(model), "-o", case.out]


def _initializer_bytes_cut(case):
    model = tiny_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:20]
    return [case.model(model), "-o", case.out]


def _initializer_type_changed(case):
    model = tiny_model()
    model.graph.initializer[0].data_type = TensorProto.BFLOAT16
    return [case.model(model), "-o", case.out]


def _external_data(case, location):
    """The model with its tensors in a separate file at ``location`` (relative to the model)."""
    from onnx import external_data_helper

    model = tiny_model()
    external_data_helper.convert_model_to_external_data(model, location="m.data", size_threshold=0)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return [case.model(model), "-o", case.out]


def _dynamic(case):
    return [case.model(tiny_model(batch_dim="N")), "-o", case.out]


def _int_initializer_used_as_weight(case):
    return [case.model(tiny_model(weight=(W * 10).astype(np.int64))), "-o", case.out]


def _shape_inference_failure(case):
    return [case.model(tiny_model(weight=np.ones((5, 3), np.float32))), "-o", case.out]


def _posterior_var_on_shape_constant(case):
    model = tiny_model()
    model.graph.node.append(helper.make_node("Reshape", ["y", "shape"], ["z"], name="reshape"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 3], np.int64), "shape"))
    model.graph.output[0].name = "z"
    return [case.model(model), "--posterior", case.posterior(**{"shape.std": np.ones(2, np.float32)}), "-o", case.out]


def _bad_posterior(**arrays):
    return lambda case: [case.model(), "--posterior", case.posterior(**arrays), "-o", case.out]


def _posterior_raw(content, name="post.npz"):
    def build(case):
        path = case.tmp / name
        path.write_bytes(content)
        return [case.model(), "--posterior", str(path), "-o", case.out]

    return build


def _posterior_single_array(case):
    path = case.tmp / "post.npy"
    np.save(path, np.ones(3, np.float32))
    return [case.model(), "--posterior", str(path), "-o", case.out]


def _posterior_truncated(case):
    full = case.posterior(**{"w.std": np.ones((4, 3), np.float32)})
    data = open(full, "rb").read()
    (case.tmp / "cut.npz").write_bytes(data[: len(data) // 2])
    return [case.model(), "--posterior", str(case.tmp / "cut.npz"), "-o", case.out]


def _existing_output(case):
    os.makedirs(case.out)
    (case.tmp / "out" / "keep.txt").write_text("mine")
    return [case.model(), "-o", case.out]


def _file_in_the_way(case):
    (case.tmp / "out").write_text("a file")
    return [case.model(), "-o", case.out]


def _file_in_the_way_forced(case):
    (case.tmp / "out").write_text("a file")
    return [case.model(), "-o", case.out, "--force"]


def _file_as_parent(case):
    (case.tmp / "parent").write_text("a file")
    return [case.model(), "-o", str(case.tmp / "parent" / "out")]


def _unwritable_parent(case):
    if os.geteuid() == 0:  # root writes through permissions; /proc refuses everyone
        return [case.model(), "-o", "/proc/pfpc-out"]
    parent = case.tmp / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    return [case.model(), "-o", str(parent / "out")]


def _run_args(*extra, inputs=None):
    def build(case):
        out = case.compiled()
        paths = []
        for index, array in enumerate(inputs if inputs is not None else [np.ones((1, 4), np.float32)]):
            path = case.tmp / f"in{index}.npy"
            np.save(path, array)
            paths += ["--input", str(path)]
        return ["run", out, *paths, "--output", str(case.tmp / "pred.npz"), *extra]

    return build


def _run_on(make_dir, command="run"):
    def build(case):
        directory = case.tmp / "notout"
        make_dir(directory)
        np.save(case.tmp / "x.npy", np.ones((1, 4), np.float32))
        tail = ["--input", str(case.tmp / "x.npy"), "--output", str(case.tmp / "pred.npz")] if command == "run" else []
        return [command, str(directory), *tail]

    return build


def _plain_dir(directory):
    directory.mkdir()
    (directory / "model.c").write_text("int x;")


def _broken_metadata(directory):
    directory.mkdir()
    (directory / "pfpc.json").write_text("{not json")


def _metadata_missing_fields(directory):
    directory.mkdir()
    (directory / "pfpc.json").write_text(json.dumps({"target": "host"}))


def _run_bad_input_file(case):
    out = case.compiled()
    (case.tmp / "x.npy").write_text("not numpy")
    return ["run", out, "--input", str(case.tmp / "x.npy"), "--output", str(case.tmp / "pred.npz")]


def _oversized(limit_option, limit):
    return lambda case: [MLP, "--batch", "1", "-o", case.out, limit_option, limit]


def _bfloat16_weight(case):
    """float16 and float64 models are converted to float32 (tests/test_front_door.py); bfloat16 is refused."""
    model = tiny_model()
    model.graph.initializer[0].CopyFrom(helper.make_tensor("w", TensorProto.BFLOAT16, [4, 3], [0] * 12))
    return [case.model(model), "-o", case.out]


#: (case id, builder(case) -> CLI arguments, fragment the error line must contain)
CASES = [
    # model files
    ("empty_model", lambda c: [c.model(raw=b""), "-o", c.out], "m.onnx: the file is empty"),
    ("truncated_model", lambda c: [c.model(raw=open(MLP, "rb").read()[:300]), "-o", c.out], "m.onnx: not a valid ONNX file"),
    ("text_model", lambda c: [c.model(raw=b"name,value\n1,2\n"), "-o", c.out], "m.onnx: not a valid ONNX file"),
    ("missing_model", lambda c: [str(c.tmp / "nope.onnx"), "-o", c.out], "nope.onnx: cannot read the model"),
    ("directory_as_model", lambda c: [str(c.tmp), "-o", c.out], "cannot read the model"),
    ("checker_failure", _checker_failure, "the ONNX checker rejects the model"),
    ("undefined_input", _undefined_input, "node 'add' reads 'undefined_tensor', which no node"),
    ("opset_too_old", lambda c: [c.model(tiny_model(opset=0)), "-o", c.out], "ONNX opset 0 is not supported"),
    ("opset_too_new", lambda c: [c.model(tiny_model(opset=23, ir_version=10)), "-o", c.out], "ONNX opset 23 is not supported"),
    ("opset_unknown", lambda c: [c.model(tiny_model(opset=999)), "-o", c.out], "ONNX opset 999 is not supported"),
    ("no_default_opset", _no_default_opset, "no default-domain ONNX opset"),
    ("unsupported_op_custom_domain", _custom_op, "relu (Gelu)"),
    ("initializer_bytes_cut", _initializer_bytes_cut, "raw_data size (20 bytes) is too small"),
    ("initializer_type_changed", _initializer_type_changed, "m.onnx: initializer 'w' cannot be read"),
    ("external_data_missing", lambda c: _external_data(c, "m.data"), "m.onnx: cannot read the model's external tensor data"),
    ("external_data_outside", lambda c: _external_data(c, "../../../etc/passwd"), "m.onnx: cannot read the model's external tensor data"),
    ("dynamic_dims_without_batch", _dynamic, "dimension 0 ('N') of 'x' is symbolic"),
    ("bfloat16_weight", _bfloat16_weight, "initializer 'w' is bfloat16"),
    ("int_weight", _int_initializer_used_as_weight, "node name: mm): B has inconsistent type tensor(int64)"),
    ("bfloat16_input", lambda c: [c.model(tiny_model(input_type=TensorProto.BFLOAT16)), "-o", c.out], "input 'x' is bfloat16"),
    ("shape_inference_failure", _shape_inference_failure, "m.onnx"),
    # posteriors
    ("posterior_not_npz", _posterior_raw(b"w.std = 1.0\n"), "post.npz: not a readable .npz posterior"),
    ("posterior_empty_file", _posterior_raw(b""), "post.npz: not a readable .npz posterior"),
    ("posterior_truncated", _posterior_truncated, "cut.npz"),
    ("posterior_single_array", _posterior_single_array, "post.npy: not an .npz archive"),
    ("posterior_missing", lambda c: [c.model(), "--posterior", str(c.tmp / "none.npz"), "-o", c.out], "none.npz: no such posterior file"),
    ("posterior_pickled", _bad_posterior(**{"w.std": np.array([object()], dtype=object)}), "'w.std' holds Python objects (pickled)"),
    ("posterior_unknown_initializer", _bad_posterior(**{"v.std": np.ones(3, np.float32)}), "'v.std' names no initializer"),
    ("posterior_key_without_kind", _bad_posterior(**{"w": np.ones((4, 3), np.float32)}), "key 'w' is not <initializer>"),
    ("posterior_unknown_kind", _bad_posterior(**{"w.sigma": np.ones((4, 3), np.float32)}), "key 'w.sigma' is not"),
    ("posterior_shape_mismatch", _bad_posterior(**{"w.std": np.ones((3, 4), np.float32)}), "'w.std' has shape [3, 4], initializer 'w' has [4, 3]"),
    ("posterior_mean_shape_mismatch", _bad_posterior(**{"b.mean": np.ones(4, np.float32)}), "'b.mean' has shape [4]"),
    ("posterior_two_parameterisations", _bad_posterior(**{"b.std": B, "b.logvar": B}), "tensor 'b' has two parameterisations"),
    ("posterior_negative_var", _bad_posterior(**{"b.var": -B}), "'b.var' holds negative values"),
    ("posterior_negative_std", _bad_posterior(**{"b.std": -B}), "'b.std' holds negative values"),
    ("posterior_nan_std", _bad_posterior(**{"b.std": np.full(3, np.nan, np.float32)}), "'b.std' holds NaN or infinite values"),
    ("posterior_inf_var", _bad_posterior(**{"b.var": np.full(3, np.inf, np.float32)}), "'b.var' holds NaN or infinite values"),
    ("posterior_nan_mean", _bad_posterior(**{"b.mean": np.full(3, np.nan, np.float32)}), "'b.mean' holds NaN or infinite values"),
    ("posterior_logvar_overflow", _bad_posterior(**{"b.logvar": np.full(3, 1000, np.float32)}), "'b.logvar' gives variances that overflow float32"),
    ("posterior_int_dtype", _bad_posterior(**{"b.std": np.ones(3, np.int32)}), "'b.std' has dtype int32"),
    ("posterior_complex_dtype", _bad_posterior(**{"b.std": np.ones(3, np.complex64)}), "'b.std' has dtype complex64"),
    ("posterior_bool_dtype", _bad_posterior(**{"b.std": np.ones(3, bool)}), "'b.std' has dtype bool"),
    ("posterior_string_dtype", _bad_posterior(**{"b.std": np.array(["1", "2", "3"])}), "'b.std' has dtype <U1"),
    ("posterior_on_shape_constant", _posterior_var_on_shape_constant, "key 'shape.std' names initializer 'shape' of dtype int64"),
    # output directory
    ("output_exists", _existing_output, "output directory exists (use --force"),
    ("file_in_the_way", _file_in_the_way, "the output path is a file, not a directory"),
    ("file_in_the_way_forced", _file_in_the_way_forced, "is a file, not a directory"),
    ("file_as_parent", _file_as_parent, "cannot write the output directory"),
    ("unwritable_parent", _unwritable_parent, "cannot write the output directory"),
    # options
    ("ram_limit_too_small", _oversized("--ram-limit", "16"), "model.onnx: the model needs"),
    ("flash_limit_too_small", _oversized("--flash-limit", "1K"), "model.onnx: the model needs"),
    ("ram_limit_not_a_size", lambda c: [c.model(), "-o", c.out, "--ram-limit", "lots"], "--ram-limit: 'lots' is not a size"),
    ("bad_target", lambda c: [c.model(), "-o", c.out, "--target", "z80"], "unknown target 'z80'"),
    ("batch_zero", lambda c: [c.model(tiny_model(batch_dim="N")), "-o", c.out, "--batch", "0"], "--batch 0"),
    ("batch_negative", lambda c: [c.model(tiny_model(batch_dim="N")), "-o", c.out, "--batch", "-3"], "--batch -3"),
    ("batch_not_a_number", lambda c: [c.model(), "-o", c.out, "--batch", "two"], "--batch"),
    ("name_not_an_identifier", lambda c: [c.model(), "-o", c.out, "--name", "my model"], "--name 'my model'"),
    ("name_keyword", lambda c: [c.model(), "-o", c.out, "--name", "int"], "--name 'int'"),
    ("missing_output_option", lambda c: [c.model()], "-o/--output"),
    # pfpc run / report
    ("run_wrong_input_shape", _run_args(inputs=[np.ones((1, 5), np.float32)]), "input 'x' has 5 values"),
    ("run_empty_input", _run_args(inputs=[np.ones((0, 4), np.float32)]), "input 'x' has 0 values"),
    ("run_too_many_inputs", _run_args(inputs=[np.ones((1, 4), np.float32)] * 2), "2 inputs given, the model takes 1"),
    ("run_string_input", _run_args(inputs=[np.array([["a"] * 4])]), "in0.npy: dtype <U1"),
    ("run_complex_input", _run_args(inputs=[np.ones((1, 4), np.complex64)]), "in0.npy: dtype complex64"),
    ("run_input_not_npy", _run_bad_input_file, "x.npy: not a readable .npy array"),
    ("run_not_pfpc_output", _run_on(_plain_dir), "notout: not a directory written by pfpc"),
    ("run_broken_metadata", _run_on(_broken_metadata), "notout: pfpc.json is not"),
    ("run_metadata_missing_fields", _run_on(_metadata_missing_fields), "notout: pfpc.json is not"),
    ("run_missing_directory", lambda c: ["run", str(c.tmp / "nothing"), "--input", "x.npy", "--output", "y.npz"], "not a directory written by pfpc"),
    ("report_not_pfpc_output", _run_on(_plain_dir, "report"), "notout: not a directory written by pfpc"),
    ("report_broken_metadata", _run_on(_broken_metadata, "report"), "notout: pfpc.json is not"),
]


def _no_staging_left(*directories):
    for directory in directories:
        if os.path.isdir(directory):
            assert not [n for n in os.listdir(directory) if n.startswith(".pfpc-")], directory


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_no_output(tmp_path, capsys, build, expected):
    args = build(Case(tmp_path))
    if args and args[0] not in COMMANDS and "--posterior" not in args and "--help" not in args:
        args = args + ["--deterministic"]  # a compile without a posterior must say so (the trap of issue 21)
    out = args[args.index("-o") + 1] if "-o" in args else None
    existed = out is not None and os.path.lexists(out)
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # usage errors exit from argparse
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("pfpc: error: "), captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    if out is not None and not existed:
        assert not os.path.lexists(out)
    assert sorted(os.listdir(tmp_path)) == before  # nothing added, nothing removed
    _no_staging_left(tmp_path, os.path.dirname(os.path.abspath(out)) if out else tmp_path)
    if "--output" not in args and "-o" not in args:
        return
    with pytest.raises((PfpcError, SystemExit)):  # --debug: the exception itself
        main(args + ["--debug"])


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_debug_shows_traceback_only_when_asked(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    command = [sys.executable, "-m", "pfpc.cli", str(model), "-o", str(tmp_path / "out"), "--deterministic"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    plain = subprocess.run(command, capture_output=True, text=True, env=env)
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PfpcError" in debug.stderr


def test_force_replaces_only_after_success(tmp_path, capsys):
    """--force on a failing compile leaves the existing directory untouched; --force replaces
    only a directory pfpc wrote (its manifest), a user's directory is refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([MLP, "--batch", "1", "-o", str(out), "--force", "--deterministic"]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    _no_staging_left(tmp_path)
    shutil.rmtree(out)
    assert main([MLP, "--batch", "1", "-o", str(out), "--deterministic"]) == 0
    (out / "keep.txt").write_text("mine")
    assert main([MLP, "--batch", "1", "-o", str(out), "--force", "--flash-limit", "1K", "--deterministic"]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    _no_staging_left(tmp_path)
    capsys.readouterr()
    assert main([MLP, "--batch", "1", "-o", str(out), "--force", "--deterministic"]) == 0
    assert not (out / "keep.txt").exists() and (out / "pfp_model.h").exists()
    shutil.rmtree(out)


def test_external_tensor_data_is_read_beside_the_model(tmp_path, capsys, monkeypatch):
    """onnx.save(..., save_as_external_data=True): the data file is found from any working directory."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(tiny_model(), str(model_dir / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    assert main([str(model_dir / "m.onnx"), "-o", str(tmp_path / "out"), "--deterministic"]) == 0, capsys.readouterr().err
