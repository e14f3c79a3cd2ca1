"""Weight operands read through codebooks, as TE stages inside the kernel.

A kernel operand stored as a codebook (`codegen.shared_weights`) arrives as small integer and
float arrays instead of its mean and moment tensors; `operand` turns them back into two TE
tensors that gather every weight from them, so the kernel's loop nest reads the codebook itself
and TVM generates the C (no text is rewritten):

- ``index``: one code per weight of the operand (row-major in its final layout): 4-bit (two per
  byte, the even position in the low nibble), uint8 or uint16;
- ``<role>_table``: float per code, one table per array (mean; variance or second moment);
- with exceptions, the largest code is the escape: the weight is one of the ``exceptions``
  positions kept individually. They are sorted; ``exception_start[b]`` is the first exception at
  or after position ``b * block`` (blocks of ``block`` weights), so the escape branch compares
  the position with at most ``chain`` entries of its block (a chain of selects, no loop) and
  reads ``exception_<role>`` there. Only escaped weights take that branch (an if/else in C).

The gathers are `CODEBOOK` stages: `schedule.schedule_kernel` inlines them into the reduction, or,
where a weight is read again for every output position (a convolution), decodes the weights
of one output channel once into a small scratch array before the spatial loops.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

#: te.compute attribute of a codebook gather (see `schedule.schedule_kernel`).
CODEBOOK_ATTR = "pfp.codebook"


@dataclass(frozen=True)
class CodebookLayout:
    """How one weight operand is stored: code ``width`` (4, 8, 16 bits), table ``entries``,
    ``exceptions`` and their blocks (``block`` weights, at most ``chain`` exceptions in one),
    ``position_dtype`` of exception positions and block starts."""

    width: int
    entries: int
    exceptions: int = 0
    block: int = 0
    chain: int = 0
    position_dtype: str = "uint16"

    @property
    def index_dtype(self) -> str:
        return "uint16" if self.width == 16 else "uint8"

    @property
    def escape(self) -> int:
        return (1 << self.width) - 1

    def blocks(self, size: int) -> int:
        return -(-size // self.block) if self.exceptions else 0

    def index_size(self, size: int) -> int:
        return (size + 1) // 2 if self.width == 4 else size

    def to_json(self) -> dict:
        return {"width": self.width, "entries": self.entries, "exceptions": self.exceptions, "block": self.block,
                "chain": self.chain, "position_dtype": self.position_dtype}


def placeholders(base: str, shape, layout: CodebookLayout, roles) -> list:
    """The kernel parameters of a codebook operand, in the order the arrays are passed:
    index, a table per role, then (with exceptions) block starts, positions, a value array per role."""
    size = 1
    for dim in shape:
        size *= int(dim)
    params = [te.placeholder([layout.index_size(size)], layout.index_dtype, name=f"{base}_index")]
    params += [te.placeholder([layout.entries], "float32", name=f"{base}_{role}_table") for role in roles]
    if layout.exceptions:
        params.append(te.placeholder([layout.blocks(size) + 1], layout.position_dtype, name=f"{base}_exception_start"))
        params.append(te.placeholder([layout.exceptions], layout.position_dtype, name=f"{base}_exception_position"))
        params += [te.placeholder([layout.exceptions], "float32", name=f"{base}_exception_{role}") for role in roles]
    return params


def operand(shape, layout: CodebookLayout, params: list, roles) -> list:
    """One TE tensor per role (``shape``, float32) gathering the weights from ``params``."""
    shape = [int(d) for d in shape]
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    index, tables = params[0], params[1 : 1 + len(roles)]
    if layout.exceptions:
        start, position = params[1 + len(roles)], params[2 + len(roles)]
        values = params[3 + len(roles) :]

    def flat(idx):
        return sum((i * s for i, s in zip(idx[1:], strides[1:])), idx[0] * strides[0])

    def code(f):
        if layout.width == 4:
            return (index[f >> 1].astype("int32") >> ((f & 1) << 2)) & 15
        return index[f].astype("int32")

    def exception(f, value):
        """The exception at flat position ``f``: the chain of its block's entries."""
        first = start[f // layout.block].astype("int32")
        last = layout.exceptions - 1
        result = None
        for k in reversed(range(layout.chain)):
            at = tirx.min(first + k, last)
            result = value[at] if result is None else tirx.Select(position[at].astype("int32") == f, value[at], result)
        return result

    def gather(table, value):
        def body(*idx):
            f = flat(idx)
            c = code(f)
            if not layout.exceptions:
                return table[c]
            return tirx.if_then_else(c == layout.escape, exception(f, value), table[c])

        return body

    return [
        te.compute(shape, gather(table, values[r] if layout.exceptions else None), name=f"codebook_{role}",
                   attrs={CODEBOOK_ATTR: 1})
        for r, (role, table) in enumerate(zip(roles, tables))
    ]
