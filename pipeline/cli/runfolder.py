"""A run folder owns itself: one configuration, one writer at a time, nothing mixed in from elsewhere.

`run.json` (the marker) is written when a stage first creates the folder. It records the preset and the
settings that define the dataset (DATASET_KEYS of `data`), and after `augment` the dataset's fingerprint
(pipeline.training.checkpoint.dataset_fingerprint). Later stages take the preset and those settings from it, so a run
folder cannot silently become a mix of two configurations; a command that contradicts it is refused.

A stage that writes holds an exclusive lock (`fcntl.flock` on `.run.lock`) for as long as it runs: a second
writer gets "run folder busy (pid N)" instead of interleaving its files with the first one's (two augments into
one folder once left A's manifest beside B's grids). The lock is released by the kernel when the process dies,
so a killed run never leaves the folder locked. While holding it, temp files of killed saves are removed.

A folder that holds visible files but no marker is not ours: no stage writes into it (it might be anything,
e.g. a home directory given to --out by mistake).

The folder's dataset is `dataset/`, or, for a run trained with `--stage train --data D`, the folder D recorded in
the marker (`dataset_dir`). A rebuilt dataset is written beside the old one and swapped in as one unit
(replace_dataset): a failure or a kill at any point leaves the old dataset whole, and the marker records the new
one's fingerprint only once it is complete. Training only writes over its own checkpoints (check_training).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from pipeline.core.errors import CheckpointError, RunFolderError
from pipeline.core.io import atomic_write_json, is_disk_full, remove_stale_temp_files

MARKER = "run.json"
LOCK = ".run.lock"
FORMAT = "trm-arc-run/1"
# The `data` settings that decide what `augment` builds; they cannot change within a run folder. (Other data
# settings, e.g. how batches are sampled, belong to training and may differ between commands.)
DATASET_KEYS = ("sources", "eval_set", "num_aug", "canvas", "max_side", "max_tasks", "skip_invalid", "seed",
                "identifiers")
# Folders a killed atomic write may have left temp files in.
_WRITE_DIRS = (".", "dataset", "checkpoints", "checkpoints/evaluated")
DATASET, NEW_DATASET, OLD_DATASET = "dataset", ".dataset.new", ".dataset.old"  # the last two only during a swap


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's run.json, checked, or None when there is none. A broken marker is an error (never guessed
    around)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunFolderError(f"run folder {folder}: {MARKER} is unreadable ({str(e)[:120]}); it is not safe to guess "
                             "what this folder holds") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise RunFolderError(f"run folder {folder}: {MARKER} is not a marker of this pipeline "
                             f"(expected format {FORMAT!r})")
    problem = _marker_problem(marker)
    if problem:
        raise RunFolderError(f"run folder {folder}: {MARKER} {problem}; it is not safe to guess what this folder "
                             "holds")
    return marker


def _marker_problem(marker: dict[str, Any]) -> str | None:
    from pipeline.core import settings
    from pipeline.config import PRESETS, DataConfig

    if marker.get("preset") not in PRESETS:
        return f"names an unknown preset {marker.get('preset')!r} (known: {', '.join(PRESETS)})"
    data = marker.get("data")
    if not isinstance(data, dict):
        return f"has 'data' {type(data).__name__}, not an object of dataset settings"
    hints = settings.field_hints(DataConfig)
    for key, value in data.items():
        if key not in DATASET_KEYS:
            return f"has an unknown dataset setting data.{key}"
        problem = settings.value_problem(value, hints[key])
        if problem:
            return f"data.{key}: {problem}"
    fingerprint = marker.get("dataset_fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{64}", fingerprint)):
        return "has a dataset_fingerprint that is not a sha256 hex digest"
    if not isinstance(marker.get("dataset_dir", ""), str):
        return "has a dataset_dir that is not a path"
    return None


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / MARKER, marker)


def new_marker(preset: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "preset": preset,
        "data": {k: data[k] for k in DATASET_KEYS if k in data},
        "dataset_fingerprint": None,  # set by augment once the dataset is complete
        "created_by": "trm-arc pipeline.run",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def visible_entries(folder: Path) -> list[str]:
    """Names in `folder` that are not hidden (a `.gitkeep` or an editor's dot file does not make it non-empty)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))


def check_writable_folder(folder: Path) -> dict[str, Any] | None:
    """A folder a stage may write into: new, empty, or a run folder (its marker is returned). Anything else is
    a RunFolderError that names the folder and what is wrong; nothing is created or changed."""
    folder = Path(folder)
    _check_path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder}: is a file, not a folder")
    if not folder.exists():
        return None
    marker = read_marker(folder)
    if marker is not None:
        return marker
    names = visible_entries(folder)
    if names:
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise RunFolderError(f"--out {folder}: not a run folder of this pipeline (no {MARKER}) and not empty "
                             f"({shown}); give a new or empty folder")
    return None


def _check_path(folder: Path) -> None:
    """A path a folder can be made at: no part of it too long a name, and none of its existing parents a file."""
    for part in folder.parts:
        if len(os.fsencode(part)) > 255:  # NAME_MAX of every common file system
            raise RunFolderError(f"--out {folder}: name too long ({len(os.fsencode(part))} bytes in one part of the "
                                 "path; at most 255)")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"--out {folder}: {parent} is a file, not a folder")
            break


class RunLock:
    """An exclusive, non-blocking lock on a run folder, released on close or when the process ends."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        path = self.folder / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if is_disk_full(e):
                raise RunFolderError(f"run folder {self.folder}: no space left on device (creating {LOCK})") from None
            raise RunFolderError(f"run folder {self.folder}: cannot create {LOCK} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"run folder {self.folder} is busy: another command (pid {holder or '?'}) is "
                                     "writing to it; wait for it to finish or use another --out") from None
            raise
        try:  # say who holds it, for the error above (best effort: the lock itself is what counts)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        for sub in _WRITE_DIRS:
            remove_stale_temp_files(self.folder / sub)
        _recover_dataset_swap(self.folder)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def data_conflicts(recorded: dict[str, Any], data: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in the run folder, value asked for) for every dataset setting that differs."""
    return [(k, recorded[k], data.get(k)) for k in DATASET_KEYS if k in recorded and recorded[k] != data.get(k)]


# ---------------------------------------------------------------------------------------------- the dataset
def dataset_dir(folder: Path, marker: dict[str, Any] | None) -> Path:
    """Where the run's dataset is: its own `dataset/`, or the folder training was given with --data."""
    recorded = (marker or {}).get("dataset_dir")
    return Path(recorded) if recorded else Path(folder) / DATASET


def adopt_dataset(folder: Path, marker: dict[str, Any], data: Path) -> dict[str, Any]:
    """The marker of a run that trains on the dataset `data` from elsewhere (`--stage train --data`): recorded
    once, with its fingerprint; a folder that already has a dataset keeps it (training on another one is refused)."""
    from pipeline.training.checkpoint import dataset_fingerprint

    fingerprint = dataset_fingerprint(data)
    current = dataset_dir(folder, marker)
    has_own = marker.get("dataset_fingerprint") is not None
    if has_own and fingerprint != marker["dataset_fingerprint"]:
        raise RunFolderError(f"--data {data}: run folder {folder} already has its dataset ({current}); a run folder "
                             "trains on one dataset: use another --out")
    if has_own and marker.get("dataset_dir") is None:
        return marker  # the folder's own dataset, named by another path
    return {**marker, "dataset_dir": str(data.resolve()), "dataset_fingerprint": fingerprint}


def check_dataset_unchanged(folder: Path, marker: dict[str, Any] | None) -> None:
    """The dataset is the one augment built (not half of another build, not edited since)."""
    from pipeline.training.checkpoint import dataset_fingerprint

    recorded = (marker or {}).get("dataset_fingerprint")
    data = dataset_dir(folder, marker)
    if recorded and (data / "manifest.json").exists() and dataset_fingerprint(data) != recorded:
        raise RunFolderError(f"{data}: the dataset's files changed since augment built them (fingerprint differs "
                             "from run.json); rebuild it with --force augment")


def replace_dataset(folder: Path, save: Callable[[Path], None]) -> None:
    """Write a dataset beside the current one (`save(path)`), then swap it in. A failure while writing (a full
    disk) leaves the old dataset untouched; the old one is kept until record_dataset has recorded the new one."""
    folder = Path(folder)
    new, old, current = folder / NEW_DATASET, folder / OLD_DATASET, folder / DATASET
    _remove(new)
    try:
        save(new)
    except BaseException:
        _remove(new)
        raise
    _remove(old)
    if current.exists():
        os.replace(current, old)
    os.replace(new, current)


def record_dataset(folder: Path, marker: dict[str, Any]) -> None:
    """After augment: run.json gets the new dataset's fingerprint (and, after --force augment, the new settings);
    only then is the dataset it replaced removed."""
    from pipeline.training.checkpoint import dataset_fingerprint

    write_marker(folder, {**marker, "dataset_fingerprint": dataset_fingerprint(Path(folder) / DATASET)})
    _remove(Path(folder) / OLD_DATASET)


def _recover_dataset_swap(folder: Path) -> None:
    """After a kill during replace_dataset: keep whichever dataset run.json describes (called under the lock)."""
    new, old, current = folder / NEW_DATASET, folder / OLD_DATASET, folder / DATASET
    _remove(new)  # a build that never finished
    if not old.exists():
        return
    if not current.exists():  # killed between the two renames
        os.replace(old, current)
        return
    from pipeline.training.checkpoint import dataset_fingerprint

    try:
        recorded = (read_marker(folder) or {}).get("dataset_fingerprint")
        swapped_in = recorded is not None and dataset_fingerprint(current) != recorded
    except (RunFolderError, CheckpointError):
        swapped_in = True  # the new dataset is unreadable: the old one is the one to keep
    if swapped_in:  # killed before run.json recorded the new dataset: the old one is still the run's
        _remove(current)
        os.replace(old, current)
    else:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------- checkpoints
def check_checkpoint(path: Path, data_dir: Path, resumable: bool = False) -> dict[str, Any]:
    """A checkpoint may be resumed or predicted with only on the dataset it was trained on (its fingerprint);
    returns its saved config."""
    from augment.dataset import read_manifest
    from pipeline.training import checkpoint as ckpt

    rows = int(read_manifest(data_dir)["num_variants"]) + 1
    return ckpt.check_checkpoint_dataset(path, ckpt.dataset_fingerprint(data_dir), rows, data_dir, resumable=resumable)


def resumable_checkpoint(folder: Path, data_dir: Path) -> tuple[Path, dict[str, Any]]:
    """--resume: the folder's latest checkpoint (and its contents), which must be resumable and of this dataset."""
    from pipeline.training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(Path(folder) / "checkpoints")
    if latest is None:
        raise RunFolderError(f"--resume: no checkpoint under {Path(folder) / 'checkpoints'} to continue from; "
                             "run without --resume to start training")
    return latest, check_checkpoint(latest, data_dir, resumable=True)


def previous_training(folder: Path, force: bool) -> list[Path]:
    """Training writes only over its own checkpoints: another run's are refused unless `force`; then they are
    returned, for clear_training to remove once everything else has been checked."""
    from pipeline.training import checkpoint as ckpt

    existing = ckpt.list_checkpoints(Path(folder) / "checkpoints")
    if existing and not force:
        raise RunFolderError(
            f"run folder {folder} already holds checkpoints of a training run (latest {existing[-1].name}): "
            "--resume continues it, --force train discards them and starts over")
    if not existing:
        return []
    return existing + ckpt.list_checkpoints(Path(folder) / "checkpoints" / "evaluated")


def clear_training(folder: Path, checkpoints: list[Path]) -> None:
    """--force train, after every check passed: the previous run's checkpoints and log go."""
    if not checkpoints:
        return
    for path in checkpoints:
        path.unlink(missing_ok=True)
    (Path(folder) / "metrics.jsonl").unlink(missing_ok=True)
    print(f"train: --force: {len(checkpoints)} checkpoints of the previous training run removed")


def undo_new_folder(folder: Path, created: bool) -> None:
    """A command that failed in a new folder before a dataset was complete leaves no trace: the folder was empty
    when it was claimed (and locked), so what is in it now is this command's half-built work. Checkpoints are
    never removed (a training run on a dataset from elsewhere keeps what it saved)."""
    names = visible_entries(folder)
    marker = read_marker(folder) if MARKER in names else None
    if "checkpoints" in names or (marker is not None and marker.get("dataset_fingerprint") and
                                  not marker.get("dataset_dir")):
        return
    for name in names:
        _remove(Path(folder) / name)
    if created:
        (Path(folder) / LOCK).unlink(missing_ok=True)
        try:
            Path(folder).rmdir()
        except OSError:
            pass  # something else is in it now: leave it
