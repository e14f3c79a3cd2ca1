"""The generated C is navigable from the model: kernels named and commented after their ONNX nodes,
weights after their initializers and moments, sizes named in elements or bytes, short lines."""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import onnx
import pytest
from onnx import helper

import pfpc.compiler as compiler
import reference
from helpers import assert_close, check_against_reference, make_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LENET = [os.path.join(ROOT, "examples", "lenet", f) for f in ("model.onnx", "post.npz")]
MAX_LINE = 160


def _sanitized(text):
    return "_".join(part for part in re.sub(r"[^A-Za-z0-9_]", "_", text).split("_") if part)


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    out = tmp_path_factory.mktemp("lenet") / "out"
    compiler.compile(LENET[0], LENET[1], out_dir=str(out), batch=1)
    return out


def _long_lines(directory):
    found = []
    for path in sorted(glob.glob(os.path.join(str(directory), "**", "*"), recursive=True)):
        if os.path.isfile(path) and path.endswith((".c", ".h", ".mk", ".txt", ".cmake", ".ld", ".s", ".S")) or path.endswith("Makefile"):
            with open(path) as handle:
                found += [(os.path.basename(path), number, len(line)) for number, line in enumerate(handle, 1) if len(line.rstrip("\n")) > MAX_LINE]
    return found


def test_lenet_kernels_are_named_and_commented_after_their_onnx_nodes(lenet):
    model = onnx.load(LENET[0])
    source = (lenet / "pfp_model.c").read_text()
    functions = re.findall(r"^PFP_KERNEL void (k_\w+)\(", source, re.M)
    for node in model.graph.node:
        assert node.name in source, f"ONNX node {node.name} not in the C"
        if node.op_type in ("Conv", "MaxPool", "Gemm"):  # each has a kernel of its own, named after it
            assert any(_sanitized(node.name) in function for function in functions), (node.name, functions)
    assert "k_pool2_MaxPool_relu2_Relu" in functions  # the pool findable by name
    assert "/conv2/Conv (Conv 6->16, 3x3, stride 1) -> mean, variance" in source
    assert "/relu2/Relu (Relu) + /pool2/MaxPool (MaxPool 2x2, stride 2) -> mean, variance" in source
    assert '{"operands"' not in source  # no raw JSON comments
    assert len(functions) == len(set(functions))


def test_report_rows_name_the_c_functions_and_their_onnx_nodes(lenet, capsys):
    """`pfpc report` lists each layer by the C function a firmware engineer finds in the source,
    and pfpc.json says which ONNX nodes each one computes."""
    from pfpc.cli import main

    source = (lenet / "pfp_model.c").read_text()
    functions = re.findall(r"^PFP_KERNEL void (k_\w+)\(", source, re.M)
    layers = json.loads((lenet / "pfpc.json").read_text())["layers"]
    assert [layer["function"] for layer in layers if layer["function"] in functions] == [layer["function"] for layer in layers]
    model_nodes = {node.name for node in onnx.load(LENET[0]).graph.node}
    for layer in layers:
        assert layer["onnx_nodes"] and set(layer["onnx_nodes"]) <= model_nodes, layer
        assert any(_sanitized(node) in layer["function"] for node in layer["onnx_nodes"]), layer
    assert main(["report", str(lenet)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert all(layer["function"] in rows for layer in layers)
    assert "k_pool2_MaxPool_relu2_Relu" in rows


def test_lenet_weights_are_named_after_initializers_and_moments(lenet):
    model = onnx.load(LENET[0])
    weights = (lenet / "pfp_model_weights.h").read_text()
    arrays = dict(re.findall(r"^static const float (\w+)\[(\d+)\]", weights, re.M))
    for init in model.graph.initializer:
        stem = "pfp_model_" + _sanitized(init.name)
        size = str(int(np.prod(init.dims)))
        assert arrays.get(f"{stem}_mean") == size, (stem, sorted(arrays))
        assert arrays.get(f"{stem}_var") == size, (stem, sorted(arrays))
    assert not [name for name in arrays if "permute_dims" in name or "reshape" in name]


def test_sizes_are_named_in_elements_and_bytes(lenet):
    header = (lenet / "pfp_model.h").read_text()
    meta = json.loads((lenet / "pfpc.json").read_text())
    defines = dict(re.findall(r"^#define (\w+) (.+)$", header, re.M))
    assert defines["PFP_MODEL_INPUT_ELEMENTS"] == "64" and defines["PFP_MODEL_LOGITS_ELEMENTS"] == "10"
    assert defines["PFP_MODEL_LOGITS_BYTES"] == "(PFP_MODEL_LOGITS_ELEMENTS * 4)"
    assert defines["PFP_MODEL_OUTPUT0_ELEMENTS"] == "PFP_MODEL_LOGITS_ELEMENTS"
    assert defines["PFP_MODEL_ARENA_BYTES"] == str(meta["arena_bytes"])
    assert defines["PFP_MODEL_ARENA_SIZE"] == str(meta["arena_bytes"])  # the old name, kept


@pytest.mark.parametrize("options", [{}, {"target": "cortex-m4"}, {"mode": "svi", "samples": 4},
                                     {"outputs": ["probs", "entropy", "mutual_information"]}], ids=["pfp", "cortex-m4", "svi", "outputs"])
def test_no_generated_line_is_longer_than_160_characters(tmp_path, options):
    out = tmp_path / "out"
    compiler.compile(LENET[0], LENET[1], out_dir=str(out), batch=1, **options)
    assert _long_lines(out) == []


def test_lenet_outputs_match_the_reference(lenet):
    """The renamed C computes what the independent float64 reference computes."""
    model = onnx.load(LENET[0])
    posterior = np.load(LENET[1])
    variances = {k[: -len(".std")]: posterior[k].astype(np.float64) ** 2 for k in posterior.files if k.endswith(".std")}
    x = np.load(os.path.join(ROOT, "examples", "lenet", "sample.npy"))[:1].astype(np.float32)
    expected = reference.pfp_onnx(onnx.shape_inference.infer_shapes(_fixed_batch(model)), variances, {"input": x})
    (mean, var), = compiler.run_host(str(lenet), [x])
    ref_mean, ref_var = next(iter(expected.values()))
    assert_close(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, what="mean")
    assert_close(var.reshape(ref_var.shape), ref_var, rtol=1e-4, what="variance")


def _fixed_batch(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in list(copy.graph.input) + list(copy.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = 1
    return copy


def test_unnamed_and_colliding_nodes_get_distinct_names_in_file_order(tmp_path):
    """Nodes without names are ``<op_type>_<index>`` (index in the ONNX file); names that sanitise
    alike ('a/b', 'a_b') give distinct C functions; the outputs still match the reference."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(3, 1, 3, 3)).astype(np.float32), "w2": rng.normal(size=(2, 3, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="a/b"),
        helper.make_node("Relu", ["c1"], ["r1"]),  # unnamed: Relu_1
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),  # unnamed: MaxPool_2
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="a_b"),
        helper.make_node("Flatten", ["c2"], ["y"]),  # unnamed: Flatten_4
    ]
    model = make_model(nodes, [("x", [1, 1, 6, 6])], ["y"], inits)
    x = rng.normal(size=(1, 1, 6, 6)).astype(np.float32)
    check_against_reference(model, inits, {"x": x}, tmp_path, rng)
    source = (tmp_path / "out" / "pfp_model.c").read_text()
    functions = re.findall(r"^PFP_KERNEL void (k_\w+)\(", source, re.M)
    for name in ("Relu_1", "MaxPool_2", "a/b", "a_b"):  # Flatten_4: a view at the output, no kernel
        assert name in source, name
    assert "k_MaxPool_2_Relu_1" in functions and len(functions) == len(set(functions)), functions
    assert "/* a/b (Conv 1->3, 3x3, stride 1) -> mean, variance */\nPFP_KERNEL void k_a_b(" in source
    assert "/* a_b (Conv 3->2, 1x1, stride 1) -> mean, variance */\nPFP_KERNEL void k_a_b_2(" in source


def test_provenance_reaches_every_kernel_and_is_checked():
    """The importer records each binding's ONNX node; after fusion every kernel stage names its
    nodes (the typed `KernelSpec.nodes`, JSON round trip included); the IR check rejects
    provenance naming a binding that does not exist and a spec whose provenance misses stages."""
    import tvm

    from pfpc import ir_state
    from pfpc.errors import PfpcError
    from pfpc.ir import func_attrs, kernel_of, main_bindings, with_attrs
    from pfpc.ops.kernel import KernelSpec
    from test_ir_state import _imported, _through

    imported = _imported(LENET[0], LENET[1])
    nodes = ir_state.onnx_nodes(imported["main"])
    assert {n.name for found in nodes.values() for n in found} == {n.name for n in onnx.load(LENET[0]).graph.node}
    broken = tvm.IRModule(dict(imported.functions))
    broken["main"] = with_attrs(broken["main"], func_attrs(broken["main"], ir_state.encode(onnx_nodes={"no_such_binding": nodes[next(iter(nodes))]})))
    with pytest.raises(PfpcError, match="no_such_binding"):
        ir_state.check_module(broken)

    fused = compiler.compile(LENET[0], LENET[1], batch=1, passes=_through("fuse_operators")).mod
    specs = [found[0] for found in (kernel_of(fused, b.value) for b in main_bindings(fused["main"])) if found]
    assert specs and all(len(spec.nodes) == len(spec.stages) and all(spec.nodes) for spec in specs)
    assert all(KernelSpec.from_json(spec.to_json()).nodes == spec.nodes for spec in specs)
    pool = next(spec for spec in specs if spec.ops == ["maxpool2d", "relu"])
    assert {n.name for n in pool.nodes[0]} == {"/relu1/Relu", "/pool1/MaxPool"}
    gvar = next(found[1] for found in (kernel_of(fused, b.value) for b in main_bindings(fused["main"])) if found)
    bad = tvm.IRModule(dict(fused.functions))
    spec = ir_state.kernel_spec(bad[gvar])
    bad[gvar] = ir_state.with_kernel_spec(bad[gvar], spec.with_(nodes=spec.nodes + spec.nodes))
    with pytest.raises(PfpcError, match="provenance"):
        ir_state.check_module(bad)
