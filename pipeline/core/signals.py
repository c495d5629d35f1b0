"""Stop requests: SIGTERM asks a long stage to save what it has and exit, instead of losing it.

A scheduler, `torchrun` or the Kaggle driver (at a stage's timeout) sends SIGTERM and SIGKILLs a little later.
Python's default is to die at once, losing every step since the last checkpoint. Inside `stop_on_sigterm()` the
signal only sets a flag; the training and prediction loops read `stop_requested()` between steps or batches, save
(a resumable checkpoint; the candidates so far), and then raise `Stopped`, so that the process still ends as one
stopped by the signal (exit status 128 + 15) and a chain of stages does not go on to the next one.

The flag is per process: with several processes every one of them is signalled (the driver signals each worker),
and the loops agree on the step to stop at through a collective (pipeline.training.train).
"""
from __future__ import annotations

import functools
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

_requested: int | None = None  # the signal number received inside stop_on_sigterm(), else None
_depth = 0  # nesting of stop_on_sigterm(): only the outermost installs and restores the handler

F = TypeVar("F", bound=Callable[..., Any])


class Stopped(SystemExit):
    """Raised once everything is saved after a stop request: exit status 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


def stop_requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _requested


def _remember(signum: int, frame: Any) -> None:
    global _requested
    _requested = signum


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM sets the stop flag instead of killing the process (main thread only: elsewhere
    signal handlers cannot be installed, and the default stays)."""
    global _depth, _requested
    outermost = _depth == 0 and threading.current_thread() is threading.main_thread()
    previous = None
    if outermost:
        _requested = None
        previous = signal.signal(signal.SIGTERM, _remember)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if outermost:
            signal.signal(signal.SIGTERM, previous)
            _requested = None


def stoppable(function: F) -> F:
    """Run `function` inside stop_on_sigterm()."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stop_on_sigterm():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
