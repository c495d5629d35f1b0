"""One ARC task: the `Task` type, and the validation of a task's JSON on the way in.

Everything is validated as it is read, because a bad grid found later (in augmentation, encoding, training) is far
harder to trace back. Problems raise `TaskError`, which names the file, the task id, where in the task (e.g.
"train[2].output") and what is wrong.
"""
from __future__ import annotations

import os
import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError

MAX_SIDE = 30  # ARC grids are at most 30 x 30
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 4, 30, 30, 40


@dataclass
class Task:
    id: str
    train: list[tuple[np.ndarray, np.ndarray]]  # (input, output) demonstration pairs, uint8 grids
    test_inputs: list[np.ndarray]
    test_outputs: list[np.ndarray] | None  # None when unknown (hidden Kaggle tasks)
    source: str  # "arc-agi-1/training", a file path, ...


class TaskError(PipelineError, ValueError):
    """A task (or a whole file) that cannot be used; says which file, which task, where in it, and what is wrong."""

    def __init__(self, file: str | os.PathLike, task_id: str | None, where: str | None, problem: str):
        # args carry every field so the error survives pickling (e.g. across worker processes).
        super().__init__(str(file), task_id, where, problem)
        self.file = str(file)
        self.task_id = task_id
        self.where = where
        self.problem = problem

    def __str__(self) -> str:
        parts = [f"ARC data error in {self.file}"]
        if self.task_id is not None:
            parts.append(f"task {self.task_id!r}")
        if self.where:
            parts.append(f"at {self.where}")
        return ", ".join(parts) + f": {self.problem}"


@dataclass
class SkippedTask:
    file: str
    task_id: str | None  # None when a whole file was skipped
    reason: str


@dataclass
class LoadResult:
    tasks: list[Task]
    skipped: list[SkippedTask] = field(default_factory=list)


class _Invalid(Exception):
    """Raised by the validators below, which do not know file or task id; turned into TaskError by the caller."""

    def __init__(self, where: str | None, problem: str):
        super().__init__(where, problem)
        self.where = where
        self.problem = problem


# ----------------------------------------------------------------------------------------------------------------
# Validation of one task


def _grid(value: Any, where: str) -> np.ndarray:
    """A JSON grid (list of rows) -> uint8 array (h, w), after checking shape and every value.

    Values must be exactly `int` 0-9: bool is a subclass of int and 1.0 == 1, so a plain range check would let
    them through; `type(v) is int` is both strict and the fastest check in CPython.
    """
    if type(value) is not list:
        raise _Invalid(where, f"grid is not a list of rows (got {type(value).__name__})")
    if not value:
        raise _Invalid(where, "grid is empty (no rows)")
    first = value[0]
    width = len(first) if type(first) is list else 0
    if len(value) > MAX_SIDE or width > MAX_SIDE:  # before the cell loop: an oversized grid fails fast
        raise _Invalid(where, f"grid is {len(value)}x{width}; sides must be at most {MAX_SIDE}")
    for r, row in enumerate(value):
        if type(row) is not list:
            raise _Invalid(where, f"row {r} is not a list (got {type(row).__name__})")
        if not row:
            raise _Invalid(where, f"row {r} is empty")
        if len(row) != width:
            raise _Invalid(where, f"rows have different lengths: row {r} has {len(row)} cells, row 0 has {width}")
        for v in row:
            if type(v) is not int or v < 0 or v > 9:
                _bad_value(row, r, where)
    return np.array(value, dtype=np.uint8)


def _bad_value(row: list, r: int, where: str) -> None:
    """Slow path, only on failure: find the first bad cell of `row` and report it."""
    for c, v in enumerate(row):
        if type(v) is not int or not 0 <= v <= 9:
            shown = _SHORT.repr(v)  # a cell may be a 3,000-digit number or a list nested 900 deep
            raise _Invalid(where, f"value {shown} ({type(v).__name__}) at row {r}, column {c} is not an integer 0-9")


def _pairs(obj: dict, key: str) -> list:
    pairs = obj[key]
    if type(pairs) is not list:
        raise _Invalid(key, f"'{key}' is not a list of pairs (got {type(pairs).__name__})")
    if not pairs:
        raise _Invalid(key, f"'{key}' is empty")
    for i, pair in enumerate(pairs):
        if type(pair) is not dict:
            raise _Invalid(f"{key}[{i}]", f"pair is not an object (got {type(pair).__name__})")
    return pairs


def _parse_task(obj: Any, solutions: Any = None) -> tuple[list, list, list | None]:
    """Validate one task object (and optionally its solutions list); return (train, test_inputs, test_outputs)."""
    if type(obj) is not dict:
        raise _Invalid("top level", f"task is not a JSON object (got {type(obj).__name__})")
    for key in ("train", "test"):
        if key not in obj:
            raise _Invalid("top level", f"missing '{key}'")
    train_pairs, test_pairs = _pairs(obj, "train"), _pairs(obj, "test")

    train = []
    for i, pair in enumerate(train_pairs):
        for key in ("input", "output"):
            if key not in pair:
                raise _Invalid(f"train[{i}]", f"pair is missing '{key}'")
        train.append((_grid(pair["input"], f"train[{i}].input"), _grid(pair["output"], f"train[{i}].output")))

    test_inputs = []
    for i, pair in enumerate(test_pairs):
        if "input" not in pair:
            raise _Invalid(f"test[{i}]", "pair is missing 'input'")
        test_inputs.append(_grid(pair["input"], f"test[{i}].input"))

    if solutions is not None:
        if type(solutions) is not list:
            raise _Invalid("solutions", f"solutions are not a list of grids (got {type(solutions).__name__})")
        if len(solutions) != len(test_inputs):
            raise _Invalid("solutions", f"{len(solutions)} solution grids for {len(test_inputs)} test inputs")
        return train, test_inputs, [_grid(g, f"solutions[{i}]") for i, g in enumerate(solutions)]

    # Test outputs are optional, but all-or-nothing: a half-known task would be scored inconsistently.
    has_output = ["output" in pair for pair in test_pairs]
    if not any(has_output):
        return train, test_inputs, None
    if not all(has_output):
        i = has_output.index(False)
        raise _Invalid(f"test[{i}]", "pair has no 'output' while other test pairs have one")
    return train, test_inputs, [_grid(p["output"], f"test[{i}].output") for i, p in enumerate(test_pairs)]


def task_from_json(obj: Any, task_id: str, file: str | os.PathLike, source: str,
                   solutions: Any = None, solutions_file: str | os.PathLike | None = None) -> Task:
    """Validate a task's JSON object and build a Task; `solutions` (a list of grids) overrides test outputs.

    Raises TaskError naming the file (`solutions_file` for problems in the solutions), `task_id`, where in the
    task and what is wrong.
    """
    try:
        train, test_inputs, test_outputs = _parse_task(obj, solutions)
    except _Invalid as e:
        in_solutions = solutions_file is not None and (e.where or "").startswith("solutions")
        raise TaskError(solutions_file if in_solutions else file, task_id, e.where, e.problem) from None
    return Task(id=task_id, train=train, test_inputs=test_inputs, test_outputs=test_outputs, source=source)


def solution_grids(value: Any, task_id: str, file: str) -> list[np.ndarray]:
    """One entry of a Kaggle solutions file: a non-empty list of grids."""
    try:
        if type(value) is not list:
            raise _Invalid("solutions", f"solutions are not a list of grids (got {type(value).__name__})")
        if not value:
            raise _Invalid("solutions", "solutions list is empty")
        return [_grid(g, f"solutions[{i}]") for i, g in enumerate(value)]
    except _Invalid as e:
        raise TaskError(file, task_id, e.where, e.problem) from None
