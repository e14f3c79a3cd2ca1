"""Emit the standalone C library: kernels, weights, the executor with its static memory plan.

Files (``<name>`` defaults to ``pfp_model``):

- ``<name>.h``          the API: sizes, shapes, ``<name>_run``;
- ``<name>.c``          the kernels (static, TVM's loop nests) and the executor that calls them
                        in order on one arena;
- ``<name>_weights.h``  the weights as ``static const float`` arrays (included by ``<name>.c``);
- ``<name>_main.c``     a host runner used by ``pfpc run`` (file I/O lives only here);
- ``Makefile``, ``CMakeLists.txt``.

The sampling build (mode svi) reuses these parts; its executor is rendered by `emit_svi`.
"""

from __future__ import annotations

import json
import keyword
import os
import re
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ..errors import PfpcError
from ..ir import call_op_name, main_bindings, output_fields
from ..ops.predictive import DOCS as PREDICTIVE_DOCS
from . import footprint, memory_plan
from .kernels import HELPERS, generate_c_kernels
from .targets import get_target

C_KEYWORDS = set(
    "auto break case char const continue default do double else enum extern float for goto if inline int long "
    "register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while "
    "_Bool _Complex _Imaginary bool true false NULL main".split()
)


#: Header macros are <NAME>_<IDENT upper-cased>_SIZE; these identifiers would repeat fixed ones.
MACRO_STEMS = re.compile(r"(input|output)[0-9]+|arena|sampled_weights")
MAX_IDENT = 63  # C99's significant characters of an internal identifier or a macro name
MAX_MACRO_IDENT = 40  # inputs and outputs: <NAME>_<IDENT>_SIZE stays within MAX_IDENT


class Namer:
    """C identifiers from arbitrary ONNX names: only [A-Za-z0-9_], at most ``limit`` characters,
    never a keyword, unique even upper-cased (header macros upper-case them)."""

    def __init__(self, reserved=()):
        self.taken = {r.lower() for r in reserved}

    def __call__(self, text: str, prefix: str = "", limit: int = MAX_IDENT) -> str:
        ident = "".join(ch if (ch.isascii() and (ch.isalnum() or ch == "_")) else "_" for ch in prefix + text)
        ident = ("_".join(part for part in ident.split("_") if part) or "t")[:limit].rstrip("_")
        if ident[0].isdigit() or ident in C_KEYWORDS or keyword.iskeyword(ident):
            ident = "t_" + ident
        base, index = ident, 2
        while ident.lower() in self.taken or MACRO_STEMS.fullmatch(ident.lower()):
            ident = f"{base}_{index}"
            index += 1
        self.taken.add(ident.lower())
        return ident


def c_comment(text: str) -> str:
    """Text safe inside /* */ on one line: printable ASCII, no comment delimiter, no trigraph."""
    text = "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in str(text))
    previous = None
    while previous != text:
        previous = text
        text = text.replace("*/", "*_/").replace("/*", "/_*").replace("??", "?_?")
    return text


@dataclass
class Tensor:
    c_name: str
    shape: list
    kind: str  # input | weight | arena | output
    produced: int = -1
    last_use: int = -1
    offset: int = 0
    param: str = ""  # a weight's Relax parameter

    @property
    def size(self):
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class Step:
    kernel: str
    args: list  # Tensor
    spec: str
    comment: str = ""


@dataclass
class Program:
    name: str
    inputs: list  # (c_name, onnx_name, shape)
    outputs: list  # (c_name, onnx_name, shape)
    extra_outputs: list = field(default_factory=list)  # (c_name, kind, shape): probs, entropy, ood
    steps: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)  # c_name -> (array, comment)
    copies: list = field(default_factory=list)  # (dst expr, Tensor) at the end of a run
    zero_fills: list = field(default_factory=list)  # output var pointers to clear
    kernels: dict = field(default_factory=dict)
    target: object = None
    arena_size: int = 0
    arena_lower_bound: int = 0
    namer: object = None  # the C identifiers taken so far
    sampling: object = None  # emit_svi.Sampling: the program runs once per weight sample (mode svi)
    output_softmax: list = field(default_factory=list)  # a softmax dropped at an output (see substitute_layers)
    shared: object = None  # shared_weights.SharedWeights: weights stored as codebooks (a shared posterior)


def lower_to_program(mod: tvm.IRModule, weights: dict, io: dict, name: str = "pfp_model", target=None,
                     before_codegen=None) -> Program:
    """Walk ``main`` of the compiled module and produce the step list and the memory plan;
    the kernels are scheduled for ``target`` (a `targets.Target`, default the host).
    ``before_codegen(program, prim_funcs)`` may change the steps and kernels before TVM generates C."""
    program, out_fields, _ = walk_main(mod, weights, io, name, target=target, before_codegen=before_codegen)
    namer = program.namer
    func = mod["main"]
    reprs = [str(r) for r in func.attrs["pfp.outputs"]]
    extras = [str(e) for e in func.attrs["pfp.extra_outputs"]] if "pfp.extra_outputs" in func.attrs else []
    assigned = set()

    def bind_output(tensor, pointer, size):
        """The kernel that makes ``tensor`` writes straight into the caller's buffer if it can."""
        if tensor is None:
            program.zero_fills.append((pointer, size))
        elif tensor.kind == "arena" and id(tensor) not in assigned:
            tensor.kind, tensor.c_name = "output", pointer
            assigned.add(id(tensor))
        else:
            program.copies.append((pointer, tensor))
            tensor.last_use = len(program.steps)

    for (onnx_name, shape), repr_ in zip(io["outputs"], reprs):
        base = namer(onnx_name, limit=MAX_MACRO_IDENT)
        program.outputs.append((base, onnx_name, shape))
        mean = out_fields.pop(0)
        moment = out_fields.pop(0) if repr_ != "none" else None
        if repr_ == "second_moment":
            raise PfpcError("internal: an output is left as a second moment")
        bind_output(mean, f"{base}_mean", int(np.prod(shape)))
        bind_output(moment, f"{base}_var", int(np.prod(shape)))
    if len(out_fields) != len(extras):
        raise PfpcError(f"internal: {len(out_fields)} extra results for the outputs {extras}")
    for kind, tensor in zip(extras, out_fields):
        pointer = namer(f"{program.outputs[0][0]}_{kind}", limit=MAX_MACRO_IDENT)
        program.extra_outputs.append((pointer, kind, tensor.shape))
        bind_output(tensor, pointer, tensor.size)
    plan_arena(program)
    return program


def walk_main(mod: tvm.IRModule, weights: dict, io: dict, name: str, reserved=(), target=None,
              before_codegen=None) -> tuple[Program, list, dict]:
    """The steps (one kernel call each) and tensors of ``main``, in order, without a memory plan.

    Returns the program, the tensors of main's result tuple (the outputs are not placed yet) and
    the weight tensors by parameter name. ``reserved``: more C names the executor uses."""
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    namer = Namer({name, f"{name}_run", "arena", "base", *reserved})
    program = Program(name, [], [], namer=namer)
    if "pfp.output_softmax" in func.attrs:
        program.output_softmax = json.loads(str(func.attrs["pfp.output_softmax"]))
    env: dict = {}
    for param, (onnx_name, shape) in zip(func.params[:num_input], io["inputs"]):
        tensor = Tensor(namer(onnx_name, limit=MAX_MACRO_IDENT), shape, "input")
        program.inputs.append((tensor.c_name, onnx_name, shape))
        env[param] = tensor
    onnx_names = {str(k): str(v) for k, v in func.attrs["pfp.onnx_names"].items()} if "pfp.onnx_names" in func.attrs else {}
    weight_tensors = {}
    for param in func.params[num_input:]:
        tensor = Tensor(namer(param.name, prefix=f"{name}_"), [int(d) for d in param.ty.shape], "weight", param=param.name)
        env[param] = tensor
        weight_tensors[param.name] = tensor
        program.weights[tensor.c_name] = (np.asarray(weights[param.name], np.float32), onnx_names.get(param.name, onnx_names.get(param.name.rsplit(".", 1)[0], param.name)))
    prim_funcs = {}
    for binding in main_bindings(func):
        value, op = binding.value, call_op_name(binding.value)
        if op == "relax.call_tir":
            gvar = value.args[0]
            prim = mod[gvar]
            prim_funcs[gvar.name_hint] = prim
            step_index = len(program.steps)
            args = []
            for arg in value.args[1].fields:
                tensor = env[arg]
                tensor.last_use = step_index
                args.append(tensor)
            outs = []
            out_types = binding.var.ty.fields if isinstance(binding.var.ty, relax.TupleType) else [binding.var.ty]
            spec = str(prim.attrs["pfp.kernel"]) if prim.attrs is not None and "pfp.kernel" in prim.attrs else ""
            out_repr = json.loads(spec)["output"] if spec else "var"
            for index, out_ty in enumerate(out_types):
                tensor = Tensor(namer(f"{gvar.name_hint}_{'mean' if index == 0 else out_repr}"), [int(d) for d in out_ty.shape], "arena", step_index, step_index)
                program.tensors.append(tensor)
                outs.append(tensor)
                args.append(tensor)
            env[binding.var] = outs if isinstance(binding.var.ty, relax.TupleType) else outs[0]
            program.steps.append(Step(gvar.name_hint, args, spec))
        elif isinstance(value, relax.TupleGetItem):
            env[binding.var] = env[value.tuple_value][value.index]
        elif isinstance(value, relax.Tuple):
            env[binding.var] = [env[field] for field in value.fields]
        elif op == "relax.reshape" or isinstance(value, relax.Var):
            source = env[value.args[0]] if op else env[value]
            env[binding.var] = source  # a view: same buffer
        else:
            raise PfpcError(f"internal: code generation cannot lower binding {binding.var.name} ({op or type(value).__name__})")
    program.target = target or get_target("host")
    if before_codegen is not None:
        before_codegen(program, prim_funcs)
    program.kernels = generate_c_kernels(prim_funcs, program.target.accumulate)
    out_fields = [env[f] for f in output_fields(func)]
    return program, out_fields, weight_tensors


def plan_arena(program: Program) -> None:
    """Place every arena tensor (lifetime: the steps from ``produced`` to ``last_use``)."""
    intervals = [memory_plan.Interval(t.c_name, 4 * t.size, t.produced, t.last_use) for t in program.tensors if t.kind == "arena"]
    program.arena_size = memory_plan.plan(intervals)
    program.arena_lower_bound = memory_plan.lower_bound(intervals)
    offsets = {i.name: i.offset for i in intervals}
    for tensor in program.tensors:
        if tensor.kind == "arena":
            tensor.offset = offsets[tensor.c_name]


def _format_floats(values: np.ndarray) -> str:
    items = [f"{float(v):.9g}f" if np.isfinite(v) else "0.0f" for v in values.reshape(-1).astype(np.float32)]
    items = [i if ("." in i or "e" in i) else i[:-1] + ".0f" for i in items]
    lines = [", ".join(items[i : i + 8]) for i in range(0, len(items), 8)]
    return "    " + ",\n    ".join(lines)


def _pointer(tensor: Tensor) -> str:
    return tensor.c_name


def render(program: Program) -> dict[str, str]:
    """The generated files as ``{file name: text}``."""
    if program.sampling is not None:
        from .emit_svi import render_svi

        return render_svi(program)
    name, upper = program.name, program.name.upper()
    files = {}
    files[f"{name}.h"] = render_header(
        program, "Probabilistic forward pass: one call computes the\n * predictive mean and variance of every output.")
    files[f"{name}_weights.h"] = render_weights(program)
    tail = [f"  memcpy({pointer}, {tensor.c_name}, {4 * tensor.size});" for pointer, tensor in program.copies]
    tail += [f"  memset({pointer}, 0, {4 * count}); /* deterministic output: zero variance */" for pointer, count in program.zero_fills]
    body = render_arena_pointers(program) + render_steps(program, "  ") + ["\n".join(tail)]
    files[f"{name}.c"] = render_source(
        program, "the executor below\n * calls them in order on one arena whose layout was planned at compile time.",
        f"{run_signature(program)} {{\n{chr(10).join(body)}\n  return 0;\n}}\n")
    files.update(render_build_files(program))
    return files


def run_signature(program: Program) -> str:
    args = [f"const float* {c}" for c, _, _ in program.inputs]
    for c, _, _ in program.outputs:
        args += [f"float* {c}_mean", f"float* {c}_var"]
    args += [f"float* {c}" for c, _, _ in program.extra_outputs]
    args.append("void* arena")
    return f"int {program.name}_run({', '.join(args)})"


def render_header(program: Program, summary: str, definitions: str = "", arena_note: str = "") -> str:
    """``<name>.h``; ``definitions`` go after the shapes, ``arena_note`` ends the arena comment."""
    name, upper = program.name, program.name.upper()
    shape_defs = []
    for index, (c_name, onnx_name, shape) in enumerate(program.inputs):
        shape_defs.append(f"/* input {index} '{c_comment(onnx_name)}': shape {list(shape)} */")
        shape_defs.append(f"#define {upper}_{c_name.upper()}_SIZE {int(np.prod(shape))}")
        shape_defs.append(f"#define {upper}_INPUT{index}_SIZE {upper}_{c_name.upper()}_SIZE")
    for index, (c_name, onnx_name, shape) in enumerate(program.outputs):
        shape_defs.append(f"/* output {index} '{c_comment(onnx_name)}': shape {list(shape)}, predictive mean and variance */")
        shape_defs.append(f"#define {upper}_{c_name.upper()}_SIZE {int(np.prod(shape))}")
        shape_defs.append(f"#define {upper}_OUTPUT{index}_SIZE {upper}_{c_name.upper()}_SIZE")
    for c_name, kind, shape in program.extra_outputs:
        shape_defs.append(f"/* {c_name}: shape {list(shape)}, {PREDICTIVE_DOCS[kind]} */")
        shape_defs.append(f"#define {upper}_{c_name.upper()}_SIZE {int(np.prod(shape))}")
    return f"""/* {name}.h: generated by pfpc. {summary} No malloc, no file I/O, no TVM runtime. */
#ifndef {upper}_H
#define {upper}_H

#ifdef __cplusplus
extern "C" {{
#endif

#define {upper}_NUM_INPUTS {len(program.inputs)}
#define {upper}_NUM_OUTPUTS {len(program.outputs)}
#define {upper}_NUM_EXTRA_OUTPUTS {len(program.extra_outputs)}
{chr(10).join(shape_defs)}
{definitions}
/* Bytes of scratch memory one run needs (16-byte aligned). Pass an arena of this size to
 * {name}_run, or NULL to use the library's static arena (define {upper}_NO_STATIC_ARENA to
 * leave it out). Lower bound for this schedule: {program.arena_lower_bound} bytes.{arena_note} */
#define {upper}_ARENA_SIZE {max(program.arena_size, 16)}

/* Returns 0. Inputs are read-only; outputs must not overlap the arena or each other.
 * Per output: its predictive mean and variance{", then the predictive outputs chosen at compile time (above)" if program.extra_outputs else ""}. */
{run_signature(program)};

#ifdef __cplusplus
}}
#endif

#endif /* {upper}_H */
"""


#: C element types of the weight arrays that are not float (a codebook's codes and positions)
C_INTEGER_TYPES = {np.dtype(np.uint8): "uint8_t", np.dtype(np.uint16): "uint16_t", np.dtype(np.uint32): "uint32_t"}


def render_const_array(c_name: str, values: np.ndarray, comment: str) -> str:
    header = f"/* {c_comment(c_name)}: {comment}, shape {list(values.shape)} */\n"
    if values.dtype in C_INTEGER_TYPES:
        items = [str(int(v)) for v in values.reshape(-1)] or ["0"]
        text = "    " + ",\n    ".join(", ".join(items[i : i + 16]) for i in range(0, len(items), 16))
        return header + f"static const {C_INTEGER_TYPES[values.dtype]} {c_name}[{max(values.size, 1)}] = {{\n{text}\n}};\n"
    return header + f"static const float {c_name}[{max(values.size, 1)}] = {{\n{_format_floats(values) if values.size else '    0.0f'}\n}};\n"


def render_weights(program: Program, extra_arrays=()) -> str:
    """``<name>_weights.h``: the weights, then ``extra_arrays`` ((c_name, values, comment), ...)."""
    name, upper = program.name, program.name.upper()
    weight_lines = [f"/* {name}_weights.h: generated by pfpc, included by {name}.c only. */", "#ifndef " + upper + "_WEIGHTS_H", "#define " + upper + "_WEIGHTS_H", ""]
    for c_name, (values, onnx_name) in program.weights.items():
        weight_lines.append(render_const_array(c_name, values, f"from initializer '{c_comment(onnx_name)}'"))
    for c_name, values, comment in extra_arrays:
        weight_lines.append(render_const_array(c_name, values, comment))
    weight_lines.append(f"#endif /* {upper}_WEIGHTS_H */\n")
    return "\n".join(weight_lines)


def render_steps(program: Program, indent: str) -> list:
    """One kernel call per step, in order."""
    body = []
    for index, step in enumerate(program.steps):
        body.append(f"{indent}/* step {index + 1}: {step.kernel} */")
        body.append(f"{indent}k_{step.kernel}({', '.join(_pointer(t) for t in step.args)});")
    return body


def render_arena_pointers(program: Program) -> list:
    """The executor's first lines: the arena base, then a pointer per arena tensor (a line may be empty)."""
    name, upper = program.name, program.name.upper()
    decls = []
    for tensor in program.tensors:
        if tensor.kind == "arena":
            decls.append(f"  float* {tensor.c_name} = (float*)(base + {tensor.offset}); /* {tensor.shape} */")
    unused = [f"  (void){t.c_name};" for t in program.tensors if t.kind == "arena" and not any(t in s.args for s in program.steps)]
    return [
        f"#ifndef {upper}_NO_STATIC_ARENA",
        f"  uint8_t* base = arena ? (uint8_t*)arena : (uint8_t*){name}_static_arena;",
        "#else",
        "  uint8_t* base = (uint8_t*)arena;",
        "#endif",
        "\n".join(decls),
        "\n".join(unused),
        "  (void)base;",
    ]


def render_source(program: Program, summary: str, executor: str) -> str:
    """``<name>.c``: the kernels, the static arena, then ``executor`` (its functions and ``_run``)."""
    name, upper = program.name, program.name.upper()
    helpers = {h for kernel in program.kernels.values() for h in kernel.helpers}
    kernel_text = [HELPERS[h] for h in HELPERS if h in helpers]
    for kernel in program.kernels.values():
        spec = next((s.spec for s in program.steps if s.kernel == kernel.name), "")
        kernel_text.append(f"/* kernel {kernel.name}: {c_comment(spec)} */\nstatic {kernel.signature('k_')} {{\n{kernel.body}\n}}\n")
    return f"""/* {name}.c: generated by pfpc. Kernels generated by TVM's C backend; {summary} */
#include "{name}.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "{name}_weights.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-parameter"
#endif

{chr(10).join(kernel_text)}
#ifndef {upper}_NO_STATIC_ARENA
/* float elements keep the arena aligned for every tensor (offsets are multiples of 16 bytes) */
static float {name}_static_arena[({upper}_ARENA_SIZE + 3) / 4];
#endif

{executor}"""


def render_build_files(program: Program) -> dict:
    """The runner, Makefile, target flags, CMake files and (bare metal) the firmware files."""
    name = program.name
    files = {f"{name}_main.c": _runner(program), "Makefile": _makefile(name, program.target),
             "pfpc_target.mk": _target_mk(name, program.target), "CMakeLists.txt": _cmake(name)}
    if program.target.name != "host":
        files["toolchain.cmake"] = _cmake_toolchain(program.target)
    if program.target.bare_metal:
        files.update(_firmware_files(program.target))
    return files


def _runner(program: Program) -> str:
    name, upper = program.name, program.name.upper()
    reads = "\n".join(
        f"    if (fread(in_{c}, sizeof(float), {upper}_{c.upper()}_SIZE, in) != {upper}_{c.upper()}_SIZE) break;" for c, _, _ in program.inputs
    )
    decl = "\n".join(f"  static float in_{c}[{upper}_{c.upper()}_SIZE];" for c, _, _ in program.inputs)
    decl += "\n" + "\n".join(
        f"  static float {c}_mean[{upper}_{c.upper()}_SIZE], {c}_var[{upper}_{c.upper()}_SIZE];" for c, _, _ in program.outputs
    )
    extras = [c for c, _, _ in program.extra_outputs]
    decl += "".join(f"\n  static float {c}[{upper}_{c.upper()}_SIZE];" for c in extras)
    call_args = [f"in_{c}" for c, _, _ in program.inputs] + [a for c, _, _ in program.outputs for a in (f"{c}_mean", f"{c}_var")] + extras + ["NULL"]
    written = [a for c, _, _ in program.outputs for a in ((f"{c}_mean", c), (f"{c}_var", c))] + [(c, c) for c in extras]
    writes = "\n".join(f"    fwrite({buffer}, sizeof(float), {upper}_{size.upper()}_SIZE, out);" for buffer, size in written)
    return f"""/* {name}_main.c: the runner used by `pfpc run`, not part of the library.
 * Reads batches of raw float32 inputs from argv[1] and writes raw means and variances (then the
 * predictive outputs, if any) to argv[2].
 * Built with -DPFPC_CYCLES (the QEMU program for Cortex-M), it prints the cycles and the peak
 * stack (painted and checked, libm included) of every run. */
#include <stdio.h>

#include "{name}.h"

#ifdef PFPC_CYCLES
#include <stdint.h>
uint64_t pfpc_cycles(void); /* firmware/startup_cortex_m.c */
void pfpc_stack_paint(void);
uint32_t pfpc_stack_used(void);
#endif

int main(int argc, char** argv) {{
{decl}
  FILE* in;
  FILE* out;
  long batches = 0;
  if (argc != 3) {{
    fprintf(stderr, "usage: %s input.f32 output.f32\\n", argv[0]);
    return 2;
  }}
  in = fopen(argv[1], "rb");
  out = fopen(argv[2], "wb");
  if (!in || !out) {{
    fprintf(stderr, "cannot open files\\n");
    return 2;
  }}
  for (;;) {{
{reads}
#ifdef PFPC_CYCLES
    {{
      uint64_t start, cycles;
      unsigned long stack;
      pfpc_stack_paint();
      start = pfpc_cycles();
      {name}_run({", ".join(call_args)});
      cycles = pfpc_cycles() - start;
      stack = (unsigned long)pfpc_stack_used(); /* before printf's own frames */
      printf("pfpc cycles %lu\\n", (unsigned long)cycles);
      printf("pfpc stack %lu\\n", stack);
    }}
#else
    {name}_run({", ".join(call_args)});
#endif
{writes}
    batches++;
  }}
  fclose(in);
  fclose(out);
  return batches > 0 ? 0 : 1;
}}
"""


def _target_mk(name: str, target) -> str:
    ar = f"{target.tool_prefix}ar" if target.tool_prefix else "ar"
    lines = [
        f"# pfpc_target.mk: toolchain and flags for target {target.name} ({target.description}).",
        "# Included by the Makefile beside it; firmware projects may include it too.",
        f"CC = {target.cc}",
        f"AR = {ar}",
        f"TARGET_FLAGS = {' '.join(target.flags)}",
        "CFLAGS = -std=c99 -O2 -Wall -Wextra -Werror -fno-math-errno -fstack-usage $(TARGET_FLAGS)",
        "LDLIBS = -lm",
    ]
    if target.bare_metal:
        lines += ["# QEMU board and linker script of the test program (firmware/)",
                  f"QEMU_MACHINE = {target.qemu_machine}", f"LINKER_SCRIPT = firmware/{target.linker_script}"]
    return "\n".join(lines) + "\n"


def _makefile(name: str, target) -> str:
    runner = "" if target.bare_metal else f" {name}_main"
    qemu = ""
    if target.bare_metal:
        qemu = f"""
# The runner as a bare-metal program for QEMU (`pfpc run --emulate`): pfpc's startup code
# (semihosting file I/O, SysTick cycle counter) and the board's linker script, in firmware/.
{name}_qemu.elf: {name}_main.c firmware/startup_cortex_m.c $(LINKER_SCRIPT) lib{name}.a
\t$(CC) $(CFLAGS) -DPFPC_CYCLES --specs=rdimon.specs -nostartfiles -T $(LINKER_SCRIPT) \\
\t\t{name}_main.c firmware/startup_cortex_m.c lib{name}.a $(LDLIBS) -o $@
"""
    return f"""# Generated by pfpc for target {target.name} ({target.description}).
# `make` builds lib{name}.a{" and the runner " + name + "_main" if runner else ""}; `make CC=... TARGET_FLAGS=...` overrides the toolchain.
include pfpc_target.mk

all: lib{name}.a{runner}

{name}.o: {name}.c {name}.h {name}_weights.h
\t$(CC) $(CFLAGS) -c {name}.c -o $@

lib{name}.a: {name}.o
\t$(AR) rcs $@ $^

{name}_main: {name}_main.c lib{name}.a
\t$(CC) $(CFLAGS) {name}_main.c lib{name}.a $(LDLIBS) -o $@
{qemu}
clean:
\trm -f {name}.o lib{name}.a {name}_main {name}_qemu.elf *.su

.PHONY: all clean
"""


def _cmake(name: str) -> str:
    return f"""# Generated by pfpc. add_subdirectory() this folder and link {name}; for a cross build,
# configure with -DCMAKE_TOOLCHAIN_FILE=<this folder>/toolchain.cmake.
cmake_minimum_required(VERSION 3.13)
project({name} C)
add_library({name} STATIC {name}.c)
target_include_directories({name} PUBLIC ${{CMAKE_CURRENT_SOURCE_DIR}})
set_target_properties({name} PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON)
if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options({name} PRIVATE -fno-math-errno)
endif()
if(NOT MSVC)
  target_link_libraries({name} PUBLIC m)
endif()
"""


def _cmake_toolchain(target) -> str:
    system = "Generic" if target.bare_metal else "Linux"
    lines = [
        f"# CMake toolchain file generated by pfpc for target {target.name} ({target.description}).",
        f"set(CMAKE_SYSTEM_NAME {system})",
        f"set(CMAKE_SYSTEM_PROCESSOR {target.cmake_processor})",
        f"set(CMAKE_C_COMPILER {target.cc})",
        f'set(CMAKE_C_FLAGS_INIT "{" ".join(target.flags)}")',
    ]
    if target.bare_metal:
        lines.append("# no operating system to link a test program against")
        lines.append("set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)")
    lines.append("set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)")
    return "\n".join(lines) + "\n"


def _firmware_files(target) -> dict:
    """pfpc's Cortex-M startup and the board's linker script, for the QEMU test program."""
    from .targets import FIRMWARE_DIR

    files = {}
    for file_name in ("startup_cortex_m.c", target.linker_script):
        with open(os.path.join(FIRMWARE_DIR, file_name)) as handle:
            files[f"firmware/{file_name}"] = handle.read()
    return files


def write(program: Program, out_dir: str) -> None:

    meta = {
        "name": program.name,
        "target": program.target.name,
        "inputs": [[onnx_name, list(shape)] for _, onnx_name, shape in program.inputs],
        "outputs": [[onnx_name, list(shape)] for _, onnx_name, shape in program.outputs],
        "extra_outputs": [[kind, list(shape)] for _, kind, shape in program.extra_outputs],
        "arena_bytes": program.arena_size,
        "arena_lower_bound_bytes": program.arena_lower_bound,
        "weights_bytes": sum(values.nbytes for values, _ in program.weights.values()),
        "layers": footprint.layer_costs(program),
        # outputs whose softmax/log-softmax was dropped: they hold the moments of the logits
        "output_softmax": program.output_softmax,
    }
    if program.shared is not None:
        meta["shared_posterior"] = program.shared.metadata()
    if program.sampling is not None:
        meta.update(program.sampling.metadata())
        meta["weights_bytes"] += sum(8 * w.tensor.size for w in program.sampling.weights)  # mean and std arrays
    with open(os.path.join(out_dir, "pfpc.json"), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)
        handle.write("\n")
    for file_name, text in render(program).items():
        os.makedirs(os.path.dirname(os.path.join(out_dir, file_name)), exist_ok=True)
        with open(os.path.join(out_dir, file_name), "w") as handle:
            handle.write(text)
