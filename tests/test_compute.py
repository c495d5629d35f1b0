"""The depth curriculum and the FLOPs plan (pipeline.training.compute), and the trainer's own count of its FLOPs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.model.flops import depth_at
from pipeline.training.compute import run_flops, steps_for_flops
from pipeline.config import preset
from pipeline.model.flops import model_flops_per_row_step
from pipeline.model.trm import ModelConfig
from tiny import build_tiny_dataset, tiny_config


def test_depth_grows_from_one_to_the_models_over_the_curriculum():
    m = ModelConfig(H_cycles=3, L_cycles=4)
    assert depth_at(m, 0.0, 0, 100) is None
    path = [depth_at(m, 0.6, s, 100) for s in range(100)]
    assert path[0] == (1, 1) and path[59] == (3, 4) and path[60] is None and path[-1] is None
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(path[:59], path[1:60]))  # never shallower again
    mini = preset("mini").model
    assert [depth_at(mini, 0.5, s, 8) for s in range(5)] == [(1, 1), (1, 1), (2, 2), (2, 2), None]


def test_run_flops_sums_the_steps_and_a_budget_buys_the_fewest_steps_that_reach_it():
    cfg = preset("mini")
    per_step = model_flops_per_row_step(cfg.model) * cfg.global_batch_size
    assert run_flops(cfg, 2000) == pytest.approx(2000 * per_step)
    assert steps_for_flops(cfg, 2000 * per_step) == 2000
    cfg.depth_curriculum = 0.6
    depths = [depth_at(cfg.model, 0.6, s, 500) or (2, 2) for s in range(500)]
    by_hand = sum(model_flops_per_row_step(dataclasses.replace(cfg.model, H_cycles=h, L_cycles=n))
                  for h, n in depths) * cfg.global_batch_size
    assert run_flops(cfg, 500) == pytest.approx(by_hand)
    steps = steps_for_flops(cfg, 2000 * per_step)
    assert steps > 2000  # the curriculum's cheaper steps: more of them for the same compute
    assert run_flops(cfg, steps) >= 2000 * per_step > run_flops(cfg, steps - 1)


def test_the_trainer_counts_its_flops_and_a_budget_sets_its_steps(tmp_path: Path):
    from pipeline.training.train import train

    data = build_tiny_dataset(tmp_path / "data", num_tasks=3, num_aug=1)
    cfg = tiny_config(max_steps=0, log_every=1, depth_curriculum=0.5)
    cfg.model.seq_len = 36
    budget = run_flops(dataclasses.replace(cfg, depth_curriculum=0.0), 4)
    cfg.flops_budget = budget
    train(cfg, data, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = rows[-1]["step"]
    assert steps == steps_for_flops(cfg, budget) > 4
    assert rows[-1]["flops"] == pytest.approx(run_flops(cfg, steps)) and rows[-1]["flops"] >= budget
    assert [r["flops"] for r in rows] == sorted(r["flops"] for r in rows) and rows[0]["wall_s"] > 0
