"""Build and write Kaggle ARC Prize submission files.

Format: `{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...one per test input, in order]}`, grids as lists of
lists of int. Kaggle rejects a file that lacks any task or test input, so a submission is always complete: a test
input without a valid candidate gets a fallback (its own input grid) and is listed in the report.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from pipeline.data.tasks import Task
from pipeline.core.io import atomic_write_text
from pipeline.inference.vote import Key, Ranked

FALLBACKS = ("input",)


@dataclass
class Fallback:
    task_id: str
    test_index: int
    reason: str


@dataclass
class SubmissionReport:
    num_tasks: int = 0
    num_test_inputs: int = 0
    num_two_attempts: int = 0  # test inputs with two distinct candidates
    num_one_candidate: int = 0  # test inputs whose only candidate fills both attempts
    fallbacks: list[Fallback] = field(default_factory=list)  # test inputs answered with the fallback grid
    ignored: list[str] = field(default_factory=list)  # ranked entries that match no task / test input

    def summary(self) -> str:
        return (
            f"{self.num_tasks} tasks, {self.num_test_inputs} test inputs: {self.num_two_attempts} with two candidates, "
            f"{self.num_one_candidate} with one, {len(self.fallbacks)} fallbacks"
            + (f", {len(self.ignored)} ranked entries ignored" if self.ignored else "")
        )


def _as_list(grid: np.ndarray) -> list[list[int]]:
    return np.asarray(grid).astype(int).tolist()  # Python ints: json can write them, numpy scalars it cannot


def fallback_submission(tasks: Sequence[Task]) -> dict[str, list[dict[str, list[list[int]]]]]:
    """A complete, valid submission whose every attempt is the test input itself.

    The Kaggle notebook writes this first, so a crash later still leaves a scoreable file.
    """
    return {
        task.id: [{"attempt_1": _as_list(x), "attempt_2": _as_list(x)} for x in task.test_inputs] for task in tasks
    }


def build_submission(
    tasks: Sequence[Task], ranked: Mapping[Key, Sequence[Ranked]], fallback: str = "input"
) -> tuple[dict[str, list[dict[str, list[list[int]]]]], SubmissionReport]:
    """attempt_1/attempt_2 = the two best ranked grids of each test input; one candidate fills both."""
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose from {FALLBACKS}")
    report = SubmissionReport(num_tasks=len(tasks))
    submission: dict[str, list[dict[str, list[list[int]]]]] = {}
    expected: set[Key] = set()
    for task in tasks:
        if task.id in submission:
            raise ValueError(f"task {task.id}: listed twice")
        attempts = []
        for i, test_input in enumerate(task.test_inputs):
            expected.add((task.id, i))
            candidates = ranked.get((task.id, i), ())
            if len(candidates) == 0:
                report.fallbacks.append(Fallback(task.id, i, "no valid candidate"))
                first = second = test_input
            elif len(candidates) == 1:
                report.num_one_candidate += 1
                first = second = candidates[0].grid
            else:
                report.num_two_attempts += 1
                first, second = candidates[0].grid, candidates[1].grid
            attempts.append({"attempt_1": _as_list(first), "attempt_2": _as_list(second)})
        report.num_test_inputs += len(attempts)
        submission[task.id] = attempts
    report.ignored = [f"{t} test {i}" for t, i in ranked if (t, i) not in expected]
    return submission, report


def write_submission(path: str | os.PathLike, submission: Mapping) -> None:
    """Compact JSON, written atomically (a killed run never leaves half a submission.json)."""
    atomic_write_text(path, json.dumps(submission, separators=(",", ":")))
