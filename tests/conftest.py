"""Fixtures shared by the test files: one finished tiny run folder per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from badinput import SMALL
from pipeline.run import cli
from tiny import tiny_overrides


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A complete tiny run folder: dataset, 2 checkpoints (steps 2 and 4), predictions, submission, score, report."""
    run = tmp_path_factory.mktemp("base") / "run"
    argv = ["--stage", "all", "--preset", "demo", "--out", str(run), *SMALL,
            *tiny_overrides(max_steps=4, checkpoint_every=2), "--set", "predict.max_variants=2"]
    assert cli(argv) == 0
    return run


