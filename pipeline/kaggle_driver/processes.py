"""A child process and everything it started, found through /proc, so that all of it can be stopped.

torchrun starts every worker in a session of its own (its elastic agent passes start_new_session=True), so the
child's process group does not reach the workers, and a worker whose launcher died is re-parented away from our
child. `ProcessTree` therefore remembers every process it has seen below the child, with its start time (so that
a re-used pid is never taken for one of ours), and is refreshed while the child runs. Stopping is two steps:
SIGTERM to the processes that do the work (they save what they have: pipeline.core.signals), then, after a grace
period, SIGKILL to the whole tree, frozen first with SIGSTOP so that nothing can start a new process in between.

Linux only (/proc); elsewhere the child's process group is signalled instead (what start_new_session gives).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

HAS_PROC = Path("/proc/self/stat").exists()


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state letter, start time in clock ticks) of a live process; None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = text[text.rindex(")") + 2:].split()  # fields 3.. (the command name may hold spaces and parentheses)
    state, parent, start = rest[0], int(rest[1]), int(rest[19])
    return None if state in ("Z", "X") else (parent, state, start)


def is_running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has)."""
    return _stat(pid) is not None


def _all_processes() -> dict[int, tuple[int, str, int]]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                found[int(name)] = stat
    return found


class ProcessTree:
    """The child `root` and every process seen below it (module docstring)."""

    def __init__(self, root: int):
        self.root = root
        stat = _stat(root) if HAS_PROC else None
        self.known: dict[int, int] = {root: stat[2]} if stat is not None else {}  # pid -> start time

    def refresh(self) -> None:
        """Add every live process whose parent is a known live process (repeated down the generations)."""
        if not HAS_PROC:
            return
        table = _all_processes()
        alive = {pid for pid, start in self.known.items() if pid in table and table[pid][2] == start}
        added = True
        while added:
            added = False
            for pid, (parent, _, start) in table.items():
                if parent in alive and pid not in alive:
                    alive.add(pid)
                    self.known[pid] = start
                    added = True

    def alive(self) -> list[int]:
        """The known processes still running (not the ones that ended, nor a stranger that got a re-used pid)."""
        out = []
        for pid, start in self.known.items():
            stat = _stat(pid)
            if stat is not None and stat[2] == start:
                out.append(pid)
        return out

    def workers(self) -> list[int]:
        """The live processes below the root (torchrun's workers and their children)."""
        self.refresh()
        return [pid for pid in self.alive() if pid != self.root]

    def signal(self, sig: int, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def terminate(self, launcher: bool) -> None:
        """SIGTERM to the processes that do the work: a launcher's workers (the launcher itself would start its own
        30 s shutdown of them), else the child itself."""
        if not HAS_PROC:
            self._signal_group(signal.SIGTERM)
            return
        workers = self.workers() if launcher else []
        self.signal(signal.SIGTERM, workers or [self.root])

    def kill(self) -> None:
        """SIGKILL every live process of the tree: frozen first (SIGSTOP), looked up again until no new one
        appears, then killed."""
        if not HAS_PROC:
            self._signal_group(signal.SIGKILL)
            return
        stopped: set[int] = set()
        for _ in range(10):  # a fork bomb could go on; ten rounds catch any real launcher
            self.refresh()
            fresh = [pid for pid in self.alive() if pid not in stopped]
            if not fresh:
                break
            self.signal(signal.SIGSTOP, fresh)
            stopped.update(fresh)
        self.signal(signal.SIGKILL, self.alive())

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.root, sig)  # start_new_session: the child's pid is its group id
        except (ProcessLookupError, PermissionError):
            pass
