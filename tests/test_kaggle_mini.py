"""benchmarks/kaggle_mini.py's arithmetic: the split it pretrains and hides, the gap a fine-tune closes against
joint training read at equal total FLOPs, and the budget table over seeds (synthetic results; the benchmark's
runs themselves are in docs/KAGGLE_BENCHMARK.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kaggle_mini as km  # noqa: E402


def test_the_split_hides_the_dev_tasks_from_pretraining(tmp_path):
    km.prepare(tmp_path)
    pretrain = json.loads((tmp_path / "tasks" / "pretrain_challenges.json").read_text())
    dev = json.loads((tmp_path / "tasks" / "dev_challenges.json").read_text())
    hidden = json.loads((tmp_path / "input" / "arc-prize-2025" / "arc-agi_test_challenges.json").read_text())
    assert (len(pretrain), len(dev)) == (133, 45) and not set(pretrain) & set(dev)
    assert hidden == dev and all("output" not in t for task in hidden.values() for t in task["test"])
    answers = json.loads((tmp_path / "input" / "arc-prize-2025" / "arc-agi_evaluation_solutions.json").read_text())
    assert sum(map(len, answers.values())) == 49


def _arm(name, seed, curve, no_finetune=False):
    return {"name": name, "seed": seed, "settings": [], "no_finetune": no_finetune, "pretrain_flops": 100.0,
            "ft_flops": curve[-1]["flops"] if curve else 0.0, "steps": len(curve), "ce_true": curve[-1]["ce_true"]
            if curve else 1.6, "cell_acc_true": 0.5, "pass2": 0.0, "task_pass2": 0.0, "answers": {}, "wall_s": 1.0,
            "curve": curve, "command": "python benchmarks/kaggle_mini.py arm"}


def test_gap_closed_reads_joint_training_at_equal_total_flops(tmp_path):
    assert km.gap_closed(1.6, 1.2, 1.3) == pytest.approx(0.75)
    assert km.gap_closed(1.6, 1.6, 1.3) is None and km.gap_closed(None, 1.2, 1.3) is None
    joint = {"run": "joint_s0", "curve": [{"flops": 100.0, "ce_true": 1.3, "task_pass2": 0.0},
                                          {"flops": 140.0, "ce_true": 1.1, "task_pass2": 0.0}]}
    assert km._interp(joint["curve"], 120.0) == pytest.approx(1.2)
    assert km._interp(joint["curve"], 200.0) is None  # never extrapolated
    results = tmp_path / "results"
    results.mkdir()
    (results / "joint_joint_s0.json").write_text(json.dumps(joint))
    (results / "no-finetune_s0.json").write_text(json.dumps(_arm("no-finetune", 0, [], no_finetune=True)))
    for seed, ce in ((0, 1.3), (1, 1.5)):  # 20 FLOPs of fine-tuning: joint at 120 -> 1.2; gap 0.4
        (results / f"tuned_s{seed}.json").write_text(json.dumps(_arm("tuned", seed, [
            {"step": 1, "flops": 20.0, "ce_true": ce, "cell_acc_true": 0.5}])))
    text = km.tables(tmp_path)
    assert "| tuned | 0 | (kaggle preset) | 1 | 0.00 T (20%) | 1.300 | 1.200 | 75% |" in text
    assert "| tuned | 0, 1 | 20% | 1 | 1.400 (1.300–1.500) | 1.200 | 50% (25–75%) |" in text


def test_an_arms_settings_name_its_driver_settings_and_its_clock():
    arm = {**_arm("split", 0, []), "settings": ["data.num_aug=1"], "params": {"train_fraction": "0.5"},
           "time_bounded": True, "budget_s": 600.0}
    assert km._settings(arm) == "data.num_aug=1 train_fraction=0.5 clock 600 s"
    nearest = {**_arm("nearest", 0, []), "settings": ["new_rows=nearest"], "params": {"bundle": "/x/bundle_rows/b"}}
    assert km._settings(nearest) == "new_rows=nearest bundle=(rows bundle)"
    assert km._settings(_arm("kaggle", 0, [])) == "(kaggle preset)"
    plan = {"steps": 81, "lr": 1e-3, "ema_rate": 0.990123, "lr_warmup_steps": 10, "train_variants": 2,
            "steps_by_time": 0, "seconds_per_step": 0.0}
    assert km._settings({**_arm("planned", 0, []), "plan": plan}) == "(plan: 2 variants, lr 0.001, EMA 0.9901, warm-up 10)"
    plan.update(steps_by_time=81, steps_bound=9000, seconds_per_step=1.234)
    assert km._settings({**_arm("planned", 0, []), "plan": plan}).endswith(", 81 steps at 1.23 s a step probed)")


def test_the_new_rows_start_counts_into_the_arms_compute(tmp_path):
    """new_rows=nearest spends FLOPs before fine-tuning: joint training is read at pretraining + fine-tune + start."""
    assert km.start_flops({"new_rows": "nearest of 33 candidates ...; 2970 rows scored, 20.000 TFLOP, 49 s"}) == 2e13
    assert km.start_flops({"new_rows": "new puzzle rows at zero"}) == km.start_flops({}) == 0.0
    results = tmp_path / "results"
    results.mkdir()
    joint = {"run": "joint_s0", "curve": [{"flops": 100.0, "ce_true": 1.3, "task_pass2": 0.0},
                                          {"flops": 140.0, "ce_true": 1.1, "task_pass2": 0.0}]}
    (results / "joint_joint_s0.json").write_text(json.dumps(joint))
    (results / "no-finetune_s0.json").write_text(json.dumps(_arm("no-finetune", 0, [], no_finetune=True)))
    near = {**_arm("near", 0, [{"step": 1, "flops": 10.0, "ce_true": 1.3, "cell_acc_true": 0.5}]),
            "new_rows": "nearest ..., 1e-11 TFLOP, 1 s"}  # 10 FLOPs of start: joint read at 100 + 10 + 10
    (results / "near_s0.json").write_text(json.dumps(near))
    assert "| near | 0 | (kaggle preset) | 1 | 0.00 T (10%) + 0.00 T start (10%) | 1.300 | 1.200 | 75% |" in km.tables(tmp_path)
