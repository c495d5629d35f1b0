"""A time window for the stages the driver runs in its own process (augment, submit): the child stages have
theirs from their timeouts (pipeline.kaggle_driver.child), these from an interval timer, so that a pathological
input cannot eat the budget of the stages after them."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class WindowExceeded(RuntimeError):
    """A stage run in the driver's process did not end within its window (the stage fails; the fallback stays)."""


@contextmanager
def time_window(seconds: float, name: str) -> Iterator[None]:
    """Run the body for at most `seconds`: then WindowExceeded is raised in it (SIGALRM, on the main thread, where
    the notebook runs; elsewhere signals cannot be handled and the body runs unbounded). The body's own `finally`
    clauses run, so locks and temp files are let go as on any error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise WindowExceeded(f"{name}: no end within its window of {seconds:.0f} s; stopped")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
