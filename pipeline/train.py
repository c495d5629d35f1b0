"""Stage `train`: TRM-Att with deep supervision and ACT, through HuggingFace Accelerate.

One optimizer step = one ACT step of every row of the global batch. Rows carry their state (z_H, z_L, step
count, data) across optimizer steps; rows that halted are refilled with fresh examples from the sampler.
Unlike the reference (which pulls a whole new batch every step and uses only the halted rows of it), the
sampler hands out exactly as many examples as rows halted, so no drawn example is wasted; the assignment
is computed on the *global* batch, so P processes × B/P rows train exactly like 1 process × B rows.

Gradients are all-reduced by hand (one flat buffer per step) instead of wrapping the model in DDP: DDP would
broadcast the puzzle-embedding table (a buffer of up to 1.3M × 512) every step, and the sparse table update
needs its own gather anyway (pipeline.optim.SignSGD).
"""
from __future__ import annotations

import math
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from augment.dataset import AugmentedDataset
from pipeline import checkpoint as ckpt
from pipeline.batches import TrainSampler
from pipeline.config import RunConfig, dumps, to_dict
from pipeline.io import atomic_write_json
from pipeline.model import TRM, Carry, act_loss
from pipeline.optim import EMA, SignSGD, all_gather_rows, build_dense_optimizer, lr_at


METRIC_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss")


class NonFiniteLossError(RuntimeError):
    pass


def total_steps(cfg: RunConfig, num_train_examples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_train_examples / cfg.global_batch_size))


def checkpoint_interval(cfg: RunConfig, num_train_examples: int) -> int:
    if cfg.checkpoint_every > 0:
        return cfg.checkpoint_every
    return max(1, math.ceil(cfg.checkpoint_every_epochs * num_train_examples / cfg.global_batch_size))


@dataclass
class Runtime:
    """Where this process sits in the job."""

    accelerator: Any
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def make_runtime(cfg: RunConfig) -> Runtime:
    from accelerate import Accelerator

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    return Runtime(accelerator, accelerator.process_index, accelerator.num_processes, accelerator.device)


def _all_gather_rows(rt: Runtime, t: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows (same row count on each) in rank order."""
    return t if rt.world == 1 else all_gather_rows(t.contiguous(), rt.world, None)


def _all_reduce_sum(rt: Runtime, t: torch.Tensor) -> torch.Tensor:
    if rt.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class Refill:
    """Hands fresh examples to halted rows, consistently across processes.

    Row r of the global batch belongs to process r // local_batch. Every process sees the global halted mask,
    takes the same `n_halted` examples from its (identical) sampler, and keeps the ones for its own rows.
    """

    def __init__(self, sampler: TrainSampler, rt: Runtime, local_batch: int, seq_len: int):
        self.sampler, self.rt, self.local_batch, self.seq_len = sampler, rt, local_batch, seq_len

    def __call__(self, halted_local: torch.Tensor) -> dict[str, torch.Tensor]:
        halted = _all_gather_rows(self.rt, halted_local.to(self.rt.device)).cpu().numpy()
        rows = np.flatnonzero(halted)
        fresh = self.sampler.take(len(rows))
        lo = self.rt.rank * self.local_batch
        mine = (rows >= lo) & (rows < lo + self.local_batch)
        batch = {
            "inputs": np.zeros((self.local_batch, self.seq_len), np.int32),
            "labels": np.full((self.local_batch, self.seq_len), -100, np.int32),
            "puzzle_identifiers": np.zeros(self.local_batch, np.int32),
        }
        for key in batch:
            batch[key][rows[mine] - lo] = fresh[key][mine]
        return {k: torch.from_numpy(v).to(self.rt.device, non_blocking=True) for k, v in batch.items()}


def exploration_draws(seed: int, step: int, global_batch: int, halt_max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniform (G,), min_halt_steps (G,)) for the whole global batch, a function of (seed, step) alone,
    so that the split over processes does not change which rows explore."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u = torch.rand(global_batch, generator=g)
    k = torch.randint(2, halt_max_steps + 1, (global_batch,), generator=g)
    return u, k


def _metrics_to_floats(sums: torch.Tensor, row_steps: int) -> dict[str, float]:
    """Interval sums -> logged values: losses per row-step, the rest averaged over the rows that halted."""
    s = dict(zip(METRIC_KEYS, sums.tolist()))
    count, rows = max(s["count"], 1.0), max(row_steps, 1)
    return {
        "loss": (s["lm_loss"] + 0.5 * s["q_halt_loss"]) / rows,
        "lm_loss": s["lm_loss"] / rows,
        "q_halt_loss": s["q_halt_loss"] / rows,
        "accuracy": s["accuracy"] / count,
        "exact_accuracy": s["exact_accuracy"] / count,
        "q_halt_accuracy": s["q_halt_accuracy"] / count,
        "steps": s["steps"] / count,
        "halted_examples": s["count"],
    }


def train(
    cfg: RunConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    init_checkpoint: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Train; return the path of the last checkpoint. Resuming continues from the latest checkpoint in out_dir."""
    rt = make_runtime(cfg)
    out_dir = Path(out_dir)
    dataset = AugmentedDataset.load(data_dir)
    fingerprint = ckpt.dataset_fingerprint(data_dir)  # stored in every checkpoint: it belongs to this dataset
    cfg.model.seq_len = dataset.canvas * dataset.canvas
    cfg.model.num_puzzle_identifiers = dataset.num_puzzle_identifiers
    if cfg.global_batch_size % (rt.world * cfg.grad_accum_steps):
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} must divide by processes × grad_accum_steps "
            f"({rt.world} × {cfg.grad_accum_steps})"
        )
    local_batch = cfg.global_batch_size // rt.world
    micro = local_batch // cfg.grad_accum_steps
    steps_total = total_steps(cfg, dataset.num_train_examples)
    every = checkpoint_interval(cfg, dataset.num_train_examples)

    torch.manual_seed(cfg.seed)
    model = TRM(cfg.model)
    if init_checkpoint is not None:
        ckpt.init_from_checkpoint(model, init_checkpoint, rt.is_main)
    model.to(rt.device)
    dense = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_dense_optimizer(
        dense, cfg.optimizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    table = SignSGD(model.puzzle_emb.weights, lr=cfg.puzzle_emb_lr, weight_decay=cfg.puzzle_emb_weight_decay)
    ema = EMA(model, decay=cfg.ema_rate) if cfg.ema else None
    sampler = TrainSampler(dataset, seed=cfg.seed)
    refill = Refill(sampler, rt, micro, cfg.model.seq_len)
    carries: list[Carry] | None = None
    step = 0

    ckpt_dir = out_dir / "checkpoints"
    latest = ckpt.latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        state = ckpt.load_training_state(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        table.load_state_dict(state["table_optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        if state.get("carry") is not None:  # a final checkpoint has none: its rows then start afresh
            carries = ckpt.carries_from_state(state["carry"], rt.rank, rt.world, cfg.grad_accum_steps, rt.device)
        ckpt.set_rng_state(state["rng"])
        if rt.is_main:
            print(f"resumed from {latest} at step {step}")
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", to_dict(cfg))
        print(f"resolved config:\n{dumps(cfg)}")
        print(
            f"train: {dataset.num_train_examples} examples, {dataset.num_variants} puzzle variants, "
            f"{steps_total} steps of {cfg.global_batch_size} rows on {rt.world} process(es), device {rt.device}"
        )

    if carries is None:
        carries = []
        for _ in range(cfg.grad_accum_steps):
            dummy = {
                "inputs": torch.zeros(micro, cfg.model.seq_len, dtype=torch.int32, device=rt.device),
                "labels": torch.full((micro, cfg.model.seq_len), -100, dtype=torch.int32, device=rt.device),
                "puzzle_identifiers": torch.zeros(micro, dtype=torch.int32, device=rt.device),
            }
            carries.append(model.initial_carry(dummy))

    def save(final: bool = False) -> Path:
        # The carry (2 × global batch × S × D floats: 2.9 GB for the paper config) is what makes a resume exact;
        # the final checkpoint, kept for prediction and fine-tuning, leaves it out.
        global_carry = None if final else ckpt.gather_carries(carries, lambda t: _all_gather_rows(rt, t))
        path = ckpt_dir / f"step_{step:08d}.pt"
        if rt.is_main:
            ckpt.save_training_state(
                path,
                {
                    "step": step,
                    "config": to_dict(cfg),
                    "model": model.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "table_optimizer": table.state_dict(),
                    "sampler": sampler.state_dict(),
                    "carry": global_carry,
                    "rng": ckpt.get_rng_state(),
                    "world": rt.world,
                    "final": final,
                    "dataset_fingerprint": fingerprint,
                },
                keep=cfg.keep_checkpoints,
            )
        if rt.world > 1:
            dist.barrier()
        return path

    metrics_path = out_dir / "metrics.jsonl"
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=rt.device)
    bad = torch.zeros((), dtype=torch.bool, device=rt.device)
    interval_start, interval_steps = time.perf_counter(), 0
    t_begin = time.perf_counter()
    last_path = ckpt.latest_checkpoint(ckpt_dir)
    bar = tqdm(total=steps_total, initial=step, disable=not (progress and rt.is_main), desc="train", dynamic_ncols=True)
    lo_global = rt.rank * local_batch
    while step < steps_total:
        lr_scale = lr_at(step + 1, 1.0, cfg.lr_warmup_steps, steps_total, cfg.lr_min_ratio, cfg.lr_schedule)
        explore_u, explore_k = exploration_draws(cfg.seed, step, cfg.global_batch_size, cfg.model.halt_max_steps)
        local_ids, local_grads = [], []
        for i in range(len(carries)):  # micro-batches (grad_accum_steps of them)
            fresh = refill(carries[i].halted)
            lo = lo_global + i * micro
            with rt.accelerator.autocast():
                carries[i], outputs = model(
                    carries[i], fresh,
                    exploration=(explore_u[lo:lo + micro].to(rt.device), explore_k[lo:lo + micro].to(rt.device)),
                )
                loss, metrics = act_loss(outputs, carries[i])
            (loss / cfg.global_batch_size).backward()
            local_ids.append(model.puzzle_emb.local_ids.detach().clone())
            local_grads.append(model.puzzle_emb.local_weights.grad.detach().clone())
            sums += torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=rt.device).detach() for k in METRIC_KEYS])
            bad |= ~torch.isfinite(loss.detach())

        ckpt.all_reduce_gradients(dense, rt.world)
        train_dense = step >= cfg.freeze_weights_steps
        if train_dense:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_scale
            optimizer.step()
        model.zero_grad(set_to_none=True)
        table.param_groups[0]["lr"] = cfg.puzzle_emb_lr * lr_scale
        table.step(torch.cat(local_ids), torch.cat(local_grads))
        if ema is not None and train_dense:
            ema.update(model)
        step += 1
        interval_steps += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == steps_total:
            _all_reduce_sum(rt, sums)
            if bool(bad.item()) or not bool(torch.isfinite(sums).all()):
                raise NonFiniteLossError(
                    f"non-finite loss before step {step}; the last good checkpoint is {last_path}"
                )
            elapsed = time.perf_counter() - interval_start
            row = {"step": step, "epoch": sampler.epoch, "lr": cfg.lr * lr_scale,
                   **_metrics_to_floats(sums, interval_steps * cfg.global_batch_size)}
            row["examples_per_s"] = interval_steps * cfg.global_batch_size / max(elapsed, 1e-9)
            if rt.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", exact=f"{row['exact_accuracy']:.3f}")
            sums.zero_()
            interval_start, interval_steps = time.perf_counter(), 0

        out_of_time = cfg.time_budget_s > 0 and time.perf_counter() - t_begin > cfg.time_budget_s
        if cfg.time_budget_s > 0 and rt.world > 1:  # every process must agree to stop at the same step
            flag = torch.tensor([1.0 if out_of_time else 0.0], device=rt.device)
            out_of_time = bool(_all_reduce_sum(rt, flag).item() > 0)
        if step % every == 0 or step == steps_total or out_of_time:
            if rt.world > 1:  # a NaN on any process stops every process (none may go on into the save)
                bad = _all_reduce_sum(rt, bad.to(torch.float32)) > 0
            if bool(bad.item()):
                raise NonFiniteLossError(f"non-finite loss before step {step}; the last good checkpoint is {last_path}")
            last_path = save(final=step == steps_total or out_of_time)
        if out_of_time:
            if rt.is_main:
                print(f"time budget of {cfg.time_budget_s:.0f} s reached at step {step}")
            break
    bar.close()
    return last_path
