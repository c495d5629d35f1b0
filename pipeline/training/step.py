"""One optimizer step: an ACT step of every row of the global batch (refilling the rows that halted), the
gradient all-reduce, the dense and sparse updates, the EMA.

Rows carry their state across optimizer steps. With canvas buckets each micro-batch's rows are grouped by side
(pipeline.model.rows.RowEngine): one model call and one backward pass per side present. Gradients are all-reduced
by hand (one flat buffer, pipeline.training.collectives) instead of wrapping the model in DDP: DDP would broadcast
the puzzle table (up to 1.3M × 512) every step, and the sparse table update needs its own gather anyway.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.core.errors import PipelineError
from pipeline.model.flops import depth_at, flops_at_depth
from pipeline.training.collectives import all_reduce_gradients
from pipeline.training.loss import METRIC_KEYS, act_loss
from pipeline.training.optim import lr_at
from pipeline.training.refill import Refill
from pipeline.training.runtime import Runtime, to_device
from pipeline.training import checkpoint as ckpt
from pipeline.training.state import TrainState, blank_carries

__all__ = ["METRIC_KEYS", "NonFiniteLossError", "exploration_draws", "metrics_to_floats", "probe_step_seconds",
           "step_flops", "train_step"]

PROBE_STEPS = 3  # timed forward + backward passes of the probe, after one untimed warm-up
# A whole step costs this many times its forward and backward passes (the updates, the EMA, the sampler's
# encoding, the metrics): the `planned` rows of docs/KAGGLE_BENCHMARK.md (a CPU; not measured on a GPU).
PROBE_OVERHEAD = 1.15


class NonFiniteLossError(PipelineError, RuntimeError):
    """Training diverged (an expected failure of a bad setting, e.g. too high a learning rate): one error line."""


def exploration_draws(seed: int, step: int, global_batch: int, halt_max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniform (G,), min_halt_steps (G,)) for the whole global batch, a function of (seed, step) alone,
    so that the split over processes does not change which rows explore."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    uniform = torch.rand(global_batch, generator=generator)
    min_steps = torch.randint(2, halt_max_steps + 1, (global_batch,), generator=generator)
    return uniform, min_steps


def metrics_to_floats(sums: torch.Tensor, row_steps: int) -> dict[str, float]:
    """Interval sums -> logged values: losses per row-step, the rest averaged over the rows that halted."""
    total = dict(zip(METRIC_KEYS, sums.tolist()))
    count, rows = max(total["count"], 1.0), max(row_steps, 1)
    return {
        "loss": (total["lm_loss"] + 0.5 * total["q_halt_loss"]) / rows,
        "lm_loss": total["lm_loss"] / rows,
        "q_halt_loss": total["q_halt_loss"] / rows,
        "accuracy": total["accuracy"] / count,
        "exact_accuracy": total["exact_accuracy"] / count,
        "q_halt_accuracy": total["q_halt_accuracy"] / count,
        "steps": total["steps"] / count,
        "halted_examples": total["count"],
    }


def step_flops(model: Any, sides: np.ndarray) -> float:
    """Model FLOPs of the step just run: every global row at its bucket's side, at the depth the step ran."""
    present, rows = np.unique(sides, return_counts=True)
    return float(sum(int(count) * flops_at_depth(model.config, model.cycles, int(side) ** 2)
                     for side, count in zip(present, rows)))


def train_step(state: TrainState, cfg: RunConfig, rt: Runtime, refill: Refill, sums: torch.Tensor,
               bad: torch.Tensor, steps_total: int) -> float:
    """One optimizer step. Adds the metrics to `sums`; sets `bad` on a non-finite loss. Returns the LR scale."""
    model = state.model
    lr_scale = lr_at(state.step + 1, 1.0, cfg.lr_warmup_steps, steps_total, cfg.lr_min_ratio, cfg.lr_schedule)
    draws = exploration_draws(cfg.seed, state.step, cfg.global_batch_size, cfg.model.halt_max_steps)
    model.cycles = depth_at(cfg.model, cfg.depth_curriculum, state.step, steps_total)
    puzzle_grads: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index in range(len(state.carries)):  # micro-batches (grad_accum_steps of them)
        micro_batch_step(state, cfg, rt, refill, index, draws, sums, bad, puzzle_grads)

    all_reduce_gradients([p for p in model.parameters() if p.requires_grad], rt.world)
    train_dense = state.step >= cfg.freeze_weights_steps
    if train_dense:
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_scale
        state.optimizer.step()
    model.zero_grad(set_to_none=True)
    state.table.param_groups[0]["lr"] = cfg.puzzle_emb_lr * lr_scale
    state.table.step(torch.cat([ids for ids, _ in puzzle_grads]), torch.cat([g for _, g in puzzle_grads]))
    if state.ema is not None and train_dense:
        state.ema.update(model)
    state.step += 1
    return lr_scale


def micro_batch_step(state: TrainState, cfg: RunConfig, rt: Runtime, refill: Refill, index: int,
                     draws: tuple[torch.Tensor, torch.Tensor], sums: torch.Tensor, bad: torch.Tensor,
                     puzzle_grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Forward and backward of micro-batch `index`, one side at a time; its carry is updated in place and the
    puzzle rows' gradients appended to `puzzle_grads`."""
    model, engine = state.model, state.engine
    refilled = refill(index, state.carries[index].halted)  # fresh examples in the rows that halted
    micro_rows = cfg.global_batch_size // rt.world // cfg.grad_accum_steps
    first_row = rt.rank * (cfg.global_batch_size // rt.world) + index * micro_rows
    explore = tuple(to_device(draw[first_row:first_row + micro_rows], rt.device) for draw in draws)
    groups = engine.groups(refill.local_sides(index))
    for group_index, (side, rows) in enumerate(groups):  # one group (all rows) without buckets
        rows = None if rows is None else to_device(torch.from_numpy(rows), rt.device)
        carry, batch = engine.take(state.carries[index], refilled, rows, side)
        with rt.accelerator.autocast():
            carry, outputs = engine.step(model, carry, batch, side,
                                         tuple(draw if rows is None else draw[rows] for draw in explore))
            state.carries[index] = engine.put(state.carries[index], rows, carry)
            if group_index == len(groups) - 1:
                refill.watch(index, state.carries[index].halted)  # the next refill overlaps this backward pass
            loss, metrics = act_loss(outputs, carry)
        (loss / cfg.global_batch_size).backward()
        puzzle_grads.append((model.puzzle_emb.local_ids.detach().clone(),
                             model.puzzle_emb.local_weights.grad.detach().clone()))
        sums += torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=rt.device).detach()
                             for k in METRIC_KEYS])
        bad |= ~torch.isfinite(loss.detach())


def probe_step_seconds(state: TrainState, cfg: RunConfig, rt: Runtime, steps: int = PROBE_STEPS) -> float:
    """Seconds a step of this run will take, measured before step 0 (a planned fine-tune under a time budget):
    forward and backward passes of real batches at full depth, one untimed, then `steps` timed, times
    PROBE_OVERHEAD. Nothing the run keeps changes: no update (the gradients are dropped), and the sampler's
    position, the RNG, the rows' carries and sides are as a fresh start has them. This process's figure."""
    if state.step != 0:
        raise ValueError(f"the step-time probe runs before step 0, not at step {state.step}")
    sampler, rng = state.sampler.state_dict(), ckpt.get_rng_state()
    micro = cfg.global_batch_size // rt.world // cfg.grad_accum_steps
    refill = Refill(state.sampler, rt, micro, cfg.model.seq_len, state.sides)
    state.model.cycles = None
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=rt.device)
    bad = torch.zeros((), dtype=torch.bool, device=rt.device)
    started = 0.0
    for probe in range(steps + 1):
        if probe == 1:
            _synchronize(rt)
            started = time.perf_counter()
        draws = exploration_draws(cfg.seed, probe, cfg.global_batch_size, cfg.model.halt_max_steps)
        for index in range(len(state.carries)):
            micro_batch_step(state, cfg, rt, refill, index, draws, sums, bad, [])
        state.model.zero_grad(set_to_none=True)
    _synchronize(rt)
    seconds = (time.perf_counter() - started) / steps * PROBE_OVERHEAD
    state.sampler.load_state_dict(sampler)
    ckpt.set_rng_state(rng)
    state.carries = blank_carries(state.model, cfg, micro, rt.device)
    state.sides = np.full(cfg.global_batch_size, state.sampler.dataset.canvas, dtype=np.int64)
    return seconds


def _synchronize(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
