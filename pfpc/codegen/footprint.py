"""What the generated library costs on its target: flash (weights, code), RAM (arena, stack), and
the arithmetic per layer.

Sizes come from building ``<name>.o`` with the target's own compiler (``-fstack-usage``) and
reading it with the same toolchain's ``size -A``: ``.rodata`` is the weights (and a few float
constants), ``.text`` the code, ``.bss`` the static arena. The stack bound is the executor's frame
plus the deepest kernel frame that was not inlined (the call depth is two; libm calls are not
counted). Per layer, the MACs are those of the deterministic network; the PFP multiply-adds follow
the cost model of `pfpc.ops.moments.FMA_PER_MAC`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

from ..errors import PfpcError
from ..ops import registry
from ..ops.gaussian import Moment
from ..ops.moments import FMA_PER_MAC, FMA_PER_MAC_GENERAL

from ..options import parse_bytes  # noqa: F401 - its old home


def layer_costs(program) -> list[dict]:
    """Per kernel step: its C function (named after its ONNX nodes, `naming.kernel_name`), the ONNX
    nodes it computes, its operators, output shape, deterministic MACs, PFP multiply-adds and
    Gaussian nonlinearity evaluations (ReLU, sigmoid, ... moments, Clark maxima: the registry's
    ``gaussian_ops`` of each stage). ``kernel`` is the IR kernel's name (the ``/* step N: ... */``
    comment above each executor call). MACs are the model's: a step that computes no ONNX node
    (the window sums and loadings of ``--covariance``) has none, its multiply-adds count as PFP
    work only (counted as MACs, they put ResNet-8 at 16.2 M instead of its 12.5 M)."""
    layers = []
    for step in program.steps:
        spec = step.spec
        ops = spec.ops if spec is not None else []
        deterministic = spec is None or spec.output == Moment.NONE  # plain max/relu, no Gaussian moments
        out_mean = step.args[-1] if deterministic else step.args[-2]
        macs = fma = 0
        gaussian = {}
        if ops and ops[0] in registry.LINEAR_OPS:
            reprs = spec.operands[:2]
            weight = step.args[1 if reprs[0] == Moment.NONE else 2]
            fan_in = weight.shape[-2] if ops[0] == "matmul" else int(np.prod(weight.shape)) // weight.shape[0]
            products = out_mean.elements * fan_in
            fma = products * FMA_PER_MAC.get(tuple(reprs), FMA_PER_MAC.get(tuple(reversed(reprs)), FMA_PER_MAC_GENERAL))
            machinery = getattr(program, "covariance", None) is not None and not any(spec.nodes)
            macs = 0 if machinery else products
        for op, attrs in [] if deterministic else spec.stages:
            for label, count in registry.gaussian_ops(op, attrs, out_mean.elements).items():
                gaussian[label] = gaussian.get(label, 0) + count
        layers.append({"kernel": step.kernel, "function": program.kernel_c_name(step.kernel) if program.namer else step.kernel,
                       "onnx_nodes": list(dict.fromkeys(node.name for stage in spec.nodes for node in stage)) if spec is not None else [], "ops": ops, "output_shape": list(out_mean.shape), "macs": int(macs),
                       "pfp_fma": int(fma), "gaussian_ops": gaussian})
    return layers


def layer_name(layer: dict) -> str:
    """How a report names a layer: its C function (pfpc.json files written before functions were
    named after ONNX nodes have only the IR kernel's name)."""
    return layer.get("function") or layer["kernel"]


def measure(out_dir: str, meta: dict, where: str | None = None) -> dict:
    """Build ``<name>.o`` with the target compiler (in a scratch copy) and read its sizes.

    Returns the footprint dict. When the object cannot be built (the target's compiler, its C
    library or its size tool missing, or the build failing), code and stack are None, the
    weights and arena come from the compiler's own plan and ``note`` says what could not be
    measured and why. ``where``: the directory to name in messages (``out_dir`` may be a
    staging directory)."""
    from .targets import get_target

    target = get_target(meta["target"])
    name = meta["name"]
    where = where or out_dir
    footprint = {
        "target": target.name,
        "weights_bytes": meta["weights_bytes"],
        "code_bytes": None,
        "arena_bytes": meta["arena_bytes"],
        "arena_lower_bound_bytes": meta["arena_lower_bound_bytes"],
        "static_bytes": meta.get("static_bytes", 0),
        "stack_bytes": None,
        "io_bytes": 4 * (sum(int(np.prod(s)) for _, s in meta["inputs"]) + _output_floats(meta)),
        "measured_with": None,
        "layers": meta["layers"],
    }
    if "shared_posterior" in meta:
        footprint["shared_posterior"] = meta["shared_posterior"]
    if meta.get("mode") == "svi":
        footprint["svi"] = {"samples": meta["samples"], "draws_per_sample": meta["draws_per_sample"]}
    size_tool = f"{target.tool_prefix}size" if target.tool_prefix else "size"
    missing = [tool for tool in (target.cc, size_tool, "make") if not shutil.which(tool)]
    if missing:
        footprint["note"] = f"code and stack not measured: {' and '.join(missing)} not installed"
    else:
        with tempfile.TemporaryDirectory() as scratch:
            for file_name in ("Makefile", "pfpc_target.mk", f"{name}.c", f"{name}.h", f"{name}_weights.h"):
                shutil.copy(os.path.join(out_dir, file_name), scratch)
            build = subprocess.run(["make", "-s", "-C", scratch, f"{name}.o"], capture_output=True, text=True)
            if build.returncode != 0:
                footprint["note"] = (f"code and stack not measured: {_build_failure(build.stderr or build.stdout, target)}"
                                     f" (the C in {where} is complete; build it with your own toolchain)").replace(scratch, where)
            else:
                sections = section_sizes(size_tool, os.path.join(scratch, f"{name}.o"))
                with open(os.path.join(scratch, f"{name}.su")) as handle:
                    frames = stack_frames(handle.read())
        if "note" not in footprint:
            footprint["weights_bytes"] = sum(v for k, v in sections.items() if k.startswith(".rodata"))
            footprint["code_bytes"] = sum(v for k, v in sections.items() if k.startswith(".text"))
            footprint["data_bytes"] = sum(v for k, v in sections.items() if k.startswith(".data"))
            footprint["bss_bytes"] = sum(v for k, v in sections.items() if k.startswith(".bss"))
            run_frame = frames.pop(f"{name}_run", 0)
            footprint["stack_bytes"] = run_frame + max(frames.values(), default=0)
            footprint["measured_with"] = f"{size_tool} -A, {target.cc} -fstack-usage"
    footprint["flash_bytes"] = footprint["weights_bytes"] + (footprint["code_bytes"] or 0) + footprint.get("data_bytes", 0)
    footprint["ram_bytes"] = (footprint["arena_bytes"] + footprint.get("static_bytes", 0) + (footprint["stack_bytes"] or 0)
                              + footprint.get("data_bytes", 0))
    return footprint


def _build_failure(output: str, target) -> str:
    """Why building the object failed, naming the missing toolchain piece when that is the cause."""
    header = re.search(r"fatal error: ([\w./]+): No such file or directory", output)
    if header:
        library = "newlib (e.g. the libnewlib-arm-none-eabi package)" if target.bare_metal else "its C library headers"
        return f"{target.cc} cannot find <{header.group(1)}>: the C library for {target.name} is missing, install {library}"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return f"{target.cc} failed to build the library: {lines[-1] if lines else 'no message'}"


def section_sizes(size_tool: str, path: str) -> dict:
    """{section: bytes} from ``size -A`` (SysV format)."""
    result = subprocess.run([size_tool, "-A", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise PfpcError(f"{path}: {size_tool} failed: {result.stderr.strip()}")
    sections = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = sections.get(parts[0], 0) + int(parts[1])
    return sections


def stack_frames(su_text: str) -> dict:
    """{function: bytes} from a GCC ``.su`` file (``file:line:col:function<TAB>bytes<TAB>kind``)."""
    frames = {}
    for line in su_text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1].strip().isdigit():
            frames[fields[0].rsplit(":", 1)[-1]] = int(fields[1])
    return frames


def _output_floats(meta: dict) -> int:
    """Floats in the caller's output buffers: per output its buffers in ``output_buffers`` (two, a
    mean and a variance, in metadata written before softmax outputs had three), then the extras."""
    buffers = [index for _, index, _ in meta.get("output_buffers", [])]
    per_output = sum((buffers.count(index) or 2) * int(np.prod(shape)) for index, (_, shape) in enumerate(meta["outputs"]))
    return per_output + sum(int(np.prod(shape)) for _, shape in meta.get("extra_outputs", []))


def ram_parts(footprint: dict) -> str:
    """"arena A + static S + stack T" (static only where the kernels keep arrays of their own)."""
    static = footprint.get("static_bytes", 0)
    return (f"arena {footprint['arena_bytes']:,}" + (f" + static {static:,}" if static else "")
            + f" + stack {footprint['stack_bytes'] or 0:,}")


def check_limits(footprint: dict, ram_limit: int | None, flash_limit: int | None, where: str) -> None:
    for kind, limit in (("flash", flash_limit), ("RAM", ram_limit)):
        used = footprint[f"{kind.lower()}_bytes"]
        if limit is not None and used > limit:
            detail = (f"weights {footprint['weights_bytes']} + code {footprint['code_bytes']}" if kind == "flash"
                      else ram_parts(footprint))
            raise PfpcError(f"{where}: the model needs {used} bytes of {kind} ({detail}), more than the limit of {limit} bytes")
    if (ram_limit is not None or flash_limit is not None) and footprint["code_bytes"] is None:
        footprint["note"] = (footprint.get("note", "") + "; the limits were checked against weights and arena only"
                             " (a lower bound: code and stack unknown)")


def format_report(footprint: dict, name: str) -> str:
    """The footprint as the text table `pfpc report` and the compile command print."""

    def number(value):
        return "?" if value is None else f"{value:,}"

    lines = [f"{name} for {footprint['target']}"]
    lines.append(f"flash {number(footprint['flash_bytes']):>10} bytes = weights {number(footprint['weights_bytes'])} "
                 f"+ code {number(footprint['code_bytes'])}" + (f" + data {footprint['data_bytes']:,}" if footprint.get("data_bytes") else ""))
    lines.append(f"RAM   {number(footprint['ram_bytes']):>10} bytes = arena {number(footprint['arena_bytes'])} "
                 f"(lower bound {number(footprint['arena_lower_bound_bytes'])})"
                 + (f" + static {footprint['static_bytes']:,}" if footprint.get("static_bytes") else "")
                 + f" + stack {number(footprint['stack_bytes'])}"
                 f"; the caller's input and output buffers: {footprint['io_bytes']:,} bytes")
    lines.append(f"      measured with {footprint['measured_with']}" if footprint["measured_with"] else f"      {footprint.get('note', '')}")
    shared = footprint.get("shared_posterior")
    if shared:
        full, stored = shared["full_bytes"], shared["shared_bytes"]
        lines.append(f"      shared posterior: {len(shared['operands'])} weight operands as codebooks, {stored:,} bytes instead of "
                     f"{full:,} as float arrays ({full - stored:,} bytes of flash saved)"
                     + "".join(f"; {k['initializer']} kept as floats: {k['reason']}" for k in shared["kept_full"]))
    width = max([len(layer_name(layer)) for layer in footprint["layers"]] + [5])
    svi = footprint.get("svi")  # the deterministic network, run once per sample: no Gaussian arithmetic
    macs = sum(layer["macs"] for layer in footprint["layers"])
    fma = sum(layer["pfp_fma"] for layer in footprint["layers"])
    shapes = ["x".join(str(d) for d in layer["output_shape"]) for layer in footprint["layers"]]
    shape_width = max([len(shape) + 2 for shape in shapes] + [14])
    # counts of any size stay in their columns (a 9+ digit count once ran into its neighbour)
    count_width = max(len(f"{macs:,}"), len(f"{fma:,}"), len("PFP FMA")) + 2
    lines.append(f"{'layer':<{width}}  {'output':<{shape_width}}{'MACs':>{count_width}}"
                 + ("" if svi else f"{'PFP FMA':>{count_width}}  Gaussian ops"))
    for layer, shape in zip(footprint["layers"], shapes):
        row = f"{layer_name(layer):<{width}}  {shape:<{shape_width}}{layer['macs']:>{count_width},}"
        if not svi:
            gaussian = ", ".join(f"{count} {op}" for op, count in layer["gaussian_ops"].items()) or "-"
            row += f"{layer['pfp_fma']:>{count_width},}  {gaussian}"
        lines.append(row)
    if svi:
        lines.append(f"{'total':<{width}}  {'':<{shape_width}}{macs:>{count_width},}  per sample; SVI: {svi['samples']:,} samples per call = "
                     f"{svi['samples'] * macs:,} MACs and {svi['samples'] * svi['draws_per_sample']:,} Gaussian weight draws")
    else:
        lines.append(f"{'total':<{width}}  {'':<{shape_width}}{macs:>{count_width},}{fma:>{count_width},}"
                     f"  ({fma / max(macs, 1):.2f} PFP multiply-adds per MAC)")
    return "\n".join(lines)
