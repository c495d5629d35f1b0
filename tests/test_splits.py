"""The dev split (pipeline.data.splits) and the `mini` preset that holds it out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from augment.dataset import AugmentedDataset
from pipeline.config import preset
from pipeline.data.tasks import load_tasks, select_tasks
from pipeline.run import main
from pipeline.data.splits import dev_every, dev_split_ids, held_out_ids
from tiny import tiny_overrides


def test_dev_split_is_every_kth_sorted_id():
    ids = ["d", "a", "c", "b", "e"]
    assert dev_split_ids(ids, 2) == {"a", "c", "e"}
    assert dev_split_ids(list(reversed(ids)), 2) == {"a", "c", "e"}  # input order does not matter
    assert dev_every("dev:4") == 4
    for bad in ("dev:", "dev:x", "dev:1"):
        with pytest.raises(ValueError, match="dev:K"):
            dev_every(bad)


def test_held_out_ids_by_rule_source_or_id():
    tasks = select_tasks(load_tasks("arc-agi-1").tasks, max_side=5)
    training = sorted(t.id for t in tasks if t.source == "arc-agi-1/training")
    loads = []

    def load(spec):
        loads.append(spec)
        return load_tasks(spec).tasks

    assert held_out_ids(tasks, "", load) == set()
    assert held_out_ids(tasks, "arc-agi-1/evaluation", load) == {t.id for t in tasks if t.source == "arc-agi-1/evaluation"}
    assert held_out_ids(tasks, "dev:3", load) == set(sorted(t.id for t in tasks)[::3])
    assert held_out_ids([t for t in tasks if t.id in training], "dev:4", load) == set(training[::4])
    assert loads == []  # a rule or a source name needs no loading
    assert held_out_ids(tasks, "arc-agi-1", load) == {t.id for t in tasks}
    assert loads == ["arc-agi-1"]


def test_mini_preset_holds_out_a_quarter_of_small_training_tasks(tmp_path: Path):
    cfg = preset("mini")
    assert cfg.data.sources == "arc-agi-1/training" and cfg.data.eval_set == "dev:4"
    assert cfg.data.canvas == 10 and cfg.data.max_side == 10 and cfg.model.seq_len == 100
    assert (cfg.data.sampling, cfg.data.translation) == ("examples", "reference")  # measured: docs/QUALITY.md
    assert main(["--stage", "augment", "--preset", "mini", "--out", str(tmp_path), "--num-aug", "1", "--quiet"]) == 0
    dataset = AugmentedDataset.load(tmp_path / "dataset")
    ids = sorted(p["task_id"] for p in dataset.puzzles)
    assert len(ids) == 178  # ARC-AGI-1 training tasks with every grid <= 10x10
    assert all(p["source"] == "arc-agi-1/training" for p in dataset.puzzles)  # evaluation never loaded
    held = {p["task_id"] for p in dataset.puzzles if p["is_eval"]}
    assert held == set(ids[::4]) and len(held) == 45
    # --eval-set replaces the rule; the size filter and canvas stay
    out = tmp_path / "other"
    assert main(["--stage", "augment", "--preset", "mini", "--out", str(out), "--num-aug", "1", "--quiet",
                 "--data", "arc-agi-1", "--eval-set", "arc-agi-1/evaluation"]) == 0
    other = AugmentedDataset.load(out / "dataset")
    assert other.canvas == 10
    assert {p["source"] for p in other.puzzles if p["is_eval"]} == {"arc-agi-1/evaluation"}


def test_mini_chain_scores_the_dev_split_from_its_dataset(tmp_path: Path, capsys):
    args = ["--stage", "all", "--preset", "mini", "--out", str(tmp_path), "--num-aug", "2", "--quiet",
            "--set", "data.max_tasks=8", *tiny_overrides(max_steps=4), "--set", "predict.max_variants=3",
            "--set", "predict.rescore_views=2", "--selector", "likelihood"]
    assert main(args) == 0
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["num_tasks"] == 2  # ids 0 and 4 of the 8 sorted training tasks
    assert json.loads((tmp_path / "submission_report.json").read_text())["selector"] == "likelihood"
    out = capsys.readouterr().out
    assert "likelihood_vote" in out  # every selector compared on the same candidates
