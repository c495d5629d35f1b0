"""benchmarks/bench_train_against.py's figure: seconds per step from the growth of wall_s between the first and
the last training row (the first interval, with start-up, left out)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train_against as bta  # noqa: E402


def _metrics(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_step_time_leaves_out_the_first_interval_and_other_rows(tmp_path):
    rows = [{"kind": "train", "step": 10, "wall_s": 9.0},  # 10 steps incl. start-up: 0.9 s each, left out
            {"kind": "eval", "step": 15, "wall_s": 100.0},
            {"kind": "train", "step": 20, "wall_s": 11.0},
            {"kind": "train", "step": 40, "wall_s": 15.0}]
    assert bta.step_seconds(_metrics(tmp_path, rows)) == pytest.approx(0.2)


def test_step_time_needs_two_training_rows(tmp_path):
    with pytest.raises(SystemExit, match="fewer than two training rows"):
        bta.step_seconds(_metrics(tmp_path, [{"kind": "train", "step": 10, "wall_s": 9.0}]))
