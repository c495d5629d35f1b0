"""Build and write Kaggle ARC Prize submission files.

Format: `{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...one per test input, in order]}`, grids as lists of
lists of int. Kaggle rejects a file that lacks any task or test input, so a submission is always complete: a test
input without a valid candidate gets a fallback (its own input grid) and is listed in the report.

What each test input got is one of three `Answer`s, and every report (the stage's line, the Kaggle driver's log,
phase table and kaggle_status.json) says it in these words: two model candidates; one model candidate + fallback
(attempt_2 is the input grid, a second chance, rather than the same candidate twice); fallback only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Mapping, Sequence

import numpy as np

from pipeline.data.tasks import Task
from pipeline.core.io import atomic_write_text
from pipeline.inference.vote import Key, Ranked

FALLBACKS = ("input",)


class Answer(str, Enum):
    """What a test input's two attempts came from (a str, so it is written to JSON as these words)."""

    TWO = "two model candidates"
    ONE = "one model candidate + fallback"
    FALLBACK = "fallback only"


def count_answers(answers: Iterable[Answer]) -> dict[str, int]:
    """{words: number of test inputs}, every Answer present (0 too), in Answer's order."""
    answers = list(answers)
    return {kind.value: sum(a == kind for a in answers) for kind in Answer}


def describe_answers(counts: Mapping[str, int]) -> str:
    """'90 two model candidates, 26 one model candidate + fallback, 51 fallback only'."""
    return ", ".join(f"{counts.get(kind.value, 0)} {kind.value}" for kind in Answer)


@dataclass
class Fallback:
    task_id: str
    test_index: int
    reason: str


@dataclass
class SubmissionReport:
    num_tasks: int = 0
    num_test_inputs: int = 0
    num_two_attempts: int = 0  # test inputs with two distinct model candidates
    num_one_candidate: int = 0  # test inputs with one model candidate (attempt_2: the fallback grid)
    fallbacks: list[Fallback] = field(default_factory=list)  # test inputs with no model candidate at all
    ignored: list[str] = field(default_factory=list)  # ranked entries that match no task / test input
    answers: dict[str, list[Answer]] = field(default_factory=dict)  # task id -> what each test input got

    def summary(self) -> str:
        counts = count_answers(a for per_task in self.answers.values() for a in per_task)
        return (
            f"{self.num_test_inputs} test inputs in {self.num_tasks} tasks: {describe_answers(counts)}"
            + (f"; {len(self.ignored)} ranked entries ignored" if self.ignored else "")
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
    """attempt_1/attempt_2 = the two best ranked grids of each test input; a single candidate is attempt_1 and
    the fallback grid attempt_2; no candidate: the fallback grid in both."""
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose from {FALLBACKS}")
    report = SubmissionReport(num_tasks=len(tasks))
    submission: dict[str, list[dict[str, list[list[int]]]]] = {}
    expected: set[Key] = set()
    for task in tasks:
        if task.id in submission:
            raise ValueError(f"task {task.id}: listed twice")
        attempts, answers = [], []
        for i, test_input in enumerate(task.test_inputs):
            expected.add((task.id, i))
            candidates = ranked.get((task.id, i), ())
            if len(candidates) == 0:
                report.fallbacks.append(Fallback(task.id, i, "no valid candidate"))
                first = second = test_input
                answers.append(Answer.FALLBACK)
            elif len(candidates) == 1:
                report.num_one_candidate += 1
                first, second = candidates[0].grid, test_input
                answers.append(Answer.ONE)
            else:
                report.num_two_attempts += 1
                first, second = candidates[0].grid, candidates[1].grid
                answers.append(Answer.TWO)
            attempts.append({"attempt_1": _as_list(first), "attempt_2": _as_list(second)})
        report.answers[task.id] = answers
        report.num_test_inputs += len(attempts)
        submission[task.id] = attempts
    report.ignored = [f"{t} test {i}" for t, i in ranked if (t, i) not in expected]
    return submission, report


def write_submission(path: str | os.PathLike, submission: Mapping) -> None:
    """Compact JSON, written atomically (a killed run never leaves half a submission.json)."""
    atomic_write_text(path, json.dumps(submission, separators=(",", ":")))
