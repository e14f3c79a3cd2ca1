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
