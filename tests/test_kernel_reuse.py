"""Kernels that differ only in their parameters' names are compiled once (pfpc.codegen.kernels,
for compile time on deep networks): the C of every kernel equals what TVM prints when each is
compiled itself, and the compiled library still equals the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
from onnx import helper

import reference
from helpers import make_model, random_std

import pfpc
from pfpc.codegen import kernels


def _deep_mlp(layers=6, width=8, seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], {}, "x"
    for index in range(layers):
        inits[f"w{index}"] = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits[f"b{index}"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
        act = ("Relu", "LeakyRelu")[index % 2]
        nodes += [helper.make_node("MatMul", [x, f"w{index}"], [f"m{index}"]),
                  helper.make_node("Add", [f"m{index}", f"b{index}"], [f"a{index}"]),
                  helper.make_node(act, [f"a{index}"], [f"h{index}"], **({"alpha": 0.1} if act == "LeakyRelu" else {}))]
        x = f"h{index}"
    model = make_model(nodes, [("x", [1, width])], [x], inits)
    return model, random_std(inits, rng)


def test_repeated_layers_compile_once_and_print_as_tvm_prints_them(monkeypatch):
    model, stds = _deep_mlp()
    compiled = []
    same = kernels._same_kernels

    def counting(prim_funcs):
        names, copies = same(prim_funcs)
        compiled.append((len(prim_funcs), len(names)))
        return names, copies

    monkeypatch.setattr(kernels, "_same_kernels", counting)
    reused = pfpc.compile(model, stds).program.kernels
    assert compiled[0][0] == 6 and compiled[0][1] < 6  # some layers reused an earlier kernel's C

    monkeypatch.setattr(kernels, "_same_kernels", lambda prim_funcs: (list(prim_funcs), {}))
    separate = pfpc.compile(model, stds).program.kernels
    assert list(reused) == list(separate)
    for name in separate:
        assert reused[name] == separate[name], name


def test_reused_kernels_compute_the_reference(tmp_path):
    model, stds = _deep_mlp(seed=1)
    x = np.random.default_rng(2).standard_normal((1, 8)).astype(np.float32)
    out = str(tmp_path / "deep")
    pfpc.compile(model, stds, out_dir=out)
    (mean, var), = pfpc.compiler.run_host(out, [x])
    variances = {k[: -len(".std")]: np.asarray(v, np.float64) ** 2 for k, v in stds.items()}
    (ref_mean, ref_var), = reference.pfp_onnx(model, variances, {"x": x}).values()
    np.testing.assert_allclose(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var.reshape(ref_var.shape), ref_var, rtol=1e-3, atol=1e-6)


def test_placeholder_kernels_stand_for_the_kernels_built():
    """The passes emit kernels without bodies (`ops.kernel.placeholder_kernel`); each has the
    type (parameters' shapes), operand parameters and spec of the kernel it builds to, and the
    compiled model's IR holds only built kernels."""
    import tvm

    from pfpc import ir_state
    from pfpc.ops.kernel import build_placeholder, is_placeholder

    model, stds = _deep_mlp()
    compiled = pfpc.compile(model, stds)
    placeholders = {gvar.name_hint: func for gvar, func in compiled._mod.functions_items() if is_placeholder(func)}
    assert len(placeholders) >= 6
    for name, placeholder in placeholders.items():
        built = build_placeholder(placeholder)
        assert not is_placeholder(built) and str(built.attrs["global_symbol"]) == name
        assert str(built.ty) == str(placeholder.ty), name
        assert str(built.attrs["pfp.kernel"]) == str(placeholder.attrs["pfp.kernel"])
        outputs = 1 if ir_state.kernel_spec(placeholder).output == "none" else 2
        assert len(built.params) == len(placeholder.params)
        for ours, theirs in zip(placeholder.params[:-outputs], built.params[:-outputs]):
            assert str(ours.name) == str(theirs.name) and [int(d) for d in ours.shape] == [int(d) for d in theirs.shape]
    assert not any(is_placeholder(func) for _, func in compiled.mod.functions_items())
    assert all(isinstance(compiled.mod[name], tvm.tirx.PrimFunc) for name in placeholders)
