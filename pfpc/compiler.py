"""The public compile API: ONNX + posterior -> Relax -> passes -> standalone C."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import tvm_ffi
from tvm import relax

from .codegen import emit_c, emit_svi, footprint, shared_weights
from .codegen import shared_draw as shared_draw_kernels
from .codegen.program import C_KEYWORDS, Program, lower_to_program
from .codegen.targets import get_target
from .errors import PfpcError
from .frontends.onnx_model import input_shapes, load_model, output_shapes
from .frontends.posterior import Posterior, bind_posterior, load_posterior
from .frontends.relax_import import import_model
from .passes.append_predictive_outputs import AppendPredictiveOutputs
from .passes.pipeline import default_passes, svi_passes

# A PfpcError raised inside a pass crosses TVM's FFI; registered, it comes back as itself.
tvm_ffi.register_error(PfpcError)

MODES = ("pfp", "svi")
SVI_DEFAULT_SAMPLES = 100


@dataclass
class CompiledModel:
    """What `compile` produced: the final IR, the C program, the output directory."""

    mod: object
    program: Program
    out_dir: str | None
    io: dict
    footprint: dict | None = None


def compile(  # noqa: A001 - the public name users expect
    model,
    posterior=None,
    target: str = "host",
    out_dir: str | None = None,
    batch: int | None = None,
    passes=None,
    dump_ir: str | None = None,
    name: str = "pfp_model",
    force: bool = False,
    measure: bool = False,
    ram_limit: int | None = None,
    flash_limit: int | None = None,
    mode: str = "pfp",
    samples: int | None = None,
    seed: int | None = None,
    outputs=(),
    probs_method: str = "meanfield",
    logit_samples: int = 64,
) -> CompiledModel:
    """Compile ``model`` (path or ModelProto) with ``posterior`` (path, dict of arrays or None).

    ``mode="pfp"``: one probabilistic forward pass. ``mode="svi"``: the same ``<name>_run`` computes
    the predictive mean and variance by sampling: ``samples`` (default 100) draws of every weight
    the posterior names, from a generator seeded with ``seed`` (default 0) on every call (see
    `pfpc.codegen.emit_svi`).
    ``passes``: a list of (name, pass) to run instead of `default_passes()` (`svi_passes()` in mode svi).
    ``dump_ir``: directory that receives the IR before and after every pass.
    ``out_dir``: where the C library is written (atomically: a temporary directory is renamed).
    ``measure``: build the library with the target's compiler and return its footprint (flash,
    RAM, per-layer arithmetic); implied by ``ram_limit``/``flash_limit`` (bytes), which make the
    compile fail, leaving nothing behind, when the model does not fit.
    ``outputs``: predictive outputs to add after the logits' mean and variance, a subset of
    ``("probs", "entropy", "mutual_information", "logit_var", "ood")``; ``probs_method``
    (meanfield, sampling or probit) and ``logit_samples`` (draws of the logits for sampling and
    mutual_information) say how (`pfpc.passes.append_predictive_outputs`, `pfpc.ops.predictive`).
    """
    target_info = get_target(target)
    check_c_name(name)
    samples, seed = check_sampling_options(mode, samples, seed)
    if outputs and mode == "svi":
        raise PfpcError("--outputs: predictive outputs are computed from the PFP's logit moments; not available with --mode svi")
    passes = list(passes if passes is not None else (svi_passes() if mode == "svi" else default_passes()))
    if outputs:
        passes.append(("append_predictive_outputs", AppendPredictiveOutputs(outputs, probs_method, logit_samples)))
    if out_dir is not None:
        _check_replaceable(out_dir, force)
    label = os.path.basename(model) if isinstance(model, (str, os.PathLike)) else "model"
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, batch)
    elif isinstance(model, onnx.ModelProto):
        model = _load_proto(model, batch)
    shared_draw = mode == "pfp"  # the sampling build draws every weight on its own
    if posterior is None:
        post = bind_posterior(model, {})
    elif isinstance(posterior, Posterior):
        post = posterior
    elif isinstance(posterior, dict):
        post = bind_posterior(model, posterior, shared_draw=shared_draw)
    else:
        post = load_posterior(model, posterior, shared_draw=shared_draw)
    mod = import_model(model, post, label)
    io = {"inputs": list(input_shapes(model).items()), "outputs": _output_shapes(model, mod)}
    if dump_ir:
        os.makedirs(dump_ir, exist_ok=True)
        _dump(dump_ir, 0, "import", mod)
    mod = _run_passes(mod, passes, dump_ir)
    func = mod["main"]
    weights = {str(k): v.numpy() for k, v in func.attrs["pfp.params"].items()}
    if mode == "svi":
        program = emit_svi.lower_to_program(mod, weights, io, name, samples, seed, target_info)
    else:
        traced = None
        if post.shared is not None and post.shared.semantics == "shared_draw":
            traced = _trace_shared_draws(model, post, passes, label)

        def read_through_codebooks(program, prim_funcs):
            if traced is not None:
                shared_draw_kernels.rewrite(program, prim_funcs, traced, post.shared)
            program.shared = shared_weights.encode(program, set(post.shared.tensors), prim_funcs)

        program = lower_to_program(mod, weights, io, name, target_info,
                                   before_codegen=read_through_codebooks if post.shared is not None else None)
    result = CompiledModel(mod, program, out_dir, io)
    if measure or ram_limit is not None or flash_limit is not None:
        def measure_and_check(directory):
            result.footprint = footprint.measure(directory, read_metadata(directory))
            footprint.check_limits(result.footprint, ram_limit, flash_limit, label)

        if out_dir is None:
            with tempfile.TemporaryDirectory() as scratch:
                emit_c.write(program, scratch)
                measure_and_check(scratch)
        else:
            _write_atomically(program, out_dir, force, measure_and_check)
    elif out_dir is not None:
        _write_atomically(program, out_dir, force)
    return result


def _run_passes(mod, passes, dump_ir=None):
    for index, (pass_name, transform) in enumerate(passes, start=1):
        mod = transform(mod)
        if dump_ir:
            _dump(dump_ir, index, pass_name, mod)
    return mod


def _trace_shared_draws(model, post, passes, label) -> dict:
    """Where the passes put every weight of a shared-draw posterior (`codegen.shared_draw.trace`):
    the model compiled once more with the covered weights replaced by their positions."""
    tracer = Posterior({**post.means, **shared_draw_kernels.tracer_means(post.shared)}, post.variances)
    func = _run_passes(import_model(model, tracer, label), passes)["main"]
    final = {str(k): v.numpy() for k, v in func.attrs["pfp.params"].items()}
    return shared_draw_kernels.trace(final, {str(k): str(v) for k, v in func.attrs["pfp.onnx_names"].items()}, post.shared)


def check_c_name(name) -> None:
    """The library prefix (``--name``) becomes file names, C identifiers and macros: an ASCII C
    identifier that is not a keyword."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name) or name in C_KEYWORDS:
        raise PfpcError(f"--name {name!r}: the library prefix must be a C identifier (letters, digits, _; "
                        "not starting with a digit; at most 63 characters) and not a C keyword")


def check_sampling_options(mode, samples, seed) -> tuple:
    """(samples, seed) for ``mode``, defaults filled in; one-line errors name the CLI options too."""
    if mode not in MODES:
        raise PfpcError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if mode != "svi":
        if samples is not None or seed is not None:
            raise PfpcError("samples (--samples) and seed (--seed) need mode svi (--mode svi)")
        return None, None
    samples = SVI_DEFAULT_SAMPLES if samples is None else samples
    seed = 0 if seed is None else seed
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise PfpcError(f"samples (--samples) must be an integer of at least 2 (the variance divides by samples - 1), not {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise PfpcError(f"seed (--seed) must be an integer in [0, 2**32), not {seed!r}")
    return int(samples), int(seed)


def _output_shapes(model, mod):
    """(name, shape) per model output, shapes as TVM's importer computed them: ONNX shape
    inference disagrees with onnxruntime for a ceil-mode pooling window that would start in
    the end padding (onnxruntime and the importer drop it)."""
    ret = mod["main"].ret_ty
    types = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = list(output_shapes(model))
    return [(name, [int(d) for d in ty.shape]) for name, ty in zip(names, types)]


def _load_proto(model, batch):
    with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as handle:
        handle.write(model.SerializeToString())
    try:
        return load_model(handle.name, batch)
    finally:
        os.unlink(handle.name)


def _dump(directory, index, name, mod):
    with open(os.path.join(directory, f"{index:02d}_{name}.py"), "w") as handle:
        handle.write(mod.script(show_meta=False))


def _check_replaceable(out_dir, force):
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise PfpcError(f"{out_dir}: the output path is a file, not a directory; refusing to replace it")
    if os.path.exists(out_dir) and not force:
        raise PfpcError(f"{out_dir}: output directory exists (use --force to replace it)")


def _write_atomically(program, out_dir, force, check=None):
    """Write into a staging directory beside ``out_dir`` and rename it: on any failure nothing is
    left, neither the staging directory nor parent directories created for it."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    created = []
    try:
        missing = parent
        while not os.path.isdir(missing) and not os.path.lexists(missing):
            created.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".pfpc-", dir=parent)
    except OSError as err:
        _remove_empty(created)
        raise PfpcError(f"{out_dir}: cannot write the output directory: {err.strerror}") from None
    try:
        try:
            emit_c.write(program, staging)
        except OSError as err:
            raise PfpcError(f"{out_dir}: cannot write the output directory: {err.strerror}") from None
        if check is not None:
            check(staging)
        _check_replaceable(out_dir, force)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(directories):
    for directory in directories:  # deepest first
        try:
            os.rmdir(directory)
        except OSError:
            return


def build_host(out_dir: str, cc: str = "cc") -> str:
    """Build the generated library and runner for the host; returns the runner path."""
    runner = read_metadata(out_dir)["name"] + "_main"
    _make(out_dir, runner, f"CC={cc}", "AR=ar", "TARGET_FLAGS=")
    return os.path.join(out_dir, runner)


def build_for_target(out_dir: str, meta: dict | None = None) -> tuple:
    """Build the runner with the Makefile's own toolchain; returns (target, program path).
    ``meta``: the directory's `read_metadata`, when the caller has it already."""
    import shutil

    meta = meta or read_metadata(out_dir)
    target = get_target(meta.get("target", "host"))
    program = meta["name"] + ("_qemu.elf" if target.bare_metal else "_main")
    for tool in [target.cc, target.emulator]:
        if tool is not None and not shutil.which(tool):
            raise PfpcError(f"{out_dir}: running target {target.name} needs {tool}, which is not installed")
    _make(out_dir, program)
    return target, os.path.join(out_dir, program)


def _make(out_dir, goal, *overrides):
    import subprocess

    result = subprocess.run(["make", "-B", "-s", "-C", out_dir, *overrides, goal], capture_output=True, text=True)
    if result.returncode != 0:
        raise PfpcError(f"{out_dir}: building the generated C failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")


def read_metadata(out_dir: str) -> dict:
    """The ``pfpc.json`` that `compile` writes beside the C: name, target, input and output shapes."""
    import json

    path = os.path.join(out_dir, "pfpc.json")
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except OSError as err:
        raise PfpcError(f"{out_dir}: not a directory written by pfpc (pfpc.json: {err.strerror})") from None
    except ValueError as err:
        raise PfpcError(f"{out_dir}: pfpc.json is not valid JSON ({err}); recompile the model") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("name"), str) and re.fullmatch(r"[A-Za-z_]\w*", meta["name"])
            and all(_shape_list(meta.get(key)) for key in ("inputs", "outputs")) and meta["inputs"] and meta["outputs"]
            and _shape_list(meta.get("extra_outputs", []))):
        raise PfpcError(f"{out_dir}: pfpc.json is not the metadata pfpc writes (name, inputs, outputs); recompile the model")
    return meta


def _shape_list(value) -> bool:
    """[[name, [positive ints]], ...], as `emit_c.write` stores inputs and outputs."""
    return isinstance(value, list) and all(
        isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry[1]) for entry in value)


@dataclass
class RunResult:
    """(mean, var) per output; the predictive outputs compiled in (``probs``, ``entropy``, ...);
    for Cortex-M under QEMU, the cycles of every call in QEMU's model, one per instruction
    executed (`targets.Target.instructions`; a real core spends more on loads, divisions and
    branches), and its peak stack bytes (painted stack, libm included)."""

    outputs: list
    cycles: list
    extras: dict
    stack_bytes: list


def run(out_dir: str, inputs: list[np.ndarray], emulate: bool = False) -> RunResult:
    """Run the generated C on ``inputs`` (each [k*batch, ...]), in k calls of ``<name>_run``.

    ``emulate=False`` builds it for the host; ``emulate=True`` builds it for the target it was
    compiled for and runs it there under QEMU (system emulation for Cortex-M, user mode for aarch64).
    """
    import subprocess

    meta = read_metadata(out_dir)
    if emulate:
        target, program = build_for_target(out_dir, meta)
    else:
        target, program = get_target("host"), build_host(out_dir)
    if len(inputs) != len(meta["inputs"]):
        raise PfpcError(f"{out_dir}: {len(inputs)} inputs given, the model takes {len(meta['inputs'])} "
                        f"({', '.join(repr(name) for name, _ in meta['inputs'])})")
    batch_in = [int(np.prod(shape)) for _, shape in meta["inputs"]]
    for x, (name, _) in zip(inputs, meta["inputs"]):
        if np.asarray(x).dtype.kind not in "fiub":
            raise PfpcError(f"input '{name}' has dtype {np.asarray(x).dtype}, not real numbers")
    arrays = [np.ascontiguousarray(x, np.float32).reshape(-1) for x in inputs]
    chunks = arrays[0].size // batch_in[0]
    for array, size, (name, shape) in zip(arrays, batch_in, meta["inputs"]):
        if array.size == 0 or array.size % size or array.size // size != chunks:
            raise PfpcError(f"input '{name}' has {array.size} values, not a positive multiple of the compiled shape {shape}")
    interleaved = np.concatenate([a.reshape(chunks, -1) for a in arrays], axis=1).reshape(-1)
    with tempfile.TemporaryDirectory() as tmp:
        # semihosting opens files relative to QEMU's working directory: run there, with relative names
        interleaved.tofile(os.path.join(tmp, "in.f32"))
        command = target.emulator_command(os.path.abspath(program), ["in.f32", "out.f32"])
        result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise PfpcError(f"{out_dir}: the generated program failed: {(result.stderr or result.stdout).strip()[-500:]}")
        raw = np.fromfile(os.path.join(tmp, "out.f32"), np.float32)
    cycles = [target.instructions(int(line.split()[2])) for line in result.stdout.splitlines() if line.startswith("pfpc cycles ")]
    stack = [int(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("pfpc stack ")]
    # per chunk: mean and var of every output, then every extra output
    layout = [shape for _, shape in meta["outputs"] for _ in range(2)] + [shape for _, shape in meta.get("extra_outputs", [])]
    raw = raw.reshape(chunks, sum(int(np.prod(shape)) for shape in layout))
    arrays, offset = [], 0
    for shape in layout:
        size = int(np.prod(shape))
        arrays.append(raw[:, offset : offset + size].reshape([chunks * shape[0]] + list(shape[1:])))
        offset += size
    count = len(meta["outputs"])
    outputs = [(arrays[2 * i], arrays[2 * i + 1]) for i in range(count)]
    extras = {kind: value for (kind, _), value in zip(meta.get("extra_outputs", []), arrays[2 * count :])}
    return RunResult(outputs, cycles, extras, stack)


def run_host(out_dir: str, inputs: list[np.ndarray], extras: bool = False):
    """Run the generated C, built for the host, on ``inputs``: (mean, var) per output; with
    ``extras``, also the predictive outputs as a dict (``probs``, ``entropy``, ``ood``)."""
    result = run(out_dir, inputs)
    return (result.outputs, result.extras) if extras else result.outputs
