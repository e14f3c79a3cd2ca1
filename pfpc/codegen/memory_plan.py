"""Static memory plan: every intermediate tensor gets an offset in one arena.

Tensors whose lifetimes (first write .. last read, in kernel steps) overlap never share bytes.
Placement is first-fit (each tensor at the lowest offset free while it lives) in some order: a
few heuristic orders first (largest first, first written first, longest-lived first), then a
depth-first search over orders that keeps the best arena, prunes every partial placement already
as large, skips tensors interchangeable with one tried at the same point, and stops at the lower
bound or after `SEARCH_BUDGET` placements (networks of more than `SEARCH_MAX_TENSORS` buffers keep
the best heuristic order). Some order makes first-fit optimal (place the tensors
of an optimal plan by increasing offset), so on small networks the search is exact; it is
deterministic either way. The lower bound reported beside the arena size is the largest total of
simultaneously live tensors; it is not always reachable.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 16


@dataclass
class Interval:
    name: str
    bytes: int
    start: int  # step that writes it
    end: int  # last step that reads it
    offset: int = -1
    reuses: str = ""  # an interval of the same size ending at ``start`` whose bytes this one takes over (written in place)

    @property
    def size(self) -> int:
        """`bytes`, by its earlier name."""
        return self.bytes


def _align(value: int) -> int:
    return (value + ALIGN - 1) // ALIGN * ALIGN


#: Placement orders tried by `plan` before its search, which starts from the best of them (LeNet's
#: arena: 4,544 bytes largest first, 4,160 first written first; the search finds 3,840, the bound).
ORDERS = (
    lambda i: (-i.bytes, i.start, i.name),
    lambda i: (i.start, -i.bytes, i.name),
    lambda i: (-(i.end - i.start), -i.bytes, i.start, i.name),
)


#: Most first-fit placements the order search makes (0.2 s for 120 tensors whose lower bound it
#: cannot reach), and most tensors it searches at all (one level of recursion per tensor).
SEARCH_BUDGET = 20000
SEARCH_MAX_TENSORS = 300


def plan(intervals: list[Interval]) -> int:
    """Assign ``offset`` to every interval; returns the arena size in bytes. An interval that
    ``reuses`` another gets its offset: the chain is placed as one interval."""
    merged, heads = _merge_reuses(intervals)
    if len(merged) != len(intervals):
        arena = plan(merged)
        for item in intervals:
            item.offset = heads[item.name].offset
        return arena
    best = None
    for order in ORDERS:
        offsets = _first_fit(sorted(intervals, key=order))
        arena = max((_align(offsets[id(i)] + i.bytes) for i in intervals), default=0)
        if best is None or arena < best[0]:
            best = (arena, offsets)
    if len(intervals) <= SEARCH_MAX_TENSORS:
        live = _live_bytes(intervals)
        best = _search(sorted(intervals, key=_busiest_first(live)), best, max(live.values(), default=0))
    for item in intervals:
        item.offset = best[1][id(item)]
    return best[0]


def _live_bytes(intervals: list[Interval]) -> dict:
    """{step: aligned bytes of the tensors live at that step}."""
    live = {}
    for item in intervals:
        for step in range(item.start, item.end + 1):
            live[step] = live.get(step, 0) + _align(item.bytes)
    return live


def _busiest_first(live: dict):
    """Sort key (``live``: `_live_bytes`): the tensors live at the step with the most live bytes
    first (they decide the arena), then by the busiest step of their lifetime, first written, largest."""
    return lambda i: (-max(live[step] for step in range(i.start, i.end + 1)), i.start, -i.bytes, i.name)


def _search(items: list[Interval], best: tuple, bound: int) -> tuple:
    """(arena, offsets) of the best first-fit order found depth first from ``best``, trying the
    remaining tensors in the order of ``items`` at every point."""
    budget = [SEARCH_BUDGET]

    def visit(placed, offsets, remaining, top):
        nonlocal best
        if not remaining:
            best = (top, dict(offsets))
            return
        tried = set()
        for index, item in enumerate(remaining):
            if best[0] <= bound or budget[0] <= 0:
                return
            kind = (item.bytes, item.start, item.end)
            if kind in tried:  # the same placement as a tensor tried here already
                continue
            tried.add(kind)
            budget[0] -= 1
            offset = _lowest_offset(item, placed, offsets)
            end = max(top, _align(offset + item.bytes))
            if end >= best[0]:
                continue
            offsets[id(item)] = offset
            visit(placed + [item], offsets, remaining[:index] + remaining[index + 1 :], end)
            del offsets[id(item)]

    visit([], {}, list(items), 0)
    return best


def _first_fit(ordered: list[Interval]) -> dict:
    """Offsets (by id) of the intervals placed in this order, each at the lowest aligned offset
    where it overlaps no placed interval that is live at the same time."""
    offsets, by_step = {}, {}  # step -> the placed intervals live at it: only those can overlap
    for item in ordered:
        steps = range(item.start, item.end + 1)
        overlapping = list({id(other): other for step in steps for other in by_step.get(step, ())}.values())
        offsets[id(item)] = _lowest_offset(item, overlapping, offsets)
        for step in steps:
            by_step.setdefault(step, []).append(item)
    return offsets


def _lowest_offset(item: Interval, placed: list, offsets: dict) -> int:
    """The lowest aligned offset where ``item`` overlaps no placed interval live at the same time."""
    live = sorted((p for p in placed if not (p.end < item.start or item.end < p.start)), key=lambda p: offsets[id(p)])
    offset = 0
    for other in live:
        if offset + item.bytes <= offsets[id(other)]:
            break
        offset = max(offset, _align(offsets[id(other)] + other.bytes))
    return offset


def _merge_reuses(intervals: list[Interval]) -> tuple[list, dict]:
    """(intervals with every ``reuses`` chain merged into one, {name: the merged interval})."""
    by_name = {i.name: i for i in intervals}
    heads, merged = {}, []

    def head(item):
        while item.reuses and item.reuses in by_name:
            item = by_name[item.reuses]
        return item

    for item in intervals:
        first = head(item)
        if first.name not in heads:
            heads[first.name] = Interval(first.name, first.size, first.start, first.end)
            merged.append(heads[first.name])
        chain = heads[first.name]
        if item.reuses and item.reuses in by_name:
            if by_name[item.reuses].end != item.start or by_name[item.reuses].size != item.size:
                raise ValueError(f"{item.name} cannot take over the bytes of {item.reuses}")
        chain.end = max(chain.end, item.end)
        heads[item.name] = chain
    return merged, heads


def lower_bound(intervals: list[Interval]) -> int:
    """The most bytes live at one step: no plan's arena is smaller (tensors written in place over
    another, ``reuses``, counted once)."""
    return max(_live_bytes(_merge_reuses(intervals)[0]).values(), default=0)
