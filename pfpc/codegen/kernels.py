"""Kernels from TVM's C backend, turned into plain C functions.

TVM emits every PrimFunc as a packed function that unpacks DLTensor arguments before its loop
nest. pfpc keeps the loop nest that TVM generated and gives it a plain signature with one pointer
per buffer (``const`` for the buffers it only reads; float, or the integer type of a codebook's
codes), so the generated library needs no TVM header, no DLTensor and no argument unpacking at
run time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import tirx

from ..errors import PfpcError
from .. import ir_state
from ..ops.gaussian import Moment
from ..ops.kernel import KERNEL_ATTR, build_placeholder, is_placeholder
from ..ops.moments import KEPT
from .schedule import schedule_kernel

#: A parameter's data pointer. TVM suffixes a repeated name (``relu_mean_handle_1``: a weight named
#: ``relu`` beside the kernel's output ``relu``), so the handle may end in ``_<n>``.
_DATA_LINE = re.compile(r"^\s*(float|uint8_t|uint16_t|uint32_t)\* (\w+) = \(\(\1\*\)\(\(\1\*\)\(\(\(DLTensor\*\)\w+_handle(?:_\d+)?\)\[0\]\.data\)\)\);\s*$")
_FORBIDDEN = ("_handle", "TVMFFI", "DLTensor", "TVMBackend", "args", "__tvm")

#: A float32 from its bits, in C that is defined (a copy, not a type-punned pointer); the C
#: compiler turns it into a register move and vectorises loops through it.
FLOAT_FROM_BITS = "pfpc_float_from_bits"
HELPERS = {
    FLOAT_FROM_BITS: f"static inline float {FLOAT_FROM_BITS}(int32_t bits) {{\n"
    "  float value;\n  memcpy(&value, &bits, sizeof value);\n  return value;\n}\n",
}


def _float_from_bits(call):
    """TVM's C backend prints ``reinterpret`` as ``*(float *)(&v)``: undefined behaviour under C's
    aliasing rules, which gcc -Wall -Werror rejects at -O2. int32 -> float32 (the 2^n of
    `moments.exp_nonpositive`) becomes a call of the `FLOAT_FROM_BITS` helper instead."""
    if str(call.ty) == "float32" and str(call.args[0].ty) == "int32":
        return tirx.call_pure_extern("float32", FLOAT_FROM_BITS, call.args[0])
    return call


tirx.register_intrin_lowering("tirx.reinterpret", target="c", f=_float_from_bits, level=99)


def _kept_value(call):
    """`ops.moments.kept` in an LLVM build (`bench.tvm_vm_timer`): its argument; the C backend's
    prints are taken out of the text instead (`without_kept`)."""
    if isinstance(call.args[0], tvm.ir.StringImm) and call.args[0].value == KEPT:
        return call.args[1]
    return call


tirx.register_intrin_lowering("tirx.call_extern", target="llvm", f=_kept_value, level=99)


@dataclass
class CKernel:
    name: str
    params: list  # (name, written)
    body: str
    ctypes: dict = field(default_factory=dict)  # parameter -> element type, if not float
    aliased: set = field(default_factory=set)  # parameters that may point to the same bytes (an output written in place)

    @property
    def static_bytes(self) -> int:
        """Bytes of the kernel's own static arrays (`static_scratch`): RAM outside the arena."""
        return sum(int(count) * _CTYPE_BYTES[ctype] for ctype, count in _STATIC_ARRAY.findall(self.body))

    @property
    def helpers(self) -> list[str]:
        """The `HELPERS` the body calls."""
        return [helper for helper in HELPERS if re.search(rf"\b{helper}\(", self.body)]

    def signature(self, prefix: str, name: str | None = None) -> str:
        """``restrict``: the memory plan lets a kernel's output share bytes with another of its
        buffers only when it writes that operand in place (``aliased``: those two stay without
        it), and saying so lets the C compiler vectorise loops that store to an output
        without runtime overlap checks (which gcc -O2 does not add)."""
        args = ", ".join(f"{'' if written else 'const '}{self.ctypes.get(p, 'float')}*{'' if p in self.aliased else ' restrict'} {p}"
                         for p, written in self.params)
        return f"void {prefix}{self.name if name is None else name}({args})"


def generate_c_kernels(prim_funcs: dict, accumulate: str = "scalar") -> dict[str, CKernel]:
    """Schedule ``{name: PrimFunc}`` for the target (`schedule_kernel`), compile them with TVM's C
    backend and extract each loop nest.

    Scheduling and compiling cost TVM about a second per kernel, and a deep network repeats the
    same kernel with other weights: a kernel that differs from an earlier one only in its
    parameters' names is not compiled again; it is the earlier one's C with the names replaced
    (`_same_kernels`), the text TVM prints for it (names are all the C printer takes from them)."""
    kernels = {}
    pending = dict(prim_funcs)
    while pending:
        compiled, copies = _same_kernels(pending)
        pending.update({name: build_placeholder(pending[name]) for name in compiled})
        mod = tvm.IRModule({name: scheduled(pending[name], accumulate).with_attr("global_symbol", name) for name in compiled})
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
            executable = tvm.compile(mod, target="c")
        source = executable.mod.inspect_source()
        for name in compiled:
            try:
                kernels[name] = _extract(source, name, accumulate)
            except PfpcError:
                if accumulate != "channel_rows":
                    raise
                # a channel block's rows outgrew what TVM keeps on the stack (it allocated them from its runtime): one row at a time
                kernels[name] = generate_c_kernels({name: pending[name]}, "row")[name]
        retry, tokens = {}, {}
        for name, (first, names) in copies.items():
            if first not in tokens:
                tokens[first] = _tokens(kernels[first].body)
            renamed = _renamed(kernels[first], name, names, tokens[first])
            if renamed is None:  # a new name is already a local of the first: compile it itself
                retry[name] = pending[name]
            else:
                kernels[name] = renamed
        pending = retry
    return {name: kernels[name] for name in prim_funcs}


_IDENTIFIER = re.compile(r"\b([A-Za-z_]\w*)\b")


def _tokens(body: str) -> tuple[list, dict]:
    """``body`` split at its identifiers (the odd items) and {identifier: its items}: a kernel's
    copies are renamed from one split (a regular-expression substitution per copy took 7 s of
    the 1,000-node chain's compile, 370 copies of 5 kernels)."""
    parts = _IDENTIFIER.split(body)
    where: dict = {}
    for index in range(1, len(parts), 2):
        where.setdefault(parts[index], []).append(index)
    return parts, where


def _same_kernels(prim_funcs: dict):
    """([names to compile], {name: (earlier kernel, [(its parameter, this one's)] in order)}):
    kernels structurally equal to an earlier one up to names (TIR's structural equality maps
    every variable and buffer it defines, the parameters among them). The C printer takes nothing
    else from a kernel but names, so the copy is the earlier kernel's C with the parameters
    renamed (`_renamed`, which declines where the printer might have named them otherwise).

    A placeholder kernel (`ops.kernel.placeholder_kernel`) with the spec and shapes of an earlier
    placeholder is that one's copy without being built: `build_kernel` makes the TIR from the
    spec and the shapes, the names aside (the operands' parameters, `_copy_names`), so the two
    are equal up to names (the 1,000-node chain's 375 kernels, 5 distinct: 375 builds, 10 s)."""
    firsts, compiled, copies = {}, [], {}
    anonymous, from_placeholder = {}, set()
    for name, func in prim_funcs.items():
        group = firsts.setdefault(_reuse_key(func), [])
        if is_placeholder(func):
            if group and group[0] in from_placeholder:
                copies[name] = (group[0], _copy_names(build_placeholder(prim_funcs[group[0]]), func))
                continue
            if not group:
                from_placeholder.add(name)
            func = build_placeholder(func)
        # the C comes from the TIR alone: the name and the kernel spec (which names the ONNX nodes) do not count
        anonymous[name] = func.without_attr(KERNEL_ATTR).with_attr("global_symbol", "kernel")
        first = next((f for f in group if tvm_ffi.structural_equal(anonymous[f], anonymous[name])), None)
        if first is None:
            group.append(name)
            compiled.append(name)
        else:
            copies[name] = (first, [(str(a.name), str(b.name)) for a, b in zip(build_placeholder(prim_funcs[first]).params, func.params)])
    return compiled, copies


def _copy_names(first, placeholder) -> list:
    """[(parameter of ``first``, of the kernel ``placeholder`` stands for)] in order, ``first``
    built from a placeholder of the same spec and shapes: the operands' parameters are the
    placeholder's; the outputs are named after the stage computing them, as in ``first``, or,
    where an output copies an operand (`ops.kernel._copy`: ``copy_x_mean``), after that operand."""
    operands = len(placeholder.params) - (1 if ir_state.kernel_spec(placeholder).output == Moment.NONE else 2)
    renamed = {str(a.name): str(b.name) for a, b in zip(first.params[:operands], placeholder.params[:operands])}
    names = list(renamed.items())
    for param in first.params[operands:]:
        name = str(param.name)
        copied = name.removeprefix("copy_")
        names.append((name, f"copy_{renamed[copied]}" if name.startswith("copy_") and copied in renamed else name))
    return names


def _reuse_key(func) -> tuple:
    """Where to look for a kernel's equal: a Gaussian kernel's spec without its ONNX provenance
    and its buffers' shapes, which determine its TIR up to names (hashing large kernels
    structurally cost 27 ms each; a placeholder kernel has the built kernel's spec and type);
    other kernels by their structural hash."""
    if func.attrs is not None and KERNEL_ATTR in func.attrs:
        spec = json.loads(str(func.attrs[KERNEL_ATTR]))
        spec.pop("nodes", None)
        return json.dumps(spec, sort_keys=True), str(func.ty)  # the parameters' shapes
    return (tvm_ffi.structural_hash(func.with_attr("global_symbol", "kernel")),)


def _renamed(kernel: CKernel, name: str, names: list, tokens=None) -> CKernel | None:
    """``kernel``'s C as kernel ``name``, its parameters renamed by ``names`` ([(old, new)] in
    order); None where that might not be the text TVM prints: a renamed parameter the printer
    had named otherwise, or a new name already an identifier of the body. ``tokens``: `_tokens`
    of its body, if split already."""
    c_params = [p for p, _ in kernel.params]
    if len(c_params) != len(names):
        return None
    changed = {}
    for c_name, (old, new) in zip(c_params, names):
        if old != new:
            if c_name != old or not re.fullmatch(r"[A-Za-z_]\w*", new):
                return None
            changed[old] = new
    parts, where = tokens or _tokens(kernel.body)
    if any(new in where or new in c_params for new in changed.values()):
        return None
    body = kernel.body
    if changed:
        parts = list(parts)
        for old, new in changed.items():
            for index in where.get(old, ()):
                parts[index] = new
        body = "".join(parts)
    return CKernel(name, [(changed.get(p, p), written) for p, written in kernel.params], body,
                   {changed.get(p, p): ctype for p, ctype in kernel.ctypes.items()})


def scheduled(func, accumulate):
    """Gaussian kernels (`ops.kernel.build_kernel`) arrive as algorithms and are scheduled here;
    others (the predictive outputs) come scheduled."""
    return schedule_kernel(func, accumulate) if func.attrs is not None and KERNEL_ATTR in func.attrs else func


#: An accumulation ``float v = (acc[i] + (...));`` as TVM's C backend prints a reduction's update.
_ACCUMULATION = re.compile(r"^(\s*float \w+ = )\((\w+\[[\w +*]+\]) \+ \((.*)\)\);$")


def _groups(text: str) -> list[str]:
    """``text`` split at the top level into parenthesised groups and the operators between them."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "(":
            if depth == 0:
                if text[start:index].strip():
                    parts.append(text[start:index].strip())
                start = index
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(text[start:index + 1])
                start = index + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def without_kept(text: str) -> str:
    """``text`` with every ``pfpc_kept(x)`` (`ops.moments.kept`: an opaque identity that keeps TVM's
    analyzer from substituting a Let's value) replaced by its argument ``x``. In the text, not as
    an intrinsic lowering for the C target like the LLVM build's (`_kept_value`): TVM lowers
    intrinsics before its last simplifications, whose analyzer then substitutes the Let chains again
    (a Softplus layer 0.2 -> 0.9 s to compile, GELU-tanh 0.2 -> 1.4 s; measured in session 12 with
    benchmarks/compile_time.py --nodes --activations)."""
    marker = f"{KEPT}("
    out, start = [], 0
    while (found := text.find(marker, start)) >= 0:
        out.append(text[start:found])
        depth, index = 1, found + len(marker)
        while depth:
            depth += {"(": 1, ")": -1}.get(text[index], 0)
            index += 1
        out.append(without_kept(text[found + len(marker):index - 1]))
        start = index
    out.append(text[start:])
    return "".join(out)


def fused_accumulation(line: str) -> str:
    """``acc + (a +- b)`` printed as ``(acc + a) +- b``: the hidden layers' variance update
    ``acc + (v q + v m m)`` (`moments.product_moments`) then contracts into two fused multiply-adds,
    where the grouping TVM prints costs a multiply, a fused multiply-add and an add. Any other
    line is returned unchanged. The same sum in another order: the rounding of one addition."""
    match = _ACCUMULATION.match(line)
    if not match:
        return line
    head, acc, inner = match.groups()
    parts = _groups(inner)
    if len(parts) != 3 or parts[1] not in "+-" or not parts[0].startswith("(") or not parts[2].startswith("("):
        return line
    return f"{head}(({acc} + {parts[0]}) {parts[1]} {parts[2]});"


_LOOP_HEAD = re.compile(r"^\s*for \(int32_t (\w+) = ")
_INDEX_LOCAL = re.compile(r"^\s*int32_t (\w+) = (.*);\s*$")


def _loop_variables(expr: str, index_locals: dict) -> set:
    """The loop variables an index expression reads, directly or through ``int32_t`` locals."""
    found = set()
    for name in _IDENTIFIER.findall(expr):
        found |= index_locals.get(name, {name})
    return found


def _chained(line: str, innermost: str | None, index_locals: dict) -> bool:
    """Whether ``line`` adds into an accumulator that stays the same across the innermost loop
    (``innermost``, its variable): one output's sum, a chain of dependent additions that no
    vector lane or other output runs beside (a narrow reduction, `codegen.schedule._narrow_reduction`:
    the covariance pass's sums over a whole map, a dense layer's few outputs). On an out-of-order
    core such a loop runs at the chain's latency: ``acc + (a + b)`` puts one addition per term on
    the chain, `fused_accumulation`'s ``(acc + a) + b`` two (two fused multiply-adds where the
    core has them), which took ResNet-8's add-variance kernels on the host twice TVM's LLVM build
    of the same loops at batch 8. An accumulator indexed by the innermost loop (a row's, which
    the compiler vectorises) is bound by throughput, where the fused form saves an instruction.
    ``index_locals``: {int32_t local: the loop variables its value reads}."""
    match = _ACCUMULATION.match(line)
    if match is None or innermost is None:
        return False
    index = match.group(2)[match.group(2).index("[") + 1:-1]
    return innermost not in _loop_variables(index, index_locals)


#: A local that TVM's C printer binds to an operand of max/min (``float v_ = acc[0];``).
_PRINTER_LOCAL = re.compile(r"^\s*[A-Za-z_][\w ]*?\s(v_\w*) = (.*);\s*$")


def inline_loaded_locals(body: str) -> str:
    """Re-read every load that TVM's C printer hoisted into a local once memory may have changed.

    The printer binds each operand of max/min to a local (``float v_ = acc[0];``) and, for the
    same text later in the scope, reuses the local even when a store in between changed that
    element (docs/upstream_tvm.md, defect 1):

        float v_ = maxpool[0];                     float v_ = maxpool[0];
        maxpool[0] = ((v_) > (v__1) ? ...);   ->   maxpool[0] = ((v_) > (v__1) ? ...);
        relu[y] = ((v_) > (0.0f) ? ...);           v_ = maxpool[0];
                                                   relu[y] = ((v_) > (0.0f) ? ...);

    A local whose value reads memory (has a subscript, directly or through another such local)
    becomes stale at every store and at every loop head (a store later in the loop body reaches
    the next iteration's uses); a stale local is assigned again from its expression right
    before its next use, after the locals it reads. Each load thus happens after the last store
    before its use, as the TIR has it; locals of pure arithmetic are left alone."""
    values: dict[str, str] = {}  # local -> its expression, for locals that read memory
    stale: set[str] = set()
    out = []

    def used(text):
        return [name for name in dict.fromkeys(re.findall(r"\bv_\w*\b", text)) if name in values]

    def refresh(names, indent):
        for name in names:
            if name in stale:
                stale.discard(name)
                refresh(used(values[name]), indent)
                out.append(f"{indent}{name} = {values[name]};")

    for line in body.split("\n"):
        indent = line[: len(line) - len(line.lstrip())]
        match = _PRINTER_LOCAL.match(line)
        if match is not None:
            local, value = match.group(1), match.group(2)
            refresh(used(value), indent)
            values.pop(local, None)
            stale.discard(local)
            if "[" in value or used(value):
                values[local] = value
            out.append(line)
            continue
        refresh(used(line), indent)
        out.append(line)
        stripped = line.strip()
        if re.search(r"\]\s*=[^=]", stripped) or stripped.startswith(("for (", "while (", "do {")):
            stale.update(values)
    return "\n".join(out)


_LOCAL_ARRAY = re.compile(r"^(\s*)((?:float|u?int(?:8|16|32|64)_t) (\w+)\[\d+\];)$", re.M)


def mark_local_arrays_used(body: str) -> str:
    """``(void)name;`` after each stack array TVM declares: when its simplifier folds away every
    read of a scratch array (a max-pool step whose window element is padding for every output
    of a row), the writes stay and gcc -Werror stops at "set but not used"."""
    return _LOCAL_ARRAY.sub(lambda m: f"{m.group(1)}{m.group(2)}\n{m.group(1)}(void){m.group(3)};", body)


_WORKSPACE = re.compile(r"^(\s*)(float|u?int(?:8|16|32|64)_t)\* (\w+) = \(\(\2\*\)\(\(\2\*\)TVMBackendAllocWorkspace\(1, dev_id, \(uint64_t\)(\d+)ULL, 2, 32\)\)\);\n"
                        r"\1if \(\3 == NULL\) \{\n\s*return -1;\n\s*\}\n", re.M)
_WORKSPACE_FREE = re.compile(r"^\s*if \(TVMBackendFreeWorkspace\(1, dev_id, (\w+)\) != 0\) \{\n\s*return -1;\n\s*\}\n", re.M)


_CTYPE_BYTES = {"float": 4, "int32_t": 4, "uint32_t": 4, "int8_t": 1, "uint8_t": 1, "int16_t": 2, "uint16_t": 2, "int64_t": 8, "uint64_t": 8}
_STATIC_ARRAY = re.compile(r"^\s*static (float|u?int(?:8|16|32|64)_t) \w+_scratch\[(\d+)\];$", re.M)


def static_scratch(body: str) -> str:
    """An intermediate over TVM's 1 KiB stack limit (a softmax's rows of more than 256 classes, a
    normalisation's statistics) as a static array of the kernel instead of TVM's runtime workspace
    (`TVMBackendAllocWorkspace`): no malloc, no runtime; its bytes are static RAM like the
    weights' (the kernel is not reentrant then, as the static arena is not)."""
    def scratch(match):
        indent, ctype, name, size = match.group(1), match.group(2), match.group(3), int(match.group(4))
        width = _CTYPE_BYTES[ctype]
        return f"{indent}static {ctype} {name}_scratch[{-(-size // width)}];\n{indent}{ctype}* {name} = {name}_scratch;\n"

    return _WORKSPACE_FREE.sub("", _WORKSPACE.sub(scratch, body))


def _extract(source: str, name: str, accumulate: str = "scalar") -> CKernel:
    """Kernel ``name``'s loop nest from TVM's C ``source``, with a plain signature. An accumulation
    is regrouped for fused multiply-adds (`fused_accumulation`) except, on application cores
    ("channel_rows"), one into an accumulator the innermost loop does not move (`_chained`)."""
    head = f"int32_t __tvm_ffi_{name}(void* self_handle, void* args, int32_t num_args, void* result) {{"
    start = source.find(head)
    if start < 0:
        raise PfpcError(f"internal: TVM emitted no C function for kernel {name}")
    lines = source[start + len(head):].split("\n")
    params, ctypes, body, depth, in_body = [], {}, [], 1, False
    loops, index_locals = [], {}  # [(depth of the loop's body, its variable)], {int32_t local: loop variables it reads}
    for line in lines:
        match = _DATA_LINE.match(line)
        if match and not in_body:
            params.append(match.group(2))
            if match.group(1) != "float":
                ctypes[match.group(2)] = match.group(1)
            continue
        if not params:
            continue
        if not in_body and (line.strip().startswith("int64_t*") or line.strip().startswith("if (!(") or line.strip() in ("}", "")):
            continue
        in_body = True
        if (head_match := _LOOP_HEAD.match(line)) is not None:
            loops.append((depth + 1, head_match.group(1)))
        elif (local := _INDEX_LOCAL.match(line)) is not None:
            index_locals[local.group(1)] = _loop_variables(local.group(2), index_locals)
        depth += line.count("{") - line.count("}")
        while loops and loops[-1][0] > depth:
            loops.pop()
        if depth == 0:
            break
        chained = accumulate == "channel_rows" and _chained(line, loops[-1][1] if loops else None, index_locals)
        body.append(line if chained else fused_accumulation(line))
    while body and body[-1].strip() in ("return 0;", ""):
        body.pop()
    text = mark_local_arrays_used(inline_loaded_locals(static_scratch(without_kept("\n".join(body)) + "\n").rstrip("\n")))
    if any(token in text for token in _FORBIDDEN):
        raise PfpcError(f"internal: kernel {name} uses the TVM runtime; cannot emit standalone C")
    written = [(p, re.search(rf"\b{re.escape(p)}\[[^\]]*\]\s*=[^=]", text) is not None) for p in params]
    return CKernel(name, written, text, ctypes)


#: A variance stored in 16 bits (bfloat16: float32's sign, exponent and top 7 mantissa bits),
#: rounded to nearest even on the way in; the arithmetic stays float32 (`store_as_bfloat16`).
BF16_LOAD = "pfpc_bf16_load"
BF16_STORE = "pfpc_bf16_store"
HELPERS[BF16_LOAD] = (f"static inline float {BF16_LOAD}(uint16_t bits) {{\n"
                      "  uint32_t word = (uint32_t)bits << 16;\n  float value;\n  memcpy(&value, &word, sizeof value);\n  return value;\n}\n")
HELPERS[BF16_STORE] = (f"static inline uint16_t {BF16_STORE}(float value) {{\n"
                       "  uint32_t word;\n  memcpy(&word, &value, sizeof word);\n"
                       "  return (uint16_t)((word + 0x7FFFu + ((word >> 16) & 1u)) >> 16);\n}\n")


def _closing_bracket(text: str, start: int) -> int:
    """Index of the ``]`` matching the ``[`` at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError("unbalanced subscript")


def _wrap_reads(line: str, param: str) -> str:
    """Every ``param[...]`` of ``line`` read through `BF16_LOAD`."""
    out, position = [], 0
    pattern = re.compile(rf"(?<![\w.]){re.escape(param)}\[")
    while True:
        match = pattern.search(line, position)
        if match is None:
            return "".join(out) + line[position:]
        end = _closing_bracket(line, match.end() - 1)
        out.append(line[position:match.start()] + f"{BF16_LOAD}({line[match.start():end + 1]})")
        position = end + 1


def store_as_bfloat16(kernel: CKernel, params) -> CKernel | None:
    """``kernel`` with the float buffers ``params`` stored as bfloat16 (``uint16_t``): every load
    of an element converts it to float, every store rounds to nearest even. None if one of them
    is used otherwise than by element loads and whole-statement stores (the caller keeps it float)."""
    lines = []
    for line in kernel.body.split("\n"):
        for param in params:
            stripped = line.lstrip()
            if stripped.startswith(param + "["):
                indent = line[: len(line) - len(stripped)]
                end = _closing_bracket(stripped, len(param))
                rest = stripped[end + 1:]
                if not (rest.startswith(" = ") and rest.endswith(";")):
                    return None
                target, value = stripped[: end + 1], rest[3:-1]
                line = f"{indent}{target} = {BF16_STORE}({_wrap_reads(value, param)});"
            else:
                line = _wrap_reads(line, param)
        lines.append(line)
    body = "\n".join(lines)
    for param in params:
        bare = re.sub(rf"{BF16_LOAD}\({re.escape(param)}\[|^\s*{re.escape(param)}\[", "", body, flags=re.M)
        if re.search(rf"(?<![\w.]){re.escape(param)}\b", bare):
            return None
    return CKernel(kernel.name, kernel.params, body, {**kernel.ctypes, **{p: "uint16_t" for p in params}}, set(kernel.aliased))
