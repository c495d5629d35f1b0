"""What a training run computes, in a run's terms: its schedule (steps, checkpoint and evaluation intervals, in the
reference's epochs), its FLOPs (pipeline.model.flops in the config's terms) and the share of the whole canvas's cost
that canvas buckets leave, measured on the dataset. `--stage plan` reads the same functions the trainer runs.

A planned fine-tune (`finetune_plan`, the `kaggle` preset's) is a schedule too: `planned_finetune` turns the planned
number of steps into the settings that depend on it (docs/KAGGLE_BENCHMARK.md: each rule's row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from augment.dataset import AugmentedDataset
from pipeline.config import RunConfig
from pipeline.model.flops import flops_of_steps, model_flops_per_row_step, steps_for_budget
from pipeline.model.rows import RowEngine
from pipeline.training.batches import examples_per_epoch, num_groups


def run_flops(cfg: RunConfig, total: int, steps: int | None = None) -> float:
    """Model FLOPs of the first `steps` (default all) optimizer steps of a run of `total` steps, every row on the
    full canvas (cfg.model.seq_len tokens)."""
    return flops_of_steps(cfg.model, cfg.global_batch_size, cfg.depth_curriculum, total, steps)


def steps_for_flops(cfg: RunConfig, budget: float, canvas_share: float = 1.0) -> int:
    """The fewest steps whose run reaches `budget` FLOPs (a run of S steps computes run_flops(cfg, S) on the whole
    canvas, `canvas_share` of that with canvas buckets: bucket_costs)."""
    return steps_for_budget(cfg.model, cfg.global_batch_size, cfg.depth_curriculum, budget / canvas_share)


def bucket_costs(cfg: RunConfig, dataset: AugmentedDataset) -> dict[str, Any]:
    """Grid tokens and model FLOPs per row-step with the run's canvas buckets, exact from the data: every training
    example weighted as the sampling draws it (groups: each puzzle's examples once per epoch, a dihedral view never
    changing an example's bucket; examples: every example of every variant), assuming an example spends as many
    ACT steps in its row whatever its bucket."""
    engine = RowEngine.build(cfg.data.canvas_buckets, dataset.canvas, cfg.model)
    if cfg.data.sampling == "groups":
        groups = np.flatnonzero((dataset.puzzle_num_examples > 0) & (dataset.puzzle_num_variants > 0))
        first, count = dataset.variant_examples(dataset.puzzle_first_variant[groups])
        ks = np.concatenate([np.arange(f, f + c) for f, c in zip(first.tolist(), count.tolist())])
    else:
        ks = np.arange(dataset.num_train_examples)
    sides, counts = np.unique(engine.side_for(dataset.train_extent(ks).max(axis=1)), return_counts=True)
    share = counts / counts.sum()
    return {
        "canvas_buckets": list(engine.buckets),
        "bucket_share": {int(b): float(f) for b, f in zip(sides, share)},
        "grid_tokens_per_row": float((share * sides ** 2).sum()),
        "model_flops_per_row": float(sum(f * model_flops_per_row_step(cfg.model, int(b) ** 2)
                                         for b, f in zip(sides, share))),
    }


def canvas_share(cfg: RunConfig, dataset: AugmentedDataset) -> float:
    """Model FLOPs per row-step with the run's canvas buckets, as a fraction of the whole canvas's (1 without)."""
    if not cfg.data.canvas_buckets:
        return 1.0
    return bucket_costs(cfg, dataset)["model_flops_per_row"] / model_flops_per_row_step(cfg.model)


# ---------------------------------------------------------------------------------------------- schedule
def steps_for_epochs(cfg: RunConfig, dataset: AugmentedDataset, epochs: float) -> int:
    """Optimizer steps in `epochs` epochs, the reference's way: epochs × examples per epoch / global batch."""
    return int(epochs * examples_per_epoch(dataset, cfg.data.sampling) / cfg.global_batch_size)


def total_steps(cfg: RunConfig, dataset: AugmentedDataset) -> int:
    if cfg.flops_budget > 0:
        return steps_for_flops(cfg, cfg.flops_budget, canvas_share(cfg, dataset))
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, steps_for_epochs(cfg, dataset, cfg.epochs))


def checkpoint_interval(cfg: RunConfig, dataset: AugmentedDataset) -> int:
    if cfg.checkpoint_every > 0:
        return cfg.checkpoint_every
    return max(1, steps_for_epochs(cfg, dataset, cfg.checkpoint_every_epochs))


def eval_interval(cfg: RunConfig, dataset: AugmentedDataset) -> int:
    """Steps between evaluations during training; 0 = none."""
    if cfg.eval_every > 0:
        return cfg.eval_every
    if cfg.eval_every_epochs <= 0:
        return 0
    return max(1, steps_for_epochs(cfg, dataset, cfg.eval_every_epochs))


def nominal_epoch(cfg: RunConfig, dataset: AugmentedDataset, step: int) -> float:
    """Epochs as the reference counts them at this step (step × global batch / examples per epoch)."""
    return step * cfg.global_batch_size / examples_per_epoch(dataset, cfg.data.sampling)


def plan_steps(cfg: RunConfig, dataset: AugmentedDataset) -> dict[str, Any]:
    """The schedule a `train` run with this config would follow, without training (for `--stage plan`)."""
    steps = total_steps(cfg, dataset)
    per_epoch = examples_per_epoch(dataset, cfg.data.sampling)
    return {
        "sampling": cfg.data.sampling,
        "translation": cfg.data.translation,
        "groups": num_groups(dataset),
        "variants": dataset.num_variants,
        "train_examples": dataset.num_train_examples,
        "mean_examples_per_variant": dataset.num_train_examples / max(dataset.num_variants, 1),
        "examples_per_epoch": per_epoch,
        "global_batch_size": cfg.global_batch_size,
        "epochs": steps * cfg.global_batch_size / per_epoch if cfg.max_steps > 0 else cfg.epochs,
        "total_steps": steps,
        "warmup_steps": cfg.lr_warmup_steps,
        "checkpoint_every": checkpoint_interval(cfg, dataset),
        "eval_every": eval_interval(cfg, dataset),
        "eval_views": cfg.eval_views,
        "seq_len": dataset.canvas * dataset.canvas,
        "num_puzzle_identifiers": dataset.num_puzzle_identifiers,
    }


# ---------------------------------------------------------------------------------------------- a planned fine-tune
# The rules' constants, each chosen by the rows of docs/KAGGLE_BENCHMARK.md named beside it ("What the `kaggle`
# preset and the time plan take" says how):
PLAN_EMA_MIN_HORIZON = 100  # EMA horizon 1 / (1 - ema_rate) at least 100 steps: `ema0.99`, `fast`, the clock600
# rows, `planned+clock600` against `planned+v2+clock600`
PLAN_EMA_HORIZON_SHARE = 1 / 12.5  # ... and a 12.5th of the fine-tune: the paper's 0.999 at its 12.5k steps
PLAN_WARMUP_SHARE = 1 / 8  # warm-up an eighth of the fine-tune (81 steps -> 10): `fast`; the config's is the cap
PLAN_VISITS = 100.0  # visits per trained puzzle row that size the trained variants: `fast` / `fast+aug3` /
# `fast+aug1`, the clock600 rows with 2 and 8 variants, `planned+clock600` against `planned+v2+clock600`
PLAN_MIN_VARIANTS = 2  # two views, so that a test input can get two model candidates: `num_aug=0`


@dataclass(frozen=True)
class FinetunePlan:
    """The settings of a fine-tune that follow from its planned length (saved in its checkpoints)."""

    steps: int  # the planned optimizer steps: the schedule runs over these
    lr: float
    ema_rate: float
    lr_warmup_steps: int
    train_variants: int  # each puzzle's first K variants are trained (and are prediction's views)
    visits: float  # expected visits per trained puzzle row: steps x batch / (tasks x K x pairs per variant)
    steps_bound: int = 0  # the steps the run's steps / FLOPs / epochs bound allows
    seconds_per_step: float = 0.0  # the probe's estimate (0: no time budget, no probe)
    steps_by_time: int = 0  # the steps the time left buys at that speed (0: no time budget)


def planned_finetune(steps: int, cfg: RunConfig, init_lr: float | None, tasks: int, pairs_per_variant: float,
                     **probe: Any) -> FinetunePlan:
    """The plan of a fine-tune of `steps` steps from a checkpoint pretrained with `init_lr` (None: unknown, then
    cfg.lr), on `tasks` puzzles with training pairs, `pairs_per_variant` of them per variant on average. The
    config's ema_rate and lr_warmup_steps are caps (the paper model's fine-tune of 12.5k steps keeps them);
    the trained variants are clamped to [2, data.num_aug + 1]. `probe`: the other FinetunePlan fields, recorded."""
    steps = max(1, int(steps))
    ema_rate = min(cfg.ema_rate, 1.0 - 1.0 / max(PLAN_EMA_MIN_HORIZON, PLAN_EMA_HORIZON_SHARE * steps))
    warmup = min(cfg.lr_warmup_steps, int(round(steps * PLAN_WARMUP_SHARE)))
    wanted = steps * cfg.global_batch_size / (max(tasks, 1) * max(pairs_per_variant, 1e-9) * PLAN_VISITS)
    variants = int(min(max(round(wanted), PLAN_MIN_VARIANTS), cfg.data.num_aug + 1))
    visits = steps * cfg.global_batch_size / (max(tasks, 1) * max(pairs_per_variant, 1e-9) * variants)
    return FinetunePlan(steps=steps, lr=cfg.lr if init_lr is None else float(init_lr), ema_rate=ema_rate,
                        lr_warmup_steps=warmup, train_variants=variants, visits=visits, **probe)


def apply_plan(cfg: RunConfig, plan: FinetunePlan) -> None:
    """The plan's settings into the run's config (what config.json and every checkpoint then record)."""
    cfg.lr, cfg.ema_rate, cfg.lr_warmup_steps = plan.lr, plan.ema_rate, plan.lr_warmup_steps
    cfg.train_variants = plan.train_variants
    cfg.predict.max_variants = capped_views(cfg.predict.max_variants, plan.train_variants)


def capped_views(views: int, trained: int) -> int:
    """`views` per test input (0 = all) capped at the `trained` variants (train_variants; 0 = all): the other
    variants' puzzle rows were never trained."""
    if not trained:
        return views
    return trained if views == 0 else min(views, trained)
