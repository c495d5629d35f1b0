"""The always-valid submission: every test input answered with itself, from the raw challenges JSON, and the merge
that replaces a fallback entry only with a complete, valid model answer.

The notebook's first cell writes the same fallback with a standard-library copy of `fallback_from_raw`, before
the project is installed (a test checks the two agree on every malformed shape).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.data.tasks import Task
from pipeline.kaggle_driver.settings import ENV
from submissions.validate import grid_problems, validate_submission
from submissions.write import write_submission

Submission = dict[str, list[dict[str, list[list[int]]]]]


def _fallback_grid(pair: Any) -> list[list[int]]:
    """The test input itself when it is a valid grid (what Kaggle accepts), else [[0]]."""
    grid = pair.get("input") if isinstance(pair, dict) else None
    return grid if not grid_problems(grid) else [[0]]


def fallback_from_raw(challenges: Any, file: str | os.PathLike = "challenges") -> Submission:
    """A complete submission from the raw challenges JSON, whatever shape each task is in.

    A task whose "test" is a list gets one entry per element; a task too broken to count its test inputs gets
    one entry. Only a file that is not a {task_id: task} object at all raises (naming the file)."""
    if not isinstance(challenges, dict):
        raise ValueError(f"{file}: not a JSON object mapping task id -> task (got {type(challenges).__name__})")
    submission: Submission = {}
    for task_id, task in challenges.items():
        tests = task.get("test") if isinstance(task, dict) else None
        pairs = tests if isinstance(tests, list) else [None]
        submission[str(task_id)] = [{"attempt_1": g, "attempt_2": g} for g in map(_fallback_grid, pairs)]
    return submission


def read_raw_challenges(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"challenges file {path} does not exist (attach the competition data, or set "
                                f"{ENV['challenges']})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"challenges file {path}: not valid JSON ({e})") from None


def expected_tasks(fallback: Submission) -> list[Task]:
    """Stand-in Tasks with the raw ids and test counts, for validate_submission (which reads only those)."""
    return [Task(task_id, [], [np.zeros((1, 1), np.uint8)] * len(entries), None, "raw challenges")
            for task_id, entries in fallback.items()]


def _valid_entries(answer: Any, count: int) -> bool:
    return isinstance(answer, list) and len(answer) == count and all(
        isinstance(e, dict) and all(k in e and not grid_problems(e[k]) for k in ("attempt_1", "attempt_2"))
        for e in answer)


def merge_submission(fallback: Submission, model: Mapping[str, Any]) -> tuple[Submission, list[str]]:
    """The model's entries for every task it answered completely and validly, the fallback entries for every other
    task; in the challenges' task order. Returns (merged, ids of the tasks that fell back)."""
    merged: Submission = {}
    fell_back: list[str] = []
    for task_id, entries in fallback.items():
        answer = model.get(task_id)
        if _valid_entries(answer, len(entries)):
            merged[task_id] = answer
        else:
            merged[task_id] = entries
            fell_back.append(task_id)
    return merged, fell_back


def write_validated(path: Path, submission: Submission, fallback: Submission) -> None:
    """Atomic replace of `path`, only with a submission complete and valid against the raw challenges."""
    problems = validate_submission(submission, expected_tasks(fallback))
    if problems:
        raise RuntimeError(f"refusing to write an invalid submission to {path}:\n" + "\n".join(problems[:20]))
    write_submission(path, submission)


def submission_problems(path: Path, fallback: Submission | None) -> list[str]:
    """A last check of the submission file on disk against the raw challenges."""
    if fallback is None:
        return ["no fallback (challenges unreadable)"]
    try:
        return validate_submission(json.loads(path.read_text()), expected_tasks(fallback))
    except (OSError, ValueError) as e:
        return [f"{path}: {e}"]
