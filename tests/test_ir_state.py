"""The typed IR state (pfpc/ir_state.py): its well-formedness check and the pass-ordering rules."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tvm

import pfpc.compiler as compiler
from pfpc import ir_state
from pfpc.errors import PfpcError
from pfpc.ir import func_attrs, kernel_of, main_bindings, with_attrs
from pfpc.ops.gaussian import Moment
from pfpc.passes.pipeline import check_order, default_passes, svi_passes

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
LENET = os.path.join(EXAMPLES, "lenet", "model.onnx")
LENET_POST = os.path.join(EXAMPLES, "lenet", "post.npz")


def _through(name):
    passes = default_passes()
    return passes[: [n for n, _ in passes].index(name) + 1]


def _imported(model, posterior):
    """The module as imported (no pass run)."""
    from pfpc.frontends.onnx_model import load_model
    from pfpc.frontends.posterior import bind_posterior, load_posterior
    from pfpc.frontends.relax_import import import_model

    model = load_model(model, 1) if isinstance(model, str) else model
    post = load_posterior(model, posterior) if isinstance(posterior, str) else bind_posterior(model, posterior)
    return import_model(model, post)


@pytest.fixture(scope="module")
def imported():
    return _imported(LENET, LENET_POST)


@pytest.fixture(scope="module")
def fused():
    return compiler.compile(LENET, LENET_POST, batch=1, passes=_through("fuse_operators")).mod


def _with_main_attrs(mod, changes):
    mod = tvm.IRModule(dict(mod.functions))
    mod["main"] = with_attrs(mod["main"], func_attrs(mod["main"], changes))
    return mod


def test_well_formed_modules_pass(imported, fused):
    ir_state.check_module(imported)
    ir_state.check_module(fused)


def test_rejects_a_weight_of_the_wrong_shape(fused):
    means = ir_state.means(fused["main"])
    name = next(n for n in means if means[n].ndim == 4)
    broken = _with_main_attrs(fused, ir_state.encode(means={**means, name: means[name][:1]}))
    with pytest.raises(PfpcError, match=f"pfp.params\\['{name}'\\] has shape"):
        ir_state.check_module(broken)


def test_rejects_a_weight_parameter_without_a_mean(fused):
    means = ir_state.means(fused["main"])
    dropped = sorted(means)[0]
    broken = _with_main_attrs(fused, ir_state.encode(means={k: v for k, v in means.items() if k != dropped}))
    with pytest.raises(PfpcError, match=f"have no pfp.params entry.*{dropped}|{dropped}.*have no pfp.params entry"):
        ir_state.check_module(broken)


def test_rejects_a_negative_variance(imported):
    variances = ir_state.variances(imported["main"])
    name = sorted(variances)[0]
    broken = _with_main_attrs(imported, ir_state.encode(variances={**variances, name: -variances[name]}))
    with pytest.raises(PfpcError, match="non-negative"):
        ir_state.check_module(broken)


def test_rejects_outputs_that_do_not_match_main(fused):
    broken = _with_main_attrs(fused, ir_state.encode(outputs=[Moment.VAR, Moment.VAR]))
    with pytest.raises(PfpcError, match="main returns 2 tensors"):
        ir_state.check_module(broken)
    broken = _with_main_attrs(fused, ir_state.encode(outputs=[Moment.SECOND_MOMENT]))
    with pytest.raises(PfpcError, match="pfp.outputs"):
        ir_state.check_module(broken)


def test_rejects_a_kernel_spec_that_does_not_match_its_call(fused):
    spec, gvar = next(found for found in (kernel_of(fused, b.value) for b in main_bindings(fused["main"])) if found and found[0].ops[0] == "conv2d")
    for wrong, message in ((spec.with_(operands=(Moment.NONE,) * len(spec.operands)), "called with"),
                           (spec.with_(output=Moment.NONE), "returns 2 tensors"),
                           (spec.with_(stages=(("no_such_stage", {}),) + spec.stages[1:]), "unknown stage")):
        broken = tvm.IRModule(dict(fused.functions))
        broken[gvar] = ir_state.with_kernel_spec(fused[gvar], wrong)
        with pytest.raises(PfpcError, match=message):
            ir_state.check_module(broken)


@tvm.transform.module_pass(opt_level=0, name="pfpc.DropAWeight")
class _DropAWeight:
    """A broken pass: forgets one weight's mean."""

    def transform_module(self, mod, ctx):
        means = ir_state.means(mod["main"])
        mod["main"] = with_attrs(mod["main"], func_attrs(mod["main"], ir_state.encode(means=dict(sorted(means.items())[1:]))))
        return mod


def test_the_tests_check_the_state_after_every_pass():
    """conftest.py installs `CheckAfterEachPass`: a broken pass fails the compile it is in, named."""
    with pytest.raises(PfpcError, match="after pfpc.DropAWeight: ill-formed IR"):
        compiler.compile(LENET, LENET_POST, batch=1, passes=_through("substitute_layers") + [("broken", _DropAWeight())])


def test_default_pipelines_keep_their_order_rules():
    check_order(default_passes())
    check_order(svi_passes())


def test_pass_order_rules_are_checked():
    passes = dict(default_passes())
    with pytest.raises(PfpcError, match="fuse_operators .* needs pfpc.SubstituteLayers"):
        check_order([("fuse_operators", passes["fuse_operators"])])
    with pytest.raises(PfpcError, match="substitute_layers .* must run after pfpc.PadConvInputs"):
        check_order([("substitute_layers", passes["substitute_layers"]), ("pad_conv_inputs", passes["pad_conv_inputs"])])
    with pytest.raises(PfpcError, match="choose_moment_representation .* must run after pfpc.FuseOperators"):
        compiler.compile(LENET, LENET_POST, batch=1, passes=_through("substitute_layers") + [
            ("choose_moment_representation", passes["choose_moment_representation"]), ("fuse_operators", passes["fuse_operators"])])


def test_moments_compare_as_their_names():
    """The enum is a str: specs, C names and pfp.outputs keep the spelling they had."""
    assert [str(m) for m in Moment] == ["none", "var", "second_moment"] and Moment.VAR == "var"
    assert f"x_{Moment.SECOND_MOMENT}" == "x_second_moment"


def test_folded_weights_record_where_their_elements_come_from():
    """fold_weight_layout records, per element of a transposed weight, its flat position in the
    ONNX initializer: gathering the initializer there gives the folded mean (checked against the
    ONNX file's values, not the pass's arithmetic)."""
    import onnx
    from onnx import numpy_helper

    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(LENET).graph.initializer}
    func = compiler._run_passes(_imported(LENET, LENET_POST), _through("fold_weight_layout"))["main"]
    means, names, positions = ir_state.means(func), ir_state.onnx_names(func), ir_state.weight_positions(func)
    moved = [name for name in positions if positions[name] is not None]
    # Gemm transB: transposed weights; conv biases: reshaped to [1, C, 1, 1]
    assert {names[name] for name in moved} == {"fc1.weight", "fc2.weight", "conv1.bias", "conv2.bias"}
    for name in moved:
        source = initializers[names[name]]
        assert positions[name].shape == means[name].shape and positions[name].size == source.size
        np.testing.assert_array_equal(source.reshape(-1)[positions[name]], means[name])
    assert positions["fc1.weight.permute_dims"].shape == initializers["fc1.weight"].T.shape
    imported = [n for n in means if n not in positions and n in names]
    assert imported and all(np.array_equal(ir_state.source_positions(positions, n, means[n].shape).reshape(-1),
                                           np.arange(means[n].size)) for n in imported)


def test_batch_norm_folding_marks_the_weights_it_scales():
    """A weight batch-norm folding scales has no positions (its elements are no initializer's)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [3, 2, 3, 3], rng.normal(size=54).astype(np.float32))]
    inits += [helper.make_tensor(n, TensorProto.FLOAT, [3], rng.uniform(0.5, 1.5, 3).astype(np.float32)) for n in ("s", "b", "m", "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    func = compiler._run_passes(_imported(model, {"w.std": np.full([3, 2, 3, 3], 0.1, np.float32)}), _through("fold_batch_norm"))["main"]
    positions = ir_state.weight_positions(func)
    assert "w" in positions and positions["w"] is None
