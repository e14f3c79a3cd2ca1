"""Emit the standalone C library: kernels, weights, the executor with its static memory plan.

Files (``<name>`` defaults to ``pfp_model``):

- ``<name>.h``          the API: sizes, shapes, ``<name>_run``;
- ``<name>.c``          the kernels (static, TVM's loop nests) and the executor that calls them
                        in order on one arena;
- ``<name>_weights.h``  the weights as ``static const float`` arrays (included by ``<name>.c``);
- ``<name>_main.c``     a host runner used by ``pfpc run`` (file I/O lives only here);
- ``Makefile``, ``CMakeLists.txt`` (`build_files`).

The program rendered here (steps, tensors, memory plan) comes from `program.lower_to_program`.
The sampling build (mode svi) reuses these parts; its executor is rendered by `emit_svi`.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ..ops.predictive import docs as predictive_docs
from . import footprint, naming
from .naming import c_comment, wrap_comment
from .build_files import render_build_files
from .kernels import HELPERS
from .program import Program, Tensor


def _format_floats(values: np.ndarray) -> str:
    floats = values.reshape(-1).astype(np.float32).astype(np.float64)  # exact: each float32 as the double it is
    floats[~np.isfinite(floats)] = 0.0  # written 0.0f (a test per element on NumPy scalars was most of the time)
    items = [f"{v:.9g}f" for v in floats.tolist()]
    items = [i if ("." in i or "e" in i) else i[:-1] + ".0f" for i in items]
    lines = [", ".join(items[i : i + 8]) for i in range(0, len(items), 8)]
    return "    " + ",\n    ".join(lines)


#: Longest line of the generated C (tests/test_c_names.py checks it)
MAX_LINE = 160


def wrap_arguments(line: str, indent: str) -> str:
    """A call or signature longer than `MAX_LINE` with its arguments on lines of their own."""
    if len(line) <= MAX_LINE or "(" not in line:
        return line
    head, _, rest = line.partition("(")
    args = rest[: rest.rindex(")")].split(", ")  # no argument holds ", " (pointers and declarations)
    tail = rest[rest.rindex(")"):]
    return head + "(\n" + ",\n".join(indent + arg for arg in args) + tail


def wrap_line(line: str, width: int = MAX_LINE) -> str:
    """A statement of a kernel body longer than ``width`` broken at spaces (between C tokens:
    the bodies hold no string literal or preprocessor line), each break at the shallowest
    parenthesis depth that fits, continuation lines indented four more spaces."""
    if len(line) <= width or line.lstrip().startswith("#"):
        return line
    indent = line[: len(line) - len(line.lstrip())] + "    "
    out, rest, first = [], line, True
    while len(rest) > width:
        depth, best = 0, None
        for position, char in enumerate(rest[:width + 1]):
            if char in "([":
                depth += 1
            elif char in ")]":
                depth -= 1
            elif char == " " and position > len(indent) and (best is None or depth <= best[0]):
                best = (depth, position)
        if best is None:
            break
        out.append(rest[: best[1]])
        rest = indent + rest[best[1] + 1 :]
        first = False
    return "\n".join(out + [rest]) if not first else line


def _operand_shapes(spec, args) -> list:
    """The shape of each Gaussian operand of a kernel call (its mean tensor's)."""
    shapes, position = [], 0
    for rep in spec.operands:
        shapes.append(list(args[position].shape))
        position += 1 if rep == "none" else 2
    return shapes


def _pointer(tensor: Tensor) -> str:
    return tensor.c_name


def render(program: Program) -> dict[str, str]:
    """The generated files as ``{file name: text}``."""
    if program.sampling is not None:  # the sampling build (`emit_svi`) renders itself
        return program.sampling.render(program)
    name = program.name
    files = {}
    files[f"{name}.h"] = render_header(
        program, "Probabilistic forward pass: one call computes the\n * predictive mean and variance of every output.")
    files[f"{name}_weights.h"] = render_weights(program)
    tail = [f"  memcpy({pointer}, {tensor.c_name}, {4 * tensor.elements});" for pointer, tensor in program.copies]
    tail += [f"  memset({pointer}, 0, {4 * count}); /* deterministic output: zero variance */" for pointer, count in program.zero_fills]
    body = render_arena_pointers(program) + render_steps(program, "  ", profile_hooks=True) + ["\n".join(tail)]
    files[f"{name}.c"] = render_source(
        program, "the executor below\n * calls them in order on one arena whose layout was planned at compile time.",
        f"{PROFILE_HOOK}{wrap_arguments(run_signature(program) + ' {', '    ')}\n{chr(10).join(body)}\n  return 0;\n}}\n")
    files.update(render_build_files(program))
    return files


def static_bytes(program: Program) -> int:
    """RAM the kernels hold outside the arena (`CKernel.static_bytes`), each emitted kernel once."""
    return sum(kernel.static_bytes for kernel in program.kernels.values())


def run_signature(program: Program) -> str:
    args = [f"const float* {c}" for c, _, _ in program.inputs]
    args += [f"float* {c}" for c, _, _ in program.output_buffers()]
    args.append("void* arena")
    return f"int {program.name}_run({', '.join(args)})"


def render_header(program: Program, summary: str, definitions: str = "", arena_note: str = "") -> str:
    """``<name>.h``; ``definitions`` go after the shapes, ``arena_note`` ends the arena comment."""
    name, upper = program.name, program.name.upper()
    shape_defs, old_names = [], []

    def sizes(c_name, shape, alias=None):
        """<NAME>_<TENSOR>_ELEMENTS (floats) and _BYTES, the alias's, and the old _SIZE names."""
        macro = f"{upper}_{c_name.upper()}"
        shape_defs.append(f"#define {macro}_ELEMENTS {int(np.prod(shape))}")
        shape_defs.append(f"#define {macro}_BYTES ({macro}_ELEMENTS * 4)")
        old_names.append(f"#define {macro}_SIZE {int(np.prod(shape))}")
        if alias is not None:
            shape_defs.append(f"#define {upper}_{alias}_ELEMENTS {macro}_ELEMENTS")
            shape_defs.append(f"#define {upper}_{alias}_BYTES {macro}_BYTES")
            old_names.append(f"#define {upper}_{alias}_SIZE {int(np.prod(shape))}")

    for index, (c_name, onnx_name, shape) in enumerate(program.inputs):
        shape_defs.append(f"/* input {index} '{c_comment(onnx_name)}': shape {list(shape)} */")
        sizes(c_name, shape, f"INPUT{index}")
    for index, (c_name, onnx_name, shape) in enumerate(program.outputs):
        entry = program.softmax_of(index)
        if entry is None:
            what = "predictive mean and variance"
        else:
            how = ("the mean of the softmaxes of the sampled networks" if program.sampling is not None
                   else f"{c_comment(entry['function'])} of the Gaussian logits, {predictive_docs('probs', *program.predictive).split(', ', 1)[1]}")
            what = (f"{'the log of ' if entry['function'] == 'log_softmax' else ''}the predictive probabilities over axis "
                    f"{entry['axis']} ({c_name}: {how}); {c_name}_logits_mean and "
                    f"{c_name}_logits_var: the predictive mean and variance of those logits (the {c_comment(entry['function'])}'s input)")
        shape_defs.append(wrap_comment(f"output {index} '{c_comment(onnx_name)}': shape {list(shape)}, {what}"))
        sizes(c_name, shape, f"OUTPUT{index}")
    for c_name, kind, shape in program.extra_outputs:
        shape_defs.append(wrap_comment(f"{c_name}: shape {list(shape)}, {predictive_docs(kind, *program.predictive)}"))
        sizes(c_name, shape)
    old_names.append(f"#define {upper}_ARENA_SIZE {max(program.arena_size, 16)}")
    if program.sampling is not None:
        old_names.append(f"#define {upper}_SAMPLED_WEIGHTS_SIZE {program.sampling.sampled_bytes}")
    return f"""/* {name}.h: generated by pfpc. {summary} No malloc, no file I/O, no TVM runtime. */
#ifndef {upper}_H
#define {upper}_H

#ifdef __cplusplus
extern "C" {{
#endif

#define {upper}_NUM_INPUTS {len(program.inputs)}
#define {upper}_NUM_OUTPUTS {len(program.outputs)}
#define {upper}_NUM_EXTRA_OUTPUTS {len(program.extra_outputs)}
/* Sizes: _ELEMENTS counts floats (array lengths), _BYTES counts bytes. */
{chr(10).join(shape_defs)}
{definitions}
/* Bytes of scratch memory one run needs (16-byte aligned). Pass an arena of this size to
 * {name}_run, or NULL to use the library's static arena (define {upper}_NO_STATIC_ARENA to
 * leave it out). Lower bound for this schedule: {program.arena_lower_bound} bytes.{arena_note} */
#define {upper}_ARENA_BYTES {max(program.arena_size, 16)}
/* Bytes of static arrays the kernels keep of their own (.bss, outside the arena: intermediates
 * over TVM's 1 KiB stack limit); RAM = arena + these + stack. */
#define {upper}_STATIC_BYTES {static_bytes(program)}

/* Deprecated names, kept for firmware written against earlier versions: _SIZE is elements for
 * the tensors, bytes for the arena{" and the sampled weights" if program.sampling is not None else ""}. */
{chr(10).join(old_names)}

/* Returns 0. Inputs are read-only; outputs must not overlap the arena or each other.
 * Per output: its predictive mean and variance{chr(10) + " * (a softmax output: its value, then its logits' mean and variance)" if program.output_softmax else ""}{chr(10) + " * then the predictive outputs chosen at compile time (above)" if program.extra_outputs else ""}. */
{wrap_arguments(run_signature(program) + ";", "    ")}
{decide_helper(program, upper) if program.extra_outputs else ""}
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


def render_steps(program: Program, indent: str, profile_hooks: bool = False) -> list:
    """One kernel call per step, in order. ``profile_hooks``: a counter read before the first
    step and after every step (`PFPC_LAYER_DONE`, empty unless built with -DPFPC_PROFILE)."""
    body = [f"{indent}PFPC_LAYER_DONE(0);"] if profile_hooks else []
    for index, step in enumerate(program.steps):
        body.append(f"{indent}/* step {index + 1}: {step.kernel} */")  # the layer's name in pfpc report and run --profile
        body.append(wrap_arguments(f"{indent}{program.kernel_c_name(step.kernel)}({', '.join(_pointer(t) for t in step.args)});", indent + "    "))
        if profile_hooks:
            body.append(f"{indent}PFPC_LAYER_DONE({index + 1});")
    return body


# The per-layer profile of `pfpc run --emulate --profile`: the QEMU runner defines pfpc_layer_done.
PROFILE_HOOK = """#ifdef PFPC_PROFILE
void pfpc_layer_done(int step); /* reads the instruction counter after `step` (0: before the first) */
#define PFPC_LAYER_DONE(step) pfpc_layer_done(step)
#else
#define PFPC_LAYER_DONE(step)
#endif

"""


def render_arena_pointers(program: Program) -> list:
    """The executor's first lines: the arena base, then a pointer per arena tensor (a line may be empty)."""
    name, upper = program.name, program.name.upper()
    decls = []
    for tensor in program.tensors:
        if tensor.kind == "arena":
            ctype = "uint16_t" if tensor.storage == "bfloat16" else "float"  # bfloat16: `program.store_moments_in_bfloat16`
            decls.append(f"  {ctype}* {tensor.c_name} = ({ctype}*)(base + {tensor.offset}); /* {tensor.shape} */")
    read_or_written = {id(arg) for step in program.steps for arg in step.args}  # a set: steps x tensors was quadratic
    unused = [f"  (void){t.c_name};" for t in program.tensors if t.kind == "arena" and id(t) not in read_or_written]
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
    first_steps = {}  # kernel -> its first step (one pass: a scan per kernel was quadratic)
    for step in program.steps:
        first_steps.setdefault(step.kernel, step)
    for kernel in program.kernels.values():
        step = first_steps.get(kernel.name)
        spec = step.spec if step is not None else None
        shapes = _operand_shapes(spec, step.args) if spec is not None else []
        comment = naming.kernel_comment(spec, kernel.name, shapes)
        renames = naming.output_parameters(spec, [p for p, _ in kernel.params])
        if any(re.search(rf"\b{n}\b", kernel.body) for n in renames.values()):
            renames = {}  # a name TVM uses already
        signature = naming.rename_identifiers(kernel.signature("", program.kernel_c_name(kernel.name)), renames)
        signature = wrap_arguments("PFP_KERNEL " + signature + " {", "    ")
        body = "\n".join(wrap_line(line) for line in naming.rename_identifiers(kernel.body, renames).split("\n"))
        kernel_text.append(f"{comment}\n{signature}\n{body}\n}}\n")
    return f"""/* {name}.c: generated by pfpc. Kernels generated by TVM's C backend; {summary} */
#include "{name}.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "{name}_weights.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-parameter"
#endif
/* gcc 12.2 computed some models wrong once it inlined the kernels into {name}_run (right at -O0,
 * with clang, and with the kernels out of line): each kernel stays a function of its own */
#if defined(__GNUC__)
#define PFP_KERNEL static __attribute__((noinline))
#else
#define PFP_KERNEL static
#endif

{chr(10).join(kernel_text)}
#ifndef {upper}_NO_STATIC_ARENA
/* float elements keep the arena aligned for every tensor (offsets are multiples of 16 bytes) */
static float {name}_static_arena[({upper}_ARENA_BYTES + 3) / 4];
#endif

{executor}"""


def decide_helper(program: Program, upper: str) -> str:
    """Accept/abstain in firmware: a score (higher = less certain) against a threshold."""
    return f"""
/* Accept or abstain: returns 1 (act on the argmax of the probabilities) when score <= threshold,
 * 0 (abstain: defer, ask again, fall back) otherwise. Use the entropy as the score (it rises on
 * ambiguous and on unfamiliar inputs; mutual_information rises on unfamiliar ones only). Take the
 * threshold from the threshold table of `pfpc evaluate` on your own in-distribution data (e.g. the
 * entropy below which 95 % of it falls); `pfpc evaluate --thresholds-into` writes them below as
 * {upper}_ABSTAIN_<SCORE>_COV<percent> defines. */
static inline int {program.name}_decide(float score, float threshold) {{ return score <= threshold; }}
/* pfpc evaluate thresholds */
"""


def write(program: Program, out_dir: str) -> None:

    meta = {
        "name": program.name,
        "target": program.target.name,
        "inputs": [[onnx_name, list(shape)] for _, onnx_name, shape in program.inputs],
        "outputs": [[onnx_name, list(shape)] for _, onnx_name, shape in program.outputs],
        "extra_outputs": [[kind, list(shape)] for _, kind, shape in program.extra_outputs],
        "predictive": list(program.predictive),
        "arena_bytes": program.arena_size,
        "arena_lower_bound_bytes": program.arena_lower_bound,
        "static_bytes": static_bytes(program),
        "weights_bytes": sum(values.nbytes for values, _ in program.weights.values()),
        "layers": footprint.layer_costs(program),
        # outputs computed by a final softmax/log-softmax: their value is the predictive probabilities
        # (their logs), by the method of "predictive"; "logits" names the buffers of their logits' moments
        "output_softmax": [{**entry, "logits": f"{program.outputs[entry['output']][1]}_logits",
                            "method": "svi" if program.sampling is not None else program.predictive[0],
                            "logit_samples": program.predictive[1]} for entry in program.output_softmax],
        # every output buffer of <name>_run in order: [parameter, output index (None: an extra output), what]
        "output_buffers": [[c_name, index, what] for c_name, index, what in program.output_buffers()],
    }
    if program.shared is not None:
        meta["shared_posterior"] = program.shared.metadata()
    if program.covariance is not None:
        meta["covariance"] = program.covariance
    if program.sampling is not None:
        meta.update(program.sampling.metadata())
        meta["weights_bytes"] += sum(8 * w.tensor.elements for w in program.sampling.weights)  # mean and std arrays
    with open(os.path.join(out_dir, "pfpc.json"), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)
        handle.write("\n")
    for file_name, text in render(program).items():
        os.makedirs(os.path.dirname(os.path.join(out_dir, file_name)), exist_ok=True)
        with open(os.path.join(out_dir, file_name), "w") as handle:
            handle.write(text)
