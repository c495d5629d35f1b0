"""Stage `train`: TRM-Att with deep supervision and ACT, through HuggingFace Accelerate. The loop, top to bottom.

One optimizer step = one ACT step of every row of the global batch (pipeline.training.step); rows that halted are
refilled from the sampler's stream (pipeline.training.refill, pipeline.training.batches); the step count follows the
reference's formula (pipeline.training.compute.total_steps). State and checkpoints: pipeline.training.state; device
and precision: pipeline.training.runtime. Evaluation is injected (`evaluator`, built by the CLI from
pipeline.cli.evaluate), so that training never imports the prediction and scoring stages downstream of it.
"""
from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from augment.dataset import AugmentedDataset
from pipeline.config import RunConfig, dumps, to_dict
from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_write_json
from pipeline.core.signals import Stopped, stop_requested, stoppable
from pipeline.core.tracking import finish_trackers, log_row, start_trackers
from pipeline.training import checkpoint as ckpt
from pipeline.training.collectives import all_reduce_sum, all_reduce_sum_async
from pipeline.model.loading import load_weights
from pipeline.training.batches import num_groups
from pipeline.training.compute import (FinetunePlan, apply_plan, checkpoint_interval, eval_interval, nominal_epoch,
                                       planned_finetune, total_steps)
from pipeline.training.loss import METRIC_KEYS
from pipeline.training.refill import Refill
from pipeline.training.runtime import Runtime, check_gradient_gate, make_runtime
from pipeline.training.state import (EVALUATED_DIR, Evaluator, TrainState, blank_carries, build_state, make_sampler,
                                     restore_state, run_evaluation, save_state)
from pipeline.training.step import NonFiniteLossError, metrics_to_floats, probe_step_seconds, step_flops, train_step

__all__ = ["EVALUATED_DIR", "Evaluator", "LoopCheck", "LoopChecks", "NonFiniteLossError", "anyone_signalled", "train"]


@dataclass(frozen=True)
class LoopCheck:
    """What the loop must do after a step, the same on every process."""

    out_of_time: bool = False  # the time budget is spent: a final checkpoint, then stop
    signalled: bool = False  # a stop request (SIGTERM, pipeline.core.signals): a resumable checkpoint, then Stopped
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


@dataclass
class Interval:
    """What the loop adds up between two metrics.jsonl rows."""

    sums: torch.Tensor  # METRIC_KEYS, summed over the interval's steps (on the device: no sync per step)
    bad: torch.Tensor  # a non-finite loss was seen (on the device)
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    cells: int = 0  # grid tokens computed (all processes)

    def reset(self) -> None:
        self.sums.zero_()
        self.started, self.steps, self.cells = time.perf_counter(), 0, 0


def log_interval(state: TrainState, cfg: RunConfig, rt: Runtime, dataset: AugmentedDataset, interval: Interval,
                 lr_scale: float, last_path: Path | None, out_dir: Path, bar: tqdm) -> None:
    """One `kind: train` row of the interval's metrics (a collective); a non-finite loss stops the run."""
    all_reduce_sum(interval.sums, rt.world)
    if bool(interval.bad.item()) or not bool(torch.isfinite(interval.sums).all()):
        raise NonFiniteLossError(f"non-finite loss before step {state.step}; the last good checkpoint is {last_path}")
    rows = interval.steps * cfg.global_batch_size
    row = {"kind": "train", "step": state.step, "epoch": nominal_epoch(cfg, dataset, state.step),
           "stream_epoch": state.sampler.epoch, "lr": cfg.lr * lr_scale, "flops": state.flops,
           "wall_s": state.wall_s, **metrics_to_floats(interval.sums, rows),
           "examples_per_s": rows / max(time.perf_counter() - interval.started, 1e-9),
           "grid_tokens_per_row": interval.cells / max(rows, 1)}
    if rt.is_main:
        log_row(rt.accelerator, out_dir / "metrics.jsonl", row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", exact=f"{row['exact_accuracy']:.3f}")
    interval.reset()


def save_checked(state: TrainState, cfg: RunConfig, rt: Runtime, interval: Interval, last_path: Path | None,
                 out_dir: Path, final: bool, stopping: bool = False) -> Path:
    """A checkpoint, unless a NaN was seen on any process (then every process stops: none may go on to save)."""
    bad = interval.bad
    if rt.world > 1:
        bad = all_reduce_sum(bad.to(torch.float32), rt.world) > 0
    if bool(bad.item()):
        raise NonFiniteLossError(f"non-finite loss before step {state.step}; the last good checkpoint is {last_path}")
    # on a stop request without the carry: the save must fit the sender's kill grace
    return save_state(state, cfg, rt, out_dir / "checkpoints", final=final, carry=False if stopping else None)


def prepare(cfg: RunConfig, data_dir: str | Path, out_dir: Path, rt: Runtime, resume: bool,
            init_checkpoint: str | Path | None) -> tuple[AugmentedDataset, TrainState]:
    """The dataset and the state to start from (restored when resuming), the config completed from the dataset."""
    dataset = AugmentedDataset.load(data_dir)
    cfg.model.seq_len = dataset.canvas * dataset.canvas
    cfg.model.num_puzzle_identifiers = dataset.num_puzzle_identifiers
    if cfg.global_batch_size % (rt.world * cfg.grad_accum_steps):
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} must divide by processes × grad_accum_steps "
                          f"({rt.world} × {cfg.grad_accum_steps})")
    latest = ckpt.latest_checkpoint(out_dir / "checkpoints") if resume else None
    saved = ckpt.load_training_state(latest, mmap=True).get("finetune_plan") if latest is not None else None
    plan = FinetunePlan(**saved) if saved is not None else None
    if plan is not None:  # a planned fine-tune resumed keeps its plan (the clock left is not the one planned with)
        apply_plan(cfg, plan)
    state = build_state(cfg, dataset, rt, init_checkpoint)
    state.dataset_fingerprint, state.plan = ckpt.dataset_fingerprint(data_dir), plan
    if latest is not None:
        restore_state(state, latest, cfg, rt)
        if rt.is_main:
            print(f"resumed from {latest} at step {state.step}")
    check_gradient_gate(state.model, rt)
    micro = cfg.global_batch_size // rt.world // cfg.grad_accum_steps
    if state.carries is None:
        state.carries, state.sides = blank_carries(state.model, cfg, micro, rt.device), None
    if state.sides is None:  # fresh rows (all halted), or a carry saved before buckets existed
        state.sides = np.full(cfg.global_batch_size, dataset.canvas, dtype=np.int64)
    return dataset, state


def plan_run(cfg: RunConfig, rt: Runtime, dataset: AugmentedDataset, state: TrainState,
             init_checkpoint: str | Path, t_begin: float) -> FinetunePlan:
    """A planned fine-tune's plan (finetune_plan), at its fresh start: its steps are the run's bound (steps, FLOPs or
    epochs) or, with a time budget, fewer if the time left buys fewer at the speed the probe measures (the same
    plan on every process: their mean figures); the plan's settings go into cfg and the state."""
    bound = total_steps(cfg, dataset)
    steps, probe = bound, {"steps_bound": bound}
    if cfg.time_budget_s > 0:
        seconds = probe_step_seconds(state, cfg, rt)
        figures = torch.tensor([seconds, cfg.time_budget_s - (time.perf_counter() - t_begin)], dtype=torch.float64,
                               device=rt.device)
        seconds, left = (all_reduce_sum(figures, rt.world) / rt.world).tolist() if rt.world > 1 else figures.tolist()
        by_time = max(1, int(left / seconds))
        steps = min(bound, by_time)
        probe.update(seconds_per_step=seconds, steps_by_time=by_time)
    pretrained = load_weights(init_checkpoint).run_config or {}
    plan = planned_finetune(steps, cfg, pretrained.get("lr"), num_groups(dataset),
                         dataset.num_train_examples / max(dataset.num_variants, 1), **probe)
    apply_plan(cfg, plan)
    if state.ema is not None:
        state.ema.decay = plan.ema_rate
    state.sampler, state.plan = make_sampler(cfg, dataset, state.engine), plan
    return plan


def announce(cfg: RunConfig, rt: Runtime, dataset: AugmentedDataset, out_dir: Path, steps_total: int, every: int,
             eval_every: int, on_start: Callable[[], None] | None, state: TrainState) -> None:
    """Rank 0, once everything that can refuse the run has passed: `on_start()` (e.g. --force train removing the
    previous run), then config.json, the run's summary and a planned fine-tune's plan (also in metrics.jsonl)."""
    if not rt.is_main:
        return
    if on_start is not None:
        on_start()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", to_dict(cfg))
    print(f"resolved config:\n{dumps(cfg)}")
    seconds = f" or {cfg.checkpoint_every_s:.0f} s" if cfg.checkpoint_every_s > 0 else ""
    print(f"train: {dataset.num_train_examples} examples, {dataset.num_variants} puzzle variants, {steps_total} steps "
          f"of {cfg.global_batch_size} rows on {rt.world} process(es), device {rt.device}; checkpoint every {every} "
          f"steps{seconds}, evaluation every {eval_every or 'no'} steps")
    if state.plan is not None:
        print(f"fine-tune plan: {describe_plan(state.plan)}")
        log_row(rt.accelerator, out_dir / "metrics.jsonl", {"kind": "plan", "step": state.step, **asdict(state.plan)})


def stop_on_signal(rt: Runtime, checks: LoopChecks, message: str, bar: tqdm) -> None:
    """After the stop request's checkpoint: say so, close the trackers, raise Stopped (every process)."""
    checks.settle()
    if rt.is_main:
        print(message, flush=True)
    bar.close()
    finish_trackers(rt.accelerator)
    raise Stopped(stop_requested() or signal.SIGTERM, message)


def describe_plan(plan: FinetunePlan) -> str:
    timed = (f" (the time left buys {plan.steps_by_time} at {plan.seconds_per_step:.3f} s a step, probed; the "
             f"bound allows {plan.steps_bound})" if plan.steps_by_time else "")
    return (f"{plan.steps} steps{timed}; lr {plan.lr:g}, ema_rate {plan.ema_rate:.4f}, {plan.lr_warmup_steps} "
            f"warm-up steps, the first {plan.train_variants} variants of each puzzle trained (~{plan.visits:.0f} "
            f"visits per puzzle row) and predicted")


def report_evaluation(row: dict[str, Any] | None, bar: tqdm) -> None:
    if row is not None:
        bar.write(f"eval at step {row['step']}: pass@2 {row['pass2']:.4f} (per task {row['task_pass2']:.4f}), "
                  f"pass@1 {row['pass1']:.4f}, oracle {row['oracle']:.4f}, {row['views']} views, "
                  f"{row['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------- the loop
@stoppable
def train(cfg: RunConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
          init_checkpoint: str | Path | None = None, progress: bool = True, evaluator: Evaluator | None = None,
          on_start: Callable[[], None] | None = None) -> Path:
    """Train; return the path of the last checkpoint. Resuming continues from the latest checkpoint in out_dir.
    The time budget counts from here: loading the dataset, building the model and restoring are part of it.
    Nothing is written to out_dir until everything that can refuse the run has passed (the weights, the checkpoint
    resumed, the trackers started); then `on_start()`. SIGTERM: a checkpoint to resume from, then Stopped."""
    t_begin, out_dir = time.perf_counter(), Path(out_dir)
    rt = make_runtime(cfg, out_dir)
    dataset, state = prepare(cfg, data_dir, out_dir, rt, resume, init_checkpoint)
    if cfg.finetune_plan and init_checkpoint is not None and state.plan is None and state.step == 0:
        plan_run(cfg, rt, dataset, state, init_checkpoint, t_begin)
    steps_total = state.plan.steps if state.plan is not None else total_steps(cfg, dataset)
    every = checkpoint_interval(cfg, dataset)
    eval_every = eval_interval(cfg, dataset) if evaluator is not None else 0
    start_trackers(rt.accelerator, to_dict(cfg), out_dir, cfg.log_project, state.step)
    announce(cfg, rt, dataset, out_dir, steps_total, every, eval_every, on_start, state)
    refill = Refill(state.sampler, rt, cfg.global_batch_size // rt.world // cfg.grad_accum_steps,
                    cfg.model.seq_len, state.sides)
    interval = Interval(torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=rt.device),
                        torch.zeros((), dtype=torch.bool, device=rt.device))
    last_path, last_save = ckpt.latest_checkpoint(out_dir / "checkpoints"), time.perf_counter()
    checks = LoopChecks(cfg, rt)
    bar = tqdm(total=steps_total, initial=state.step, disable=not (progress and rt.is_main), desc="train",
               dynamic_ncols=True)
    while state.step < steps_total:
        step_start = time.perf_counter()
        lr_scale = train_step(state, cfg, rt, refill, interval.sums, interval.bad, steps_total)
        state.wall_s += time.perf_counter() - step_start
        state.flops += step_flops(state.model, state.sides)
        interval.steps += 1
        interval.cells += int(np.square(state.sides).sum())
        step = state.step
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps_total:
            log_interval(state, cfg, rt, dataset, interval, lr_scale, last_path, out_dir, bar)
        check = checks(time.perf_counter() - t_begin, time.perf_counter() - last_save)
        final = step == steps_total or check.out_of_time
        if step % every == 0 or final or check.signalled or check.save_due:
            last_path = save_checked(state, cfg, rt, interval, last_path, out_dir, final, stopping=check.signalled)
            last_save = time.perf_counter()
            checks.saved()
        if check.signalled and not final:  # no evaluation: the time is the signal sender's
            stop_on_signal(rt, checks, f"train: stopped by a signal at step {step}; checkpoint to resume from "
                           f"{last_path}", bar)
        if eval_every and (step % eval_every == 0 or final):
            report_evaluation(run_evaluation(state, cfg, rt, dataset, evaluator, out_dir), bar)
            if anyone_signalled(rt):  # a stop request during the evaluation ended it: save, then stop
                if not final:
                    last_path = save_checked(state, cfg, rt, interval, last_path, out_dir, False, stopping=True)
                stop_on_signal(rt, checks, f"train: stopped by a signal during the evaluation at step {step}; "
                               f"checkpoint {last_path}", bar)
        if check.out_of_time:
            if rt.is_main:
                print(f"time budget of {cfg.time_budget_s:.0f} s reached at step {step}")
            break
    checks.settle()
    bar.close()
    finish_trackers(rt.accelerator)
    return last_path
