"""What a training run computes, in a run's terms: its FLOPs (pipeline.model.flops in the config's terms) and the
share of the whole canvas's cost that canvas buckets leave, measured on the dataset.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from augment.dataset import AugmentedDataset
from pipeline.data.canvas import parse_buckets, side_for
from pipeline.config import RunConfig
from pipeline.model.flops import flops_of_steps, model_flops_per_row_step, steps_for_budget


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
    canvas = dataset.canvas
    buckets = parse_buckets(cfg.data.canvas_buckets, canvas)
    if cfg.data.sampling == "groups":
        groups = np.flatnonzero((dataset.puzzle_num_examples > 0) & (dataset.puzzle_num_variants > 0))
        first, count = dataset.variant_examples(dataset.puzzle_first_variant[groups])
        ks = np.concatenate([np.arange(f, f + c) for f, c in zip(first.tolist(), count.tolist())])
    else:
        ks = np.arange(dataset.num_train_examples)
    sides, counts = np.unique(side_for(dataset.train_extent(ks).max(axis=1), buckets, canvas), return_counts=True)
    share = counts / counts.sum()
    return {
        "canvas_buckets": list(buckets),
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
