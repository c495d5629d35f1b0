"""The machinery of the bad-input tables (tests/test_bad_inputs*.py): a case's workspace, a case, and the runner.

Each case builds its input in a fresh copy of one finished tiny run folder (the session's `base_run`, conftest.py),
runs `pipeline.run` in-process through `cli()`, and asserts the exit status, that stderr holds exactly one `error:`
line naming the file (or setting) and the problem and no traceback, and that nothing under the case's folder
changed, byte for byte (the run folder's lock file aside). Exit-0 rows check what the run reports and writes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from pipeline.run import cli
from pipeline.cli.runfolder import LOCK

SMALL = ["--data", "arc-agi-1/training,arc-agi-1/evaluation", "--set", "data.max_side=6", "--set", "data.max_tasks=3",
         "--canvas", "6", "--num-aug", "2", "--quiet"]
GOOD_TASK = {"train": [{"input": [[1, 0]], "output": [[2, 0]]}], "test": [{"input": [[1, 1]], "output": [[2, 2]]}]}


@dataclass
class Ws:
    """One case's workspace: `root` (a tmp folder) holding `run` (a copy of the base run folder)."""

    root: Path
    run: Path
    monkeypatch: pytest.MonkeyPatch
    held: list = field(default_factory=list)

    def file(self, name: str, content: str | bytes | object) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
        return path

    @property
    def latest(self) -> Path:
        return sorted((self.run / "checkpoints").glob("step_*.pt"))[-1]

    def run_args(self, stage: str, *extra: str) -> list[str]:
        return ["--stage", stage, "--out", str(self.run), "--quiet", *extra]


@dataclass
class Case:
    id: str
    setup: Callable[[Ws], list[str]]  # builds the input, returns argv
    needles: tuple[str, ...] | Callable[[Ws], tuple[str, ...]]  # all must appear in the error line
    rc: int = 2
    check: Callable[[Ws, str, str], None] | None = None  # exit-0 rows: what must hold afterwards (ws, stdout, stderr)
    unchanged: bool = True  # rc 2 rows: nothing under ws.root may change


# ---------------------------------------------------------------------------------------------------- helpers
def task_folder(ws: Ws, files: dict[str, object], name: str = "tasks") -> Path:
    for fname, content in files.items():
        ws.file(f"{name}/{fname}", content)
    return ws.root / name


def augment_new(ws: Ws, source: Path | str, *extra: str) -> list[str]:
    return ["--stage", "augment", "--preset", "demo", "--out", str(ws.root / "new"), "--data", str(source),
            "--quiet", *extra]


def edit_checkpoint(ws: Ws, path: Path, edit: Callable[[dict], None], out: Path | None = None) -> Path:
    state = torch.load(path, weights_only=True)
    edit(state)
    out = out or path
    torch.save(state, out)
    return out


def fake_disk_full(ws: Ws, after_bytes: int = 0, names: tuple[str, ...] = ()) -> None:
    """Every atomic write whose target name contains one of `names` (all, if empty) fails with ENOSPC after
    `after_bytes` bytes, as a full disk does."""
    import pipeline.core.io as pio

    real_fdopen, real_mkstemp = os.fdopen, pio.tempfile.mkstemp
    targets: dict[int, str] = {}

    def mkstemp(*a, **kw):
        fd, path = real_mkstemp(*a, **kw)
        targets[fd] = path
        return fd, path

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *a, **kw):
        f = real_fdopen(fd, *a, **kw)
        name = targets.pop(fd, "")
        return Full(f) if not names or any(n in name for n in names) else f

    ws.monkeypatch.setattr(pio.tempfile, "mkstemp", mkstemp)
    ws.monkeypatch.setattr(pio.os, "fdopen", fdopen)


def submission_of(ws: Ws) -> dict:
    return json.loads((ws.run / "submission.json").read_text())


def truth_of(ws: Ws) -> tuple[str, list]:
    """A task id of the run's submission and its true first test output."""
    from pipeline.data.tasks import load_solutions

    sols = load_solutions("arc-agi-1/evaluation")
    task_id = sorted(submission_of(ws))[0]
    return task_id, sols[task_id][0].tolist()


def snapshot(root: Path) -> dict[str, str]:
    snap = {}
    for p in sorted(root.rglob("*")):
        if p.name == LOCK:
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = f"link to {os.readlink(p)}"
        else:
            snap[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def run_case(case: Case, base_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """One row of a table: copy the base run, build the input, run, check."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    ws = Ws(tmp_path, run, monkeypatch)
    argv = case.setup(ws)
    before = snapshot(tmp_path)
    try:
        rc = cli(argv)
    except SystemExit as e:  # a usage error that argparse handled itself
        rc = e.code
    finally:
        for lock in ws.held:
            lock.release()
        monkeypatch.undo()
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert rc == case.rc, f"exit {rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
    if case.rc == 0:
        assert "error:" not in err, err
        case.check(ws, out, err)
        return
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    needles = case.needles(ws) if callable(case.needles) else case.needles
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    if case.unchanged:
        assert snapshot(tmp_path) == before
    else:  # a failed write leaves no temp file behind
        assert not [p for p in tmp_path.rglob("*.tmp")]




def refingerprint(ws: Ws) -> None:
    """run.json made to agree with the dataset's files as they are now (as if augment had written them), so that a
    case reaches the reader of a broken dataset file rather than the "changed since augment" guard."""
    from pipeline.training.checkpoint import dataset_fingerprint

    marker = json.loads((ws.run / "run.json").read_text())
    marker["dataset_fingerprint"] = dataset_fingerprint(ws.run / "dataset")
    (ws.run / "run.json").write_text(json.dumps(marker))


def edit_json(ws: Ws, name: str, edit: Callable[[object], object]) -> Path:
    """Rewrite the run folder's JSON file `name` with edit(content) (which may change it in place and return None)."""
    path = ws.run / name
    content = json.loads(path.read_text())
    changed = edit(content)
    path.write_text(json.dumps(content if changed is None else changed))
    return path
