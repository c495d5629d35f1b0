"""Run one stage in a child process: its output echoed live (and into a log file), a hard timeout, and nothing of
it left running afterwards, whether it ended by itself, at its timeout, or because the notebook was interrupted.

The child and everything it started are found through /proc, so that all of it can be stopped. torchrun starts
every worker in a session of its own (its elastic agent passes start_new_session=True), so the child's process
group does not reach the workers, and a worker whose launcher died is re-parented away from our child.
`ProcessTree` therefore remembers every process it has seen below the child, with its start time (so that a re-used
pid is never taken for one of ours), and is refreshed while the child runs. Stopping is two steps: SIGTERM to the
processes that do the work (they save what they have: pipeline.core.signals), then, after a grace period, SIGKILL
to the whole tree, frozen first with SIGSTOP so that nothing can start a new process in between.

Linux only (/proc); elsewhere the child's process group is signalled instead (what start_new_session gives).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.kaggle_driver.log import log

POLL_S = 1.0  # how often the process tree is looked up while the child runs
TAIL_BYTES = 1 << 16


# ---------------------------------------------------------------------------- the process tree, through /proc
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


# --------------------------------------------------------------------------------------------------- the child
@dataclass
class ChildResult:
    returncode: int | None
    timed_out: bool
    seconds: float
    tail: str = ""  # the last 64 kB of its output (what went wrong is at the end)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def launch_command(num_processes: int, args: Sequence[str], module: str = "pipeline.run") -> list[str]:
    """`python -m pipeline.run ARGS`, through torchrun with one process per GPU when there are several."""
    if num_processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
                "-m", module, *args]
    return [sys.executable, "-m", module, *args]


class _Output:
    """Pumps the child's output to our stdout, a log file and a tail buffer, on a thread of its own."""

    def __init__(self, proc: subprocess.Popen, log_path: Path | None):
        self.proc, self.tail = proc, bytearray()
        self.file = open(log_path, "ab") if log_path is not None else None
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:  # raw chunks, not lines: tqdm's \r updates must pass through
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(TAIL_BYTES), b""):
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
            if self.file is not None:
                self.file.write(chunk)
            self.tail.extend(chunk)
            del self.tail[:-TAIL_BYTES]

    def close(self, join_s: float) -> str:
        self.thread.join(timeout=join_s)
        if self.file is not None:
            self.file.close()
        return self.tail.decode("utf-8", errors="replace")


def _wait(proc: subprocess.Popen, tree: ProcessTree, seconds: float) -> bool:
    """Wait up to `seconds` for the child to end, looking up its process tree meanwhile; True if it ended."""
    end = time.monotonic() + max(seconds, 0.0)
    while True:
        tree.refresh()
        try:
            proc.wait(timeout=max(0.0, min(POLL_S, end - time.monotonic())))
            return True
        except subprocess.TimeoutExpired:
            if time.monotonic() >= end:
                return False


def _stop(proc: subprocess.Popen, tree: ProcessTree, grace_s: float, launcher: bool) -> None:
    """SIGTERM to the working processes, then SIGKILL to the whole tree after grace_s (at once on a second
    interrupt)."""
    tree.terminate(launcher)
    try:
        _wait(proc, tree, grace_s)
    finally:
        tree.kill()
        proc.wait()


def run_child(cmd: Sequence[str], timeout_s: float, *, cwd: Path, env: Mapping[str, str] | None = None,
              log_path: Path | None = None, grace_s: float = 30.0, join_s: float = 5.0, name: str = "child",
              launcher: bool = False) -> ChildResult:
    """Run `cmd`, echoing its output live (and into log_path). At timeout_s, or on KeyboardInterrupt (which is
    raised again afterwards): SIGTERM, SIGKILL grace_s later (ProcessTree). Any process of
    the tree still alive when the child ends is killed. `launcher`: cmd is torchrun, whose workers do the work.
    Ends within timeout_s + grace_s + join_s (the budget's window)."""
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"env": dict(env)} if env is not None else {}
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **kwargs)
    tree = ProcessTree(proc.pid)
    output = _Output(proc, log_path)
    timed_out = False
    try:
        if not _wait(proc, tree, timeout_s):
            timed_out = True
            log(f"{name}: no end after {timeout_s:.0f} s, stopping it (SIGTERM, SIGKILL {grace_s:.0f} s later)")
            _stop(proc, tree, grace_s, launcher)
    except BaseException:  # KeyboardInterrupt: the notebook was interrupted; leave nothing running
        log(f"{name}: interrupted, stopping it (SIGTERM, SIGKILL {grace_s:.0f} s later; interrupt again to kill now)")
        _stop(proc, tree, grace_s, launcher)
        raise
    finally:
        tree.kill()  # whatever outlived the child (a worker whose launcher died)
        tail = output.close(join_s)
    return ChildResult(proc.returncode, timed_out, time.perf_counter() - start, tail)
