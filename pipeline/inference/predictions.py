"""Candidate answers per held-out test input, stored column by column.

Prediction runs make one candidate per (task, test input, augmentation variant): 400 tasks x 1000 variants is
400k rows, so a list of Python objects would be slow to build, vote on and save. Instead every per-row field is
one numpy column and all grids sit back to back in one flat uint8 buffer (`cells`), row-major, addressed by
`offset` and `height * width`. The whole store is one uncompressed `.npz` file.

Voting (`pipeline/inference/vote.py`) reads only this type; the model never sees it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_with

FORMAT_VERSION = 1
MAX_SIDE = 30

# Column name -> dtype. Every column has one entry per candidate row.
COLUMNS: dict[str, np.dtype] = {
    "task": np.dtype(np.int32),  # index into Predictions.task_ids
    "test_index": np.dtype(np.int32),  # which test input of the task
    "variant": np.dtype(np.int32),  # augmentation variant the candidate came from (0 = identity)
    "q": np.dtype(np.float32),  # sigmoid(q_halt logit): the model's own confidence that it is done
    "valid": np.dtype(np.bool_),  # False when the decode was malformed / empty; such rows hold no grid
    "height": np.dtype(np.uint8),  # grid height, 0 for invalid rows
    "width": np.dtype(np.uint8),  # grid width, 0 for invalid rows
    "offset": np.dtype(np.int64),  # start of the row's grid in `cells`
}
# Optional columns (pipeline.inference.rescore's likelihood scores), absent when prediction did not re-score.
OPTIONAL_COLUMNS: dict[str, np.dtype] = {"logp": np.dtype(np.float32), "logp_cells": np.dtype(np.uint16)}


def _shown(array: np.ndarray) -> str:
    text = f"{array.dtype} {array.shape}" if array.size != 1 else repr(array.tolist())
    return text[:60]


class PredictionsError(PipelineError, ValueError):
    """A predictions file or batch that breaks the format; the message names the file and the problem."""


@dataclass
class Predictions:
    task_ids: list[str]
    task: np.ndarray
    test_index: np.ndarray
    variant: np.ndarray
    q: np.ndarray
    valid: np.ndarray
    height: np.ndarray
    width: np.ndarray
    offset: np.ndarray
    cells: np.ndarray  # uint8 (total cells,): every valid grid, row-major, back to back
    # optional float32 (n,): the candidate's likelihood score from pipeline.inference.rescore (mean over views of its summed
    # log-probability); NaN for rows not scored. None when the prediction run did not re-score.
    logp: np.ndarray | None = None
    # optional uint16 (n,): how many label cells that sum runs over (colours + EOS edge; 0 = not scored), for the
    # per-cell selectors. None in files written before it existed (pipeline.inference.vote then counts the cells itself).
    logp_cells: np.ndarray | None = None
    # the fingerprint (pipeline.training.checkpoint.dataset_fingerprint) of the dataset whose held-out inputs these answer;
    # None in files written before it was recorded
    dataset_fingerprint: str | None = None
    # how `--checkpoint best` chose the weights that made these (pipeline.cli.choose, as JSON text), stored here so
    # that the choice and its predictions are one unit; None when no choice made them. Read as is, judged by its
    # reader (a broken one costs the score its note, never the predictions).
    checkpoint_choice: str | None = None

    def __len__(self) -> int:
        return len(self.task)

    def grid(self, i: int) -> np.ndarray | None:
        """The candidate grid of row i (a read-only view into `cells`), or None for an invalid row."""
        if not self.valid[i]:
            return None
        h, w = int(self.height[i]), int(self.width[i])
        start = int(self.offset[i])
        return self.cells[start : start + h * w].reshape(h, w)

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS}

    def check(self, where: str = "predictions") -> None:
        """Raise PredictionsError if the columns are inconsistent (lengths, dtypes, bounds, colours)."""
        n = len(self.task)
        for name, dtype in COLUMNS.items():
            column = getattr(self, name)
            if column.shape != (n,):
                raise PredictionsError(f"{where}: column {name!r} has shape {column.shape}, expected ({n},)")
            if column.dtype != dtype:
                raise PredictionsError(f"{where}: column {name!r} has dtype {column.dtype}, expected {dtype}")
        for name, dtype in OPTIONAL_COLUMNS.items():
            column = getattr(self, name)
            if column is not None and (column.shape != (n,) or column.dtype != dtype):
                raise PredictionsError(f"{where}: {name} must be {dtype} ({n},), got {column.dtype} {column.shape}")
        if self.cells.dtype != np.uint8 or self.cells.ndim != 1:
            raise PredictionsError(f"{where}: cells must be a flat uint8 array, got {self.cells.dtype} {self.cells.shape}")
        if n and (self.task.min() < 0 or self.task.max() >= len(self.task_ids)):
            raise PredictionsError(f"{where}: task index out of range 0..{len(self.task_ids) - 1}")
        if len(set(self.task_ids)) != len(self.task_ids):
            raise PredictionsError(f"{where}: duplicate task ids")
        v = self.valid
        if np.any((self.height[v] < 1) | (self.height[v] > MAX_SIDE) | (self.width[v] < 1) | (self.width[v] > MAX_SIDE)):
            bad = int(np.flatnonzero(v & ((self.height < 1) | (self.height > MAX_SIDE) | (self.width < 1) | (self.width > MAX_SIDE)))[0])
            raise PredictionsError(
                f"{where}: row {bad} (task {self.task_ids[self.task[bad]]}) has a {self.height[bad]}x{self.width[bad]} grid; sides must be 1..{MAX_SIDE}"
            )
        size = self.height.astype(np.int64) * self.width
        if np.any(self.offset < 0) or np.any(self.offset + size > len(self.cells)):
            raise PredictionsError(f"{where}: a grid offset points outside the cell buffer")
        if len(self.cells) and self.cells.max() > 9:
            raise PredictionsError(f"{where}: a cell holds colour {int(self.cells.max())}; colours are 0..9")

    def save(self, path: str | os.PathLike) -> None:
        """Write one uncompressed .npz atomically (compression costs seconds and saves little on small grids)."""
        arrays = self.columns()
        arrays["cells"] = self.cells
        for name in OPTIONAL_COLUMNS:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        arrays["task_ids"] = np.array(self.task_ids, dtype=np.str_)
        arrays["format_version"] = np.array(FORMAT_VERSION)
        if self.dataset_fingerprint is not None:
            arrays["dataset_fingerprint"] = np.array(self.dataset_fingerprint, dtype=np.str_)
        if self.checkpoint_choice is not None:
            arrays["checkpoint_choice"] = np.array(self.checkpoint_choice, dtype=np.str_)
        atomic_write_with(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Predictions":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except FileNotFoundError:
            raise PredictionsError(f"{path}: no such file") from None
        except Exception as e:  # noqa: BLE001 - numpy raises many types for a file that is not an .npz
            raise PredictionsError(f"{path}: not a readable predictions .npz ({type(e).__name__}: "
                                   f"{str(e)[:120]})") from None
        missing = [name for name in (*COLUMNS, "cells", "task_ids", "format_version") if name not in arrays]
        if missing:
            raise PredictionsError(f"{path}: missing arrays {missing}")
        version, task_ids, fingerprint = arrays["format_version"], arrays["task_ids"], arrays.get("dataset_fingerprint")
        if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
            raise PredictionsError(f"{path}: format_version {_shown(version)}, expected {FORMAT_VERSION}")
        if task_ids.ndim != 1 or task_ids.dtype.kind != "U":
            raise PredictionsError(f"{path}: task_ids should be a list of text, got {task_ids.dtype} {task_ids.shape}")
        if fingerprint is not None and (fingerprint.shape != () or fingerprint.dtype.kind != "U"):
            raise PredictionsError(f"{path}: dataset_fingerprint should be one text, got {_shown(fingerprint)}")
        optional = {name: arrays.get(name) for name in OPTIONAL_COLUMNS}
        columns = {n: arrays[n] for n in COLUMNS}
        for name, column in [*columns.items(), ("cells", arrays["cells"]), *optional.items()]:
            if column is not None and column.ndim != 1:
                raise PredictionsError(f"{path}: column {name!r} has shape {column.shape}, expected one row per entry")
        choice = arrays.get("checkpoint_choice")
        if choice is not None:  # anything but one text is passed on as "" (its reader says it is unreadable)
            choice = str(choice) if choice.shape == () and choice.dtype.kind == "U" else ""
        predictions = cls(task_ids=[str(t) for t in task_ids.tolist()], cells=arrays["cells"], **optional,
                          dataset_fingerprint=None if fingerprint is None else str(fingerprint),
                          checkpoint_choice=choice, **columns)
        predictions.check(where=str(path))
        return predictions

    @classmethod
    def empty(cls, task_ids: Sequence[str] = ()) -> "Predictions":
        return cls(task_ids=list(task_ids), cells=np.zeros(0, np.uint8), **{n: np.zeros(0, d) for n, d in COLUMNS.items()})

    @classmethod
    def concatenate(cls, parts: Sequence["Predictions"]) -> "Predictions":
        """Join stores (e.g. one shard per process); task ids are merged in first-seen order."""
        task_ids: list[str] = []
        index: dict[str, int] = {}
        for part in parts:
            for t in part.task_ids:
                if t not in index:
                    index[t] = len(task_ids)
                    task_ids.append(t)
        if not parts:
            return cls.empty()
        columns: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
        cells: list[np.ndarray] = []
        base = 0
        for part in parts:
            remap = np.array([index[t] for t in part.task_ids], dtype=np.int32)
            for name in COLUMNS:
                column = getattr(part, name)
                if name == "task":
                    column = remap[column] if len(column) else column
                elif name == "offset":
                    column = column + base
                columns[name].append(column)
            cells.append(part.cells)
            base += len(part.cells)
        optional = {}
        for name, missing in (("logp", np.nan), ("logp_cells", 0)):
            if any(getattr(part, name) is not None for part in parts):
                dtype = OPTIONAL_COLUMNS[name]
                optional[name] = np.concatenate([
                    getattr(part, name) if getattr(part, name) is not None else np.full(len(part), missing, dtype)
                    for part in parts])
        fingerprints = {part.dataset_fingerprint for part in parts}
        choices = {part.checkpoint_choice for part in parts}
        return cls(
            task_ids=task_ids,
            cells=np.concatenate(cells),
            **optional,
            dataset_fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,  # kept only when shared
            checkpoint_choice=choices.pop() if len(choices) == 1 else None,
            **{name: np.concatenate(chunks).astype(COLUMNS[name], copy=False) for name, chunks in columns.items()},
        )


@dataclass
class PredictionsWriter:
    """Collects candidate batches and joins them once at the end (appending to numpy arrays per batch is quadratic).

    `task_ids` given up front fixes their order and keeps tasks that end up with no candidate at all.
    """

    task_ids: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _chunks: list[dict[str, np.ndarray]] = field(default_factory=list, init=False, repr=False)
    _cells: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _num_cells: int = field(default=0, init=False, repr=False)
    _num_rows: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.task_ids = list(self.task_ids)
        self._index = {t: i for i, t in enumerate(self.task_ids)}
        if len(self._index) != len(self.task_ids):
            raise PredictionsError("PredictionsWriter: duplicate task ids")

    def __len__(self) -> int:
        return self._num_rows

    def _task_indices(self, task: str | Sequence[str], n: int) -> np.ndarray:
        names = [task] * n if isinstance(task, str) else list(task)
        if len(names) != n:
            raise PredictionsError(f"batch has {n} grids but {len(names)} task ids")
        out = np.empty(n, np.int32)
        for k, name in enumerate(names):
            i = self._index.get(name)
            if i is None:
                i = self._index[name] = len(self.task_ids)
                self.task_ids.append(name)
            out[k] = i
        return out

    def _append(self, task: np.ndarray, test_index, variant, q, valid, height, width, cells: np.ndarray) -> None:
        n = len(task)
        columns = {
            "task": task,
            "test_index": np.broadcast_to(np.asarray(test_index, np.int32), (n,)),
            "variant": np.broadcast_to(np.asarray(variant, np.int32), (n,)),
            "q": np.broadcast_to(np.asarray(q, np.float32), (n,)),
            "valid": valid,
            "height": height,
            "width": width,
        }
        size = height.astype(np.int64) * width
        starts = np.cumsum(size) - size
        columns["offset"] = starts + self._num_cells
        self._chunks.append({name: np.array(c, dtype=COLUMNS[name]) for name, c in columns.items()})
        self._cells.append(cells)
        self._num_cells += int(size.sum())
        self._num_rows += n

    def add(
        self,
        task: str | Sequence[str],
        test_index: int | Sequence[int] | np.ndarray,
        variant: int | Sequence[int] | np.ndarray,
        q: float | Sequence[float] | np.ndarray,
        grids: Sequence[np.ndarray | None],
    ) -> None:
        """Append one batch. `grids[k]` is a uint8 (h, w) grid, or None when the decode failed (row is invalid).

        Scalars for task/test_index/variant/q apply to the whole batch.
        """
        n = len(grids)
        task_index = self._task_indices(task, n)
        valid = np.array([g is not None for g in grids], dtype=bool)
        height = np.zeros(n, np.uint8)
        width = np.zeros(n, np.uint8)
        flat: list[np.ndarray] = []
        for k, g in enumerate(grids):
            if g is None:
                continue
            g = np.asarray(g)
            if g.ndim != 2 or not (1 <= g.shape[0] <= MAX_SIDE and 1 <= g.shape[1] <= MAX_SIDE):
                raise PredictionsError(f"grid {k} of batch (task {self.task_ids[task_index[k]]}) has shape {g.shape}; need 2-D, sides 1..{MAX_SIDE}")
            height[k], width[k] = g.shape
            flat.append(g.astype(np.uint8, copy=False).ravel())
        cells = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
        if len(cells) and cells.max() > 9:
            raise PredictionsError(f"batch holds colour {int(cells.max())}; colours are 0..9")
        self._append(task_index, test_index, variant, q, valid, height, width, cells)

    def add_padded(
        self,
        task: str | Sequence[str],
        test_index: int | Sequence[int] | np.ndarray,
        variant: int | Sequence[int] | np.ndarray,
        q: float | Sequence[float] | np.ndarray,
        canvas: np.ndarray,
        height: np.ndarray,
        width: np.ndarray,
    ) -> None:
        """Append a batch of grids cropped from a padded canvas, without a Python loop.

        canvas: uint8 (n, H, W) with grid k in canvas[k, :height[k], :width[k]]; height or width 0 marks the
        row invalid (no grid).
        """
        canvas = np.asarray(canvas)
        n = canvas.shape[0]
        height = np.asarray(height, np.int64)
        width = np.asarray(width, np.int64)
        if height.shape != (n,) or width.shape != (n,):
            raise PredictionsError(f"height/width must have shape ({n},)")
        if np.any(height > min(MAX_SIDE, canvas.shape[1])) or np.any(width > min(MAX_SIDE, canvas.shape[2])) or np.any(height < 0) or np.any(width < 0):
            raise PredictionsError(f"a grid size exceeds the {canvas.shape[1]}x{canvas.shape[2]} canvas or {MAX_SIDE}")
        valid = (height > 0) & (width > 0)
        height = np.where(valid, height, 0)
        width = np.where(valid, width, 0)
        rows = np.arange(canvas.shape[1])[None, :, None] < height[:, None, None]
        cols = np.arange(canvas.shape[2])[None, None, :] < width[:, None, None]
        cells = canvas[rows & cols].astype(np.uint8, copy=False)  # boolean indexing walks C order: row-major per grid
        if len(cells) and cells.max() > 9:
            raise PredictionsError(f"batch holds colour {int(cells.max())}; colours are 0..9")
        self._append(self._task_indices(task, n), test_index, variant, q, valid, height.astype(np.uint8), width.astype(np.uint8), cells)

    def finish(self) -> Predictions:
        if not self._chunks:
            return Predictions.empty(self.task_ids)
        predictions = Predictions(
            task_ids=list(self.task_ids),
            cells=np.concatenate(self._cells) if self._cells else np.zeros(0, np.uint8),
            **{name: np.concatenate([c[name] for c in self._chunks]) for name in COLUMNS},
        )
        return predictions
