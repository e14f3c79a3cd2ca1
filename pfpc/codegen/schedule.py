"""Schedules of the kernels for the C backend: loop nests gcc turns into fast code on each target.

`schedule_kernel` takes a kernel's PrimFunc (`pfpc.ops.kernel.build_kernel`: a chain of Gaussian
stages as TE computes) and returns it scheduled for ``accumulate``, the target's kind
(`pfpc.codegen.targets.Target.accumulate`): "scalar" for Cortex-M without SIMD (register blocks of
outputs per loaded input, unrolled windows, merged epilogues), "row" for Helium, "channel_rows" for
application cores (rows the C compiler vectorises). Every choice here changes speed only: the
stages, their arithmetic and its order per output are the operator library's; the constants below
(block widths, row lengths, unroll limits) were chosen by measurement, each with its numbers beside it.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import ScheduleError
from tvm.s_tir.schedule import _ffi_api as _schedule_ffi
from tvm.tirx import IndexMap

from ..ops import codebook as CB
from ..ops import gaussian as G
from ..ops.kernel import IN_PLACE_APART


def _is_shared(sch, block) -> bool:
    return G.SHARED_ATTR in sch.get(block).annotations


def _is_codebook(sch, block) -> bool:
    return CB.CODEBOOK_ATTR in sch.get(block).annotations


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def schedule_kernel(func: tirx.PrimFunc, accumulate: str = "scalar") -> tirx.PrimFunc:
    """One loop nest per output with everything before it fused in, no materialised intermediates.

    Single-output element-wise stages are inlined into their consumers. A reduction accumulates
    either (``accumulate="scalar"``, for cores without SIMD) a register block of outputs (a row's,
    `BLOCK`; or F channels x B positions where a row's outputs share no input:
    `_channel_block_factor`) with the reduction loops outside the block, the results in registers
    and the epilogue computed right after it,
    or (``"row"``, for SIMD cores) a whole output row at a time: the reduction loops move outside
    the row's loop, so the innermost loop runs along contiguous outputs and weights, which the C
    compiler vectorises, and the epilogue follows the row; ``"channel_rows"`` (application cores:
    the host, Cortex-A) accumulates the rows of a block of output channels together, each input
    element loaded once for the block (`_channel_block`), a stride-2 convolution's input rows
    deinterleaved first (`_deinterleave_strided_rows`), a Pad's output split into a fill and an
    interior copy (`_decomposed_padding`). Either way the innermost reduction
    loops are unrolled when short (a convolution's kernel window). The element-wise stages marked
    `gaussian.SHARED` (terms that both moments read, Clark's steps) are not inlined, which would
    repeat their exp per reader; they share one loop nest with the stages that read them: as
    scalars ("scalar"), or with a row loop each ("row", "channel_rows": see `_row_nests`).
    """
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in outputs or _is_reduction(sch, block) or \
                (_is_shared(sch, block) and not (accumulate != "channel_rows" and G.ROW_STAGE_ATTR in sch.get(block).annotations)):
            continue
        if _is_codebook(sch, block) and any(_is_reduction(sch, c) for c in sch.get_consumers(block)):
            continue  # placed by `_decode_once` below
        sch.compute_inline(block)
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in outputs and not sch.get(block).name_hint.startswith("copy_" + IN_PLACE_APART):
            try:
                sch.reverse_compute_inline(block)
            except Exception:
                pass
    placed = set()
    for block in sch.get_child_blocks(root):
        if not _is_reduction(sch, block):
            continue
        loops = sch.get_loops(block)
        spatial = sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar)
        downstream = _downstream(sch, root, block, placed)
        if accumulate == "channel_rows" and _narrow_reduction(sch, block) and _partial_sums(sch, block):
            for consumer in downstream:
                if not _after_outputs(sch, block, consumer, sch.get_loops(block)[spatial - 1]):
                    break  # the rest read it: after the reduction too
            placed.update(sch.get(b).name_hint for b in downstream)
            continue
        if accumulate == "channel_rows" and _narrow_unshared_rows(sch, block, spatial):
            # a row's outputs innermost around the unrolled window: the row loop vectorises with
            # its sums in registers (`_narrow_unshared_rows`)
            for consumer in downstream:
                if not _after_outputs(sch, block, consumer, loops[spatial - 2]):
                    break
            sch.decompose_reduction(block, sch.get_loops(block)[spatial])
            if _unrollable(sch, block):
                _unroll_window(sch, sch.get_loops(block)[spatial:])
            placed.update(sch.get(b).name_hint for b in downstream)
            continue
        if accumulate in ("row", "channel_rows") and spatial >= 2 and not (accumulate == "channel_rows" and _narrow_reduction(sch, block)):
            if accumulate == "channel_rows" and _contiguous_plane(sch, block):
                # a pointwise convolution's short rows: the plane is one row, split into rows of VECTOR_ROW_MAX at most
                plane = sch.fuse(loops[spatial - 2], loops[spatial - 1])
                extent = int(sch.get(plane).extent)
                sch.split(plane, [None, _row_split(extent, VECTOR_LANES, VECTOR_ROW_MAX) if extent > VECTOR_ROW_MAX else extent])
                loops = sch.get_loops(block)
            channels = _channel_block(sch, block, spatial) if accumulate == "channel_rows" else 1
            if channels > 1 and _accumulates_planes(sch, block, spatial, channels):
                _accumulate_planes(sch, block, spatial, channels, downstream)
                placed.update(sch.get(b).name_hint for b in downstream)
                continue
            longest = ROW_MAX if accumulate == "row" else VECTOR_ROW_MAX
            if int(sch.get(loops[spatial - 1]).extent) > longest:  # rows live on the stack: bound them
                lanes = VECTOR_LANES if accumulate == "channel_rows" else 1
                sch.split(loops[spatial - 1], [None, _row_split(int(sch.get(loops[spatial - 1]).extent), lanes, longest)])
                loops, spatial, channels = sch.get_loops(block), spatial + 1, 1
            if channels > 1:  # see `_channel_block`: (channel block, row) -> (row, channel block), one row loop
                _, inner = sch.split(loops[spatial - 3], [None, channels])
                loops, spatial = sch.get_loops(block), spatial + 1
                sch.reorder(loops[spatial - 2], inner)
                loops = sch.get_loops(block)
            for consumer in downstream:  # one row loop each: those without libm calls vectorise
                if not _after_outputs(sch, block, consumer, loops[spatial - 2 - (channels > 1)]):
                    break  # the rest read it: after the reduction too
            sch.decompose_reduction(block, loops[spatial - 1 - (channels > 1)])
            update = sch.get_loops(block)
            if channels > 1:
                sch.reorder(*update[spatial:], update[spatial - 1], update[spatial - 2])
                sch.unroll(sch.get_loops(block)[-1])
                if _unrollable(sch, block):
                    _unroll_window(sch, sch.get_loops(block)[spatial - 1:-2])
                placed.update(_deinterleave_strided_rows(sch, block, spatial))
            else:
                sch.reorder(*update[spatial:], update[spatial - 1])
                if _unrollable(sch, block):
                    _unroll_window(sch, sch.get_loops(block)[spatial:-1])
        elif _unrollable(sch, block) and len(sch.get(block).writes) <= 2 and _channel_block_factor(sch, block, loops, spatial) > 1:
            # register blocking of output channels (`_channel_block_factor`): F channels x B positions per
            # loaded input and weight, loops (..., y, x block | c, ky, F, B, kx)
            channels, positions = _register_block(int(sch.get(loops[1]).extent), int(sch.get(loops[3]).extent), len(sch.get(block).writes))
            _, channel = sch.split(loops[1], [None, channels])
            outer, inner = sch.split(loops[3], [None, positions])
            sch.reorder(loops[2], outer, channel, inner)
            for consumer in downstream:
                if not _after_outputs(sch, block, consumer, outer):
                    break  # the rest read it: after the reduction too
            _unroll_block(sch, sch.decompose_reduction(block, channel), 2, downstream, outer)
            update = sch.get_loops(block)  # n, o block, y, x block, channel, inner, c, ky, kx
            sch.reorder(update[6], update[7], update[4], update[5], update[8])
            update = sch.get_loops(block)
            for loop in update[-3:]:
                sch.unroll(loop)
            _unroll_window(sch, update[-4:-3], int(sch.get(update[-1]).extent))
        elif (shape := _row_block(sch, block, loops, spatial)) is not None:
            # a Gaussian dense layer over a few rows: each weight loaded once for the rows, loops
            # (output block | k, row, output)
            outer, inner = sch.split(loops[1], [None, shape[1]])
            sch.reorder(outer, loops[0])
            for consumer in downstream:
                if not _after_outputs(sch, block, consumer, outer):
                    break  # the rest read it: after the reduction too
            _unroll_block(sch, sch.decompose_reduction(block, loops[0]), 2, downstream, outer)
            update = sch.get_loops(block)  # output block, row, output, k
            sch.reorder(update[3], update[1], update[2])
            update = sch.get_loops(block)
            sch.unroll(update[-1])
            sch.unroll(update[-2])
        elif _unrollable(sch, block) and len(sch.get(block).writes) <= 2 \
                and (factor := _block_factor(int(sch.get(loops[spatial - 1]).extent), len(sch.get(block).writes),
                                         dense=len(loops) == spatial + 1)) > 1:
            # register blocking: BLOCK outputs along the last spatial axis per loaded weight
            outer, inner = sch.split(loops[spatial - 1], [None, factor])
            for consumer in downstream:
                if not _after_outputs(sch, block, consumer, outer):
                    break  # the rest read it: after the reduction too
            _unroll_block(sch, sch.decompose_reduction(block, inner), 1, downstream, outer)
            update = sch.get_loops(block)
            if len(update) - spatial - 1 >= 2 and int(sch.get(update[-1]).extent) <= UNROLL_ROW_MAX \
                    and (_inputs_per_tap(sch, block) >= 2 or _tests_border(sch, block)):
                # a Gaussian input (mean, variance, ...): the block's outputs between a window's rows and
                # its taps, see `_inputs_per_tap`
                sch.reorder(*update[spatial + 1:-1], update[spatial], update[-1])
                update = sch.get_loops(block)
                sch.unroll(update[-1])
                sch.unroll(update[-2])
                _unroll_window(sch, update[spatial:-2], int(sch.get(update[-1]).extent))
                _unroll_window_rows(sch, update[spatial:-2], int(sch.get(update[-1]).extent))
            else:
                sch.reorder(*update[spatial + 1:], update[spatial])
                update = sch.get_loops(block)
                sch.unroll(update[-1])
                _unroll_window(sch, update[spatial:-1])
                window = [loop for loop in update[spatial:-1] if int(sch.get(loop).extent) > 1]
                if spatial == 4 and len(window) == 1 and int(sch.get(window[0]).extent) <= UNROLL_ROW_MAX:
                    # a window of one row (the covariance form's window sums along rows or columns)
                    sch.unroll(window[0])
        else:
            for consumer in downstream:
                if not _after_outputs(sch, block, consumer, loops[spatial - 1]):
                    break  # the rest read it: after the reduction too
            sch.decompose_reduction(block, sch.get_loops(block)[spatial])
            if _unrollable(sch, block):
                _unroll_window(sch, sch.get_loops(block)[spatial:])
                _unroll_sum_row(sch, block)
        placed.update(sch.get(b).name_hint for b in downstream)
    decoded = {}
    for block in sch.get_child_blocks(root):
        if _is_codebook(sch, block):
            _decode_once(sch, block)
            placed.add(sch.get(block).name_hint)
            decoded.setdefault(sch.get(sch.get_consumers(block)[0]).name_hint, []).append(block)
    for gathers in decoded.values():
        _merge_gathers(sch, gathers)
        if accumulate == "scalar":
            _unroll_gather(sch, gathers[0])
    rest = [b for b in sch.get_child_blocks(root)
            if sch.get(b).name_hint not in placed and not _is_reduction(sch, b) and not sch.get(b).name_hint.endswith("_init")]
    if accumulate == "channel_rows":
        rest = [b for b in rest if not _decomposed_padding(sch, b)]
    if accumulate != "scalar":
        _row_nests(sch, rest, accumulate)
    else:
        _one_nest(sch, rest)
        _unroll_elementwise_row(sch, rest)
    return sch.mod["main"]


#: Largest scratch array of decoded weights (floats): TVM's C backend keeps buffers under 1 KB on the stack.
DECODE_SCRATCH = 255


def _decode_once(sch, block):
    """Place a codebook gather (`codebook.operand`) under the outermost loop of the reduction
    that reads it where its decoded weights fit in `DECODE_SCRATCH` floats: a convolution decodes
    an output channel's weights once for all output positions, a matmul a column (each weight
    once per row), instead of decoding every weight at every read."""
    consumer = sch.get_consumers(block)[0]
    for depth, loop in enumerate(sch.get_loops(consumer)):
        trial = sch.copy()
        try:
            trial.compute_at(block, loop, preserve_unit_loops=True)
        except Exception:  # not a legal place (TVM's ScheduleError): try an inner loop
            continue
        size = 1
        for inner in trial.get_loops(block)[depth + 1 :]:
            size *= int(trial.get(inner).extent)
        if size <= DECODE_SCRATCH:
            sch.compute_at(block, loop, preserve_unit_loops=True)
            return
    sch.compute_at(block, sch.get_loops(consumer)[-1], preserve_unit_loops=True)


def _merge_gathers(sch, blocks):
    """The gathers of one operand's mean and second moment in one loop nest: a weight's code is
    read, unpacked and tested for the escape once, not once per table."""
    shapes = {tuple(int(sch.get(loop).extent) for loop in sch.get_loops(block)) for block in blocks}
    if len(blocks) > 1 and len(shapes) == 1:
        _one_nest(sch, blocks)


#: Most weights a gather decodes in one unrolled stretch (`_unroll_gather`).
GATHER_UNROLL_MAX = 8


def _unroll_gather(sch, block):
    """Unroll a gather's innermost loops while they decode at most GATHER_UNROLL_MAX weights (a
    register block's weights, a kernel window): the unpacking shifts become constants and the
    codes that share a byte are read once."""
    total = 1
    for loop in reversed(sch.get_loops(block)):
        total *= int(sch.get(loop).extent)
        if total > GATHER_UNROLL_MAX:
            break
        sch.unroll(loop)


#: Fewest elements a row loop of `_row_nests` spans (trailing loops are fused up to it).
ROW_ELEMENTS = 16
#: Most elements of a row ("row" schedules): every stage of a row has a buffer of that many floats
#: on the stack, and TVM's C backend puts an allocation over 1 KiB in a runtime workspace.
ROW_MAX = 64


#: Narrowest padded row `_decomposed_padding` splits: DS-CNN's rows of 5 padded to 7 took 1.08x the time
#: of one loop when split (two short loops per row); ResNet-8's 10 to 34 gained.
PAD_ROW_MIN = 10


def _decomposed_padding(sch, block) -> bool:
    """Split a Pad's output (``if_then_else(inside, x[...], c)`` per element) into a fill of each
    plane with the constant and a copy of the input into its interior ("channel_rows"), and say
    whether it did. As one loop, the load under the test stayed scalar (gcc does not vectorise a
    conditional load): ResNet-8's pads took about three times TVM's LLVM build's time. The
    interior's elements are written twice, in rows the C compiler vectorises. Scalar targets keep
    one loop (on Cortex-M the second write costs instructions; their 3x3 convolutions test their
    border instead of reading a padded copy)."""
    loops = sch.get_loops(block)
    if len(loops) < 3 or not sch.get(block).name_hint.startswith("pad_") or int(sch.get(loops[-1]).extent) < PAD_ROW_MIN:
        return False
    plane = loops[-3]  # a row-major plane (NCHW: one channel's) stays in the cache between the fill and the copy
    try:
        if not sch.can_decompose_padding(block, plane):
            return False
        sch.decompose_padding(block, plane)
    except Exception:  # not the padding pattern after all
        return False
    return True


def _row_nests(sch, blocks, accumulate: str = "row"):
    """Element-wise blocks over one shape in one nest of outer loops, each with a row loop of its
    own inside: rows without libm calls vectorise, and the row's independent elements interleave
    in each stage (a chain of Clark steps is otherwise one long dependency chain per element).
    "channel_rows" fuses rows of ROW_ELEMENTS or fewer further, up to VECTOR_ROW_MAX: the digits
    LeNet's first max-pool + ReLU (6 channels of 4x4) had rows of 16, of which gcc -O3 unrolled
    16 loops completely as scalar code (`-fopt-info-loop`) and vectorised 16; in rows of 96 (the
    sample's) it vectorises them all, 0.74x the time at batch 8 (benchmarks/host_kernels.md).
    "channel_rows": blocks that read every operand at their own position (`_aligned`) run over
    their whole tensor as one flat array, in rows of a multiple of VECTOR_LANES where one divides
    it (DS-CNN's 64x25x5 maps: rows of 64 instead of 5, which gcc -O2 leaves scalar)."""
    shapes = {tuple(int(sch.get(loop).extent) for loop in sch.get_loops(b)) for b in blocks}
    if accumulate == "channel_rows" and len(shapes) == 1 and blocks and all(_aligned(sch, b) for b in blocks):
        _flat_rows(sch, blocks, list(shapes.pop()))
        return
    if len(blocks) < 2 or len(shapes) != 1:
        _one_nest(sch, blocks)
        return
    shape = list(shapes.pop())
    row = len(shape) - 1
    if shape[row] > ROW_MAX:
        factor = _row_split(shape[row])
        for block in _distinct_nests(sch, blocks):
            sch.split(sch.get_loops(block)[row], [None, factor])
        shape[row:] = [-(-shape[row] // factor), factor]
        row += 1
    span = shape[row]
    while row > 0 and span * shape[row - 1] <= ROW_MAX and span < ROW_ELEMENTS:
        row -= 1
        span *= shape[row]
    while accumulate == "channel_rows" and row > 0 and span <= ROW_ELEMENTS and span * shape[row - 1] <= VECTOR_ROW_MAX:
        # rows of ROW_ELEMENTS or fewer: gcc -O3 unrolls most of them completely, as scalar code
        row -= 1
        span *= shape[row]
    outer = []
    for block in _distinct_nests(sch, blocks):
        loops = sch.get_loops(block)
        if row < len(shape) - 1:
            sch.fuse(*loops[row:])
        if row > 0:
            outer.append(sch.get_loops(block)[row - 1])
    if len(outer) > 1:  # the blocks may share one nest already (one multi-output stage)
        sch.merge(*outer)


def _aligned(sch, block) -> bool:
    """Whether a block's loops are its iteration variables in order and it reads every buffer of
    its rank at exactly its own position (x[i, j, k], no broadcast operand, no window): its loops
    may then be fused into one without index arithmetic in the reads."""
    iter_vars = [iv.var for iv in sch.get(block).iter_vars]
    loops = sch.get_loops(block)
    if len(loops) != len(iter_vars) or any(int(sch.get(l).extent) != int(iv.dom.extent) for l, iv in zip(loops, sch.get(block).iter_vars)):
        return False
    for region in list(sch.get(block).reads) + list(sch.get(block).writes):
        indices = [rng.min for rng in region.region]
        if len(indices) != len(iter_vars) or not all(i.same_as(v) for i, v in zip(indices, iter_vars)) \
                or any(int(rng.extent) != 1 for rng in region.region):
            return False
    return True


def _flat_rows(sch, blocks, shape):
    """`_row_nests` for aligned blocks: every nest's loops fused into one and split into rows of
    `_row_split` (a multiple of VECTOR_LANES if one divides the size), the row loops under one
    outer loop, the stages' own buffers flat (`_flatten_stages`). Where no row divides every
    trailing block of the shape (`_clean_row`) and the leading axis (the batch) is over 1, the
    rows are counted per sample: loops (sample, row of the sample, element), each sample's
    indices those of batch 1, which TVM's simplifier reduces to the row loop's own; rows counted
    across the batch kept a division and a remainder by the sample's size in every index (DS-CNN's
    64x25x5 ReLU stages at batch 8: 2.5x TVM's LLVM time, not vectorised)."""
    total = 1
    for extent in shape:
        total *= extent
    row = total if total <= ROW_MAX else (_clean_row(shape) or _clean_row(shape, VECTOR_ROW_MAX))
    samples, sample = 1, total
    if row is None and len(shape) > 1 and shape[0] > 1:
        samples, sample = shape[0], total // shape[0]
        row = sample if sample <= ROW_MAX else (_clean_row(shape[1:]) or _row_split(sample, VECTOR_LANES))
    if row is None:
        row = _row_split(total, VECTOR_LANES)
    if sample % row:  # no row length divides it: a bounds test per element would stop the vectoriser
        _one_nest(sch, blocks)
        return
    if row < total and len(shape) > 1:
        _flatten_stages(sch, blocks, shape)
    outer = []
    for block in _distinct_nests(sch, blocks):
        fused = sch.fuse(*sch.get_loops(block)) if len(shape) > 1 else sch.get_loops(block)[0]
        if samples > 1:
            outer.append(sch.split(fused, [samples, sample // row, row] if row < sample else [samples, row])[:-1])
        elif row < total:
            outer.append([sch.split(fused, [None, row])[0]])
    if len(outer) > 1:
        for level in range(len(outer[0])):  # the samples' loops, then the rows' under them
            sch.merge(*[loops[level] for loops in outer])


def _clean_row(shape, longest: int = ROW_MAX) -> int | None:
    """The longest row (at most ``longest``, at least ROW_ELEMENTS, a multiple of VECTOR_LANES) that
    every trailing block of the shape (a map's row, its plane, ...) divides or is divided by:
    its elements' indices are then the row loop's own, with no division or remainder (rows of 64
    over 24-column maps read x[(f / 3) * 24 + f % 24], which gcc does not vectorise; rows of 48
    read x[f]). None where no such row exists (DS-CNN's 25x5 planes). `_flat_rows` asks for
    longer rows where none of ROW_MAX exists: ResNet-8's padded 34x34 maps take rows of 68; in rows
    of 64 their indices kept divisions by 289 from batch 2 on (ResNet-8's independent-variance
    stages at batch 8: 1.5x TVM's LLVM build of the same loops)."""
    blocks, size = [], 1
    for extent in reversed(shape):
        size *= extent
        blocks.append(size)
    for row in range(longest - longest % VECTOR_LANES, ROW_ELEMENTS - 1, -VECTOR_LANES):
        if size % row == 0 and all(b % row == 0 or row % b == 0 for b in blocks):
            return row
    return None


def _flatten_stages(sch, blocks, shape):
    """The buffers of the kernel's own stages (allocated inside it, of the output's shape) as one
    dimension: indexed in 4-D by a row that crosses the map's rows (rows of 64 over 32x32 maps), a
    row's region is its divisions and remainders, from which TVM's buffer compaction keeps a whole
    plane (1,024 floats); its C backend allocates that from its runtime, and the kernel fell back to
    one scalar loop nest (ResNet-8's 16x32x32 ReLU loadings). Flat, the compaction keeps about a
    row. The parameters keep their shapes (TVM's VM calls the same kernels with the tensors)."""
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    flat = tirx.IndexMap.from_func(lambda *index: [sum(v * s for v, s in zip(index, strides))], ndim=len(shape), index_dtype="int32")
    allocated = sch.get(sch.get_sblock("root")).alloc_buffers

    def transform(schedule):
        for block in blocks:
            for index, region in enumerate(schedule.get(block).writes):
                buffer = region.source
                if any(buffer.same_as(b) for b in allocated) and [int(d) for d in buffer.shape] == list(shape):
                    schedule.transform_layout(block, ("write", index), flat)

    try:
        transform(sch.copy())
    except Exception:  # TVM's error: a buffer it cannot map (leave them indexed as they are)
        return
    transform(sch)


def _after_outputs(sch, block, consumer, loop) -> bool:
    """``consumer`` of the reduction ``block`` computed under ``loop``, right after the outputs
    each iteration of it completes, where TVM can bound it to them; else left after the whole
    reduction. TVM's region analysis can find the consumer needs the whole tensor under ``loop``
    (a channel block over rows one element wide): it then recomputes every element at every
    iteration from rows not yet computed, and a kernel that writes its output over an operand
    (`in_place_operands`) overwrote the operand's later rows before they were read (fuzz seed
    500102: a residual Add + Clip after a convolution on 7x1 maps, output varying from run to run).
    The test: the consumer's elements under ``loop`` times the iterations of ``loop`` and the loops
    above it are no more than the consumer's own elements (each computed once; a normalisation's
    consumer has more elements than its statistics, and is placed). Returns whether it placed the
    consumer."""
    extent = lambda l, schedule=sch: int(schedule.get(l).extent)
    above = 1
    for outer in sch.get_loops(block):
        above *= extent(outer)
        if sch.get(outer).same_as(sch.get(loop)):
            break
    outputs = 1
    for iv in sch.get(consumer).iter_vars:
        if iv.iter_type == tirx.IterVar.DataPar:
            outputs *= int(iv.dom.extent)
    trial = sch.copy()
    try:
        trial.reverse_compute_at(consumer, loop)
    except Exception:  # TVM's ScheduleError: not placeable there
        return False
    loops, inner, under = trial.get_loops(consumer), 1, False
    for candidate in loops:
        if under:
            inner *= extent(candidate, trial)
        under = under or trial.get(candidate).same_as(trial.get(loop))
    if inner * above > outputs:
        return False
    sch.reverse_compute_at(consumer, loop)
    return True


def _partial_sums(sch, block) -> bool:
    """A narrow reduction (`_narrow_reduction`: the covariance pass's window sums, a global pool's
    sums) as a row of partial sums along its innermost reduced axis (``rfactor``), accumulated
    over the other reduced axes with the row innermost, which the C compiler vectorises, then
    added up, per output: one accumulator per output is a chain of dependent float additions the
    compiler may not reorder. Returns whether it applied (the block is then scheduled)."""
    loops = sch.get_loops(block)
    spatial = sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar)
    if len(loops) - spatial < 2 or int(sch.get(loops[-1]).extent) < 2 * VECTOR_LANES:
        return False

    def factor(schedule):
        partial = schedule.rfactor(schedule.get_loops(block)[-1], factor_axis=spatial)
        schedule.compute_at(partial, schedule.get_loops(block)[spatial - 1])  # one output's row at a time
        loops = schedule.get_loops(partial)
        schedule.reorder(*loops[spatial + 1:], loops[spatial])  # the row innermost
        schedule.decompose_reduction(partial, schedule.get_loops(partial)[spatial])
        schedule.decompose_reduction(block, schedule.get_loops(block)[spatial])

    try:
        factor(sch.copy())
    except Exception:  # TVM's ScheduleError: keep the one accumulator
        return False
    factor(sch)
    return True


#: Longest output row `_narrow_unshared_rows` takes: two vectors of `VECTOR_LANES`.
NARROW_ROW_MAX = 16


def _narrow_unshared_rows(sch, block, spatial: int) -> bool:
    """Whether a "channel_rows" reduction runs its row's outputs innermost with the whole window
    unrolled inside (each output's sums in registers, the loop over the row vectorised) instead of
    the window's taps outside a row loop: a convolution whose output rows are at most
    NARROW_ROW_MAX long and whose channels share no input (a depthwise convolution: no channel
    block, `_channel_block`; not a convolution whose channel count no block divides), stride 1, a window
    of at most UNROLL_MAX taps. DS-CNN's depthwise 3x3 convolutions (rows of 5): with the taps
    outside, every tap was a loop of 5 (a vector and a scalar tail) loading and storing the row's
    sums in a stack array, about 100 µs each on the host against 37 for TVM's LLVM build of the
    same schedule; this way 36 µs (benchmarks/host_kernels.md). The sums add in the same order."""
    if spatial < 3 or len(_data_parallel(sch, block)) < 3 or _contiguous_plane(sch, block):
        return False
    if not _unrollable(sch, block) or int(sch.get(sch.get_loops(block)[spatial - 1]).extent) > NARROW_ROW_MAX:
        return False
    reduced = 1
    for iv in sch.get(block).iter_vars:
        if iv.iter_type == tirx.IterVar.CommReduce:
            reduced *= int(iv.dom.extent)
    if reduced > UNROLL_MAX:  # the window unrolled whole (not the covariance form's window sums over a map)
        return False
    row, channel = _data_parallel(sch, block)[-1].var, _data_parallel(sch, block)[-3]
    extent = int(channel.dom.extent)
    reads = [r for r in sch.get(block).reads if len(r.region) > 1]
    # contiguous along the row (a stride of 2 keeps its deinterleaved or strided rows), each read its channel's own
    return all(_stride(r.region[-1].min, row) == 1 and any(_uses(rng.min, channel.var, extent) for rng in r.region) for r in reads)


def _narrow_reduction(sch, block) -> bool:
    """Whether "channel_rows" schedules a reduction like "scalar" does (the reduction innermost,
    the row's outputs register-blocked): where its output rows are narrower than a vector and the
    reduction long (the covariance pass's window sums: 3x3 outputs, each a sum over a whole
    feature map, whose row loop of 3 would run once per reduced element). Not DS-CNN's depthwise
    convolutions (rows of 5): that way they took as many instructions as their rows (4.32 M
    against 4.40 M at -O3). A pointwise convolution's plane is one row (`_contiguous_plane`)."""
    if _contiguous_plane(sch, block):
        return False
    reduced = 1
    for iv in sch.get(block).iter_vars:
        if iv.iter_type == tirx.IterVar.CommReduce:
            reduced *= int(iv.dom.extent)
    return int(_data_parallel(sch, block)[-1].dom.extent) < VECTOR_LANES and reduced >= ROW_ELEMENTS * VECTOR_LANES


#: Output channels a "channel_rows" schedule accumulates together, tried in this order (`_channel_block`).
CHANNEL_BLOCK = (8, 4, 2)
#: Most accumulators of one channel block's rows (floats, each on the stack, as are the epilogue's rows;
#: under TVM's 1 KiB limit for a stack array): 2 channels of a pointwise convolution's 125-element plane.
CHANNEL_BLOCK_FLOATS = 250


def _channel_block(sch, block, spatial: int) -> int:
    """Output channels whose rows a "channel_rows" schedule accumulates together: with the block's output
    channels (the spatial axis before the row's) innermost, under the row loop, every input row
    element loaded (and its square or second moment formed) serves that many output channels
    instead of one. 1 where no read is shared by the channels (a depthwise convolution, a dense
    layer's single row) or no block of `CHANNEL_BLOCK` divides them."""
    if len(_data_parallel(sch, block)) < 3:
        return 1
    channel = _data_parallel(sch, block)[-3]
    extent = int(channel.dom.extent)
    shared = [r for r in sch.get(block).reads if len(r.region) > 1 and not any(_uses(rng.min, channel.var, extent) for rng in r.region)]
    if not shared:
        return 1
    row = int(sch.get(sch.get_loops(block)[spatial - 1]).extent)
    return next((f for f in CHANNEL_BLOCK if extent % f == 0 and f * row <= CHANNEL_BLOCK_FLOATS), 1)


def _accumulates_planes(sch, block, spatial: int, channels: int) -> bool:
    """Whether a "channel_rows" convolution accumulates its channel block's whole output planes
    (`_accumulate_planes`): a batch of more than one sample, output rows of at most one vector
    (VECTOR_LANES) over maps of more than one row, read contiguously along the row (stride 1),
    the block's planes within CHANNEL_BLOCK_FLOATS. Batch 1 keeps the `_channel_block` rows:
    the Cortex-A targets share this schedule, and with NEON's 32 registers the digits LeNet took
    2.4 % more Cortex-A53 instructions this way (125,776 -> 128,772 per inference, with blocks of 4)."""
    loops = sch.get_loops(block)
    height, width = int(sch.get(loops[spatial - 2]).extent), int(sch.get(loops[spatial - 1]).extent)
    data = _data_parallel(sch, block)
    if width > VECTOR_LANES or height < 2 or len(data) < 4 or int(data[0].dom.extent) < 2 or channels * height * width > CHANNEL_BLOCK_FLOATS:
        return False
    row = data[-1].var
    return all(_stride(r.region[-1].min, row) == 1 for r in sch.get(block).reads if len(r.region) > 1)


def _accumulate_planes(sch, block, spatial: int, channels: int, downstream):
    """A convolution over maps with rows of one vector or less (the digits LeNet's conv2: 4x4
    outputs) with its window's taps outside the block's whole output planes: loops (n, channel
    block | c, ky, kx, y, x, channel), x vectorised, the channels unrolled. Per row of the
    `_channel_block` form (taps inside the row loop) every tap's weights were loaded, squared and
    broadcast for one vector of outputs, with 8 channels' two moments (16 vectors) kept across
    the taps beside them, spilled: 0.66x TVM's LLVM time on the host at batch 8. Here each tap's
    broadcast weights serve the plane's rows, the sums are read and written in the stack arrays
    (L1) once per tap and row: 0.52-0.59x the C's time at batch 8 and 128. Blocks of 4 channels (their
    weights fit the 16 SSE registers) took another 13 % off the C's time, but TVM's LLVM build of
    those loops took about 3.5x its time with blocks of 8, which would have turned the comparison with
    it into one of LLVM's trouble with a schedule (benchmarks/host_kernels.md, session 14)."""
    loops = sch.get_loops(block)
    sch.split(loops[spatial - 3], [None, channels])
    loops = sch.get_loops(block)  # n, channel block, channel, y, x, c, ky, kx
    for consumer in downstream:
        if not _after_outputs(sch, block, consumer, loops[spatial - 3]):
            break  # the rest read it: after the reduction too
    sch.decompose_reduction(block, loops[spatial - 2])
    update = sch.get_loops(block)
    sch.reorder(*update[spatial + 1:], update[spatial - 1], update[spatial], update[spatial - 2])
    sch.unroll(sch.get_loops(block)[-1])
    if _unrollable(sch, block):
        _unroll_window(sch, sch.get_loops(block)[spatial - 1:-3])


def _contiguous_plane(sch, block) -> bool:
    """Whether a reduction's output rows are short (under ROW_ELEMENTS) and every buffer it
    reads by position holds its plane as the output does (a pointwise, stride-1 convolution): its
    (row, column) plane is then one contiguous row of each."""
    data = _data_parallel(sch, block)
    if len(data) < 3 or int(data[-1].dom.extent) >= ROW_ELEMENTS:
        return False
    height, width = data[-2], data[-1]
    unit = [iv.var for iv in sch.get(block).iter_vars if int(iv.dom.extent) == 1]  # a 1x1 window's taps

    def position(index, var):  # var, or var + a tap of a 1x1 window
        if isinstance(index, tirx.Add):
            return (position(index.a, var) and any(index.b.same_as(u) for u in unit)) or \
                (position(index.b, var) and any(index.a.same_as(u) for u in unit))
        return index.same_as(var)

    for region in sch.get(block).reads:
        indices = [rng.min for rng in region.region]
        if not any(_uses(index, var.var, int(var.dom.extent)) for index in indices for var in (height, width)):
            continue  # a weight
        if len(indices) < 2 or not (position(indices[-1], width.var) and position(indices[-2], height.var)) \
                or int(region.source.shape[-1]) != int(width.dom.extent) or int(region.source.shape[-2]) != int(height.dom.extent):
            return False
    return True


#: Most floats of one input's rows that `_deinterleave_strided_rows` copies (a stack array each).
DEINTERLEAVE_FLOATS = 255


def _deinterleave_strided_rows(sch, block, spatial: int) -> list[str]:
    """A stride-2 convolution's input rows copied, per input channel, into a local array with the
    even columns before the odd ones: the row loop then reads them contiguously (x[2 o + k] is
    rows[k % 2][o + k // 2]), which the C compiler vectorises (strided loads it does not, at -O2);
    the channel block shares the copy. Returns the names of the copying blocks."""
    row = _data_parallel(sch, block)[-1].var
    names = []
    for index, region in enumerate(sch.get(block).reads):
        if len(region.region) < 2 or _stride(region.region[-1].min, row) != 2:
            continue
        trial = sch.copy()
        try:
            _widen_to_pairs(trial, block, index)
            cache = trial.cache_read(block, index, "global", consumer_blocks=[block])
            trial.compute_at(cache, trial.get_loops(block)[spatial - 2], preserve_unit_loops=True)
            size = 1
            for loop in trial.get_loops(cache)[spatial - 1:]:
                size *= int(trial.get(loop).extent)
            width = int(region.source.shape[-1])
            if size > DEINTERLEAVE_FLOATS or width % 2:
                continue
            trial.transform_layout(cache, ("write", 0), lambda *i: (*i[:-1], i[-1] % 2, i[-1] // 2))
        except Exception:  # TVM's ScheduleError: leave this input as it is
            continue
        _widen_to_pairs(sch, block, index)
        cache = sch.cache_read(block, index, "global", consumer_blocks=[block])
        sch.compute_at(cache, sch.get_loops(block)[spatial - 2], preserve_unit_loops=True)
        sch.transform_layout(cache, ("write", 0), lambda *i: (*i[:-1], i[-1] % 2, i[-1] // 2))
        _copy_in_pairs(sch, cache)
        names.append(sch.get(cache).name_hint)
    return names


def _widen_to_pairs(sch, block, index):
    """Declare the ``index``-th read of a stride-2 window one column wider (never past the row's
    end): the rows its copy holds (`_deinterleave_strided_rows`) then span an even number of
    columns when the input's width is even (ResNet-8's padded 34: 33 columns read, 34 copied),
    which `_copy_in_pairs` needs. The window reads the same elements."""
    region = sch.get(block).reads[index]
    width = int(region.source.shape[-1])
    bounds = []
    for axis, extent in enumerate(region.region):
        end = extent.min + extent.extent
        bounds += [extent.min, tirx.min(end + 1, width) if axis == len(region.region) - 1 else end]
    # the block's own iteration variables map to the region (Schedule.annotate_buffer_access would
    # want one range per iteration variable: a buffer of the block's rank)
    index_map = IndexMap(initial_indices=[iv.var for iv in sch.get(block).iter_vars], final_indices=bounds, inverse_index_map=None)
    _schedule_ffi.ScheduleAnnotateBufferAccess(sch, block, index, 0, index_map)


def _copy_in_pairs(sch, cache):
    """The deinterleaving copy's column loop as pairs (even, odd), the pair unrolled: rows[0][j] =
    x[2 j], rows[1][j] = x[2 j + 1], an interleaved load the C compiler vectorises (with the index
    (k % 2) * half + k / 2 per element it stayed scalar: half of ResNet-8's stride-2 convolutions'
    host time). Only where the copied row has an even number of columns (an odd one is left as it is:
    the last pair would need a test)."""
    column = sch.get_loops(cache)[-1]
    if int(sch.get(column).extent) % 2:
        return
    _, pair = sch.split(column, [None, 2])
    sch.unroll(pair)


def _stride(expr, var) -> int:
    """c in an index ``var * c + ...`` (1 if ``var`` is not multiplied by a constant there)."""
    if isinstance(expr, tirx.Add):
        return max(_stride(expr.a, var), _stride(expr.b, var))
    if isinstance(expr, tirx.Mul) and isinstance(expr.a, tirx.Var) and expr.a.same_as(var) and isinstance(expr.b, tirx.IntImm):
        return int(expr.b.value)
    return 1


def _data_parallel(sch, block) -> list:
    """The block's spatial iteration variables, outermost first (a loop split does not change them)."""
    return [iv for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar]


def _uses(expr, var, extent: int) -> bool:
    """Whether ``expr`` varies with ``var`` in [0, extent): a convolution's input channel
    ``o // outputs_per_group * inputs_per_group + c`` does not with a single group (o // extent is 0)."""
    if isinstance(expr, tirx.Var):
        return expr.same_as(var)
    if isinstance(expr, tirx.FloorDiv) and isinstance(expr.a, tirx.Var) and expr.a.same_as(var) \
            and isinstance(expr.b, tirx.IntImm) and int(expr.b.value) >= extent:
        return False
    children = [getattr(expr, name) for name in ("a", "b", "value") if hasattr(expr, name)] + list(getattr(expr, "args", []))
    return any(_uses(child, var, extent) for child in children if isinstance(child, tvm.ir.Expr))


#: Outputs accumulated together by the "scalar" schedule (register blocking), tried in this order
#: as divisors of the last output axis: each loaded weight (and, in a convolution's unrolled
#: window, each loaded input) then serves several multiply-adds instead of one.
BLOCK = (8, 7, 6, 5, 4, 3, 2)


#: Accumulators of a channel-blocked register block (`_channel_block_factor`): the Cortex-M4's FPU has 32
#: single-precision registers, the rest hold the loaded inputs and weights.
ACCUMULATORS = 16


def _channel_block_factor(sch, block, loops, spatial: int) -> int:
    """Output channels the "scalar" schedule accumulates together (`_register_block`'s F; 1: none)
    for a 2-D convolution whose neighbouring outputs along a row share no input, a 1x1 window or a
    stride of 2 or more along the row: blocking the row's outputs alone reuses only the weights,
    F channels reuse each loaded input F times (with ACCUMULATORS / F / accumulators per output
    positions of the row: `_register_block`). Cortex-M4 instructions (Makefile flags): ResNet-8
    PFP 104.02 M -> 101.39 M (its 1x1 shortcuts, the covariance form's coherent terms, the
    stride-2 3x3 convolutions), its deterministic network 22.55 M -> 21.59 M; DS-CNN (pointwise
    convolutions) PFP 39.97 M -> 37.84 M, deterministic 8.08 M -> 6.29 M. Stride-1 3x3
    convolutions keep the row blocks (their taps share inputs), which 4 channels made 14 % slower."""
    if spatial != 4 or len(loops) != spatial + 3:
        return 1
    stmt = sch.get(block)
    _, channel, _, row = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    factor, _ = _register_block(int(channel.dom.extent), int(row.dom.extent), len(stmt.writes))
    if factor == 1:
        return 1
    written = [write.source for write in stmt.writes]
    single = int(row.dom.extent) == 1 and int(sch.get(loops[2]).extent) == 1  # one output position per channel
    inputs = [read.region for read in stmt.reads if not any(read.source.same_as(b) for b in written)
              and (len(read.region) == 4 if single else _uses(read.region[-1].min, row.var, int(row.dom.extent)))]
    if any(_uses(region[1].min, channel.var, factor) for region in inputs):
        return 1  # depthwise: each channel reads its own input
    window = int(sch.get(loops[5]).extent) * int(sch.get(loops[6]).extent)
    # the index of a padded window's tap: x s + t - p
    if window > 1 and not single and not any(_stride(_minuend(region[-1].min), row.var) >= 2 for region in inputs):
        return 1
    return factor


def _unroll_block(sch, init, depth: int, downstream, outer):
    """Unroll the ``depth`` innermost loops of a register block's initialisation ``init`` and the
    loops over the block of its light consumers placed under ``outer`` (bias, batch norm, residual,
    the covariance form's coherent variance: `_light`): rolled, gcc -O2 kept the block's
    accumulators in memory (an array indexed by the loop) and spilled around them. Cortex-M4
    (Makefile flags): ResNet-8 PFP 101.39 M -> 99.28 M, seed LeNet-5 PFP 2.97 M -> 2.93 M, DS-CNN
    PFP 37.84 M -> 36.53 M. An epilogue with a square root, a division or a libm call (a fused
    Gaussian ReLU) stays rolled: unrolled, ResNet-8's diagonal PFP (`--covariance none`) was
    slower (86.29 M -> 87.07 M) and its code 2.5 times larger."""
    for loop in sch.get_loops(init)[-depth:]:
        sch.unroll(loop)
    epilogue = []
    for consumer in downstream:
        loops = sch.get_loops(consumer)
        placed = [index for index, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(outer))]
        if placed:
            epilogue.append(loops[placed[0] + 1:])
    if all(_light(sch, consumer) for consumer in downstream):
        for loops in epilogue:
            for loop in loops:
                sch.unroll(loop)
    else:
        _merge_epilogue(sch, epilogue)


def _merge_epilogue(sch, epilogue):
    """The loops of a heavy epilogue's stages (a fused Gaussian ReLU: square root, exp, division)
    merged level by level into one rolled nest, where they match: each element's stages then run
    together, their intermediates scalars, not one loop per stage over arrays of the block."""
    for level in range(min((len(loops) for loops in epilogue), default=0)):
        loops = [loops[level] for loops in epilogue]
        distinct = []
        for loop in loops:
            if not any(sch.get(loop).same_as(sch.get(seen)) for seen in distinct):
                distinct.append(loop)
        if len(distinct) < 2 or len({int(sch.get(loop).extent) for loop in distinct}) != 1:
            return
        try:
            sch.merge(*distinct)
        except ScheduleError:  # the nests do not merge (another shape below, a dependence): the rest stays apart
            return


def _light(sch, block, allowed_calls=()) -> bool:
    """Whether a block computes with additions, multiplications and selections only (no division,
    no call but those named in ``allowed_calls``)."""
    values = []
    _collect_values(sch.get(block).body, values)
    return not any(_has(value, (tvm.ir.Call, tirx.Div, tirx.FloorDiv), allowed_calls) for value in values)


def _has(expr, kinds, allowed_calls=()) -> bool:
    """Whether ``expr`` holds a node of one of ``kinds``, calls of ``allowed_calls`` aside (their
    arguments searched; loads' indices not)."""
    if isinstance(expr, kinds) and not (isinstance(expr, tvm.ir.Call) and str(getattr(expr.op, "name", "")) in allowed_calls):
        return True
    children = [getattr(expr, field) for field in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(expr, field)]
    children += list(getattr(expr, "args", []))
    return any(_has(child, kinds, allowed_calls) for child in children if isinstance(child, tvm.ir.Expr))


def _minuend(expr):
    """a of a - b, else ``expr``."""
    return expr.a if isinstance(expr, tirx.Sub) else expr


def _register_block(channels: int, width: int, accumulators_per_output: int) -> tuple:
    """(F, B): F of ``channels`` (16, 8, 4, 2, 1) and B of a row of ``width`` outputs accumulated
    together, at most ACCUMULATORS accumulators, loading each input once per F outputs and each
    weight once per B: the fewest loads per multiply-add, 1/F + 1/B (a tie: more channels; a strided
    row reads B inputs per tap, not B + taps - 1)."""
    pairs = [(f, b) for f in (16, 8, 4, 2, 1) for b in range(width, 0, -1)
             if channels % f == 0 and width % b == 0 and f * b * accumulators_per_output <= ACCUMULATORS]
    return min(pairs, key=lambda pair: (1 / pair[0] + 1 / pair[1], -pair[0]))


#: A dense layer's register block (one reduction loop) may be wider than a convolution's: only its
#: accumulators and one loaded input stay live across the loop, where a convolution's unrolled
#: window keeps its loaded inputs too. Cortex-M4, seed MLP 784-100-100-10: 10 outputs instead of 5,
#: PFP 542,200 -> 486,400 instructions, det. 252,400 -> 216,480 (LeNet-5's conv2 with 10 was +16 %).
#: Only for layers of two such blocks or more: gcc folds a single block's constant-indexed bias into
#: the code, and the weights' arrays are the flash image firmware engineers read (`pfpc report`).
DENSE_BLOCK = (10,)


#: Most rows of a Gaussian dense layer accumulated together (`_row_block`) and their accumulators.
ROW_BLOCK, ROW_ACCUMULATORS = 4, 18


def _row_block(sch, block, loops, spatial: int):
    """(R, F): the rows and outputs of a Gaussian dense layer [R, in] x [in, out] with a batch of
    R <= `ROW_BLOCK` rows (the shared scale's three scenarios, `passes.share_dense_scale`)
    accumulated together, at most `ROW_ACCUMULATORS` accumulators (mean and variance per output),
    or None. Each weight's mean, variance and squared mean are loaded and formed once for the R
    rows, where a block of one row's outputs forms them once per row: per multiply-add 3 + 3 / R
    instructions instead of 6, and 3 / F per row for the input's moments."""
    stmt = sch.get(block)
    if spatial != 2 or len(loops) != 3 or len(stmt.writes) != 2 or not _unrollable(sch, block):
        return None
    rows, width = int(sch.get(loops[0]).extent), int(sch.get(loops[1]).extent)
    if not 2 <= rows <= ROW_BLOCK:
        return None
    factor = next((f for f in BLOCK if width % f == 0 and rows * f * 2 <= ROW_ACCUMULATORS), 1)
    return (rows, factor) if factor > 1 else None


def _block_factor(extent: int, writes: int = 2, dense: bool = False) -> int:
    """The first factor dividing ``extent`` (no tail loop) of: `ACCUMULATORS` down to one more than
    `DENSE_BLOCK`'s for a reduction with one output tensor (deterministic: one accumulator per
    output), `DENSE_BLOCK` for a dense layer of two such blocks or more, then `BLOCK`; 1 if none.
    One output tensor (Cortex-M4, Makefile flags): ResNet-8's deterministic network 21.25 M ->
    20.29 M instructions, its PFP 99.28 M -> 99.20 M, the shared scale's alpha pass 121,120 ->
    108,960; the seed LeNet-5's and DS-CNN's deterministic networks unchanged. Down to 11
    (session 14): the shared scale's noise pass over fc1's 120 outputs in blocks of 15, not 10,
    115,560 -> 109,120."""
    wide = (tuple(range(ACCUMULATORS, DENSE_BLOCK[0], -1)) if writes == 1 else ()) + \
        tuple(factor for factor in DENSE_BLOCK if dense and extent >= 2 * factor)
    return next((factor for factor in wide + BLOCK if extent % factor == 0 and extent >= factor), 1)


#: Most iterations of the innermost reduction loops that are unrolled (a 3x3 kernel window).
UNROLL_MAX = 9

#: Longest window row unrolled with the register block's outputs (`_inputs_per_tap`): the covariance
#: form's window sums over a row of 32 outputs (ResNet-8), unrolled whole, cost half the instructions
#: (Cortex-M4: 3.07 M -> 1.66 M); longer rows keep their loop (code size).
UNROLL_ROW_MAX = 32


def _tests_border(sch, block) -> bool:
    """Whether a reduction's taps test the border of a zero-padded input: an ``if_then_else`` read
    whose condition the loop bounds do not prove (no padded copy: `passes.pad_conv_inputs`'
    ``border_taps``; a padded copy's reads keep a condition that always holds)."""
    stmt = sch.get(block)
    analyzer = tvm.sym.Analyzer()
    for iv in stmt.iter_vars:
        analyzer.bind(iv.var, iv.dom)
    values = []
    _collect_values(stmt.body, values)
    return any(_tested(value, analyzer) for value in values)


def _tested(expr, analyzer) -> bool:
    """Whether ``expr`` holds an ``if_then_else`` whose condition ``analyzer`` cannot prove."""
    if isinstance(expr, tvm.ir.Call) and str(getattr(expr.op, "name", "")).endswith("if_then_else") \
            and not analyzer.can_prove(expr.args[0]):
        return True
    children = [getattr(expr, field) for field in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(expr, field)]
    children += list(getattr(expr, "args", []))
    return any(_tested(child, analyzer) for child in children if isinstance(child, tvm.ir.Expr))


def _inputs_per_tap(sch, block) -> int:
    """Tensors a reduction reads at positions that move along its last output axis: one for a
    deterministic convolution's input, two or three for a Gaussian one (mean and variance, and the
    covariance form's independent variance); not the weights.

    With two or more, the register-blocked schedule unrolls a window row as (output, tap), the
    taps innermost, not (tap, output): each loaded input then serves the block's neighbouring
    outputs while it is live (a window row's inputs, not the block's row plus the window, held at
    once), which gcc keeps in registers where the other order spilled. Cortex-M4, ResNet-8 PFP
    (3x3): 112.3 M -> 104.2 M instructions; seed LeNet-5's second convolution (5x5) 1.32 M -> 1.26 M.
    With one (a deterministic input) it cost instructions: seed LeNet-5's first convolution
    454 k -> 533 k, the deterministic ResNet-8 22.55 M -> 22.81 M."""
    stmt = sch.get(block)
    last = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar][-1]
    extent = int(last.dom.extent)
    written = [write.source for write in stmt.writes]  # the accumulators, read by the update too
    return sum(1 for read in stmt.reads
               if not any(read.source.same_as(b) for b in written) and any(_uses(r.min, last.var, extent) for r in read.region))


def _unrollable(sch, block) -> bool:
    """Whether a reduction's window may be unrolled: not a max or min reduction. TVM's C printer
    names an operand of max/min with a local variable (``float v_ = acc[0];``) and reuses that
    name for the same text later in one scope, so a max-pool window unrolled into one scope would
    compare every element with the accumulator's first value. Sums print inline."""
    values = []
    _collect_values(sch.get(block).body, values)
    return not any(isinstance(value, (tirx.Max, tirx.Min)) for value in values)


def _collect_values(stmt, values):
    """The values stored or let-bound in a block body (sequences and nested bodies walked through)."""
    if isinstance(stmt, tirx.SeqStmt):
        for child in stmt.seq:
            _collect_values(child, values)
        return
    if hasattr(stmt, "value"):
        values.append(stmt.value)
    if hasattr(stmt, "body"):
        _collect_values(stmt.body, values)


def _unroll_window(sch, loops, total: int = 1):
    """Unroll the innermost reduction loops while they run at most UNROLL_MAX iterations together
    (a convolution's kernel window): a 3-iteration loop costs about as much in overhead as in work.
    ``total``: the iterations of reduction loops unrolled already (inside ``loops``)."""
    for loop in reversed(loops):
        total *= int(sch.get(loop).extent)
        if total > UNROLL_MAX:
            break
        sch.unroll(loop)


#: Largest window whose rows `_unroll_window_rows` unrolls (5 x 5).
UNROLL_WINDOW_MAX = 25


def _unroll_window_rows(sch, loops, taps: int):
    """Unroll the window rows of a register-blocked Gaussian convolution (``loops``: input
    channel, window row; ``taps``: a row's) whose window is larger than `UNROLL_MAX` and at most `UNROLL_WINDOW_MAX`,
    inside a loop over input channels: each row's loop increment, compare, branch and address
    arithmetic are gone and gcc schedules one row's loads beside the last's multiply-adds (the
    registers each row needs do not grow). Cortex-M4: seed LeNet-5's conv2 (5 x 5, 6 input
    channels) 1,267,280 -> 1,225,200 instructions. Its first convolution (one input channel, a
    deterministic input: another schedule) got slower the same way (414,120 -> 572,640)."""
    if len(loops) < 2 or int(sch.get(loops[-2]).extent) < 2:
        return
    if UNROLL_MAX < int(sch.get(loops[-1]).extent) * taps <= UNROLL_WINDOW_MAX:
        sch.unroll(loops[-1])


def _unroll_sum_row(sch, block):
    """Unroll the innermost loop of a plain sum (additions and multiplications only, `_light`)
    when it is longer than a window (`UNROLL_MAX`) and at most `UNROLL_ROW_MAX`: a row of a sum
    over positions (the covariance form's sums of a channel's variances), where the loop's
    increment, compare and branch cost more than its load and addition (Cortex-M4: the seed
    LeNet-5's two sums over conv2's 10 x 10 positions 7,160 and 7,200 -> 3,800 and 3,840)."""
    innermost = sch.get_loops(block)[-1]
    if UNROLL_MAX < int(sch.get(innermost).extent) <= UNROLL_ROW_MAX and _light(sch, block):
        sch.unroll(innermost)


#: Calls an element-wise row unrolled by `_unroll_elementwise_row` may hold (one instruction each on Cortex-M4F).
CHEAP_CALLS = ("tirx.sqrt", "prim.if_then_else")


def _unroll_elementwise_row(sch, blocks):
    """Unroll the innermost loop of an element-wise nest (``blocks``, merged by `_one_nest`) of at
    most `UNROLL_ROW_MAX` iterations whose values need no division and no call but a square root
    or a selection: there the loop's increment, compare and branch cost as much as the element's
    load, arithmetic and store, and a padded copy's border test becomes a constant per unrolled
    column (Cortex-M4, the seed LeNet-5: the loading's square roots and products over conv2's
    rows of 10, 15,480 and 9,120 -> 10,720 and 3,880 instructions; conv1's padded input 6,920 -> 3,800)."""
    if not blocks:
        return
    innermost = sch.get_loops(blocks[0])[-1]
    if not 1 < int(sch.get(innermost).extent) <= UNROLL_ROW_MAX:
        return
    if all(sch.get(sch.get_loops(block)[-1]).same_as(sch.get(innermost)) and _light(sch, block, CHEAP_CALLS) for block in blocks):
        sch.unroll(innermost)


#: Floats in a 128-bit vector (SSE, NEON): "channel_rows" prefers rows of a multiple of it, which
#: gcc -O2 vectorises without a scalar tail loop (its -O2 cost model adds none: a row of 50 stays scalar).
VECTOR_LANES = 4


#: Most elements of a reduction's row in "channel_rows" schedules (a dense layer's 100 outputs in one row).
VECTOR_ROW_MAX = 128


def _row_split(extent: int, lanes: int = 1, longest: int = ROW_MAX) -> int:
    """Row length for a loop longer than ``longest``: a divisor of it if one is at least
    ROW_ELEMENTS (no tail, so no bounds test in the row loop), the longest that is a multiple of
    ``lanes`` if any, else ``longest``."""
    divisors = [f for f in range(longest, ROW_ELEMENTS - 1, -1) if extent % f == 0]
    return next((f for f in divisors if f % lanes == 0), divisors[0] if divisors else longest)


def _distinct_nests(sch, blocks):
    """One block per loop nest (the outputs of a multi-output stage share theirs)."""
    first, seen = [], []
    for block in blocks:
        outermost = sch.get_loops(block)[0]
        if not any(sch.get(outermost).same_as(sch.get(done)) for done in seen):
            seen.append(outermost)
            first.append(block)
    return first


def _one_nest(sch, blocks):
    """Sibling loop nests of element-wise blocks over one shape merged into one."""
    innermost = []
    for block in blocks:
        loop = sch.get_loops(block)[-1]
        if not any(sch.get(loop).same_as(sch.get(seen)) for seen in innermost):
            innermost.append(loop)
    if len(innermost) > 1:
        sch.merge(*innermost)


def _downstream(sch, root, block, placed=()):
    """The blocks that read ``block``'s results, directly or not, in program order, and the
    element-wise blocks (not yet ``placed``) they also read: those move under the reduction's
    loops with them (a ReLU of matmul + stochastic bias reads s = sqrt(bias variance), which does
    not depend on the matmul but must be computed inside its loop nest all the same)."""
    names, frontier = set(), [block]
    while frontier:
        for consumer in sch.get_consumers(frontier.pop()):
            if sch.get(consumer).name_hint not in names:
                names.add(sch.get(consumer).name_hint)
                frontier.append(consumer)
    own = sch.get(block).name_hint
    frontier = [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint in names]
    while frontier:
        for producer in sch.get_producers(frontier.pop()):
            name = sch.get(producer).name_hint
            if name != own and name not in names and name not in placed and not _is_reduction(sch, producer):
                names.add(name)
                frontier.append(producer)
    return [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint in names]
