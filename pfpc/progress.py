"""Which step pfpc is in: named in internal-error messages, and shown on a terminal for any step
that takes longer than about two seconds."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

current = ["starting"]  # the step running now, for the CLI's internal-error line
_DELAY = 2.0


@contextlib.contextmanager
def step(name: str, show: bool | None = None):
    """Run a step called ``name``; on a terminal (``show`` None) or when ``show``, announce it
    once it has run for two seconds and report its time when it ends."""
    previous, current[0] = current[0], name
    if show is None:
        show = _show
    started, announced = time.monotonic(), []

    def announce():
        announced.append(True)
        print(f"pfpc: {name} ...", file=sys.stderr, flush=True)

    timer = threading.Timer(_DELAY, announce) if show else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    failed = True
    try:
        yield
        failed = False
    finally:
        if timer is not None:
            timer.cancel()
            if announced and not failed:
                print(f"pfpc: {name}: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        if not failed:
            current[0] = previous


_show = False


def show_on_terminal() -> None:
    """The CLI shows progress when its stderr is a terminal."""
    global _show
    _show = sys.stderr.isatty()
