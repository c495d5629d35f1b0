"""What a training run computes, in a run's terms: its schedule (steps, checkpoint and evaluation intervals, in the
reference's epochs), its FLOPs (pipeline.model.flops in the config's terms) and the share of the whole canvas's cost
that canvas buckets leave, measured on the dataset. `--stage plan` reads the same functions the trainer runs.
"""
from __future__ import annotations

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
