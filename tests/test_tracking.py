"""Experiment trackers: what a tiny run logs to TensorBoard / W&B (offline) is what it writes to metrics.jsonl."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.tracking import flat_hyperparameters, tracker_names, tracker_values
from tiny import build_tiny_dataset, tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "dataset")


def _train_with(log_with: str, data: Path, out: Path, **settings) -> list[dict]:
    """A tiny run with held-out evaluations; its metrics.jsonl rows."""
    from augment.dataset import AugmentedDataset
    from pipeline.cli.evaluate import HeldOutEvaluator
    from pipeline.training.train import train

    cfg = tiny_config(log_with=log_with, max_steps=6, eval_every=3, eval_views=2, **settings)
    evaluator = HeldOutEvaluator.for_dataset(AugmentedDataset.load(data), cfg.eval_views)
    train(cfg, data, out, progress=False, evaluator=evaluator)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in tracker_values(row).items():
            expected.setdefault(name, []).append((row["step"], value))
    return expected


def test_tracker_values_forward_every_numeric_column_under_its_kind():
    row = {"kind": "eval", "step": 8, "pass2": 0.5, "tasks": 3, "ok": True, "selector": "vote",
           "flops": 1.5e12, "per_bucket": {"small": 0.25}}
    assert tracker_values(row) == {"eval/pass2": 0.5, "eval/tasks": 3.0, "eval/flops": 1.5e12,
                                   "eval/per_bucket/small": 0.25}
    assert flat_hyperparameters({"lr": 1e-3, "model": {"hidden_size": 32, "mlp_t": False}, "x": None}) == {
        "lr": 1e-3, "model.hidden_size": 32, "model.mlp_t": False, "x": "null"}


def test_unknown_or_missing_tracker_is_one_config_error(monkeypatch):
    assert tracker_names("") == [] and tracker_names(" , ") == []
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        tracker_names("tensorboard,mlflow")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'trm-arc\[wandb\]'"):
        tracker_names("wandb")


def test_missing_tracker_package_stops_the_command_with_one_error_line(tiny_data, tmp_path, monkeypatch, capsys):
    from pipeline.run import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code = cli(["--stage", "train", "--preset", "demo", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                "--quiet", "--set", "log_with=tensorboard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --set log_with: the tensorboard package") and "trm-arc[tensorboard]" in err[0]
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_match_metrics_jsonl(tiny_data, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install '.[test]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _train_with("tensorboard", tiny_data, tmp_path / "run")
    assert {r["kind"] for r in rows} == {"train", "eval"}
    logdir = tmp_path / "run" / "tensorboard" / "trm-arc"
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    expected = _expected_scalars(rows)
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in logged] == [s for s, _ in points], name
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-12), name
    hparams = next(logdir.glob("*/hparams.yml")).read_text()  # the resolved config, as Accelerate stores it
    assert "model.hidden_size: 32" in hparams and "log_with: tensorboard" in hparams


def test_wandb_offline_writes_its_run_folder(tiny_data, tmp_path):
    """In a process of its own: W&B keeps the settings of its first start for the whole process, so an earlier
    test's start (without a login, say) must not decide where this offline run writes."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install '.[test]')")
    out = tmp_path / "my-run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pipeline.run", "--stage", "train", "--preset", "demo", "--data", str(tiny_data),
                           "--out", str(out), "--quiet", *tiny_overrides(max_steps=6, eval_every=3, eval_views=2),
                           "--set", "log_with=wandb"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("eval") == 2
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()  # W&B's own record log, synced by `wandb sync`
    for name in _expected_scalars(rows):  # every column of every row went in, under its tracker name
        assert name.encode() in log, name
    assert b"my-run" in log and b"model.hidden_size" in log  # the run's name and its config
