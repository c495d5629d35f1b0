"""Run one stage in a child process: its output echoed live (and into a log file), a hard timeout, and nothing of
it left running afterwards, whether it ended by itself, at its timeout, or because the notebook was interrupted.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.kaggle_driver.log import log
from pipeline.kaggle_driver.processes import ProcessTree

POLL_S = 1.0  # how often the process tree is looked up while the child runs
TAIL_BYTES = 1 << 16


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
    raised again afterwards): SIGTERM, SIGKILL grace_s later (pipeline.kaggle_driver.processes). Any process of
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
