"""Stage `plan` (also `--stage train --dry-run`): what a training run will cost, before it costs it.

Writes `plan.json` in the run folder: the schedule the trainer will follow (steps, epochs, groups, intervals, from
pipeline.training.train's own functions, so plan and run cannot disagree), the model's FLOPs, and, after timing a few real
training steps on this machine's device, the estimated hours. With canvas buckets (`data.canvas_buckets`) it gives the
tokens and FLOPs per step both with the buckets and on the whole canvas, counted exactly from the dataset. Nothing is trained and no checkpoint is written.

The timing runs full optimizer steps (refill, forward, backward, all-reduce, updates, EMA) on a few rows per
process (`rows`) and scales linearly to the global batch: on a GPU a small batch under-uses the device, so the
estimate errs on the slow side; time with more rows (`--set` a smaller model is no substitute) for a tighter figure.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from augment.dataset import AugmentedDataset
from pipeline.training.collectives import is_main_process
from pipeline.training.compute import bucket_costs, run_flops
from pipeline.config import RunConfig
from pipeline.core.io import atomic_write_json
from pipeline.model.flops import model_flops_per_row_step


def time_steps(cfg: RunConfig, dataset: AugmentedDataset, steps: int, rows: int) -> dict[str, Any]:
    """Seconds per optimizer step of `rows` rows per process (median of `steps`, after one warm-up step)."""
    import copy

    from pipeline.training.train import METRIC_KEYS, Refill, blank_carries, build_state, make_runtime, train_step

    small = copy.deepcopy(cfg)
    rt = make_runtime(small)
    small.global_batch_size = rows * rt.world
    small.grad_accum_steps = 1
    state = build_state(small, dataset, rt)
    state.carries = blank_carries(state.model, small, rows, rt.device)
    state.sides = np.full(small.global_batch_size, dataset.canvas, dtype=np.int64)
    refill = Refill(state.sampler, rt, rows, small.model.seq_len, state.sides)
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=rt.device)
    bad = torch.zeros((), dtype=torch.bool, device=rt.device)
    times = []
    for i in range(steps + 1):
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(state, small, rt, refill, sums, bad, steps + 1)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - started)
    times.sort()
    return {"device": str(rt.device), "processes": rt.world, "rows_per_process": rows,
            "seconds_per_step": times[len(times) // 2], "timed_steps": steps}


def prediction_flops(cfg: RunConfig, dataset: AugmentedDataset) -> dict[str, Any]:
    """Model FLOPs of stage predict (forward only): every view of every held-out test input, each for the ACT
    steps prediction runs; the likelihood re-scoring pass is `predict.rescore_views` more views per input. For a
    config with another data.num_aug than the dataset's, every input is counted with num_aug + 1 views."""
    views = cfg.predict.max_variants if cfg.predict.max_variants > 0 else None
    if cfg.data.num_aug == dataset.manifest.get("num_aug", cfg.data.num_aug):
        rows = len(dataset.test_rows(views)["variant"])
    else:
        rows = len(dataset.test_rows(1)["variant"]) * min(views or cfg.data.num_aug + 1, cfg.data.num_aug + 1)
    rescored = len(dataset.test_rows(cfg.predict.rescore_views)["variant"]) if cfg.predict.rescore_views > 0 else 0
    steps = cfg.predict.act_steps or cfg.model.halt_max_steps
    per_row = model_flops_per_row_step(cfg.model, backward=False)
    return {"prediction_rows": rows, "prediction_act_steps": steps,
            "prediction_flops": (rows * steps + rescored * cfg.model.halt_max_steps) * per_row}


def recipes(preset_name: str | None, dataset: AugmentedDataset, seconds_per_flop: float | None) -> dict[str, Any]:
    """The paper recipe and its fast counterpart (config.FAST_RECIPES) on this dataset: steps, training and
    prediction FLOPs, and hours at this machine's timed seconds per FLOP; {} for a preset without a pair."""
    from pipeline.config import preset, recipe_pair
    from pipeline.training.train import total_steps

    out = {}
    for name in recipe_pair(preset_name):
        cfg = preset(name)
        cfg.model.seq_len = dataset.canvas * dataset.canvas
        cfg.model.num_puzzle_identifiers = dataset.num_puzzle_identifiers
        steps = total_steps(cfg, dataset)
        entry = {"total_steps": steps, "model_flops_total": run_flops(cfg, steps), **prediction_flops(cfg, dataset)}
        if seconds_per_flop is not None:
            entry["estimated_hours"] = seconds_per_flop * entry["model_flops_total"] / 3600
        out[name] = entry
    return out


def make_plan(cfg: RunConfig, dataset_dir: str | Path, time_steps_n: int = 2, rows: int = 0,
              preset_name: str | None = None) -> dict[str, Any]:
    """The plan as a dict; `time_steps_n` = 0 skips the timing (and so the hours). For a preset with a fast
    counterpart (or the fast one), `recipes` holds both recipes' FLOPs and hours."""
    from pipeline.training.train import plan_steps

    dataset = AugmentedDataset.load(dataset_dir)
    cfg.model.seq_len = dataset.canvas * dataset.canvas
    cfg.model.num_puzzle_identifiers = dataset.num_puzzle_identifiers
    plan = plan_steps(cfg, dataset)
    costs = bucket_costs(cfg, dataset)
    flops_row, rows_per_step = costs.pop("model_flops_per_row"), cfg.global_batch_size
    plan.update(costs)
    full_row = model_flops_per_row_step(cfg.model)
    plan["tokens_per_step"] = rows_per_step * (cfg.model.puzzle_len + plan["grid_tokens_per_row"])
    plan["tokens_per_step_full_canvas"] = rows_per_step * cfg.model.total_len
    plan["model_flops_per_step"] = flops_row * rows_per_step  # at full depth
    plan["model_flops_per_step_full_canvas"] = full_row * rows_per_step
    # a depth curriculum's cheaper steps included (compute.run_flops), scaled by the buckets' share of the canvas
    plan["model_flops_total"] = run_flops(cfg, plan["total_steps"]) * flops_row / full_row
    plan.update(prediction_flops(cfg, dataset))
    plan["evaluations"] = plan["total_steps"] // plan["eval_every"] if plan["eval_every"] else 0
    if time_steps_n > 0:
        on_gpu = torch.cuda.is_available()
        rows = rows or min(cfg.global_batch_size, 64 if on_gpu else 4)
        timing = time_steps(cfg, dataset, time_steps_n, rows)
        local_batch = cfg.global_batch_size / timing["processes"]
        step_s = timing["seconds_per_step"] * local_batch / rows  # linear in the rows each process runs
        timing["estimated_seconds_per_step"] = step_s
        timing["estimated_hours"] = step_s * plan["model_flops_total"] / plan["model_flops_per_step"] / 3600
        timing["achieved_tflops_per_process"] = flops_row * rows / timing["seconds_per_step"] / 1e12
        timing["note"] = ("training only (evaluations come on top); scaled linearly from the timed rows per "
                          "process to the global batch / processes")
        plan["timing"] = timing
    seconds_per_flop = plan["timing"]["estimated_seconds_per_step"] / plan["model_flops_per_step"] if "timing" in plan else None
    plan["recipes"] = recipes(preset_name, dataset, seconds_per_flop)
    return plan


def write_plan(cfg: RunConfig, dataset_dir: str | Path, out: Path, time_steps_n: int = 2, rows: int = 0,
               preset_name: str | None = None) -> Path:
    plan = make_plan(cfg, dataset_dir, time_steps_n, rows, preset_name)
    path = out / "plan.json"
    if is_main_process():
        atomic_write_json(path, plan)
        print(format_plan(plan))
        print(f"plan: {path}")
    return path


def format_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"plan: {plan['total_steps']:,} steps of {plan['global_batch_size']} rows = {plan['epochs']:g} epochs of "
        f"{plan['examples_per_epoch']:,.0f} examples ({plan['sampling']} sampling: {plan['groups']} groups, "
        f"{plan['variants']:,} variants, {plan['mean_examples_per_variant']:.3f} examples per variant)",
        f"  warm-up {plan['warmup_steps']:,} steps; checkpoint every {plan['checkpoint_every']:,} steps; "
        f"evaluation every {plan['eval_every']:,} steps ({plan['evaluations']} evaluations, {plan['eval_views']} views)",
        f"  model: {plan['model_flops_per_step'] / 1e12:,.1f} TFLOP per step, "
        f"{plan['model_flops_total'] / 1e18:,.1f} EFLOP in all; prediction {plan['prediction_flops'] / 1e15:,.1f} PFLOP "
        f"({plan['prediction_rows']:,} views × {plan['prediction_act_steps']} ACT steps)",
    ]
    if plan["canvas_buckets"]:
        shares = ", ".join(f"{b}: {f:.0%}" for b, f in plan["bucket_share"].items())
        lines.append(
            f"  canvas buckets {','.join(map(str, plan['canvas_buckets']))} (examples per side {shares}): "
            f"{plan['tokens_per_step']:,.0f} tokens per step against {plan['tokens_per_step_full_canvas']:,.0f} on "
            f"the whole canvas ({plan['tokens_per_step'] / plan['tokens_per_step_full_canvas']:.2f}); FLOPs "
            f"{plan['model_flops_per_step'] / plan['model_flops_per_step_full_canvas']:.2f} of the whole canvas's")
    for name, r in plan.get("recipes", {}).items():
        hours = f", about {r['estimated_hours']:,.1f} hours" if "estimated_hours" in r else ""
        lines.append(f"  recipe {name}: {r['total_steps']:,} steps, {r['model_flops_total'] / 1e18:,.2f} EFLOP of "
                     f"training{hours}; prediction {r['prediction_flops'] / 1e15:,.1f} PFLOP")
    t = plan.get("timing")
    if t:
        lines.append(
            f"  timed on {t['device']} × {t['processes']}: {t['seconds_per_step']:.3f} s per step of "
            f"{t['rows_per_process']} rows per process -> about {t['estimated_seconds_per_step']:.2f} s per step, "
            f"{t['estimated_hours']:,.1f} hours of training"
        )
    return "\n".join(lines)
