"""Check a submission against the challenge tasks before Kaggle does (a rejected file costs a day's submission).

Every problem is named: task id, test index, attempt and what is wrong. An empty list means the file is valid.
"""
from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any, Sequence

from pipeline.data.tasks import Task
from pipeline.core.errors import InputFileError
from pipeline.core.io import read_json

ATTEMPT_KEYS = ("attempt_1", "attempt_2")
_SHORT = reprlib.Repr()  # a cell may be anything, e.g. a list nested 900 deep: show only a short head of it
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 30, 30
MAX_SIDE = 30
MAX_PROBLEMS_PER_GRID = 3  # a 30x30 grid of strings would otherwise produce 900 lines


def grid_problems(grid: Any) -> list[str]:
    """What keeps `grid` from being a rectangular, non-empty list of lists of ints 0-9 with sides <= 30."""
    if not isinstance(grid, list):
        return [f"is a {type(grid).__name__}, not a list of rows"]
    if len(grid) == 0:
        return ["has no rows"]
    if len(grid) > MAX_SIDE:
        return [f"has {len(grid)} rows (at most {MAX_SIDE})"]
    problems: list[str] = []
    width = None
    for r, row in enumerate(grid):
        if not isinstance(row, list):
            problems.append(f"row {r} is a {type(row).__name__}, not a list")
            continue
        if len(row) == 0:
            problems.append(f"row {r} is empty")
            continue
        if len(row) > MAX_SIDE:
            problems.append(f"row {r} has {len(row)} cells (at most {MAX_SIDE})")
        if width is None:
            width = len(row)
        elif len(row) != width:
            problems.append(f"is not rectangular: row {r} has {len(row)} cells, row 0 has {width}")
        for c, value in enumerate(row):
            # bool is a subclass of int in Python, but `true` is not a colour.
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"cell ({r},{c}) is {_SHORT.repr(value)} ({type(value).__name__}), not an int")
            elif not 0 <= value <= 9:
                problems.append(f"cell ({r},{c}) is {value}, not a colour 0-9")
            if len(problems) >= MAX_PROBLEMS_PER_GRID:
                return problems + ["(further cell problems not listed)"]
    return problems


def validate_submission(submission: Any, tasks: Sequence[Task]) -> list[str]:
    """All problems of `submission` against the challenge `tasks` (every task and test input must be answered)."""
    if not isinstance(submission, dict):
        return [f"submission is a {type(submission).__name__}, expected an object mapping task id -> list"]
    problems: list[str] = []
    expected = {task.id: len(task.test_inputs) for task in tasks}
    for task_id, num_tests in expected.items():
        if task_id not in submission:
            problems.append(f"task {task_id}: missing")
            continue
        entries = submission[task_id]
        if not isinstance(entries, list):
            problems.append(f"task {task_id}: is a {type(entries).__name__}, expected a list with one object per test input")
            continue
        if len(entries) != num_tests:
            problems.append(f"task {task_id}: has {len(entries)} entries, expected {num_tests} (one per test input)")
        for i, entry in enumerate(entries):
            where = f"task {task_id} test {i}"
            if not isinstance(entry, dict):
                problems.append(f"{where}: is a {type(entry).__name__}, expected an object with {' and '.join(ATTEMPT_KEYS)}")
                continue
            for key in ATTEMPT_KEYS:
                if key not in entry:
                    problems.append(f"{where}: {key} missing")
                    continue
                problems.extend(f"{where} {key}: grid {p}" for p in grid_problems(entry[key]))
    extras = sorted(str(t) for t in submission if t not in expected)
    if extras:
        shown = ", ".join(extras[:10]) + (f", ... ({len(extras)} in all)" if len(extras) > 10 else "")
        problems.append(f"{len(extras)} task(s) not in the challenges: {shown}")
    return problems


def validate_submission_file(path: str | os.PathLike, challenges_tasks: Sequence[Task]) -> list[str]:
    """Like validate_submission, but for a file; an unreadable file or broken JSON is reported, not raised."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return [f"{path}: cannot read ({e})"]
    try:
        submission = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"]
    return [f"{path}: {p}" for p in validate_submission(submission, challenges_tasks)]


def read_submission_file(path: str | os.PathLike) -> dict[str, Any]:
    """A submission file's JSON object (task id -> entries); anything else raises InputFileError naming the file:
    missing, unreadable, not UTF-8, broken or truncated JSON, nested too deeply, a repeated or non-Unicode task
    id, or a top level that is not an object. Bad entries inside are the scorer's to report, per task."""
    submission = read_json(path, "submission")
    if not isinstance(submission, dict):
        raise InputFileError(path, f"not a JSON object mapping task id -> list of attempts (got "
                             f"{type(submission).__name__})", "submission")
    for task_id in submission:
        try:
            task_id.encode("utf-8")
        except UnicodeEncodeError:
            raise InputFileError(path, f"task id {ascii(task_id)} is not valid Unicode text (a lone surrogate)",
                                 "submission") from None
    return submission
