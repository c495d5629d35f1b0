"""One out-of-memory retry loop, shared by fine-tuning (more micro-batches) and prediction (a smaller batch)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from pipeline.kaggle_driver.budget import StagePlan
from pipeline.kaggle_driver.child import ChildResult
from pipeline.kaggle_driver.log import log

OOM_PATTERN = re.compile(r"out of memory|OutOfMemoryError|exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)", re.IGNORECASE)


def is_out_of_memory(result: ChildResult) -> bool:
    """Did the child die for memory? SIGKILL (the host's OOM killer: exit -9, 137 through a shell) or a CUDA
    out-of-memory error in its output (torchrun reports a worker's -9 as text). A child we stopped for time is not."""
    if result.timed_out:
        return False
    return result.returncode in (-9, 137) or bool(OOM_PATTERN.search(result.tail))


def next_grad_accum(global_batch: int, num_processes: int, accum: int) -> int | None:
    """The next number of micro-batches for an out-of-memory retry: the smallest >= 2 x accum that splits each
    process's share of the global batch evenly (a micro-batch at most half as big, the same global batch); None
    when the micro-batch is already one row."""
    local = global_batch // max(1, num_processes)
    for candidate in range(2 * accum, local + 1):
        if local % candidate == 0:
            return candidate
    return None


def halve(batch: int) -> int | None:
    """The next prediction batch for an out-of-memory retry; None at one row."""
    return batch // 2 if batch > 1 else None


@dataclass(frozen=True)
class Attempt:
    setting: int  # what the attempt ran with: grad_accum_steps (fine-tuning) or the batch size (prediction)
    plan: StagePlan
    result: ChildResult
    out_of_memory: bool


def run_attempts(name: str, first: int, describe: Callable[[int], str], *, plan: Callable[[], StagePlan],
                 launch: Callable[[int, StagePlan], ChildResult], smaller: Callable[[int], int | None],
                 max_retries: int, done: Callable[[Attempt], bool] = lambda a: a.result.ok,
                 after: Callable[[Attempt], None] = lambda a: None) -> list[Attempt]:
    """Attempts until one is `done`; after a failure for memory, again with `smaller(setting)` (`describe` says a
    setting in the log), while the plan
    leaves time (plan().run) and retries are left. `after` sees every attempt (to record it, to keep its partial
    output). Returns the attempts made."""
    attempts: list[Attempt] = []
    setting = first
    for number in range(1 + max_retries):
        stage_plan = plan()
        if not stage_plan.run:
            log(f"{name}: {stage_plan.reason}; no {'further ' if attempts else ''}attempt")
            break
        result = launch(setting, stage_plan)
        attempt = Attempt(setting, stage_plan, result, is_out_of_memory(result))
        attempts.append(attempt)
        after(attempt)
        if done(attempt) or not attempt.out_of_memory:
            break
        next_setting = smaller(setting)
        if next_setting is None or number == max_retries:
            log(f"{name}: out of memory at {describe(setting)}; "
                f"{'no retries left (max_retries)' if next_setting is not None else 'it cannot be made smaller'}")
            break
        log(f"{name}: out of memory at {describe(setting)} (exit code {result.returncode}); retrying with "
            f"{describe(next_setting)}")
        setting = next_setting
    return attempts
