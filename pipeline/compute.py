"""What a training run computes: the depth curriculum, and the model FLOPs of a run's steps.

Runs are compared at equal compute (docs/QUALITY.md): an arm that makes steps cheaper may take more of them. The
trainer counts the FLOPs it actually computes (the `flops` column of metrics.jsonl); this module plans them in
advance, so that `flops_budget` can turn a FLOPs figure into a number of steps, and plan.json can show a run's
FLOPs before it runs.

The depth curriculum (`depth_curriculum` = f > 0, after CGAR: recursion depth grows during training) runs
T = H_cycles and n = L_cycles cycles that grow from 1 to the model's values over the first fraction f of the steps:
at progress p = step / (f × total steps) < 1, T_p = 1 + ⌊p·T⌋ and n_p = 1 + ⌊p·n⌋; the model's own depth from
then on. A step at (1, 1) costs (1·2 + 2·2) / (T(n+1) + 2(n+1)) of a full one: half, at mini's T = n = 2.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from augment.dataset import AugmentedDataset
from pipeline.canvas import parse_buckets, side_for
from pipeline.config import RunConfig
from pipeline.model import ModelConfig, model_flops_per_row_step


def depth_at(model: ModelConfig, curriculum: float, step: int, total: int) -> tuple[int, int] | None:
    """(T, n) for the optimizer step after `step` steps of `total`; None = the model's own depth."""
    if curriculum <= 0 or step >= curriculum * total:
        return None
    p = step / (curriculum * total)
    return min(model.H_cycles, 1 + int(p * model.H_cycles)), min(model.L_cycles, 1 + int(p * model.L_cycles))


def run_flops(cfg: RunConfig, total: int, steps: int | None = None) -> float:
    """Model FLOPs of the first `steps` (default all) optimizer steps of a run of `total` steps, every row on the
    full canvas (cfg.model.seq_len tokens)."""
    steps = total if steps is None else steps
    m = cfg.model
    full = model_flops_per_row_step(m) * cfg.global_batch_size
    if cfg.depth_curriculum <= 0:
        return full * steps
    s = np.arange(steps, dtype=np.float64)
    p = s / (cfg.depth_curriculum * total)
    H = np.minimum(m.H_cycles, 1 + np.floor(p * m.H_cycles)).astype(np.int64)
    L = np.minimum(m.L_cycles, 1 + np.floor(p * m.L_cycles)).astype(np.int64)
    cost = np.array([[model_flops_per_row_step(dataclasses.replace(m, H_cycles=h, L_cycles=l)) if h and l else 0.0
                      for l in range(m.L_cycles + 1)] for h in range(m.H_cycles + 1)])
    return float(cost[H, L].sum() * cfg.global_batch_size)


def steps_for_flops(cfg: RunConfig, budget: float, canvas_share: float = 1.0) -> int:
    """The fewest steps whose run reaches `budget` FLOPs (a run of S steps computes run_flops(cfg, S) on the whole
    canvas, `canvas_share` of that with canvas buckets: bucket_costs)."""
    budget = budget / canvas_share
    per_step = model_flops_per_row_step(cfg.model) * cfg.global_batch_size
    steps = max(1, int(np.ceil(budget / per_step)))  # a full-depth run; a curriculum needs more steps
    while run_flops(cfg, steps) < budget:
        steps = max(steps + 1, int(steps * budget / run_flops(cfg, steps)))
    while steps > 1 and run_flops(cfg, steps - 1) >= budget:
        steps -= 1
    return steps


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
