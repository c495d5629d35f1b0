"""Building the augmented dataset from tasks (`build_dataset`), and the names most callers import.

A dataset is augment.compact's AugmentedDataset (the folder: augment.storage); which augmentations of a puzzle
become its variants is augment.variants'.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from augment.compact import AugmentedDataset, TestInput
from augment.identifiers import PuzzleRows
from augment.storage import FORMAT, MANIFEST_FIELDS, read_manifest
from augment.variants import RETRIES_FACTOR, _draw_candidates, _draw_variants
from pipeline.data.tasks import Task, TaskError
from pipeline.core.errors import ConfigError

__all__ = ["FORMAT", "MANIFEST_FIELDS", "RETRIES_FACTOR", "AugmentedDataset", "TestInput", "build_dataset",
           "read_manifest", "_draw_candidates", "_draw_variants"]


def _as_record(item: Any) -> Any:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return item if isinstance(item, (dict, str, int, float)) else str(item)


class _Grids:
    """Every original grid once: a flat pixel buffer and its (offset, height, width) table."""

    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []
        self.table: list[tuple[int, int, int]] = []
        self.offset = 0

    def add(self, grid: np.ndarray) -> int:
        self.pieces.append(np.ascontiguousarray(grid, dtype=np.uint8).ravel())
        self.table.append((self.offset, grid.shape[0], grid.shape[1]))
        self.offset += grid.size
        return len(self.table) - 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.uint8)
        return pixels, np.asarray(self.table, dtype=np.int64).reshape(-1, 3)


def _puzzle_record(task: Task, is_eval: bool, grids: _Grids) -> dict[str, Any]:
    outputs = None if task.test_outputs is None else [grids.add(g) for g in task.test_outputs]
    return {
        "task_id": task.id,
        "source": task.source,
        "is_eval": is_eval,
        "train_inputs": [grids.add(i) for i, _ in task.train],
        "train_outputs": [grids.add(o) for _, o in task.train],
        "test_inputs": [grids.add(g) for g in task.test_inputs],
        "test_outputs": outputs,
    }


def _largest_side(task: Task, seen: dict[str, str]) -> int:
    """The task's largest grid side; a task id seen before is an error."""
    if task.id in seen:
        raise TaskError(task.source, task.id, None, f"task id appears twice (in {seen[task.id]!r} and "
                        f"{task.source!r})")
    seen[task.id] = task.source
    return max(max(g.shape) for g in _all_grids(task))


def _all_grids(task: Task) -> list[np.ndarray]:
    return [g for pair in task.train for g in pair] + list(task.test_inputs) + list(task.test_outputs or [])


def _check_grids(task: Task) -> None:
    for g in _all_grids(task):
        if g.ndim != 2 or g.size == 0 or g.max() > 9:
            raise TaskError(task.source, task.id, None, f"a grid of shape {g.shape} is not a valid grid")


def _what_the_model_sees(task: Task, is_eval: bool) -> tuple[list, list]:
    """(training pairs, held-out test inputs): variants are deduplicated on these (an eval puzzle's test outputs
    are answers, never shown)."""
    pairs = [(np.asarray(i, np.uint8), np.asarray(o, np.uint8)) for i, o in task.train]
    held_out = [np.asarray(g, np.uint8) for g in task.test_inputs] if is_eval else []
    if not is_eval and task.test_outputs is not None:
        pairs += [(np.asarray(i, np.uint8), np.asarray(o, np.uint8)) for i, o in zip(task.test_inputs, task.test_outputs)]
    return pairs, held_out


def build_dataset(
    tasks: Sequence[Task],
    eval_task_ids: Iterable[str],
    num_aug: int,
    seed: int,
    canvas: int,
    progress: bool = True,
    skipped: Sequence[Any] = (),
    sources: str | Sequence[str] = (),
    rows: PuzzleRows | None = None,
) -> AugmentedDataset:
    """Draw up to num_aug distinct augmentations per puzzle and lay out the compact dataset.

    Puzzle p's draws come from np.random.default_rng([seed, p]) alone (p = index among the kept puzzles), so
    they do not depend on other puzzles. Tasks with a grid side above `canvas` are left out and listed as
    too_big; `skipped` (the loader's skipped tasks) and `sources` are only recorded in the manifest.
    With `rows` (a reference dataset's identifiers, augment.identifiers) nothing is drawn: its tasks, in its
    order, get exactly its variants, each under the row it names.
    """
    if num_aug < 0:
        raise ConfigError(f"data.num_aug must be at least 0, got {num_aug}")
    if rows is not None:
        tasks = rows.order(tasks)
    eval_ids = set(eval_task_ids)
    seen: dict[str, str] = {}
    grids = _Grids()
    puzzles: list[dict[str, Any]] = []
    too_big: list[dict[str, Any]] = []
    short: list[dict[str, Any]] = []
    variants: list[tuple[np.ndarray, np.ndarray]] = []
    for task in tqdm(tasks, desc="augment", unit="task", disable=not progress):
        largest = _largest_side(task, seen)
        if largest > canvas:
            if rows is not None:
                raise TaskError(task.source, task.id, None, f"a grid side of {largest} is over the canvas "
                                f"({canvas}), and {rows.path} gives it rows")
            too_big.append({"task_id": task.id, "source": task.source, "largest_side": int(largest)})
            continue
        _check_grids(task)
        is_eval = task.id in eval_ids
        p = len(puzzles)
        puzzles.append(_puzzle_record(task, is_eval, grids))
        if rows is not None:
            variants.append(rows.variants_of(task.id))
            continue
        tids, colours = _draw_variants(*_what_the_model_sees(task, is_eval), num_aug, np.random.default_rng([seed, p]))
        if len(tids) < num_aug:
            short.append({"task_id": task.id, "got": int(len(tids))})
        variants.append((tids, colours))
    manifest = _manifest(sources, seed, num_aug, canvas, puzzles, short, too_big, skipped)
    if rows is not None:
        manifest["identifiers"] = rows.record()
    return _assemble(grids, puzzles, variants, manifest)


def _manifest(sources: str | Sequence[str], seed: int, num_aug: int, canvas: int, puzzles: list[dict[str, Any]],
              short: list[dict[str, Any]], too_big: list[dict[str, Any]], skipped: Sequence[Any]) -> dict[str, Any]:
    """The build's settings and counts (the variant and example counts are filled in by _assemble)."""
    return {
        "format": FORMAT,
        "sources": [sources] if isinstance(sources, str) else list(sources),
        "seed": seed,
        "num_aug": num_aug,
        "canvas": canvas,
        "num_puzzles": len(puzzles),
        "num_eval_puzzles": sum(q["is_eval"] for q in puzzles),
        "num_variants": 0,
        "num_train_examples": 0,
        "num_test_inputs": 0,
        "short_puzzles": short,
        "too_big": too_big,
        "skipped": [_as_record(s) for s in skipped],
    }


def _assemble(grids: _Grids, puzzles: list[dict[str, Any]], variants: list[tuple[np.ndarray, np.ndarray]],
              manifest: dict[str, Any]) -> AugmentedDataset:
    """The dataset: each puzzle's original (the identity) then its variants; the manifest's counts filled in."""
    identity = np.arange(10, dtype=np.uint8)[None]
    v_puzzle = [np.full(len(tids) + 1, p, dtype=np.int32) for p, (tids, _) in enumerate(variants)]
    v_dihedral = [np.concatenate([[0], tids]).astype(np.uint8) for tids, _ in variants]
    v_colours = [np.concatenate([identity, colours]) for _, colours in variants]
    dataset = AugmentedDataset(
        *grids.arrays(),
        puzzles,
        np.concatenate(v_puzzle) if v_puzzle else np.zeros(0, np.int32),
        np.concatenate(v_dihedral) if v_dihedral else np.zeros(0, np.uint8),
        np.concatenate(v_colours) if v_colours else np.zeros((0, 10), np.uint8),
        manifest,
    )
    manifest["num_variants"] = dataset.num_variants
    manifest["num_train_examples"] = dataset.num_train_examples
    manifest["num_test_inputs"] = dataset.num_test_inputs
    return dataset
