"""Puzzle rows named as the reference's builder names them, so that a published checkpoint's rows line up.

A TRM checkpoint's puzzle-embedding row r belongs to the puzzle its dataset's `identifiers.json` names at r:
`<blank>` at row 0, then per task its original (the bare task id) followed by its variants,
`TASK|||t<k>|||<ten digits>` (dihedral transform k of augment.transforms, colour map: digit c is the new colour of
colour c). Our variant v is row v + 1, a task's variants are consecutive and its original comes first, which is
also the reference builder's layout; so building exactly the named variants, tasks in the file's order, gives
every variant the row it was trained under. `identifiers_of` writes a dataset's rows in the same format.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from augment.transforms import Augmentation
from pipeline.data.tasks import Task
from pipeline.core.errors import InputFileError
from pipeline.core.io import atomic_write_json, read_json

BLANK = "<blank>"
_NAME = re.compile(r"^(?P<task>.+?)\|\|\|t(?P<dihedral>[0-7])\|\|\|(?P<colours>[0-9]{10})$")


@dataclass(frozen=True)
class PuzzleRows:
    """The rows an identifiers file names: per task, in row order, the augmentations of its variants after the
    original. `sha256` identifies the list (recorded in the dataset's manifest)."""

    path: str
    tasks: dict[str, list[Augmentation]]
    sha256: str

    @property
    def num_rows(self) -> int:
        """Rows of the puzzle table, the blank one included."""
        return 1 + sum(1 + len(v) for v in self.tasks.values())

    def order(self, tasks: Sequence[Task]) -> list[Task]:
        """`tasks` in the file's order; every task it names must be among them and no other."""
        by_id = {t.id: t for t in tasks}
        missing = [t for t in self.tasks if t not in by_id]
        extra = [t.id for t in tasks if t.id not in self.tasks]
        for names, what in ((missing, "are not among the tasks loaded (data.sources)"),
                            (extra, "are loaded but have no rows in it (leave them out of data.sources)")):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                raise InputFileError(self.path, f"{len(names)} task(s) it names {what}: {shown}", "identifiers file")
        return [by_id[t] for t in self.tasks]

    def variants_of(self, task_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The task's variants after the original: dihedral ids uint8 (k,), colour maps uint8 (k, 10)."""
        augs = self.tasks[task_id]
        return (np.asarray([a.dihedral for a in augs], dtype=np.uint8),
                np.asarray([a.colours for a in augs], dtype=np.uint8).reshape(-1, 10))

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of it."""
        return {"file": self.path, "sha256": self.sha256, "rows": self.num_rows}


def parse_name(name: str) -> tuple[str, Augmentation]:
    """`TASK|||t<k>|||<digits>` (or a bare task id, the original) -> (task id, augmentation). ValueError if not."""
    match = _NAME.match(name)
    if match is None:
        if "|||" in name or not name:
            raise ValueError(f"{name!r} is neither a task id nor TASK|||t<0-7>|||<ten digits>")
        return name, Augmentation.identity()
    colours = tuple(int(c) for c in match["colours"])
    return match["task"], Augmentation(int(match["dihedral"]), colours)  # checks the colour map


def parse_identifiers(names: Any, path: str | Path) -> PuzzleRows:
    """The rows of an identifiers list, checked: row 0 blank, each task's rows together, its original first."""
    where = str(path)
    if not isinstance(names, list) or not names or names[0] != BLANK:
        raise InputFileError(where, f"not a list of puzzle names starting with {BLANK!r}", "identifiers file")
    tasks: dict[str, list[Augmentation]] = {}
    seen: set[tuple[str, Augmentation]] = set()
    previous = None
    for row, name in enumerate(names[1:], start=1):
        try:
            if not isinstance(name, str):
                raise ValueError(f"{name!r} is not a string")
            task, aug = parse_name(name)
        except ValueError as e:
            raise InputFileError(where, f"row {row}: {e}", "identifiers file") from None
        if (task, aug) in seen:
            raise InputFileError(where, f"row {row}: {name!r} appears twice", "identifiers file")
        seen.add((task, aug))
        if task != previous:
            if task in tasks:
                raise InputFileError(where, f"row {row}: task {task!r}'s rows are not together (this pipeline keeps "
                                     "a task's variants in consecutive rows, as the reference's builder does)",
                                     "identifiers file")
            if not aug.is_identity:
                raise InputFileError(where, f"row {row}: task {task!r} starts with a variant, not its original "
                                     f"({task!r})", "identifiers file")
            tasks[task] = []
            previous = task
        elif aug.is_identity:
            raise InputFileError(where, f"row {row}: the original of {task!r} again", "identifiers file")
        else:
            tasks[task].append(aug)
    digest = hashlib.sha256(json.dumps(names, separators=(",", ":")).encode()).hexdigest()
    return PuzzleRows(where, tasks, digest)


def read_identifiers(path: str | Path) -> PuzzleRows:
    """A reference dataset's identifiers.json (the row names of its puzzle table)."""
    return parse_identifiers(read_json(path, "identifiers file"), path)


def identifiers_of(dataset: Any) -> list[str]:
    """An AugmentedDataset's rows in the reference's format: row v + 1 names variant v."""
    return [BLANK, *(dataset.variant_name(v) for v in range(dataset.num_variants))]


def write_identifiers(dataset: Any, path: str | Path) -> None:
    atomic_write_json(Path(path), identifiers_of(dataset), indent=None)
