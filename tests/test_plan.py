"""The plan: the paper presets' step counts match the reference's formula, and planning never trains."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import PAPER_BUCKETS, apply_overrides, preset
from pipeline.cli.plan import make_plan
from pipeline.model.flops import model_flops_per_row_step
from pipeline.run import main
from tiny import build_tiny_dataset, tiny_config


@pytest.mark.parametrize("name, steps, tolerance, groups, ratio", [
    ("arc1", 518_226, 0.01, 960, 0.32),  # the reference's ARC-AGI-1 command: 800 tasks + 160 ConceptARC
    ("arc2", 722_098, 0.02, 1280, 0.36),  # ARC-AGI-2 (the paper's version) 1000 + 120 + ConceptARC 160
])
def test_paper_presets_plan_the_reference_step_count(tmp_path: Path, name: str, steps: int, tolerance: float,
                                                     groups: int, ratio: float):
    assert main(["--stage", "augment", "--preset", name, "--out", str(tmp_path), "--quiet"]) == 0
    plan = make_plan(preset(name), tmp_path / "dataset", time_steps_n=0, preset_name=name)
    assert plan["groups"] == groups and plan["sampling"] == "groups" and plan["translation"] == "reference"
    assert abs(plan["total_steps"] - steps) <= tolerance * steps
    for interval in ("checkpoint_every", "eval_every"):  # every 10,000 of 100,000 epochs: a tenth of the run
        assert plan[interval] == plan["total_steps"] // 10
    assert plan["evaluations"] == 10 and plan["warmup_steps"] == 2000
    assert plan["model_flops_per_step"] == pytest.approx(768 * model_flops_per_row_step(preset(name).model))
    # canvas buckets (docs/BUCKETS.md): the same steps, at most half the tokens and FLOPs per step
    bucketed = make_plan(apply_overrides(preset(name), [f"data.canvas_buckets={PAPER_BUCKETS}"]), tmp_path / "dataset",
                         time_steps_n=0)
    assert bucketed["total_steps"] == plan["total_steps"] and plan["tokens_per_step"] == 768 * 916
    assert bucketed["tokens_per_step"] / plan["tokens_per_step"] == pytest.approx(ratio, abs=0.005)
    assert bucketed["model_flops_per_step"] < 0.5 * bucketed["model_flops_per_step_full_canvas"]
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text() + (root / "docs" / "RECIPES.md").read_text()
    assert f"{plan['total_steps']:,}" in readme and f"{plan['eval_every']:,}" in readme  # the recipe's table
    paper, fast = plan["recipes"][name], plan["recipes"][f"{name}-fast"]  # both recipes, on the same tasks
    assert paper["model_flops_total"] == pytest.approx(plan["model_flops_total"])
    assert paper["total_steps"] == plan["total_steps"] and paper["prediction_flops"] == plan["prediction_flops"] > 0
    assert fast["model_flops_total"] < paper["model_flops_total"]
    if name == "arc1":  # the fine-tune example names the run's final checkpoint
        assert f"runs/arc1/checkpoints/step_{plan['total_steps']:08d}.pt" in readme


def test_plan_stage_times_steps_and_trains_nothing(tmp_path: Path):
    data = build_tiny_dataset(tmp_path / "dataset")
    cfg = tiny_config()
    plan = make_plan(cfg, data, time_steps_n=1)
    timing = plan["timing"]
    assert timing["seconds_per_step"] > 0 and timing["estimated_hours"] > 0 and timing["processes"] == 1
    assert plan["total_steps"] == cfg.max_steps
    assert plan["prediction_flops"] > 0 and plan["recipes"] == {}  # no preset named: no recipe pair
    assert not (tmp_path / "checkpoints").exists()

    with_sampling = apply_overrides(tiny_config(max_steps=0), ["epochs=10", "data.sampling=examples"])
    by_examples = make_plan(with_sampling, data, time_steps_n=0)
    assert by_examples["examples_per_epoch"] == by_examples["train_examples"]
    assert by_examples["total_steps"] == int(10 * by_examples["train_examples"] / with_sampling.global_batch_size)
