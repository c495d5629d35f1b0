"""Fixtures shared by the test files: one finished tiny run folder per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.run import cli
from tiny import base_run_args


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A complete tiny run folder: dataset, 2 checkpoints (steps 2 and 4), predictions, submission, score, report."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert cli(base_run_args(run)) == 0
    return run




def pytest_configure(config) -> None:
    """Under pytest-xdist each worker (and every child process a test starts) computes on one thread: the workers
    share the machine's cores, and two torch thread pools per core slow everything down."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): one worker per core, at most 4 (each imports torch and builds its own session
    fixtures; past 4 the suite's longest tests, not the core count, set its time)."""
    import os

    return max(1, min(4, len(os.sched_getaffinity(0))))
