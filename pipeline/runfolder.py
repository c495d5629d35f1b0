"""A run folder owns itself: one configuration, one writer at a time, nothing mixed in from elsewhere.

`run.json` (the marker) is written when a stage first creates the folder. It records the preset and the
settings that define the dataset (DATASET_KEYS of `data`), and after `augment` the dataset's fingerprint
(pipeline.checkpoint.dataset_fingerprint). Later stages take the preset and those settings from it, so a run
folder cannot silently become a mix of two configurations; a command that contradicts it is refused.

A stage that writes holds an exclusive lock (`fcntl.flock` on `.run.lock`) for as long as it runs: a second
writer gets "run folder busy (pid N)" instead of interleaving its files with the first one's (two augments into
one folder once left A's manifest beside B's grids). The lock is released by the kernel when the process dies,
so a killed run never leaves the folder locked. While holding it, temp files of killed saves are removed.

A folder that holds visible files but no marker is not ours: no stage writes into it (it might be anything,
e.g. a home directory given to --out by mistake).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import RunFolderError
from pipeline.io import atomic_write_json, is_disk_full, remove_stale_temp_files

MARKER = "run.json"
LOCK = ".run.lock"
FORMAT = "trm-arc-run/1"
# The `data` settings that decide what `augment` builds; they cannot change within a run folder. (Other data
# settings, e.g. how batches are sampled, belong to training and may differ between commands.)
DATASET_KEYS = ("sources", "eval_set", "num_aug", "canvas", "max_side", "max_tasks", "skip_invalid", "seed")
# Folders a killed atomic write may have left temp files in.
_WRITE_DIRS = (".", "dataset", "checkpoints", "checkpoints/evaluated")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's run.json, or None when there is none. A broken marker is an error (never guessed around)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunFolderError(f"run folder {folder}: {MARKER} is unreadable ({e}); it is not safe to guess what "
                             "this folder holds") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise RunFolderError(f"run folder {folder}: {MARKER} is not a marker of this pipeline "
                             f"(expected format {FORMAT!r})")
    return marker


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
