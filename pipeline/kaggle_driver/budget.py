"""The time plan: the only place with time arithmetic. The stages run exactly the plans computed here.

One wall-clock budget counts from the notebook's start. What is left after the submit reserve is split between
the two child stages, fine-tuning and prediction. Each child stage gets a *window* that holds everything it can
cost, so that windows add up to the budget:

    window = stage_overhead_s  +  work  +  kill_grace_s  +  READER_JOIN_S
             (start-up, loads,   (the child's    (SIGTERM at the        (the log reader
              final save)         own budget)     timeout -> SIGKILL)    drains its output)

The child is told `work` as its time budget and is sent SIGTERM at `stage_overhead_s + work` (it then saves what
it has: pipeline.core.signals); SIGKILL follows `kill_grace_s` later, and the driver waits at most READER_JOIN_S
for its output. So a stage ends inside its window even when the child hangs, and the next stage's window is
never eaten into.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from pipeline.kaggle_driver.settings import KaggleSettings

SAVE_SAFETY = 3.0  # a stop checkpoint may write this many times slower than the disk was measured to (a busy disk)
READER_JOIN_S = 5.0  # after a child ended, the most the driver waits for the rest of its output
ROUNDING_S = 1e-6  # a window planned as exactly a stage's minimum stays enough for it after float arithmetic


class PlanMode(Enum):
    FINETUNE_AND_PREDICT = "finetune+predict"
    PREDICT_ONLY = "predict-only"  # with the pretrained checkpoint
    FALLBACK_ONLY = "fallback-only"


@dataclass(frozen=True)
class TimePlan:
    """How the time left is spent: the windows of the two child stages (each as in the module docstring)."""

    mode: PlanMode
    finetune_s: float
    predict_s: float
    left_s: float  # what was left after the submit reserve when this plan was made
    reason: str = ""  # why not both stages


@dataclass(frozen=True)
class StagePlan:
    """One child stage's window, split (module docstring). run=False: the window is too short for the minimum."""

    run: bool
    work_s: float  # handed to the child as its time budget
    timeout_s: float  # SIGTERM to the child this long after its start
    grace_s: float  # then SIGKILL this much later
    join_s: float  # then at most this long for its output
    reason: str = ""

    @property
    def window_s(self) -> float:
        return self.timeout_s + self.grace_s + self.join_s


def deadline(s: KaggleSettings) -> float:
    """When the final submission must be written (time.time() clock)."""
    return s.started_at + s.time_budget_s


def remaining_s(s: KaggleSettings, now: float | None = None) -> float:
    """Seconds until the deadline."""
    return deadline(s) - (time.time() if now is None else now)


def stage_cost(s: KaggleSettings) -> float:
    """Everything a child stage costs besides its work."""
    return s.stage_overhead_s + s.kill_grace_s + READER_JOIN_S


def stop_grace_s(s: KaggleSettings, save_bytes: float, write_bytes_per_s: float) -> float:
    """The kill grace a child stage needs: SIGTERM reaches every process within one step (pipeline.training.train), which
    then saves a checkpoint without the carry and exits; SIGKILL must come later than that. `kill_grace_s` is
    the allowance for the step in progress and the exit, the save's time comes from its size (`save_bytes`,
    pipeline.training.checkpoint.stop_checkpoint_bytes) at the disk's measured rate, with a margin (SAVE_SAFETY)."""
    return s.kill_grace_s + SAVE_SAFETY * save_bytes / max(write_bytes_per_s, 1.0)


def plan_time(s: KaggleSettings, now: float | None = None) -> TimePlan:
    """The split of what is left after the submit reserve, degrading step by step as the budget shrinks:
    enough for both stages' minimums -> fine-tuning gets train_fraction (never cutting prediction below its
    minimum), prediction the rest; enough for prediction only (or train_fraction 0) -> predict with the
    pretrained checkpoint (the round-robin order gives every test input its first views first, so fewer views
    fit, not fewer inputs); less -> the fallback stays."""
    left = remaining_s(s, now) - s.submit_reserve_s
    need_predict = stage_cost(s) + s.min_predict_s
    need_train = stage_cost(s) + s.min_train_s
    if left < need_predict:
        return TimePlan(PlanMode.FALLBACK_ONLY, 0.0, 0.0, left,
                        f"{left:.0f} s left after the {s.submit_reserve_s:.0f} s submit reserve; predicting needs "
                        f"{need_predict:.0f} s (stage_overhead_s + kill_grace_s + {READER_JOIN_S:.0f} s + min_predict_s)")
    if s.train_fraction <= 0:
        return TimePlan(PlanMode.PREDICT_ONLY, 0.0, left, left, "train_fraction is 0 (the default without a GPU)")
    if left < need_train + need_predict:
        return TimePlan(PlanMode.PREDICT_ONLY, 0.0, left, left,
                        f"{left:.0f} s left after the submit reserve; fine-tuning as well needs "
                        f"{need_train + need_predict:.0f} s (both stages' costs + min_train_s + min_predict_s)")
    train = min(max(left * s.train_fraction, need_train), left - need_predict)
    return TimePlan(PlanMode.FINETUNE_AND_PREDICT, train, left - train, left)


def plan_window(s: KaggleSettings, window_s: float, min_work_s: float) -> StagePlan:
    """A child stage that must end within `window_s` seconds from now."""
    work = window_s - stage_cost(s)
    if work < min_work_s - ROUNDING_S:
        return StagePlan(False, 0.0, 0.0, 0.0, 0.0,
                         f"{max(work, 0.0):.0f} s of work fit in the {max(window_s, 0.0):.0f} s left (minimum "
                         f"{min_work_s:.0f} s)")
    work = max(work, min_work_s, 0.0)  # at most ROUNDING_S more than the window holds
    return StagePlan(True, work, s.stage_overhead_s + work, s.kill_grace_s, READER_JOIN_S)


def plan_finetune(s: KaggleSettings, now: float | None = None) -> StagePlan:
    """Fine-tuning's window: its share of plan_time."""
    plan = plan_time(s, now)
    if plan.mode != PlanMode.FINETUNE_AND_PREDICT:
        return StagePlan(False, 0.0, 0.0, 0.0, 0.0, f"{plan.mode.value}: {plan.reason}")
    return plan_window(s, plan.finetune_s, s.min_train_s)


def plan_predict(s: KaggleSettings, now: float | None = None) -> StagePlan:
    """Prediction's window: everything left but the submit reserve."""
    return plan_window(s, remaining_s(s, now) - s.submit_reserve_s, s.min_predict_s)


AUGMENT_SHARE = 0.25  # of the time left after the submit reserve: the most augment (in the driver's process) may use


def augment_window_s(s: KaggleSettings, now: float | None = None) -> float:
    """Augment's window (it runs in the driver's process, under stages.time_window): a share of what is left
    after the submit reserve, never cutting into prediction's minimum."""
    left = remaining_s(s, now) - s.submit_reserve_s
    return max(min(AUGMENT_SHARE * left, left - stage_cost(s) - s.min_predict_s), 1.0)


def submit_window_s(s: KaggleSettings, now: float | None = None) -> float:
    """Submit's window: what is left until the deadline, and never less than the submit reserve (the fallback
    submission is already written, so a submit cut short leaves it)."""
    return max(remaining_s(s, now), s.submit_reserve_s, 1.0)


def window_end(plan: StagePlan, now: float | None = None) -> float:
    """When a stage that starts now with this plan must be over (time.time() clock)."""
    return (time.time() if now is None else now) + plan.window_s


def plan_retry(s: KaggleSettings, stage_end: float, min_work_s: float, now: float | None = None) -> StagePlan:
    """An attempt after a failed one: what is left of the stage's window (which ends at `stage_end`)."""
    return plan_window(s, stage_end - (time.time() if now is None else now), min_work_s)
