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


