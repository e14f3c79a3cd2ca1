"""The public compile API: ONNX + posterior -> Relax -> passes -> standalone C."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from .codegen import emit_c
from .codegen.targets import get_target
from .errors import PfpcError, reraise_from_tvm
from .frontends.onnx_model import input_shapes, load_model, output_shapes
from .frontends.posterior import Posterior, bind_posterior, load_posterior
from .frontends.relax_import import import_model
from .passes.append_predictive_outputs import AppendPredictiveOutputs
from .passes.pipeline import default_passes


@dataclass
class CompiledModel:
    """What `compile` produced: the final IR, the C program, the output directory."""

    mod: object
    program: emit_c.Program
    out_dir: str | None
    io: dict


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
    outputs=(),
) -> CompiledModel:
    """Compile ``model`` (path or ModelProto) with ``posterior`` (path, dict of arrays or None).

    ``passes``: a list of (name, pass) to run instead of `default_passes()`.
    ``dump_ir``: directory that receives the IR before and after every pass.
    ``out_dir``: where the C library is written (atomically: a temporary directory is renamed).
    ``outputs``: predictive outputs to add after the logits' mean and variance, a subset of
    ``("probs", "entropy", "ood")`` (`pfpc.passes.append_predictive_outputs`).
    """
    passes = list(passes if passes is not None else default_passes())
    if outputs:
        passes.append(("append_predictive_outputs", AppendPredictiveOutputs(outputs)))
    target_info = get_target(target)
    if out_dir is not None and os.path.exists(out_dir) and not force:
        raise PfpcError(f"{out_dir}: output directory exists (use --force to replace it)")
    label = os.path.basename(model) if isinstance(model, (str, os.PathLike)) else "model"
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, batch)
    elif isinstance(model, onnx.ModelProto):
        model = _load_proto(model, batch)
    if posterior is None:
        post = bind_posterior(model, {})
    elif isinstance(posterior, Posterior):
        post = posterior
    elif isinstance(posterior, dict):
        post = bind_posterior(model, posterior)
    else:
        post = load_posterior(model, posterior)
    io = {"inputs": list(input_shapes(model).items()), "outputs": list(output_shapes(model).items())}
    mod = import_model(model, post, label)
    if dump_ir:
        os.makedirs(dump_ir, exist_ok=True)
        _dump(dump_ir, 0, "import", mod)
    for index, (pass_name, transform) in enumerate(passes, start=1):
        try:
            mod = transform(mod)
        except PfpcError:
            raise
        except Exception as err:
            reraise_from_tvm(err)
            raise
        if dump_ir:
            _dump(dump_ir, index, pass_name, mod)
    func = mod["main"]
    weights = {str(k): v.numpy() for k, v in func.attrs["pfp.params"].items()}
    program = emit_c.lower_to_program(mod, weights, io, name)
    program.target = target_info
    if out_dir is not None:
        _write_atomically(program, out_dir, force)
    return CompiledModel(mod, program, out_dir, io)


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


def _write_atomically(program, out_dir, force):
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".pfpc-", dir=parent)
    except OSError as err:
        raise PfpcError(f"{out_dir}: cannot write the output directory: {err.strerror}") from None
    try:
        emit_c.write(program, staging)
        if os.path.exists(out_dir):
            if not force:
                raise PfpcError(f"{out_dir}: output directory exists (use --force to replace it)")
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_host(out_dir: str, cc: str = "cc") -> str:
    """Build the generated library and runner for the host; returns the runner path."""
    import subprocess

    runner = read_metadata(out_dir)["name"] + "_main"
    command = ["make", "-B", "-s", "-C", out_dir, f"CC={cc}", "AR=ar", "TARGET_FLAGS=", runner]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise PfpcError(f"{out_dir}: building the generated C failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return os.path.join(out_dir, runner)


def read_metadata(out_dir: str) -> dict:
    """The ``pfpc.json`` that `compile` writes beside the C: name, input and output shapes."""
    import json

    with open(os.path.join(out_dir, "pfpc.json")) as handle:
        return json.load(handle)


def run_host(out_dir: str, inputs: list[np.ndarray], extras: bool = False):
    """Run the generated C on ``inputs`` (each [k*batch, ...]) and return (mean, var) per output;
    with ``extras``, also the predictive outputs as a dict (``probs``, ``entropy``, ``ood``)."""
    import subprocess

    meta = read_metadata(out_dir)
    runner = build_host(out_dir)
    batch_in = [int(np.prod(shape)) for _, shape in meta["inputs"]]
    arrays = [np.ascontiguousarray(x, np.float32).reshape(-1) for x in inputs]
    chunks = arrays[0].size // batch_in[0]
    for array, size, (name, shape) in zip(arrays, batch_in, meta["inputs"]):
        if array.size % size or array.size // size != chunks:
            raise PfpcError(f"input '{name}' has {array.size} values, not a multiple of the compiled shape {shape}")
    interleaved = np.concatenate([a.reshape(chunks, -1) for a in arrays], axis=1).reshape(-1)
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = os.path.join(tmp, "in.f32"), os.path.join(tmp, "out.f32")
        interleaved.tofile(in_path)
        result = subprocess.run([runner, in_path, out_path], capture_output=True, text=True)
        if result.returncode != 0:
            raise PfpcError(f"{out_dir}: the generated program failed: {result.stderr.strip()}")
        raw = np.fromfile(out_path, np.float32)
    # per chunk: mean and var of every output, then every extra output
    layout = [shape for _, shape in meta["outputs"] for _ in range(2)] + [shape for _, shape in meta.get("extra_outputs", [])]
    raw = raw.reshape(chunks, sum(int(np.prod(shape)) for shape in layout))
    arrays, offset = [], 0
    for shape in layout:
        size = int(np.prod(shape))
        arrays.append(raw[:, offset : offset + size].reshape([chunks * shape[0]] + list(shape[1:])))
        offset += size
    count = len(meta["outputs"])
    results = [(arrays[2 * i], arrays[2 * i + 1]) for i in range(count)]
    if not extras:
        return results
    return results, {kind: value for (kind, _), value in zip(meta.get("extra_outputs", []), arrays[2 * count :])}
