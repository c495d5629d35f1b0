"""Fixtures shared by the test files: one finished tiny run folder and one tiny run trained by 2 processes per
session, each built once however many pytest-xdist workers use it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from pipeline.run import cli
from tiny import TORCHRUN, TWO_PROCESS_SETTINGS, base_run_args, free_port

ROOT = Path(__file__).resolve().parents[1]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder NAME, built by `build(folder)` once per test session: under pytest-xdist the first worker to ask
    builds it (under a file lock) in the session's temporary folder, which every worker shares, and the others wait
    for it and reuse it (filelock comes with torch). Whoever uses it reads it and copies what it would change; a
    build that failed is started again from nothing by the next to ask."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # above the workers' own folders
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            done.write_text("")
    return folder


@pytest.fixture(scope="session")
def build_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """built_once for a module's fixtures: `build_once(name, build)`."""
    return lambda name, build: built_once(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A complete tiny run folder: dataset, 2 checkpoints (steps 2 and 4), predictions, submission, score, report."""
    def build(folder: Path) -> None:
        assert cli(base_run_args(folder / "run")) == 0

    return built_once(tmp_path_factory, "base", build) / "run"


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory) -> Path:
    """A tiny run folder trained by torchrun as 1 node x 2 processes (tiny.TWO_PROCESS_SETTINGS: 6 steps,
    checkpoints at steps 3 and 6, the final evaluation) on the dataset `--stage augment --preset demo` builds from
    badinput.SMALL: what 1 process must equal (test_train.py) and 2 nodes must equal bit for bit (test_multinode.py)."""
    from badinput import SMALL

    def build(folder: Path) -> None:
        run = folder / "run"
        assert cli(["--stage", "augment", "--preset", "demo", "--out", str(run), *SMALL]) == 0
        done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port",
                               str(free_port()), "-m", "pipeline.run", "--stage", "train", "--out", str(run), "--quiet",
                               *TWO_PROCESS_SETTINGS], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (run / "train.log").write_text(done.stdout + done.stderr)

    return built_once(tmp_path_factory, "two_process", build) / "run"




def pytest_configure(config) -> None:
    """Under pytest-xdist each worker (and every child process a test starts) computes on one thread: the workers
    share the machine's cores, and two torch thread pools per core slow everything down."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_finish(session) -> None:
    """The objects that importing torch and the test files made (~190k) live as long as this process: frozen, the
    garbage collector stops walking them in every full collection; and it runs every 10,000 allocations instead of
    700. Three in-process test files spent 9.4 s of 21 s collecting garbage, 2 s after (docs/BENCHMARKS.md)."""
    import gc

    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


# The files whose tests take the most time (child processes: torchrun, the notebook's kernel and stages),
# heaviest first by a per-test CPU profile of the suite. Under `--dist loadfile` (pyproject.toml) each file runs
# on one worker (its module fixtures built once) and a worker takes the next file when it is almost done with
# one: these go first, so that the light files fill in around them and no worker is left with a long one at the end.
HEAVY_FILES_FIRST = ("test_multinode.py", "test_kaggle.py", "test_train.py", "test_stop_signals.py", "test_cli.py",
                     "test_kaggle_driver.py", "test_plan.py", "test_bad_inputs.py", "test_tracking.py",
                     "test_gpu_check.py")


def pytest_collection_modifyitems(config, items) -> None:
    """HEAVY_FILES_FIRST, then the other files in their usual order (the order inside a file is kept)."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): one worker per core, at most 4 (each imports torch and builds its own session
    fixtures; past 4 the suite's longest tests, not the core count, set its time)."""
    import os

    return max(1, min(4, len(os.sched_getaffinity(0))))
