"""Static memory plan: every intermediate tensor gets an offset in one arena.

Tensors whose lifetimes (first write .. last read, in kernel steps) overlap never share bytes;
placement is greedy first-fit, largest tensor first, which is deterministic. The lower bound
reported beside the arena size is the largest total of simultaneously live tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 16


@dataclass
class Interval:
    name: str
    size: int  # bytes
    start: int  # step that writes it
    end: int  # last step that reads it
    offset: int = -1


def _align(value: int) -> int:
    return (value + ALIGN - 1) // ALIGN * ALIGN


def plan(intervals: list[Interval]) -> int:
    """Assign ``offset`` to every interval; returns the arena size in bytes."""
    placed: list[Interval] = []
    for item in sorted(intervals, key=lambda i: (-i.size, i.start, i.name)):
        live = sorted(
            (p for p in placed if not (p.end < item.start or item.end < p.start)), key=lambda p: p.offset
        )
        offset = 0
        for other in live:
            if offset + item.size <= other.offset:
                break
            offset = max(offset, _align(other.offset + other.size))
        item.offset = offset
        placed.append(item)
    return max((_align(i.offset + i.size) for i in intervals), default=0)


def lower_bound(intervals: list[Interval]) -> int:
    steps = {i.start for i in intervals} | {i.end for i in intervals}
    return max((sum(_align(i.size) for i in intervals if i.start <= s <= i.end) for s in steps), default=0)
