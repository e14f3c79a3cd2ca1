"""Tied weights: one initializer read by several nodes through layout operations (Gemm transB,
Transpose). Each distinct layout is stored once, and the sampling build (``mode="svi"``) draws the
initializer once per sample for all its uses: with the same draw, y = W x - W x is exactly 0."""

from __future__ import annotations

import os
import re

import numpy as np
from onnx import helper

import pfpc.compiler as compiler
from helpers import make_model, random_std


def _difference_of_tied_layers(rng, second="gemm"):
    """y = Gemm(x, W, transB=1) - (the same product through a second node on the same W)."""
    inits = {"w": rng.standard_normal((4, 6)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], transB=1)]
    if second == "gemm":
        nodes.append(helper.make_node("Gemm", ["x", "w"], ["b"], transB=1))
    else:  # MatMul by Transpose(w): the same layout reached by another operator
        nodes += [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["b"])]
    nodes.append(helper.make_node("Sub", ["a", "b"], ["y"]))
    return make_model(nodes, [("x", [2, 6])], ["y"], inits), inits


def _stored_weight_arrays(out_dir):
    text = open(os.path.join(out_dir, "pfp_model_weights.h")).read()
    return re.findall(r"static const float (\w+)\[", text)


def test_a_weight_tied_through_gemm_transb_is_stored_once(tmp_path):
    rng = np.random.default_rng(0)
    model, inits = _difference_of_tied_layers(rng)
    out = str(tmp_path / "pfp")
    compiler.compile(model, random_std(inits, rng), out_dir=out, covariance="none")
    arrays = _stored_weight_arrays(out)
    # the transposed mean and variance, once each (two copies before)
    assert len(arrays) == 2, arrays


def test_sampling_draws_a_tied_weight_once_per_sample(tmp_path):
    """Under any draw of W, W x - W x = 0: an SVI build that draws each use separately returns a
    variance of 2 Var(W x) instead."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    for second in ("gemm", "transpose"):
        model, inits = _difference_of_tied_layers(rng, second)
        out = str(tmp_path / f"svi_{second}")
        compiler.compile(model, random_std(inits, rng, 0.5), out_dir=out, mode="svi", samples=50)
        (mean, var), = compiler.run_host(out, [x])
        assert np.max(np.abs(mean)) < 1e-5 and np.max(var) < 1e-9, (second, mean, var)


def test_sampling_draws_an_initializer_read_in_two_layouts_once(tmp_path):
    """u W by a MatMul (W as stored) and (W^T u^T)^T through Transposes (W^T folded at compile
    time): the same product, so their difference is 0 under every draw of W only if both layouts
    come from one draw."""
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((4, 6)).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["u", "w"], ["a"]),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("Transpose", ["u"], ["ut"], perm=[1, 0]),
        helper.make_node("MatMul", ["wt", "ut"], ["bt"]),
        helper.make_node("Transpose", ["bt"], ["b"], perm=[1, 0]),
        helper.make_node("Sub", ["a", "b"], ["y"]),
    ]
    model = make_model(nodes, [("u", [1, 4])], ["y"], inits)
    out = str(tmp_path / "svi")
    compiler.compile(model, random_std(inits, rng, 0.5), out_dir=out, mode="svi", samples=50)
    (mean, var), = compiler.run_host(out, [rng.standard_normal((1, 4)).astype(np.float32)])
    assert np.max(np.abs(mean)) < 1e-5 and np.max(var) < 1e-9, (mean, var)
    assert "_tied_gather" in open(os.path.join(out, "pfp_model_weights.h")).read()  # gathered, not drawn
