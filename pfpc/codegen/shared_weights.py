"""Store the weights of a shared posterior as codebooks: an index per weight into small tables.

The passes run on the expanded posterior (`frontends.shared_posterior.expand`), so every weight
array a kernel reads is final: transposed, reshaped, scaled and turned into variances or second
moments as that kernel needs. A weight's (mean, moment) pair is a function of its codebook entry,
so the distinct pairs of a final array ARE its codebook, in the final layout, whatever the layout
passes did: this module finds them (exactly, by bit pattern) and stores, per weight operand of a
kernel (its mean array and its moment array together), the arrays `ops.codebook` reads:

- ``<w>_index``: one code per weight, 4-bit (two per byte, the even position in the low nibble),
  uint8 or uint16, whichever makes the operand smallest;
- ``<w>_mean_table``, ``<w>_<moment>_table``: the entries' values;
- the sparse correction: the positions whose pair is not in the table (exceptions the posterior
  kept individually, or rare entries) hold the escape code (the largest code) and are listed in
  ``<w>_exception_position`` (ascending) with their values, found through per-block starts.

Before TVM generates C (`program.walk_main`'s ``before_codegen``), every kernel that reads such an
operand is rebuilt from its `KernelSpec` with the operand as a codebook (`ops.kernel.build_kernel`):
the gather is a TE stage of the kernel, so the C is TVM's. The values gathered are bit-identical
to the full arrays', so the library computes exactly what the expanded posterior compiles to. An
operand whose codebook would not be smaller than two float arrays (e.g. a batch-norm scale folded
per channel multiplies the entries) stays as float arrays, with the reason in ``kept_full``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ops.codebook import CodebookLayout
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec, build_kernel
from .program import Tensor, operand_info, operand_slices

WIDTHS = (4, 8, 16)
#: Most exceptions the escape branch compares in one block (`exception_blocks` picks the block size).
MAX_CHAIN = 8


@dataclass
class Codebook:
    """One weight operand (its mean array and, if stochastic, its moment array) as a codebook."""

    name: str  # C name prefix of its arrays (the mean array's old name)
    source: str  # ONNX initializer
    arrays: list  # [(old c_name, role)]: role "mean", "var" or "second_moment"
    size: int
    width: int
    codes: np.ndarray  # [size] uint
    table: np.ndarray  # [arrays, entries] float32
    exception_position: np.ndarray  # [E], ascending
    exception_value: np.ndarray  # [arrays, E] float32
    exception_block: int = 0  # weights per block of `exception_start`
    exception_start: np.ndarray | None = None  # [blocks + 1]: first exception of every block

    @property
    def position_dtype(self):
        return np.uint16 if self.size <= 1 << 16 else np.uint32

    @property
    def layout(self) -> CodebookLayout:
        exceptions = int(self.exception_position.size)
        return CodebookLayout(self.width, int(self.table.shape[1]), exceptions, self.exception_block,
                              int(np.diff(self.exception_start).max()) if exceptions else 0, np.dtype(self.position_dtype).name)

    def stored(self) -> list:
        """[(suffix, array)] in the order of `ops.codebook.placeholders`."""
        roles = [role for _, role in self.arrays]
        if self.width == 4:
            codes = np.concatenate([self.codes.astype(np.uint8), np.zeros(self.size % 2, np.uint8)])
            index = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
        else:
            index = self.codes.astype(np.uint16 if self.width == 16 else np.uint8)
        arrays = [("index", index)] + [(f"{role}_table", row) for role, row in zip(roles, self.table)]
        if self.exception_position.size:
            arrays += [("exception_start", self.exception_start.astype(self.position_dtype)),
                       ("exception_position", self.exception_position.astype(self.position_dtype))]
            arrays += [(f"exception_{role}", row) for role, row in zip(roles, self.exception_value)]
        return arrays

    def bytes(self) -> int:
        """Bytes of the index, tables and exceptions (with their block starts)."""
        return sum(array.nbytes for _, array in self.stored())

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


def exception_blocks(position: np.ndarray, size: int) -> tuple[int, np.ndarray]:
    """(block, starts): the largest power-of-two block (at least 16 weights) in which no block
    holds more than `MAX_CHAIN` exceptions (16 if none does), and the first exception of every block."""
    best = None
    block = 16
    while True:
        starts = np.searchsorted(position, np.arange(0, -(-size // block) + 1) * block)
        if best is None or np.diff(starts).max() <= MAX_CHAIN:
            best = (block, starts)
        if block >= size or np.diff(starts).max() > MAX_CHAIN:
            return best
        block *= 2


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
        if book.exception_position.size:
            book.exception_block, book.exception_start = exception_blocks(book.exception_position, size)
        if best is None or book.bytes() < best.bytes():
            best = book
    return best if best.bytes() < full else None


def encode(program, covered: set, prim_funcs: dict) -> SharedWeights:
    """Replace the float arrays of the weights of ``covered`` initializers in ``program`` (an
    `program.Program` before code generation) by codebooks, and the kernels (``prim_funcs``) that
    read them by kernels that gather them (`ops.codebook`)."""
    result = SharedWeights()
    stored = {}  # id(old Tensor) -> (Codebook, [new Tensors])
    for tensors, source, rep in _weight_operands(program, covered, result):
        roles = ["mean", rep][: len(tensors)]
        stem = program.namer(tensors[0].stem, prefix=f"{program.name}_") if tensors[0].stem else tensors[0].c_name
        book = choose_codebook([program.weights[t.c_name][0] for t in tensors], stem, source,
                               [(t.c_name, role) for t, role in zip(tensors, roles)])
        if book is None:
            result.kept_full.append((source, "a codebook would not be smaller than the float arrays (per-channel scaling?)"))
            continue
        new = []
        for suffix, array in book.stored():
            # the index stands for the operand: it keeps the operand's shape (the footprint's MACs read it)
            tensor = Tensor(program.namer(f"{book.name}_{suffix}"), tensors[0].shape if suffix == "index" else list(array.shape), "weight")
            program.weights[tensor.c_name] = (array, source)
            new.append(tensor)
        for tensor in tensors:
            program.weights.pop(tensor.c_name)
        stored[id(tensors[0])] = (book, new)
        result.codebooks.append(book)
    if stored:
        _rebuild_kernels(program, prim_funcs, stored)
    return result


def _rebuild_kernels(program, prim_funcs, stored) -> None:
    """Every step that reads a codebook gets a kernel built with that operand as a codebook."""
    built = {}
    for step in program.steps:
        spec = step.spec
        if spec is None or not any(id(t) in stored for t in step.args):
            continue
        names, shapes = operand_info(spec, prim_funcs[step.kernel])
        args, codebooks = [], {}
        for position, part in enumerate(operand_slices(spec)):
            if id(step.args[part][0]) in stored:
                book, new = stored[id(step.args[part][0])]
                codebooks[position] = book.layout
                args += new
            else:
                args += step.args[part]
        step.args = args + step.args[operand_slices(spec)[-1].stop :]
        rebuild(step, prim_funcs, program.namer, spec, names, shapes, built, "codebook", codebooks)
    drop_unused(program, prim_funcs)


def rebuild(step, prim_funcs, namer, spec, names, shapes, built, suffix, codebooks=None) -> None:
    """Point ``step`` at the kernel of ``spec`` (built once per distinct kernel, in ``built``)."""
    key = (step.kernel, spec.to_json(), tuple(sorted((codebooks or {}).items(), key=lambda item: item[0])))
    if key not in built:
        built[key] = namer(f"{step.kernel}_{suffix}")
        prim_funcs[built[key]], _ = build_kernel(spec.with_(names=tuple(names)), shapes, built[key], codebooks)
    step.kernel = built[key]
    step.spec = spec
    step.variant = suffix


def drop_unused(program, prim_funcs) -> None:
    used = {step.kernel for step in program.steps}
    for name in [n for n in prim_funcs if n not in used]:
        del prim_funcs[name]


def _weight_operands(program, covered, result) -> list:
    """[([mean Tensor, moment Tensor if stochastic], initializer, moment representation)] of the
    kernels' weight operands that come from ``covered`` initializers."""
    operands, pairing = {}, {}
    for step in program.steps:
        if step.spec is None:
            continue
        index = 0
        for rep in step.spec.operands:
            tensors = step.args[index : index + (1 if rep == Moment.NONE else 2)]
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
