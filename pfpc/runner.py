"""Building the generated C and running it: on the host, or for its target under QEMU (system
emulation for Cortex-M, user mode for aarch64). Needs no TVM: a directory written by
`pfpc.compile` is all it reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

from .codegen.targets import get_target
from .errors import PfpcError
from .progress import step


def read_metadata(out_dir: str) -> dict:
    """The ``pfpc.json`` that `compile` writes beside the C: name, target, input and output shapes."""
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


def build_host(out_dir: str, cc: str = "cc") -> str:
    """Build the generated library and runner for the host; returns the runner path."""
    runner = read_metadata(out_dir)["name"] + "_main"
    _make(out_dir, runner, f"CC={cc}", "AR=ar", "TARGET_FLAGS=")
    return os.path.join(out_dir, runner)


def build_for_target(out_dir: str, meta: dict | None = None, profile: bool = False) -> tuple:
    """Build the runner with the Makefile's own toolchain; returns (target, program path).
    ``meta``: the directory's `read_metadata`, when the caller has it already. For Cortex-M this
    is the one firmware build every instruction count comes from (`run --cycles`, `bench`);
    ``profile`` builds it with a counter read after every kernel (``<name>_profile.elf``)."""
    meta = meta or read_metadata(out_dir)
    target = get_target(meta.get("target", "host"))
    if profile and not target.bare_metal:
        raise PfpcError(f"{out_dir}: --profile needs a Cortex-M target (compiled for {target.name})")
    if profile and meta.get("mode") == "svi":
        raise PfpcError(f"{out_dir}: --profile counts the kernels of a PFP build; this one samples (--mode svi)")
    program = meta["name"] + ("_profile.elf" if profile else "_qemu.elf" if target.bare_metal else "_main")
    for tool in [target.cc, target.emulator]:
        if tool is not None and not shutil.which(tool):
            raise PfpcError(f"{out_dir}: running target {target.name} needs {tool}, which is not installed")
    _make(out_dir, program)
    if target.bare_metal:
        check_fits_board(out_dir, target, os.path.join(out_dir, program))
    return target, os.path.join(out_dir, program)


def _make(out_dir, goal, *overrides):
    result = subprocess.run(["make", "-B", "-s", "-C", out_dir, *overrides, goal], capture_output=True, text=True)
    if result.returncode != 0:
        text = (result.stderr or "") + (result.stdout or "")
        overflow = re.search(r"region `(\w+)' overflowed by (\d+) bytes", text)
        if overflow:  # the linker script's MEMORY is the emulated board's
            raise PfpcError(f"{out_dir}: {goal} needs {int(overflow[2]):,} bytes more {overflow[1].lower()} than the emulated board has; "
                            f"it cannot run under QEMU (--flash-limit / --ram-limit make the compile check it)")
        raise PfpcError(f"{out_dir}: building the generated C failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")


def board_memory(target) -> dict:
    """{region: bytes} of the emulated board, from the linker script's MEMORY block."""
    from .codegen.targets import FIRMWARE_DIR

    with open(os.path.join(FIRMWARE_DIR, target.linker_script)) as handle:
        text = handle.read()
    units = {"": 1, "K": 1024, "M": 1024 ** 2}
    return {region: int(size) * units[unit.upper()]
            for region, size, unit in re.findall(r"(\w+)\s*\([^)]*\)\s*:\s*ORIGIN\s*=\s*\w+\s*,\s*LENGTH\s*=\s*(\d+)\s*([KkMm]?)", text)}


def check_fits_board(out_dir, target, elf) -> None:
    """Refuse, before QEMU runs it, an image larger than the emulated board's flash or RAM (QEMU
    would lock up at reset and print its register dump)."""
    size_tool = f"{target.tool_prefix}size"
    if not shutil.which(size_tool):
        return
    from .codegen.footprint import section_sizes

    sections = section_sizes(size_tool, elf)
    flash = sum(v for k, v in sections.items() if k.startswith((".text", ".rodata", ".data", ".ARM", ".init", ".fini", ".isr")))
    ram = sum(v for k, v in sections.items() if k.startswith((".data", ".bss", ".heap", ".stack")))
    memory = board_memory(target)
    for kind, used in (("FLASH", flash), ("RAM", ram)):
        if kind in memory and used > memory[kind]:
            raise PfpcError(f"{out_dir}: the {target.name} image needs {used:,} bytes of {kind.lower()}, more than the "
                            f"{memory[kind]:,} of the emulated board ({target.qemu_machine}); it cannot run under QEMU")


@dataclass
class RunResult:
    """(mean, var) per output, for an output computed by a final softmax (log-softmax) (its value:
    the predictive probabilities (their logs), None), its logits' (mean, var) in ``logits`` by output
    index; the predictive outputs compiled in (``probs``, ``entropy``, ``ood``); for Cortex-M under
    QEMU, the instructions executed by every call (`targets.Target.instructions`; a real core spends
    more on loads, divisions and branches), its peak stack bytes (painted stack, libm included) and,
    when built with ``profile``, the instructions per kernel."""

    outputs: list
    cycles: list
    extras: dict
    stack_bytes: list
    layers: list | None = None
    logits: dict | None = None


def run(out_dir: str, inputs: list[np.ndarray], emulate: bool = False, profile: bool = False) -> RunResult:
    """Run the generated C on ``inputs`` (each [k*batch, ...]), in k calls of ``<name>_run``.

    ``emulate=False`` builds it for the host; ``emulate=True`` builds it for the target it was
    compiled for and runs it there under QEMU (system emulation for Cortex-M, user mode for aarch64).
    ``profile`` (Cortex-M, implies ``emulate``): also the instructions of every kernel of the first
    call, in ``layers`` (each exact to one SysTick tick; their sum is the call's total less its
    entry and exit, within one tick).
    """
    meta = read_metadata(out_dir)
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
    with step("building the C"):
        if emulate or profile:
            target, program = build_for_target(out_dir, meta, profile)
        else:
            target, program = get_target("host"), build_host(out_dir)
    interleaved = np.concatenate([a.reshape(chunks, -1) for a in arrays], axis=1).reshape(-1)
    with tempfile.TemporaryDirectory() as tmp:
        # semihosting opens files relative to QEMU's working directory: run there, with relative names
        interleaved.tofile(os.path.join(tmp, "in.f32"))
        command = target.emulator_command(os.path.abspath(program), ["in.f32", "out.f32"])
        with step(f"running {'under ' + target.emulator if target.emulator else 'on the host'}"):
            result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise PfpcError(f"{out_dir}: the generated program failed: {(result.stderr or result.stdout).strip()[-500:]}")
        raw = np.fromfile(os.path.join(tmp, "out.f32"), np.float32)
    lines = result.stdout.splitlines()
    cycles = [target.instructions(int(line.split()[2])) for line in lines if line.startswith("pfpc cycles ")]
    stack = [int(line.split()[2]) for line in lines if line.startswith("pfpc stack ")]
    layers = None
    if profile:
        ticks = [int(line.split()[3]) for line in lines if line.startswith("pfpc layer ")]
        layers = [{"kernel": layer["kernel"], "function": layer.get("function", layer["kernel"]),
                   "onnx_nodes": layer.get("onnx_nodes", []), "ticks": tick, "instructions": target.instructions(tick)}
                  for layer, tick in zip(meta["layers"], ticks)]
        # the executor's own work (arena pointers, output copies, entry, exit, the counter reads):
        # the first call's total less its kernels, so that the rows add up to that total exactly
        executor = "(executor: entry, copies, exit, counter reads)"
        layers.append({"kernel": executor, "function": executor, "onnx_nodes": [], "ticks": None,
                       "instructions": cycles[0] - sum(layer["instructions"] for layer in layers)})
    outputs, logits, extras = split_output_buffers(meta, raw, chunks)
    return RunResult(outputs, cycles, extras, stack, layers, logits)


def output_buffers(meta: dict) -> list:
    """(parameter, output index or None, what) of every output buffer of ``<name>_run``, in order
    (``pfpc.json``'s ``output_buffers``; `program.Program.output_buffers` says what each is)."""
    if "output_buffers" in meta:
        return [tuple(entry) for entry in meta["output_buffers"]]
    # written before softmax outputs kept their value: a mean and a variance per output
    return ([(None, index, what) for index in range(len(meta["outputs"])) for what in ("mean", "var")]
            + [(None, None, kind) for kind, _ in meta.get("extra_outputs", [])])


def run_host(out_dir: str, inputs: list[np.ndarray], extras: bool = False):
    """Run the generated C, built for the host, on ``inputs``: (mean, var) per output ((value, None)
    for an output computed by a final softmax: `RunResult`); with ``extras``, also the predictive
    outputs as a dict (``probs``, ``entropy``, ``ood``)."""
    result = run(out_dir, inputs)
    return (result.outputs, result.extras) if extras else result.outputs


def split_output_buffers(meta: dict, raw: np.ndarray, chunks: int = 1):
    """(outputs, logits, extras) from the floats the runner wrote for ``chunks`` batches: per chunk,
    the buffers of <name>_run in order (per output its mean and var, a softmax output its value and
    its logits' mean and var, then every extra output). outputs: per output (mean, var), a softmax
    output (value, None); logits: {output index: (mean, var)}; extras: {kind: values}."""
    buffers = output_buffers(meta)
    extra_shapes = iter(shape for _, shape in meta.get("extra_outputs", []))
    layout = [meta["outputs"][index][1] if index is not None else next(extra_shapes) for _, index, _ in buffers]
    raw = raw.reshape(chunks, sum(int(np.prod(shape)) for shape in layout))
    arrays, offset = {}, 0
    for (_, index, what), shape in zip(buffers, layout):
        size = int(np.prod(shape))
        arrays[(index, what)] = raw[:, offset : offset + size].reshape([chunks * shape[0]] + list(shape[1:]))
        offset += size
    outputs, logits = [], {}
    for index in range(len(meta["outputs"])):
        if (index, "value") in arrays:
            outputs.append((arrays[(index, "value")], None))
            logits[index] = (arrays[(index, "logits_mean")], arrays[(index, "logits_var")])
        else:
            outputs.append((arrays[(index, "mean")], arrays[(index, "var")]))
    extras = {kind: arrays[(None, kind)] for kind, _ in meta.get("extra_outputs", [])}
    return outputs, logits, extras
