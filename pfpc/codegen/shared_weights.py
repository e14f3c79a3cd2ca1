"""Store the weights of a shared posterior as codebooks: an index per weight into small tables.

The passes run on the expanded posterior (`frontends.shared_posterior.expand`), so every weight
array a kernel reads is final: transposed, reshaped, scaled and turned into variances or second
moments as that kernel needs. A weight's (mean, moment) pair is a function of its codebook entry,
so the distinct pairs of a final array ARE its codebook, in the final layout, whatever the layout
passes did: this module finds them (exactly, by bit pattern) and stores, per weight operand of a
kernel (its mean array and its moment array together):

- ``<w>_index``: one code per weight, 4-bit (two per byte, the even position in the low nibble),
  uint8 or uint16, whichever makes the operand smallest;
- ``<w>_mean_table``, ``<w>_<moment>_table``: the entries' values;
- the sparse correction: the positions whose pair is not in the table (exceptions the posterior
  kept individually, or rare entries) hold the escape code (the largest code) and are looked up
  in ``<w>_exception_position`` (ascending) / ``<w>_exception_<array>`` by binary search.

The kernel reads ``w[i]`` through ``pfpc_codebook_<kind>_read(w, i)`` (its C text is rewritten;
its loop nest is TVM's). The values read are bit-identical to the full arrays', so the library
computes exactly what the expanded posterior compiles to. An operand whose codebook would not be
smaller than two float arrays (e.g. a batch-norm scale folded per channel multiplies the entries)
stays as float arrays, with the reason in ``kept_full``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import PfpcError
from .kernels import CKernel

WIDTHS = (4, 8, 16)


@dataclass
class Codebook:
    """One weight operand (its mean array and, if stochastic, its moment array) as a codebook."""

    name: str  # C name of the index array's prefix (the mean array's old name)
    source: str  # ONNX initializer
    arrays: list  # [(old c_name, role)]: role "mean", "var" or "second_moment"
    size: int
    width: int
    codes: np.ndarray  # [size] uint
    table: np.ndarray  # [arrays, entries] float32
    exception_position: np.ndarray  # [E]
    exception_value: np.ndarray  # [arrays, E] float32

    @property
    def position_bits(self) -> int:
        return 16 if self.size <= 1 << 16 else 32

    @property
    def kind(self) -> str:
        return f"u{self.width}_p{self.position_bits}"

    def index_bytes(self) -> int:
        return (self.size + 1) // 2 if self.width == 4 else self.size * self.width // 8

    def bytes(self) -> int:
        """Bytes of the index, tables and exceptions (the small pointer structs not counted)."""
        exceptions = self.exception_position.size
        return self.index_bytes() + 4 * self.table.size + exceptions * (self.position_bits // 8 + 4 * len(self.arrays))

    def full_bytes(self) -> int:
        return 4 * self.size * len(self.arrays)


@dataclass
class SharedWeights:
    codebooks: list = field(default_factory=list)
    kept_full: list = field(default_factory=list)  # (initializer, reason)

    def metadata(self) -> dict:
        return {
            "full_bytes": sum(c.full_bytes() for c in self.codebooks),
            "shared_bytes": sum(c.bytes() for c in self.codebooks),
            "operands": [{"initializer": c.source, "arrays": [role for _, role in c.arrays], "weights": c.size,
                          "entries": int(c.table.shape[1]), "index_bits": c.width, "exceptions": int(c.exception_position.size),
                          "full_bytes": c.full_bytes(), "shared_bytes": c.bytes()} for c in self.codebooks],
            "kept_full": [{"initializer": name, "reason": reason} for name, reason in self.kept_full],
        }

    def c_text(self) -> str:
        if not self.codebooks:
            return ""
        kinds = sorted({c.kind for c in self.codebooks})
        parts = [_C_PRELUDE] + [_reader(kind) for kind in kinds]
        for book in self.codebooks:
            parts.append(_arrays(book))
        return "\n".join(parts)


def choose_codebook(values: list, name: str, source: str, arrays: list) -> Codebook | None:
    """The smallest codebook for the arrays ``values`` (same size), or None if floats are smaller."""
    size = values[0].size
    pairs = np.stack([np.ascontiguousarray(v, np.float32).reshape(-1).view(np.uint32) for v in values], axis=1)
    entries, inverse, counts = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(-counts, kind="stable")  # most used entries first
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    best, full = None, 4 * size * len(values)
    for width in WIDTHS:
        capacity = 1 << width
        if entries.shape[0] <= capacity:
            kept, escape = entries.shape[0], None
        else:
            kept, escape = capacity - 1, capacity - 1
        codes = rank[inverse]
        exceptional = codes >= kept
        book = Codebook(
            name, source, arrays, size, width,
            np.where(exceptional, escape if escape is not None else 0, codes).astype(np.uint16 if width == 16 else np.uint8),
            entries[order[:kept]].T.copy().view(np.float32),
            np.flatnonzero(exceptional),
            pairs[exceptional].T.copy().view(np.float32),
        )
        if best is None or book.bytes() < best.bytes():
            best = book
    return best if best.bytes() < full else None


def encode(program, covered: set) -> SharedWeights:
    """Replace the float arrays of the weights of ``covered`` initializers in ``program`` (an
    `emit_c.Program`) by codebooks; kernels that read them get a rewritten copy."""
    result = SharedWeights()
    books = []  # (tensors, Codebook)
    for tensors, source, rep in _weight_operands(program, covered, result):
        roles = ["mean", rep][: len(tensors)]
        book = choose_codebook([program.weights[t.c_name][0] for t in tensors], tensors[0].c_name, source,
                               [(t.c_name, role) for t, role in zip(tensors, roles)])
        if book is None:
            result.kept_full.append((source, "a codebook would not be smaller than the float arrays (per-channel scaling?)"))
        else:
            books.append((tensors, book))
    if not books:
        return result
    readers = {id(tensor): book.kind for tensors, book in books for tensor in tensors}
    _rewrite_kernels(program, readers)
    for tensors, book in books:
        for tensor in tensors:
            program.weights.pop(tensor.c_name)
            tensor.c_name = f"&{tensor.c_name}"  # the struct that replaces the array, same name
        result.codebooks.append(book)
    _name_arrays(program, result.codebooks)
    return result


def _weight_operands(program, covered, result) -> list:
    """[([mean Tensor, moment Tensor if stochastic], initializer, moment representation)] of the
    kernels' weight operands that come from ``covered`` initializers."""
    operands, pairing = {}, {}
    for step in program.steps:
        if not step.spec:
            continue
        index = 0
        for rep in json.loads(step.spec)["operands"]:
            tensors = step.args[index : index + (1 if rep == "none" else 2)]
            index += len(tensors)
            if any(t.kind != "weight" for t in tensors) or program.weights[tensors[0].c_name][1] not in covered:
                continue
            key = tuple(id(t) for t in tensors)
            operands[key] = (tensors, program.weights[tensors[0].c_name][1], rep)
            for tensor in tensors:
                pairing.setdefault(id(tensor), set()).add(key)
    for key in list(operands):
        if any(len(pairing[i]) > 1 for i in key):
            result.kept_full.append((operands.pop(key)[1], "its mean array is read with two different moment arrays"))
    return list(operands.values())


def _rewrite_kernels(program, readers) -> None:
    """Give every step whose weights became codebooks a kernel that reads them through the tables."""
    clones = {}
    for step in program.steps:
        kinds = tuple((position, readers[id(t)]) for position, t in enumerate(step.args) if id(t) in readers)
        if not kinds:
            continue
        key = (step.kernel, kinds)
        if key not in clones:
            kernel = program.kernels[step.kernel]
            name = program.namer(f"{step.kernel}_codebook")
            types = {kernel.params[position][0]: f"pfpc_codebook_{kind}" for position, kind in kinds}
            body = kernel.body
            for param, ctype in types.items():
                body = read_through(body, param, f"{ctype}_read")
            clones[key] = CodebookKernel(name, kernel.params, body, types)
            program.kernels[name] = clones[key]
        step.kernel = clones[key].name
    used = {step.kernel for step in program.steps}
    for name in [n for n in program.kernels if n not in used]:
        del program.kernels[name]


def read_through(body: str, param: str, reader: str) -> str:
    """``param[expr]`` -> ``reader(param, expr)`` in C text; any other use of ``param`` is an error."""
    out, position = [], 0
    pattern = re.compile(rf"\b{re.escape(param)}\b")
    for match in pattern.finditer(body):
        if match.start() < position:
            continue
        start = match.end()
        if start >= len(body) or body[start] != "[":
            raise PfpcError(f"internal: weight {param} is used other than by subscript in a kernel; cannot read it through a codebook")
        depth, end = 0, start
        while True:
            depth += {"[": 1, "]": -1}.get(body[end], 0)
            if depth == 0:
                break
            end += 1
        inner = read_through(body[start + 1 : end], param, reader)
        out.append(body[position : match.start()] + f"{reader}({param}, {inner})")
        position = end + 1
    out.append(body[position:])
    return "".join(out)


@dataclass
class CodebookKernel(CKernel):
    """A kernel whose ``types`` parameters are codebooks (``param -> C struct type``)."""

    types: dict = field(default_factory=dict)

    def signature(self, prefix: str) -> str:
        args = ", ".join(
            f"const {self.types[p]}* {p}" if p in self.types else (f"float* {p}" if written else f"const float* {p}")
            for p, written in self.params
        )
        return f"void {prefix}{self.name}({args})"


def _name_arrays(program, codebooks) -> None:
    """Reserve the C names of the arrays (the structs keep the float arrays' names)."""
    for book in codebooks:
        book.c_index = program.namer(f"{book.name}_index")
        book.c_tables = [program.namer(f"{c_name}_table") for c_name, _ in book.arrays]
        book.c_position = program.namer(f"{book.name}_exception_position")
        book.c_exceptions = [program.namer(f"{c_name}_exception") for c_name, _ in book.arrays]


_C_PRELUDE = """#include <stdint.h>

/* Weights of a shared posterior, read through codebooks: code = index[i] (4-bit codes two per
 * byte, the even position in the low nibble); a code below the escape (the largest code) reads
 * table[code]; with exceptions, the escape code reads the exception at position i (positions
 * ascending, binary search). */"""


def _reader(kind: str) -> str:
    width, bits = (int(part[1:]) for part in kind.split("_"))
    index_type = "uint16_t" if width == 16 else "uint8_t"
    position_type = f"uint{bits}_t"
    code = ("(uint32_t)((w->index[i >> 1] >> ((i & 1) << 2)) & 15u)" if width == 4 else "(uint32_t)w->index[i]")
    escape = (1 << width) - 1
    return f"""typedef struct {{
  const {index_type}* index;
  const float* table;
  const {position_type}* exception_position;
  const float* exception_value;
  int32_t exceptions;
}} pfpc_codebook_{kind};

static inline float pfpc_codebook_{kind}_read(const pfpc_codebook_{kind}* w, int32_t i) {{
  uint32_t code = {code};
  if (code == {escape}u && w->exceptions > 0) {{
    int32_t lo = 0, hi = w->exceptions - 1;
    while (lo < hi) {{
      int32_t mid = (lo + hi) >> 1;
      if ((int32_t)w->exception_position[mid] < i) lo = mid + 1; else hi = mid;
    }}
    return w->exception_value[lo];
  }}
  return w->table[code];
}}
"""


def _ints(values) -> str:
    items = [str(int(v)) for v in np.asarray(values).reshape(-1)]
    return "    " + ",\n    ".join(", ".join(items[i : i + 16]) for i in range(0, len(items), 16)) if items else "    0"


def _arrays(book: Codebook) -> str:
    from .emit_c import _format_floats, c_comment

    if book.width == 4:
        codes = book.codes.astype(np.uint8)
        codes = np.concatenate([codes, np.zeros(book.size % 2, np.uint8)])
        packed = codes[0::2] | (codes[1::2] << 4)
        index_type, index_values = "uint8_t", packed
    else:
        index_type, index_values = ("uint16_t" if book.width == 16 else "uint8_t"), book.codes
    exceptions = int(book.exception_position.size)
    position_type = f"uint{book.position_bits}_t"
    lines = [f"/* from initializer '{c_comment(book.source)}': {book.size} weights, {book.table.shape[1]} entries, "
             f"{book.width}-bit codes, {exceptions} exceptions; {book.bytes()} bytes instead of {book.full_bytes()} */",
             f"static const {index_type} {book.c_index}[{max(index_values.size, 1)}] = {{\n{_ints(index_values)}\n}};"]
    if exceptions:
        lines.append(f"static const {position_type} {book.c_position}[{exceptions}] = {{\n{_ints(book.exception_position)}\n}};")
    for row, ((c_name, role), table, exception) in enumerate(zip(book.arrays, book.c_tables, book.c_exceptions)):
        lines.append(f"static const float {table}[{book.table.shape[1]}] = {{\n{_format_floats(book.table[row])}\n}};")
        if exceptions:
            lines.append(f"static const float {exception}[{exceptions}] = {{\n{_format_floats(book.exception_value[row])}\n}};")
        pointers = f"{exception}, {exceptions}" if exceptions else "NULL, 0"
        lines.append(f"/* {role} */\nstatic const pfpc_codebook_{book.kind} {c_name} = {{{book.c_index}, {table}, "
                     f"{book.c_position if exceptions else 'NULL'}, {pointers}}};")
    return "\n".join(lines) + "\n"
