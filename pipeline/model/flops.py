"""Model FLOPs: what one ACT step of one row costs, and what a run of steps costs with a depth curriculum.

Runs are compared at equal compute (docs/QUALITY.md), so the count lives beside the model, not inside it: the
trainer adds up what each step ran, `flops_budget` turns a figure into steps, and plan.json shows a run's cost.

The depth curriculum (`depth_curriculum` = f > 0) runs T = H_cycles and n = L_cycles cycles that grow from 1 to
the model's values over the first fraction f of the steps: at progress p = step / (f × total) < 1,
T_p = 1 + ⌊p·T⌋ and n_p = 1 + ⌊p·n⌋; the model's own depth from then on.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.model.trm import ModelConfig, swiglu_width


def model_flops_per_row_step(m: ModelConfig, seq_len: int | None = None, backward: bool = True) -> float:
    """Matmul FLOPs of one ACT step of one row on `seq_len` grid tokens (default m.seq_len), forward + backward
    (backward = 2 × forward of the gradient cycle); forward only (prediction) with backward=False.

    A step runs T·(n+1) applications of the L-layer block stack; only the last cycle's n+1 keep gradients."""
    L = m.seq_len if seq_len is None else seq_len
    D, S = m.hidden_size, L + m.puzzle_len
    inter = swiglu_width(D, m.expansion)
    per_block = 2 * S * (3 * D * D + D * D + 2 * D * inter + inter * D) + 4 * S * S * D
    per_block += 2 * m.mlp_conv**2 * inter * L  # the grid convolution in the MLP (0 unless mlp_conv)
    forward_blocks = m.H_cycles * (m.L_cycles + 1) * m.num_layers
    grad_blocks = (m.L_cycles + 1) * m.num_layers
    heads = 2 * L * D * m.vocab_size
    if not backward:
        return forward_blocks * per_block + heads
    return (forward_blocks + 2 * grad_blocks) * per_block + 3 * heads


def flops_at_depth(m: ModelConfig, cycles: tuple[int, int] | None, seq_len: int | None = None) -> float:
    """`model_flops_per_row_step` at depth `cycles` = (T, n) (None: the config's own)."""
    if cycles is not None:
        m = dataclasses.replace(m, H_cycles=cycles[0], L_cycles=cycles[1])
    return model_flops_per_row_step(m, seq_len)


def depth_at(model: ModelConfig, curriculum: float, step: int, total: int) -> tuple[int, int] | None:
    """(T, n) for the optimizer step after `step` steps of `total`; None = the model's own depth."""
    if curriculum <= 0 or step >= curriculum * total:
        return None
    progress = step / (curriculum * total)
    return min(model.H_cycles, 1 + int(progress * model.H_cycles)), min(model.L_cycles, 1 + int(progress * model.L_cycles))


def flops_of_steps(m: ModelConfig, rows_per_step: int, curriculum: float, total: int, steps: int | None = None) -> float:
    """Model FLOPs of the first `steps` (default all) optimizer steps of a run of `total` steps, every row on the
    full canvas (m.seq_len tokens)."""
    steps = total if steps is None else steps
    if curriculum <= 0:
        return model_flops_per_row_step(m) * rows_per_step * steps
    progress = np.arange(steps, dtype=np.float64) / (curriculum * total)
    H = np.minimum(m.H_cycles, 1 + np.floor(progress * m.H_cycles)).astype(np.int64)
    L = np.minimum(m.L_cycles, 1 + np.floor(progress * m.L_cycles)).astype(np.int64)
    cost = np.array([[flops_at_depth(m, (h, l)) if h and l else 0.0 for l in range(m.L_cycles + 1)]
                     for h in range(m.H_cycles + 1)])
    return float(cost[H, L].sum() * rows_per_step)


def steps_for_budget(m: ModelConfig, rows_per_step: int, curriculum: float, budget: float) -> int:
    """The fewest steps whose run (flops_of_steps) reaches `budget` FLOPs."""
    per_step = model_flops_per_row_step(m) * rows_per_step
    steps = max(1, int(np.ceil(budget / per_step)))  # a full-depth run; a curriculum needs more steps

    def cost(n: int) -> float:
        return flops_of_steps(m, rows_per_step, curriculum, n)

    while cost(steps) < budget:
        steps = max(steps + 1, int(steps * budget / cost(steps)))
    while steps > 1 and cost(steps - 1) >= budget:
        steps -= 1
    return steps
