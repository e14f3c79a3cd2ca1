"""The arena plan: tensors that are live at the same step never share bytes."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from pfpc.codegen.memory_plan import ALIGN, Interval, lower_bound, plan

intervals = st.lists(
    st.tuples(st.integers(1, 5000), st.integers(0, 20), st.integers(0, 6)), min_size=1, max_size=25
)


@settings(max_examples=200, deadline=None)
@given(intervals)
def test_live_tensors_never_overlap(raw):
    items = [Interval(f"t{i}", size, start, start + length) for i, (size, start, length) in enumerate(raw)]
    arena = plan(items)
    for item in items:
        assert item.offset % ALIGN == 0 and item.offset + item.size <= arena
    for a in items:
        for b in items:
            if a is b or a.end < b.start or b.end < a.start:
                continue
            assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
    assert arena >= lower_bound(items)


def test_disjoint_lifetimes_share_memory():
    items = [Interval("a", 1024, 0, 1), Interval("b", 1024, 2, 3), Interval("c", 512, 1, 2)]
    assert plan(items) == 1024 + 512
    assert items[0].offset == items[1].offset


def test_lenet_arena_reaches_the_lower_bound():
    """LeNet-5's PFP buffers (bytes, write step, last read step): largest-first first-fit needs
    4,544 bytes, placing them in the order they are written 4,160; the order search finds a plan
    at the lower bound, 3,840 (the conv1 outputs at the bottom, the max-pool outputs above them)."""
    lenet = [(400, 0, 1), (1536, 1, 2), (1536, 1, 2), (384, 2, 3), (384, 2, 3), (864, 3, 4), (864, 3, 4),
             (1024, 4, 5), (1024, 4, 5), (256, 5, 6), (256, 5, 6), (128, 6, 7), (128, 6, 7)]
    items = [Interval(f"t{i}", size, start, end) for i, (size, start, end) in enumerate(lenet)]
    assert lower_bound(items) == 3840
    assert plan(items) == 3840


def _first_fit_arena(ordered):
    """First-fit written out plainly: each tensor at the lowest multiple of ALIGN that clears every
    tensor placed before it and live at the same time."""
    placed = []
    for size, start, end in ordered:
        offset = 0
        while any(start <= e and s <= end and offset < o + z and o < offset + size for o, z, s, e in placed):
            offset += ALIGN
        placed.append((offset, size, start, end))
    return max(-(-(o + z) // ALIGN) * ALIGN for o, z, _, _ in placed)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40).map(lambda k: 16 * k), st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=6))
def test_small_plans_are_the_best_first_fit_order(raw):
    """Up to six tensors: the plan is as small as first-fit in the best of all orders (every order
    tried by the plain first-fit above), which includes an optimal plan."""
    triples = [(size, start, start + length) for size, start, length in raw]
    items = [Interval(f"t{i}", size, start, end) for i, (size, start, end) in enumerate(triples)]
    assert plan(items) == min(_first_fit_arena(order) for order in itertools.permutations(triples))


def test_large_networks_plan_without_deep_search():
    """A network of 1,200 buffers (a chain, each read by the next two steps) is planned with the
    heuristic orders only, never one recursion level per tensor; the plan is valid and, here, at
    the lower bound."""
    items = [Interval(f"t{i}", 256 * (1 + i % 7), i, i + 2) for i in range(1200)]
    arena = plan(items)
    for gap in (1, 2):  # the buffers live at the same time as a buffer i
        for a, b in zip(items, items[gap:]):
            assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
    assert arena == lower_bound(items)


def test_tensor_written_in_place_takes_over_its_operand():
    """``reuses``: an output written in place over an operand that dies at that step gets the
    operand's offset, so the step needs one buffer for both (a residual sum); the lower bound
    counts them once."""
    items = [Interval("x", 1024, 0, 2), Interval("h", 1024, 1, 2), Interval("y", 1024, 2, 3, reuses="x"), Interval("z", 512, 3, 3)]
    assert plan(items) == 2048 and lower_bound(items) == 2048
    assert items[2].offset == items[0].offset != items[1].offset
    without = [Interval(i.name, i.size, i.start, i.end) for i in items]
    assert lower_bound(without) == 3072
    try:
        plan([Interval("x", 1024, 0, 1), Interval("y", 512, 1, 2, reuses="x")])
    except ValueError as err:
        assert "cannot take over" in str(err)
    else:
        raise AssertionError("a reuse of another size was accepted")
