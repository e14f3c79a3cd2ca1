"""The operator registry (pfpc/ops/registry.py) is the one place that lists operators."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper
from tvm import te

import reference
from pfpc.ops import gaussian as G
from pfpc.ops import registry as R

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pfpc"
#: A literal naming this many registry operators is a table of operators.
TABLE = 2


def op_name_lists(source: str, names) -> list[int]:
    """Line numbers of tuple/list/set literals and dict displays in ``source`` that contain at least
    `TABLE` string constants from ``names``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [key for key in node.keys if key is not None]
        else:
            continue
        found = [item.value for item in items if isinstance(item, ast.Constant) and item.value in names]
        if len(found) >= TABLE:
            lines.append(node.lineno)
    return lines


def test_no_stray_operator_lists():
    """No module but the registry lists ONNX op names, Relax operator names or stage names."""
    names = set(R.onnx_ops()) | set(R.BY_RELAX) | set(R.STAGES) | set(R.LOWERED_1D)
    stray = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "registry.py" and path.parent.name == "ops":
            continue
        found = op_name_lists(path.read_text(), names)
        if found:
            stray[str(path.relative_to(PACKAGE))] = found
    assert not stray, f"operator lists outside pfpc/ops/registry.py (file: lines): {stray}"


def test_the_stray_list_check_finds_lists():
    """The check above fails on the tables the registry replaced."""
    names = set(R.onnx_ops()) | set(R.BY_RELAX) | set(R.STAGES)
    assert op_name_lists('VIEW_OPS = {"Flatten", "Reshape", "Identity"}', names) == [1]
    assert op_name_lists('if op in ("matmul", "conv2d"):\n    pass', names) == [1]
    assert op_name_lists('LINEAR = ("relax.nn.conv2d", "relax.matmul")', names) == [1]
    assert op_name_lists('X = {"relu": 1, "tanh": 2}', names) == [1]
    assert op_name_lists('if node.op_type == "Conv":\n    pass', names) == []


def test_every_gaussian_operator_is_complete():
    """A formula, a native moment, a reference in tests/reference.py (data movement may have none)."""
    for op in R.STAGES.values():
        assert op.build is not None, op.name
        assert op.native is None or op.native in G.Moment, op.name
        if op.reference is not None:
            assert callable(getattr(reference, op.reference, None)), f"{op.name}: tests/reference.py has no {op.reference}"
    for op in R.OPERATORS:
        assert op.kind is R.Kind.GAUSSIAN or op.build is None, op.name
    assert all(op.reference is not None for op in R.STAGES.values() if op.name != "transpose")


def test_each_onnx_op_and_relax_op_is_listed_once():
    onnx_names = [name for op in R.OPERATORS for name in op.onnx]
    relax_names = [name for op in R.OPERATORS for name in op.relax]
    assert len(onnx_names) == len(set(onnx_names)) and len(relax_names) == len(set(relax_names))


def test_native_moment_is_what_the_formula_computes():
    """The registry's native moment of each unary stage equals the representation its formula
    returns for an input given as a variance (None: the input's own)."""
    shape = [1, 2, 4, 4]
    attrs = {
        "relu": {}, "sigmoid": {}, "tanh": {}, "clip": {"lower": -1.0, "upper": 1.0}, "leaky_relu": {"alpha": 0.1},
        "scale": {"factor": 2.0}, "transpose": {"axes": [0, 1, 3, 2]}, "pad": {"width": [0, 0, 0, 0, 1, 1, 1, 1], "value": 0.0},
        "maxpool2d": {"kernel": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0], "dilations": [1, 1]},
        "avgpool2d": {"kernel": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0], "dilations": [1, 1], "ceil_mode": False,
                      "count_include_pad": False},
        "reduce_mean": {"axes": [2, 3], "keepdims": True},
    }
    for stage, stage_attrs in attrs.items():
        x = G.Gaussian(te.placeholder(shape, "float32", "m"), te.placeholder(shape, "float32", "v"), G.Moment.VAR)
        result = R.STAGES[stage].build([x], stage_attrs)
        assert result.repr == (R.STAGES[stage].native or G.Moment.VAR), stage


def _tanh_sigmoid_model():
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [5, 3], rng.normal(size=15).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [3, 4], rng.normal(size=12).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["g"]), helper.make_node("Sigmoid", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_report_counts_tanh_and_sigmoid():
    """The per-layer report counts one Gaussian evaluation per output element of Tanh and Sigmoid
    (it counted only ReLU and max before the registry)."""
    from pfpc.codegen.footprint import layer_costs
    from pfpc.compiler import compile as compile_model

    model = _tanh_sigmoid_model()
    posterior = {"w1.std": np.full([5, 3], 0.1, np.float32), "w2.std": np.full([3, 4], 0.1, np.float32)}
    layers = layer_costs(compile_model(model, posterior).program)
    counted = {}
    for layer in layers:
        for label, count in layer["gaussian_ops"].items():
            counted[label] = counted.get(label, 0) + count
    assert counted == {"tanh": 2 * 3, "sigmoid": 2 * 4}


def test_native_moment_of_the_embedded_network_operators():
    """As above for the operators whose formulas are in pfpc/ops/elementwise.py (unary and binary)."""
    shape = [1, 2, 4, 4]
    unary = {
        "reduce_sum": {"axes": [2, 3], "keepdims": True}, "reduce_max": {"axes": [2, 3], "keepdims": True}, "exp": {}, "abs": {},
        "hard_sigmoid": {"alpha": 0.2, "beta": 0.5}, "hard_swish": {"alpha": 1 / 6, "beta": 0.5}, "silu": {}, "gelu": {},
        "gelu_tanh": {}, "softplus": {}, "elu": {"alpha": 1.0}, "selu": {"alpha": 1.67, "gamma": 1.05},
        "slice": {"starts": [0, 1, 0, 3], "steps": [1, 1, 2, -1], "shape": [1, 1, 2, 4]}, "tile": {"repeats": [1, 2, 1, 1]},
        "broadcast": {"shape": [2, 2, 4, 4]},
        "resize2d": {"size": [8, 8], "method": "linear", "mode": "half_pixel", "rounding": "round_prefer_floor"},
        "power": {"exponent": 2.0}, "lrn": {"size": 3, "alpha": 1e-4, "beta": 0.75, "bias": 1.0},
    }
    pool3d = {"kernel": [1, 2, 2], "strides": [1, 2, 2], "pads": [0] * 6, "dilations": [1, 1, 1], "ceil_mode": False, "count_include_pad": False}
    volume = [1, 2, 2, 4, 4]
    for stage, stage_attrs, shapes in (("maxpool3d", pool3d, [volume]), ("avgpool3d", pool3d, [volume]),
                                       ("conv3d", {"strides": [1, 1, 1], "pads": [0] * 6, "dilations": [1, 1, 1], "groups": 1}, [volume, [3, 2, 1, 1, 1]])):
        operands = [G.Gaussian(te.placeholder(s, "float32", f"m{i}"), te.placeholder(s, "float32", f"v{i}"), G.Moment.VAR)
                    for i, s in enumerate(shapes)]
        assert R.STAGES[stage].build(operands, stage_attrs).repr == (R.STAGES[stage].native or G.Moment.VAR), stage
    # normalisations: x and a gamma and beta of the normalised shape / per channel
    ternary = {"layer_norm": ({"axes": [3], "epsilon": 1e-5}, [4]), "group_norm": ({"groups": 2, "epsilon": 1e-5}, [2])}
    for stage, (stage_attrs, affine_shape) in ternary.items():
        operands = [G.Gaussian(te.placeholder(s, "float32", f"m{i}"), te.placeholder(s, "float32", f"v{i}"), G.Moment.VAR)
                    for i, s in enumerate([shape, affine_shape, affine_shape])]
        assert R.STAGES[stage].build(operands, stage_attrs).repr == G.Moment.VAR, stage
    binary = {"maximum": {}, "minimum": {},
              "conv_transpose2d": {"strides": [2, 2], "pads": [0, 0, 0, 0], "dilations": [1, 1], "output_padding": [0, 0], "groups": 1}}
    for stage, stage_attrs in {**unary, **binary}.items():
        operands = [G.Gaussian(te.placeholder(shape, "float32", f"m{i}"), te.placeholder(shape, "float32", f"v{i}"), G.Moment.VAR)
                    for i in range(R.STAGES[stage].arity)]
        result = R.STAGES[stage].build(operands, stage_attrs)
        assert result.repr == (R.STAGES[stage].native or G.Moment.VAR), stage
    first = R.OPERATORS.index(R.STAGES["reduce_sum"])  # the entries of elementwise.py's operators start there
    smooth_loadings = {f"{name}_loading" for name in R.SMOOTH_FUNCTIONS}  # appended after them (`registry._loading_of`)
    assert {op.name for op in R.OPERATORS[first:] if op.kind is R.Kind.GAUSSIAN} - smooth_loadings == set(unary) | set(binary) | set(ternary) | {"conv3d", "maxpool3d", "avgpool3d"}
    assert smooth_loadings <= set(R.LOADING_SLOPES.values())


def test_markers_name_their_parameters():
    """Every marker stage's parameters are named, and the importer's markers parse back to them."""
    import tvm
    from tvm import relax

    for stage, op in R.MARKERS.items():
        x = relax.Var("x", relax.TensorType([2, 3], "float32"))
        values = [relax.prim_value(tvm.tirx.FloatImm("float32", 0.25 * (k + 1))) for k in range(len(op.marker_params))]
        call = relax.op.call_pure_packed(R.MARKER_PREFIX + stage, x, *values, ty_args=x.ty)
        assert R.stage_of(call, R.MARKER_OP) == (stage, {name: 0.25 * (k + 1) for k, name in enumerate(op.marker_params)})
    unknown = relax.op.call_pure_packed("pfpc.nothing", relax.Var("y", relax.TensorType([2], "float32")),
                                        ty_args=relax.TensorType([2], "float32"))
    assert R.stage_of(unknown, R.MARKER_OP) is None


def test_reduce_max_over_too_many_positions_is_one_error():
    """ReduceMax's entry refuses more than REDUCE_MAX_POSITIONS reduced positions (one Clark step each)."""
    import pytest

    from pfpc.compiler import compile as compile_model
    from pfpc.errors import PfpcError

    positions = R.REDUCE_MAX_POSITIONS + 1
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, positions], np.ones(3 * positions, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("ReduceMax", ["h"], ["y"], axes=[1], keepdims=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(PfpcError, match=f"a maximum over {positions} positions"):
        compile_model(model, {"w.std": np.full([3, positions], 0.1, np.float32)})
