"""The generated C under AddressSanitizer + UndefinedBehaviorSanitizer (gcc and clang) and valgrind.

A harness of our own (not the generated runner) allocates every buffer with malloc at its exact
size, the arena too (exactly <NAME>_ARENA_SIZE bytes, filled with NaN bit patterns so a read
before a write would show), calls ``<name>_run`` with that arena and, unless built with
-D<NAME>_NO_STATIC_ARENA, once more with NULL (the static arena) and requires identical results.
Inputs: normal, zeros, tiny (1e-30), denormal, mixed magnitudes (1e-40..1e3), 1e3 (finite
outputs required), 1e15 (no NaN: inf where a moment overflows), and the cases whose results the
README documents (1e30, inf, NaN: no invalid access or undefined behaviour, any value).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from onnx import helper

import pfpc.compiler as compiler
from helpers import make_model, random_std
from test_ops import CASES as OP_CASES

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
# UBSan stops at the first error through halt_on_error=1 at run time: -fno-sanitize-recover=all
# does the same at build time but made clang's builds 2.5x slower (the digits LeNet 75 s)
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
# -g1: line tables are all the sanitizers' reports need; -g's variable tracking made the LeNet build 5x slower
CFLAGS = ["-std=c99", "-O1", "-g1", "-Wall", "-Wextra", "-Werror", "-fno-math-errno"]
ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98"}


def _conv_strided(rng):
    node = helper.make_node
    nodes = [node("Conv", ["x", "w", "b"], ["c"], pads=[2, 1, 0, 2], strides=[2, 1], dilations=[2, 3]), node("Relu", ["c"], ["y"])]
    return nodes, [("x", [2, 3, 9, 8])], {"w": rng.normal(0, 0.5, (4, 3, 3, 2)).astype(np.float32), "b": rng.normal(0, 0.1, 4).astype(np.float32)}, ["w", "b"], 17


def _op_model(name):
    rng = np.random.default_rng(5)
    nodes, inputs, inits, stochastic, opset = (_conv_strided if name == "conv_pads_strides_dilations" else OP_CASES[name])(rng)
    model = make_model(nodes, inputs, ["y"], inits, opset=opset)
    return model, random_std({k: inits[k] for k in stochastic}, rng)


OP_MODELS = ["conv_pads_strides_dilations", "conv1d_maxpool1d", "maxpool_ceil_drops_window", "avgpool_pads_include_ceil",
             "concat", "batch_matmul", "sigmoid", "mul_two_gaussians"]


def _compile(tmp_path, which, zero_var=False):
    out = tmp_path / f"{which}{'_zero_var' if zero_var else ''}"
    if which in ("mlp", "lenet"):
        post = None if zero_var else os.path.join(ROOT, which, "post.npz")
        compiler.compile(os.path.join(ROOT, which, "model.onnx"), post, out_dir=str(out), batch=2)
    else:
        model, stds = _op_model(which)
        compiler.compile(model, None if zero_var else stds, out_dir=str(out))
    return out


def write_harness(out) -> str:
    """harness.c for the library in ``out``: argv[1] inputs (raw float32, one input set after
    the other), argv[2] outputs (means, variances and extras of every set)."""
    meta = compiler.read_metadata(str(out))
    name, upper = meta["name"], meta["name"].upper()
    sizes = [int(np.prod(s)) for _, s in meta["inputs"]]
    out_sizes = [int(np.prod(s)) for _, s in meta["outputs"] for _ in (0, 1)] + [int(np.prod(s)) for _, s in meta.get("extra_outputs", [])]
    ins = ", ".join(f"in{i}" for i in range(len(sizes)))
    outs = ", ".join(f"out{i}" for i in range(len(out_sizes)))
    refs = ", ".join(f"ref{i}" for i in range(len(out_sizes)))
    lines = [
        "#include <stdio.h>", "#include <stdlib.h>", "#include <string.h>", f'#include "{name}.h"', "",
        "int main(int argc, char** argv) {",
        "  FILE* in = fopen(argv[1], \"rb\");", "  FILE* out = fopen(argv[2], \"wb\");",
        f"  void* arena = malloc({upper}_ARENA_SIZE);", "  int sets = 0;",
    ]
    lines += [f"  float* in{i} = malloc({n} * sizeof(float));" for i, n in enumerate(sizes)]
    lines += [f"  float* out{i} = malloc({n} * sizeof(float));" for i, n in enumerate(out_sizes)]
    lines += [f"  float* ref{i} = malloc({n} * sizeof(float));" for i, n in enumerate(out_sizes)]
    lines += ["  if (argc != 3 || !in || !out || !arena) return 2;",
              f"  memset(arena, 0xff, {upper}_ARENA_SIZE); /* NaN bit patterns */", "  (void)sets;", "  for (;;) {"]
    lines += [f"    if (fread(in{i}, sizeof(float), {n}, in) != {n}) break;" for i, n in enumerate(sizes)]
    lines += [f"    if ({name}_run({ins}, {outs}, arena) != 0) return 4;"]
    lines += ["#ifndef " + upper + "_NO_STATIC_ARENA", f"    if ({name}_run({ins}, {refs}, NULL) != 0) return 4;"]
    lines += [f"    if (memcmp(out{i}, ref{i}, {n} * sizeof(float)) != 0) return 3;" for i, n in enumerate(out_sizes)]
    lines += ["#endif"]
    lines += [f"    fwrite(out{i}, sizeof(float), {n}, out);" for i, n in enumerate(out_sizes)]
    lines += ["    sets++;", "  }"]
    lines += [f"  free(in{i});" for i in range(len(sizes))] + [f"  free(out{i}); free(ref{i});" for i in range(len(out_sizes))]
    lines += ["  free(arena);", "  fclose(in);", "  fclose(out);", "  return sets > 0 ? 0 : 5;", "}", ""]
    (out / "harness.c").write_text("\n".join(lines))
    return meta


def build(out, cc, flags, program):
    name = compiler.read_metadata(str(out))["name"]
    command = [cc, *CFLAGS, *flags, "harness.c", f"{name}.c", "-o", program, "-lm"]
    result = subprocess.run(command, cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return str(out / program)


def input_sets(meta, rng):
    """{kind: list of input arrays (one per model input)}."""
    shapes = [s for _, s in meta["inputs"]]

    def each(make):
        return [make(s).astype(np.float32) for s in shapes]

    def denormal(s):
        return rng.choice([-1, 1], s) * rng.uniform(1e-45, 1e-38, s)

    return {
        "normal": each(lambda s: rng.standard_normal(s)),
        "zeros": each(np.zeros),
        "tiny": each(lambda s: rng.standard_normal(s) * 1e-30),
        "denormal": each(denormal),
        "mixed": each(lambda s: rng.standard_normal(s) * 10.0 ** rng.uniform(-40, 3, s)),
        "large": each(lambda s: rng.standard_normal(s) * 1e3),
        "big": each(lambda s: rng.standard_normal(s) * 1e15),
        "huge": each(lambda s: rng.standard_normal(s) * 1e30),
        "inf": each(lambda s: np.where(rng.random(s) < 0.1, np.inf, rng.standard_normal(s))),
        "nan": each(lambda s: np.where(rng.random(s) < 0.1, np.nan, rng.standard_normal(s))),
    }


FINITE_KINDS = ("normal", "zeros", "tiny", "denormal", "mixed", "large")


def run_sets(program, meta, sets, tmp, runner=()):
    """Run ``program`` on every input set; {kind: flat float32 outputs}."""
    kinds = list(sets)
    data = np.concatenate([np.concatenate([x.reshape(-1) for x in sets[k]]) for k in kinds]).astype(np.float32)
    data.tofile(tmp / "in.f32")
    result = subprocess.run([*runner, program, str(tmp / "in.f32"), str(tmp / "out.f32")], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    raw = np.fromfile(tmp / "out.f32", np.float32).reshape(len(kinds), -1)
    return dict(zip(kinds, raw))


def _models():
    return ["mlp", "lenet"] + OP_MODELS


@pytest.mark.parametrize("which", _models())
def test_sanitizers(tmp_path, which):
    """ASan + UBSan (gcc -O1 with the static and a malloc'd arena; clang -O0 without a static arena),
    zero and non-zero variance: no invalid access, no undefined behaviour, identical results from
    both arenas, and finite outputs for finite, moderate inputs."""
    compilers = [cc for cc in ("gcc", "clang") if shutil.which(cc)]
    rng = np.random.default_rng(11)
    for zero_var in (False, True):
        out = _compile(tmp_path, which, zero_var)
        meta = write_harness(out)
        sets = input_sets(meta, rng)
        results = []
        for cc in compilers:
            # clang at -O0 (no static arena): its UBSan at -O1 took 12 x ASan's build time on the
            # LeNet; gcc -O1 keeps the optimised build (and its -Wmaybe-uninitialized) covered
            extra = [f"-D{meta['name'].upper()}_NO_STATIC_ARENA", "-O0"] if cc == "clang" else []
            program = build(out, cc, SANITIZE + extra, f"harness_{cc}")
            results.append(run_sets(program, meta, sets, tmp_path))
        for kind in FINITE_KINDS:
            assert np.all(np.isfinite(results[0][kind])), (which, zero_var, kind)
            if zero_var:
                variances = _variances(meta, results[0][kind])
                assert all(np.all(v == 0) for v in variances), (which, kind)
        # |x| ~ 1e15: x^2 still fits float32; a moment may overflow to inf (x * x in mul_two_gaussians), never NaN
        assert not np.any(np.isnan(results[0]["big"])), (which, zero_var)
        for other in results[1:]:
            for kind in FINITE_KINDS:
                np.testing.assert_allclose(other[kind], results[0][kind], rtol=1e-5, atol=1e-30)


def _variances(meta, flat):
    offset, found = 0, []
    for _, shape in meta["outputs"]:
        size = int(np.prod(shape))
        found.append(flat[offset + size : offset + 2 * size])
        offset += 2 * size
    return found


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind not installed")
@pytest.mark.parametrize("which", ["lenet", "conv_pads_strides_dilations", "avgpool_pads_include_ceil", "concat", "batch_matmul"])
def test_valgrind(tmp_path, which):
    """memcheck: no invalid read or write, no use of uninitialised values, no leak."""
    out = _compile(tmp_path, which)
    meta = write_harness(out)
    program = build(out, "gcc", [], "harness_plain")
    sets = input_sets(meta, np.random.default_rng(2))
    runner = ["valgrind", "--error-exitcode=1", "--leak-check=full", "--errors-for-leak-kinds=definite", "--track-origins=yes", "-q"]
    results = run_sets(program, meta, sets, tmp_path, runner)
    assert all(np.all(np.isfinite(results[k])) for k in FINITE_KINDS)
