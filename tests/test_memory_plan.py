"""The arena plan: tensors that are live at the same step never share bytes."""

from __future__ import annotations

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
