"""A planned fine-tune (`finetune_plan`, the `kaggle` preset's): the rule's numbers, the sampler's prefix of
variants, the probe that plans the steps from a time budget, the plan as its settings (and the switch off as the
settings given), and prediction and the truth figures on at most the trained variants."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from augment.dataset import AugmentedDataset
from pipeline.config import apply_overrides, preset
from pipeline.training import checkpoint as ckpt
from pipeline.training.batches import TrainSampler
from pipeline.training.compute import FinetunePlan, planned_finetune
from tiny import build_tiny_dataset, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(a pretrained checkpoint (lr 1e-3), a dataset of other puzzles with 6 variants each to fine-tune on)."""
    from pipeline.training.train import train

    root = tmp_path_factory.mktemp("plan")
    base = train(tiny_config(max_steps=4), build_tiny_dataset(root / "base"), root / "run", progress=False)
    return base, build_tiny_dataset(root / "other", num_tasks=3, num_aug=5, offset=6)


# ------------------------------------------------------------------------------------------------- the rule
def test_the_rule_gives_the_benchmarks_winners_at_81_steps_and_keeps_the_presets_caps_at_the_papers_length():
    cfg = apply_overrides(preset("kaggle"), ["global_batch_size=64", "data.num_aug=7"])
    assert cfg.finetune_plan and not preset("arc1").finetune_plan and not preset("arc2").finetune_plan
    short = planned_finetune(81, cfg, 1e-3, tasks=45, pairs_per_variant=3.44)
    assert (short.lr, short.lr_warmup_steps, short.train_variants) == (1e-3, 10, 2)
    assert short.ema_rate == pytest.approx(0.99) and 15 < short.visits < 19
    clock = planned_finetune(555, cfg, 1e-3, tasks=45, pairs_per_variant=3.44)  # the 600 s clock's length
    assert (clock.ema_rate, clock.lr_warmup_steps, clock.train_variants) == (pytest.approx(0.99), 69, 2)
    paper = planned_finetune(12_500, preset("kaggle"), 1e-4, tasks=240, pairs_per_variant=3.4)
    assert (paper.lr, paper.ema_rate, paper.lr_warmup_steps) == (1e-4, 0.999, 100)
    assert 100 < paper.train_variants < 130  # about 120 of the 1001 variants
    assert planned_finetune(81, cfg, None, 45, 3.44).lr == cfg.lr  # the pretraining's lr unknown: the config's
    assert planned_finetune(10**6, cfg, 1e-3, 45, 3.44).train_variants == 8  # never more than were built


# ------------------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("sampling", ["groups", "examples"])
def test_the_sampler_trains_a_prefix_of_each_puzzles_variants_and_all_of_them_as_before(runs, sampling):
    ds = AugmentedDataset.load(runs[1])
    local = np.zeros(ds.num_variants, np.int64)  # each variant's index within its puzzle
    for p in range(len(ds.puzzle_num_variants)):
        first, count = int(ds.puzzle_first_variant[p]), int(ds.puzzle_num_variants[p])
        local[first:first + count] = np.arange(count)
    variant_of = np.repeat(np.arange(ds.num_variants), ds.variant_examples(np.arange(ds.num_variants))[1])

    def stream(**kw) -> np.ndarray:
        sampler = TrainSampler(ds, seed=3, sampling=sampling, translation="none", batch_size=8, **kw)
        return np.concatenate([sampler.take_indices(8)[0] for _ in range(40)])

    drawn = stream(variants=2)
    assert local[variant_of[drawn]].max() == 1 and set(local[variant_of[drawn]]) == {0, 1}
    assert np.array_equal(stream(variants=100), stream())  # K past every puzzle's variants: the stream unchanged
    assert local[variant_of[stream()]].max() > 1
    resumed = TrainSampler(ds, seed=3, sampling=sampling, translation="none", batch_size=8, variants=2)
    resumed.take_indices(50)
    with pytest.raises(ValueError, match="variants"):
        TrainSampler(ds, seed=3, sampling=sampling, translation="none", batch_size=8).load_state_dict(
            resumed.state_dict())


# ------------------------------------------------------------------------------------------------- the probe
def test_the_probe_times_steps_and_leaves_the_run_as_it_was(runs):
    from pipeline.training.runtime import make_runtime
    from pipeline.training.step import probe_step_seconds
    from pipeline.training.train import prepare

    cfg = tiny_config(finetune_plan=True)
    rt = make_runtime(cfg, runs[1].parent / "probe")
    _, state = prepare(cfg, runs[1], runs[1].parent / "probe", rt, False, runs[0])
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    sampler, rng = state.sampler.state_dict(), torch.get_rng_state()
    assert probe_step_seconds(state, cfg, rt) > 0
    assert all(torch.equal(v, state.model.state_dict()[k]) for k, v in weights.items())
    assert state.sampler.state_dict() == sampler and torch.equal(torch.get_rng_state(), rng)
    assert all(bool(c.halted.all()) for c in state.carries) and state.step == 0
    assert all(p.grad is None for p in state.model.parameters())


def test_a_time_budget_plans_the_steps_the_probed_speed_buys(runs, tmp_path, monkeypatch):
    from pipeline.training import train as train_module

    monkeypatch.setattr(train_module, "probe_step_seconds", lambda state, cfg, rt: 0.5)
    cfg = tiny_config(finetune_plan=True, max_steps=40, time_budget_s=6.0)
    last = train_module.train(cfg, runs[1], tmp_path / "ft", init_checkpoint=runs[0], progress=False)
    plan = FinetunePlan(**ckpt.load_training_state(last)["finetune_plan"])
    assert plan.seconds_per_step == 0.5 and 8 <= plan.steps_by_time <= 12 and plan.steps == plan.steps_by_time
    assert plan.steps_bound == 40 and ckpt.load_training_state(last)["step"] == plan.steps
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "plan" and rows[0]["steps"] == plan.steps


# ------------------------------------------------------------------------------------------------- the settings
def test_the_plan_is_its_settings_and_the_switch_off_keeps_the_settings_given(runs, tmp_path):
    """A planned fine-tune trains exactly as the same fine-tune with the plan's settings given by hand and the
    switch off; a resumed planned fine-tune keeps its plan."""
    from pipeline.training.train import train

    planned = train(tiny_config(finetune_plan=True, max_steps=16, checkpoint_every=8, ema_rate=0.999,
                                lr_warmup_steps=100, lr=3e-4), runs[1], tmp_path / "planned",
                    init_checkpoint=runs[0], progress=False)
    state = ckpt.load_training_state(planned)
    plan = FinetunePlan(**state["finetune_plan"])
    assert (plan.lr, plan.lr_warmup_steps, plan.train_variants) == (1e-3, 2, 2) and plan.ema_rate < 0.999
    assert state["config"]["predict"]["max_variants"] == 2 and state["sampler"]["variants"] == 2
    by_hand = tiny_config(max_steps=16, checkpoint_every=8, lr=plan.lr, ema_rate=plan.ema_rate,
                          lr_warmup_steps=plan.lr_warmup_steps, train_variants=plan.train_variants)
    by_hand.predict.max_variants = 2
    manual = ckpt.load_training_state(train(by_hand, runs[1], tmp_path / "manual", init_checkpoint=runs[0],
                                            progress=False))
    assert "finetune_plan" not in manual and manual["config"]["lr"] == plan.lr
    for part in ("model", "ema"):
        got = state[part] if part == "model" else state[part]["shadow"]
        want = manual[part] if part == "model" else manual[part]["shadow"]
        assert all(torch.equal(got[k], want[k]) for k in want), part
    # resumed from step 8 with other settings given (as the driver's retry gives them): the plan stays
    (tmp_path / "planned" / "checkpoints" / "step_00000016.pt").unlink()
    resumed = train(tiny_config(finetune_plan=True, max_steps=40, lr=3e-4), runs[1], tmp_path / "planned",
                    resume=True, progress=False)
    again = ckpt.load_training_state(resumed)
    assert again["step"] == 16 and again["finetune_plan"] == asdict(plan)
    assert all(torch.equal(again["model"][k], state["model"][k]) for k in state["model"])


# ------------------------------------------------------------------------------------------------- prediction
def test_prediction_and_the_truth_figures_use_at_most_the_trained_variants(runs, tmp_path, monkeypatch):
    from pipeline import kaggle_driver as kd
    from pipeline.kaggle_driver import child_stages, stages
    from pipeline.kaggle_driver.pretrained import trained_variants
    from pipeline.kaggle_driver.state import Outcome, RunState
    from pipeline.training.train import train

    planned = train(tiny_config(finetune_plan=True, max_steps=4), runs[1], tmp_path / "ft", init_checkpoint=runs[0],
                    progress=False)
    assert trained_variants(planned) == 2 and trained_variants(runs[0]) == 0
    ds = AugmentedDataset.load(runs[1])
    two, eight = stages.truth_figures(planned, ds, views=2), stages.truth_figures(planned, ds, views=8)
    assert two and two == eight  # the views past the trained variants are left out

    settings = kd.settings_from_env(env={"TRM_KAGGLE_INPUT": str(tmp_path), "TRM_KAGGLE_WORKING": str(tmp_path),
                                         "TRM_NUM_GPUS": "0"})
    run = RunState(settings, settings.devices, cfg=tiny_config(), checkpoint=runs[0])
    build_tiny_dataset(settings.run_dir / "dataset", num_tasks=3, num_aug=5, offset=6)
    run.status["augment"] = {"state": Outcome.OK.value}
    (settings.run_dir / "checkpoints").mkdir()
    (settings.run_dir / "checkpoints" / "step_00000004.pt").write_bytes(planned.read_bytes())
    launched = []
    monkeypatch.setattr(child_stages, "run_child", lambda cmd, timeout_s, **kw: (launched.append(cmd),
                                                                                 kd.ChildResult(1, False, 1.0))[1])
    with pytest.raises(RuntimeError, match="left no candidates"):  # the fake child predicted nothing
        child_stages.predict(run)
    assert "predict.max_variants=2" in launched[-1] and run.status["predict"]["max_variants"] == 2
