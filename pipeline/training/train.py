"""Stage `train`: TRM-Att with deep supervision and ACT, through HuggingFace Accelerate.

One optimizer step = one ACT step of every row of the global batch. Rows carry their state (z_H, z_L, step
count, data) across optimizer steps; rows that halted are refilled with fresh examples from the sampler's stream
(pipeline.training.batches: the reference's group epochs by default). Unlike the reference (which pulls a whole new batch
every step and uses only the halted rows of it), the sampler hands out exactly as many examples as rows halted,
so no drawn example is wasted; the assignment is computed on the *global* batch, so P processes × B/P rows train
exactly like 1 process × B rows. The step count follows the reference's formula (`total_steps`), so a run does as
many optimizer steps as the reference's; it passes over the stream fewer times, because nothing is thrown away.

With canvas buckets (`data.canvas_buckets`, pipeline.data.canvas) the rows and the stream stay the same; each row is
computed on its example's bucket, the rows of one bucket together (pipeline.training.rows): one model call per bucket per
micro-batch, each with its own backward pass.

Gradients are all-reduced by hand (one flat buffer per step, pipeline.training.collectives) instead of wrapping the model
in DDP: DDP would broadcast the puzzle-embedding table (a buffer of up to 1.3M × 512) every step, and the sparse
table update needs its own gather anyway (pipeline.training.optim.SignSGD).

Evaluation during training is injected (`evaluator`, built by the CLI from pipeline.cli.evaluate), so that training
never imports the prediction and scoring stages downstream of it.
"""
from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from augment.dataset import AugmentedDataset
from pipeline.training import checkpoint as ckpt
from pipeline.training.batches import TrainSampler, examples_per_epoch
from pipeline.data.canvas import parse_buckets
from pipeline.training.collectives import (all_gather_rows, all_reduce_gradients, all_reduce_sum, all_reduce_sum_async, barrier,
                                           gather_carries, gather_rows_to_main)
from pipeline.model.flops import depth_at, flops_at_depth
from pipeline.training.compute import canvas_share, steps_for_flops
from pipeline.config import RunConfig, dumps, to_dict
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.io import atomic_write_json, atomic_write_with
from pipeline.model.trm import TRM, Carry, act_loss, dense_params_without_gradient
from pipeline.training.optim import EMA, SignSGD, build_dense_optimizer, lr_at
from pipeline.training.rows import bucket_groups, put_rows, take_rows
from pipeline.core.tracking import accelerator_settings, finish_trackers, log_row, start_trackers
from pipeline.core.signals import Stopped, stop_requested, stoppable


METRIC_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss")
EVALUATED_DIR = "evaluated"  # checkpoints/evaluated/step_N.pt: the weights of every evaluation, kept for good

# evaluator(model, runtime) -> the metrics of one evaluation (on rank 0; None elsewhere), model in eval mode
Evaluator = Callable[["TRM", "Runtime"], "dict[str, Any] | None"]


class NonFiniteLossError(PipelineError, RuntimeError):
    """Training diverged (an expected failure of a bad setting, e.g. too high a learning rate): one error line."""


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


# ---------------------------------------------------------------------------------------------- runtime
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


def native_bf16() -> bool:
    """Whether this process's GPU computes in bf16 natively. T4 and P100 only emulate it (far slower than fp32),
    and torch's plain is_bf16_supported() says yes for them; older torch has no `including_emulation`."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.get_device_capability()[0] >= 8  # bf16 arithmetic came with Ampere


def auto_mixed_precision() -> str:
    """What mixed_precision "auto" means: bf16 where the GPU has it natively, fp32 ("no") elsewhere."""
    return "bf16" if native_bf16() else "no"


def make_runtime(cfg: RunConfig, out_dir: Path | None = None) -> Runtime:
    """The Accelerator of this process; with `cfg.log_with`, its experiment trackers too (pipeline.core.tracking)."""
    from accelerate import Accelerator

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = auto_mixed_precision()
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              **accelerator_settings(cfg.log_with, out_dir))
    return Runtime(accelerator, accelerator.process_index, accelerator.num_processes, accelerator.device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without blocking (a copy from pageable memory
    would make the host wait for the device's queue)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Refill:
    """Hands fresh examples to halted rows, consistently across processes, without stalling the device.

    Row r of the global batch belongs to process r // local_batch. Halted rows, in global row order, take the
    next examples of the stream, so one process's halted rows take one contiguous slice of them (after the
    halted rows of lower ranks): every process draws the same stream positions (cheap: indices) but encodes only
    its own slice. The stream does not depend on which rows halt, only on how many.

    `watch(i, halted)` is called right after the forward pass of micro-batch i: it gathers the global halted mask
    on the device and starts its copy to pinned host memory. `refill(i, halted)` at the next step waits for that
    copy alone, which on a GPU finishes with the forward pass while the backward pass is still running, so the
    host encodes the refill while the device is busy (the one host-device synchronisation of a steady step).
    Without a pending copy (the first step, after a resume) it gathers and copies on the spot.

    `sides` (G,) is every global row's bucket side (process-major, then micro-batch, as a checkpoint's carry);
    every process keeps all of it up to date (the sides of the examples drawn, cheap: no encoding), so the
    computed token count is known everywhere without a collective. Fresh rows come in bucket-local layout.
    """

    def __init__(self, sampler: TrainSampler, rt: Runtime, local_batch: int, seq_len: int,
                 sides: np.ndarray | None = None):
        self.sampler, self.rt, self.local_batch, self.seq_len = sampler, rt, local_batch, seq_len
        if sides is None:  # one micro-batch, every row on the whole canvas
            sides = np.full(rt.world * local_batch, sampler.dataset.canvas, dtype=np.int64)
        self.sides = sides
        self.micro_batches = len(sides) // (rt.world * local_batch)
        self._pending: dict[int, tuple[torch.Tensor, Any]] = {}

    def _global_rows(self, index: int) -> np.ndarray:
        """Positions in `sides` of micro-batch `index`'s rows on every process, in the gathered mask's order."""
        per_process = self.micro_batches * self.local_batch
        starts = np.arange(self.rt.world) * per_process + index * self.local_batch
        return (starts[:, None] + np.arange(self.local_batch)[None, :]).reshape(-1)

    def local_sides(self, index: int) -> np.ndarray:
        """int64 (local_batch,): this process's rows of micro-batch `index`, their bucket sides."""
        lo = self.rt.rank * self.micro_batches * self.local_batch + index * self.local_batch
        return self.sides[lo:lo + self.local_batch]

    def watch(self, index: int, halted_local: torch.Tensor) -> None:
        """Start fetching micro-batch `index`'s global halted mask (a collective: every process calls it)."""
        halted = all_gather_rows(halted_local.to(self.rt.device), self.rt.world)
        if halted.device.type == "cuda":
            host = torch.empty(halted.shape, dtype=halted.dtype, pin_memory=True)
            host.copy_(halted, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending[index] = (host, event)
        else:
            self._pending[index] = (halted.cpu(), None)

    def __call__(self, index: int, halted_local: torch.Tensor) -> dict[str, torch.Tensor]:
        if index not in self._pending:
            self.watch(index, halted_local)
        host, event = self._pending.pop(index)
        if event is not None:
            event.synchronize()
        rows = np.flatnonzero(host.numpy())
        ks, offsets = self.sampler.take_indices(len(rows))
        sides = self.sampler.sides(ks)
        self.sides[self._global_rows(index)[rows]] = sides
        lo = self.rt.rank * self.local_batch
        mine = (rows >= lo) & (rows < lo + self.local_batch)
        at = None if offsets is None else offsets[mine]
        encode = self.sampler.dataset.encode_train_examples
        fresh = encode(ks[mine], at, sides[mine]) if self.sampler.buckets else encode(ks[mine], at)
        batch = {
            "inputs": np.zeros((self.local_batch, self.seq_len), np.int32),
            "labels": np.full((self.local_batch, self.seq_len), -100, np.int32),
            "puzzle_identifiers": np.zeros(self.local_batch, np.int32),
        }
        for key in batch:
            batch[key][rows[mine] - lo] = fresh[key]
        return {k: to_device(torch.from_numpy(v), self.rt.device) for k, v in batch.items()}


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


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything a step changes and a checkpoint holds."""

    model: TRM
    optimizer: torch.optim.Optimizer
    table: SignSGD  # sparse sign-SGD over the puzzle-embedding rows
    ema: EMA | None
    sampler: TrainSampler
    carries: list[Carry] | None  # one per micro-batch; None until the first step (or after a final checkpoint)
    sides: np.ndarray | None = None  # int64 (G,): every global row's bucket side (Refill); None with the carries
    step: int = 0
    dataset_fingerprint: str | None = None  # saved in every checkpoint: it works only with this dataset
    flops: float = 0.0  # model FLOPs computed by the training steps so far, all processes (the `flops` column)
    wall_s: float = 0.0  # seconds spent in training steps so far, evaluations and checkpoints left out


def build_state(cfg: RunConfig, dataset: AugmentedDataset, rt: Runtime,
                init_checkpoint: str | Path | None = None) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = TRM(cfg.model)
    if init_checkpoint is not None:
        ckpt.init_from_checkpoint(model, init_checkpoint, rt.is_main)
    model.to(rt.device)
    dense = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = build_dense_optimizer(
        dense, cfg.optimizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    table = SignSGD(model.puzzle_emb.weights, lr=cfg.puzzle_emb_lr, weight_decay=cfg.puzzle_emb_weight_decay)
    ema = EMA(model, decay=cfg.ema_rate) if cfg.ema else None
    sampler = TrainSampler(dataset, seed=cfg.seed, sampling=cfg.data.sampling, translation=cfg.data.translation,
                           batch_size=cfg.global_batch_size, buckets=parse_buckets(cfg.data.canvas_buckets, dataset.canvas))
    return TrainState(model, optimizer, table, ema, sampler, carries=None)


def restore_state(state: TrainState, path: Path, cfg: RunConfig, rt: Runtime) -> None:
    saved = ckpt.load_training_state(path)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.table.load_state_dict(saved["table_optimizer"])
    if state.ema is not None and saved.get("ema") is not None:
        state.ema.load_state_dict(saved["ema"])
    state.sampler.load_state_dict(saved["sampler"])
    state.step = saved["step"]
    state.flops = float(saved.get("flops", 0.0))
    state.wall_s = float(saved.get("wall_s", 0.0))
    if saved.get("carry") is not None:  # a final checkpoint has none: its rows then start afresh
        state.carries = ckpt.carries_from_state(saved["carry"], rt.rank, rt.world, cfg.grad_accum_steps, rt.device)
        if "sides" in saved["carry"]:  # absent when saved before buckets existed (train() fills in the canvas)
            state.sides = saved["carry"]["sides"].numpy().astype(np.int64)
    ckpt.set_rng_state(saved["rng"])


def check_gradient_gate(model: TRM, rt: Runtime) -> None:
    """Before training under mixed precision: one throw-away step must give every dense parameter a gradient
    (pipeline.model.trm.dense_params_without_gradient); stops the run with the names otherwise. Logged on rank 0,
    so a run's log (the Kaggle fine-tune's too) shows that its torch trains every weight."""
    precision = rt.accelerator.mixed_precision
    if precision not in ("bf16", "fp16"):
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    missing = dense_params_without_gradient(model, rt.device.type, dtype)
    if missing:
        raise RuntimeError(
            f"gradient gate: under {precision} autocast on torch {torch.__version__} ({rt.device}), {len(missing)} "
            f"dense parameters get no gradient ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); "
            f"training would silently leave them untrained"
        )
    if rt.is_main:
        n = sum(1 for p in model.parameters() if p.requires_grad)
        print(f"gradient gate: all {n} dense parameter tensors get a gradient under {precision} autocast "
              f"(torch {torch.__version__}, {rt.device})")


def blank_carries(model: TRM, cfg: RunConfig, micro: int, device: torch.device) -> list[Carry]:
    """Carries whose rows are all halted, so that the first step fills every row from the sampler."""
    carries = []
    for _ in range(cfg.grad_accum_steps):
        dummy = {
            "inputs": torch.zeros(micro, cfg.model.seq_len, dtype=torch.int32, device=device),
            "labels": torch.full((micro, cfg.model.seq_len), -100, dtype=torch.int32, device=device),
            "puzzle_identifiers": torch.zeros(micro, dtype=torch.int32, device=device),
        }
        carries.append(model.initial_carry(dummy))
    return carries


def save_state(state: TrainState, cfg: RunConfig, rt: Runtime, ckpt_dir: Path, final: bool,
               carry: bool | None = None) -> Path:
    """A checkpoint of everything (rank 0 writes; every rank must call: the carry gather is a collective).

    The carry (2 × global batch × S × D floats: 2.9 GB for the paper config) is what makes a resume exact; the
    final checkpoint, kept for prediction and fine-tuning, leaves it out, and so does the checkpoint saved on a stop
    request (`carry=False`): it must be written within the sender's kill grace, and a resume from it is correct,
    if not bit-exact (the rows in flight start afresh from the sampler's stream; docs/RELIABILITY.md)."""
    global_carry = None
    if not final if carry is None else carry:  # gathered to rank 0 alone (the only writer); the others get empties
        global_carry = gather_carries(state.carries, lambda t: gather_rows_to_main(t, rt.world))
        global_carry["sides"] = torch.from_numpy(state.sides.copy())  # every process holds all of them
    path = ckpt_dir / f"step_{state.step:08d}.pt"
    if rt.is_main:
        ckpt.save_training_state(
            path,
            {
                "step": state.step,
                "config": to_dict(cfg),
                "model": state.model.state_dict(),
                "ema": state.ema.state_dict() if state.ema is not None else None,
                "optimizer": state.optimizer.state_dict(),
                "table_optimizer": state.table.state_dict(),
                "sampler": state.sampler.state_dict(),
                "carry": global_carry,
                "rng": ckpt.get_rng_state(),
                "world": rt.world,
                "final": final,
                "stopped": carry is False and not final,  # saved on a stop request, without the carry
                "dataset_fingerprint": state.dataset_fingerprint,
                "flops": state.flops,
                "wall_s": state.wall_s,
            },
            keep=cfg.keep_checkpoints,
        )
    if rt.world > 1:
        barrier()
    return path


# ---------------------------------------------------------------------------------------------- one step
def step_flops(model: Any, sides: np.ndarray) -> float:
    """Model FLOPs of the step just run: every global row at its bucket's side, at the depth the step ran."""
    values, counts = np.unique(sides, return_counts=True)
    return float(sum(int(c) * flops_at_depth(model.config, model.cycles, int(v) ** 2) for v, c in zip(values, counts)))


def train_step(state: TrainState, cfg: RunConfig, rt: Runtime, refill: Refill, sums: torch.Tensor,
               bad: torch.Tensor, steps_total: int) -> float:
    """One optimizer step: an ACT step of every row (refilling halted rows), the gradient all-reduce, the dense
    and sparse updates, the EMA. Adds the metrics to `sums`; sets `bad` on a non-finite loss. Returns the LR scale."""
    model = state.model
    micro = cfg.global_batch_size // rt.world // cfg.grad_accum_steps
    lr_scale = lr_at(state.step + 1, 1.0, cfg.lr_warmup_steps, steps_total, cfg.lr_min_ratio, cfg.lr_schedule)
    explore_u, explore_k = exploration_draws(cfg.seed, state.step, cfg.global_batch_size, cfg.model.halt_max_steps)
    local_ids, local_grads = [], []
    model.cycles = depth_at(cfg.model, cfg.depth_curriculum, state.step, steps_total)
    for i in range(len(state.carries)):  # micro-batches (grad_accum_steps of them)
        fresh = refill(i, state.carries[i].halted)
        lo = rt.rank * (cfg.global_batch_size // rt.world) + i * micro
        explore = (to_device(explore_u[lo:lo + micro], rt.device), to_device(explore_k[lo:lo + micro], rt.device))
        groups = bucket_groups(refill.local_sides(i), math.isqrt(cfg.model.seq_len))
        for g, (side, rows) in enumerate(groups):  # one group (all rows) without buckets
            index = None if rows is None else to_device(torch.from_numpy(rows), rt.device)
            carry, batch = take_rows(state.carries[i], fresh, index, side, model.puzzle_len)
            with rt.accelerator.autocast():
                carry, outputs = model(carry, batch, exploration=tuple(
                    e if index is None else e[index] for e in explore))
                state.carries[i] = put_rows(state.carries[i], index, carry)
                if g == len(groups) - 1:
                    refill.watch(i, state.carries[i].halted)  # the next step's refill overlaps this backward pass
                loss, metrics = act_loss(outputs, carry)
            (loss / cfg.global_batch_size).backward()
            local_ids.append(model.puzzle_emb.local_ids.detach().clone())
            local_grads.append(model.puzzle_emb.local_weights.grad.detach().clone())
            sums += torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=rt.device).detach()
                                 for k in METRIC_KEYS])
            bad |= ~torch.isfinite(loss.detach())

    all_reduce_gradients([p for p in model.parameters() if p.requires_grad], rt.world)
    train_dense = state.step >= cfg.freeze_weights_steps
    if train_dense:
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_scale
        state.optimizer.step()
    model.zero_grad(set_to_none=True)
    state.table.param_groups[0]["lr"] = cfg.puzzle_emb_lr * lr_scale
    state.table.step(torch.cat(local_ids), torch.cat(local_grads))
    if state.ema is not None and train_dense:
        state.ema.update(model)
    state.step += 1
    return lr_scale


@dataclass(frozen=True)
class LoopCheck:
    """What the loop must do after a step, the same on every process."""

    out_of_time: bool = False  # the time budget is spent: a final checkpoint, then stop
    signalled: bool = False  # a stop request (SIGTERM, pipeline.core.signals): a checkpoint, then Stopped
    save_due: bool = False  # checkpoint_every_s has passed since the last checkpoint


class LoopChecks:
    """Whether to stop or save after each step, the same on every process.

    With one process the clock and the signal flag are read every step. With several, every process must stop or
    save at the same step: each step starts a sum of the three flags over the processes (a few bytes, which runs
    while the next step computes) and acts on the sum the step before started, so a stop request or the end of the
    time budget reaches every process within one step, and no step waits for the device to agree."""

    def __init__(self, cfg: RunConfig, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self._pending: Callable[[], torch.Tensor] | None = None  # the sum in flight (started one step ago)
        self._saved_since = False  # a checkpoint was written after the sum in flight was started

    def __call__(self, elapsed_s: float, since_save_s: float) -> LoopCheck:
        cfg = self.cfg
        local = LoopCheck(
            out_of_time=cfg.time_budget_s > 0 and elapsed_s > cfg.time_budget_s,
            signalled=stop_requested() is not None,
            save_due=cfg.checkpoint_every_s > 0 and since_save_s > cfg.checkpoint_every_s,
        )
        if self.rt.world == 1:
            return local
        flags = torch.tensor([float(local.out_of_time), float(local.signalled), float(local.save_due)],
                             device=self.rt.device)
        previous, self._pending = self._pending, all_reduce_sum_async(flags, self.rt.world)
        stale_save, self._saved_since = self._saved_since, False
        if previous is None:
            return LoopCheck()
        out_of_time, signalled, save_due = (previous() > 0).tolist()
        return LoopCheck(out_of_time, signalled, save_due and not stale_save)

    def saved(self) -> None:
        """A checkpoint was just written: the sum in flight's `save_due` predates it."""
        self._saved_since = True

    def settle(self) -> None:
        """Wait for the sum in flight (every process, before they leave the loop)."""
        if self._pending is not None:
            self._pending()
            self._pending = None


def anyone_signalled(rt: Runtime) -> bool:
    """Whether any process has a stop request (a collective with several: every process calls it)."""
    flag = stop_requested() is not None
    if rt.world == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=rt.device), rt.world).item() > 0)


def nominal_epoch(cfg: RunConfig, dataset: AugmentedDataset, step: int) -> float:
    """Epochs as the reference counts them at this step (step × global batch / examples per epoch)."""
    return step * cfg.global_batch_size / examples_per_epoch(dataset, cfg.data.sampling)


def run_evaluation(state: TrainState, cfg: RunConfig, rt: Runtime, dataset: AugmentedDataset,
                   evaluator: Evaluator, out_dir: Path) -> dict[str, Any] | None:
    """Evaluate with the EMA weights (what prediction uses), log a `kind: eval` row, keep the evaluated weights.
    Every process calls it (the evaluation is sharded); they leave together, after rank 0 has written."""
    started = time.perf_counter()
    state.model.cycles = None  # evaluated at the model's full depth (the next step sets the curriculum's again)
    with state.ema.swap(state.model) if state.ema is not None else nullcontext():
        result = evaluator(state.model, rt)
    state.model.train()
    row = None
    if rt.is_main and result is not None:
        row = {"kind": "eval", "step": state.step, "epoch": nominal_epoch(cfg, dataset, state.step),
               "flops": state.flops, "wall_s": state.wall_s, **result, "seconds": time.perf_counter() - started}
        log_row(rt.accelerator, out_dir / "metrics.jsonl", row)
        weights = {"step": state.step, "config": to_dict(cfg), "model": state.model.state_dict(),
                   "ema": state.ema.state_dict() if state.ema is not None else None, "final": True, "eval": row,
                   "dataset_fingerprint": state.dataset_fingerprint}
        atomic_write_with(out_dir / "checkpoints" / EVALUATED_DIR / f"step_{state.step:08d}.pt",
                          lambda f: torch.save(weights, f))
    if rt.world > 1:
        barrier()
    return row


# ---------------------------------------------------------------------------------------------- the loop
@stoppable
def train(
    cfg: RunConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    init_checkpoint: str | Path | None = None,
    progress: bool = True,
    evaluator: Evaluator | None = None,
    on_start: Callable[[], None] | None = None,
) -> Path:
    """Train; return the path of the last checkpoint. Resuming continues from the latest checkpoint in out_dir.
    The time budget counts from here: loading the dataset, building the model and restoring are part of it.
    Nothing is written to out_dir until everything that can refuse the run has passed (the weights, the checkpoint
    resumed, the trackers started); then `on_start()` (rank 0: e.g. --force train removing the previous run).
    SIGTERM: a checkpoint to resume from, then pipeline.core.signals.Stopped."""
    t_begin = time.perf_counter()
    out_dir = Path(out_dir)
    rt = make_runtime(cfg, out_dir)
    dataset = AugmentedDataset.load(data_dir)
    cfg.model.seq_len = dataset.canvas * dataset.canvas
    cfg.model.num_puzzle_identifiers = dataset.num_puzzle_identifiers
    if cfg.global_batch_size % (rt.world * cfg.grad_accum_steps):
        raise ConfigError(
            f"global_batch_size {cfg.global_batch_size} must divide by processes × grad_accum_steps "
            f"({rt.world} × {cfg.grad_accum_steps})"
        )
    micro = cfg.global_batch_size // rt.world // cfg.grad_accum_steps
    steps_total = total_steps(cfg, dataset)
    every = checkpoint_interval(cfg, dataset)
    eval_every = eval_interval(cfg, dataset) if evaluator is not None else 0

    state = build_state(cfg, dataset, rt, init_checkpoint)
    state.dataset_fingerprint = ckpt.dataset_fingerprint(data_dir)
    ckpt_dir = out_dir / "checkpoints"
    latest = ckpt.latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        restore_state(state, latest, cfg, rt)
        if rt.is_main:
            print(f"resumed from {latest} at step {state.step}")
    check_gradient_gate(state.model, rt)
    if state.carries is None:
        state.carries, state.sides = blank_carries(state.model, cfg, micro, rt.device), None
    if state.sides is None:  # fresh rows (all halted), or a carry saved before buckets existed
        state.sides = np.full(cfg.global_batch_size, dataset.canvas, dtype=np.int64)
    start_trackers(rt.accelerator, to_dict(cfg), out_dir, cfg.log_project, state.step)
    if rt.is_main:
        if on_start is not None:
            on_start()
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", to_dict(cfg))
        print(f"resolved config:\n{dumps(cfg)}")
        print(
            f"train: {dataset.num_train_examples} examples, {dataset.num_variants} puzzle variants, "
            f"{steps_total} steps of {cfg.global_batch_size} rows on {rt.world} process(es), device {rt.device}; "
            f"checkpoint every {every} steps{f' or {cfg.checkpoint_every_s:.0f} s' if cfg.checkpoint_every_s > 0 else ''}, "
            f"evaluation every {eval_every or 'no'} steps"
        )
    refill = Refill(state.sampler, rt, micro, cfg.model.seq_len, state.sides)

    metrics_path = out_dir / "metrics.jsonl"
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=rt.device)
    bad = torch.zeros((), dtype=torch.bool, device=rt.device)
    interval_start, interval_steps, interval_cells = time.perf_counter(), 0, 0
    last_path = ckpt.latest_checkpoint(ckpt_dir)
    last_save = time.perf_counter()
    checks = LoopChecks(cfg, rt)
    bar = tqdm(total=steps_total, initial=state.step, disable=not (progress and rt.is_main), desc="train",
               dynamic_ncols=True)
    while state.step < steps_total:
        step_start = time.perf_counter()
        lr_scale = train_step(state, cfg, rt, refill, sums, bad, steps_total)
        state.wall_s += time.perf_counter() - step_start
        state.flops += step_flops(state.model, state.sides)
        step = state.step
        interval_steps += 1
        interval_cells += int(np.square(state.sides).sum())  # grid tokens computed this step (all processes)
        bar.update(1)

        if step % cfg.log_every == 0 or step == steps_total:
            all_reduce_sum(sums, rt.world)
            if bool(bad.item()) or not bool(torch.isfinite(sums).all()):
                raise NonFiniteLossError(f"non-finite loss before step {step}; the last good checkpoint is {last_path}")
            elapsed = time.perf_counter() - interval_start
            row = {"kind": "train", "step": step, "epoch": nominal_epoch(cfg, dataset, step),
                   "stream_epoch": state.sampler.epoch, "lr": cfg.lr * lr_scale, "flops": state.flops,
                   "wall_s": state.wall_s,
                   **_metrics_to_floats(sums, interval_steps * cfg.global_batch_size)}
            row["examples_per_s"] = interval_steps * cfg.global_batch_size / max(elapsed, 1e-9)
            row["grid_tokens_per_row"] = interval_cells / (interval_steps * cfg.global_batch_size)
            if rt.is_main:
                log_row(rt.accelerator, metrics_path, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", exact=f"{row['exact_accuracy']:.3f}")
            sums.zero_()
            interval_start, interval_steps, interval_cells = time.perf_counter(), 0, 0

        check = checks(time.perf_counter() - t_begin, time.perf_counter() - last_save)
        final = step == steps_total or check.out_of_time
        if step % every == 0 or final or check.signalled or check.save_due:
            if rt.world > 1:  # a NaN on any process stops every process (none may go on into the save)
                bad = all_reduce_sum(bad.to(torch.float32), rt.world) > 0
            if bool(bad.item()):
                raise NonFiniteLossError(f"non-finite loss before step {step}; the last good checkpoint is {last_path}")
            # on a stop request without the carry: the save must fit the sender's kill grace
            last_path = save_state(state, cfg, rt, ckpt_dir, final=final, carry=False if check.signalled else None)
            last_save = time.perf_counter()
            checks.saved()
        if check.signalled and not final:  # no evaluation: the time is the signal sender's
            _stopped(rt, bar, checks, f"train: stopped by a signal at step {step}; checkpoint to resume from "
                     f"{last_path}")
        if eval_every and (step % eval_every == 0 or final):
            row = run_evaluation(state, cfg, rt, dataset, evaluator, out_dir)
            if row is not None:
                bar.write(f"eval at step {step}: pass@2 {row['pass2']:.4f} (per task {row['task_pass2']:.4f}), "
                          f"pass@1 {row['pass1']:.4f}, oracle {row['oracle']:.4f}, {row['views']} views, "
                          f"{row['seconds']:.1f} s")
            if anyone_signalled(rt):  # a stop request during the evaluation ended it: save, then stop
                if not final:
                    last_path = save_state(state, cfg, rt, ckpt_dir, final=False, carry=False)
                _stopped(rt, bar, checks, f"train: stopped by a signal during the evaluation at step {step}; "
                         f"checkpoint {last_path}")
        if check.out_of_time:
            if rt.is_main:
                print(f"time budget of {cfg.time_budget_s:.0f} s reached at step {step}")
            break
    checks.settle()
    bar.close()
    finish_trackers(rt.accelerator)
    return last_path


def _stopped(rt: Runtime, bar: Any, checks: LoopChecks, message: str) -> None:
    """After the stop request's checkpoint: say so, close the trackers, raise Stopped (every process)."""
    checks.settle()
    if rt.is_main:
        print(message, flush=True)
    bar.close()
    finish_trackers(rt.accelerator)
    raise Stopped(stop_requested() or signal.SIGTERM, message)


def plan_steps(cfg: RunConfig, dataset: AugmentedDataset) -> dict[str, Any]:
    """The schedule a `train` run with this config would follow, without training (for `--stage plan`)."""
    from pipeline.training.batches import num_groups

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
