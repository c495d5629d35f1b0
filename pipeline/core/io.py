"""Files in and out: atomic writes (a killed process leaves the old file or the new one, never half of one),
a JSON reader that names the file for every way a file can be wrong, and disk-full errors that say where."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.core.errors import DiskFullError, InputFileError

TMP_SUFFIX = ".tmp"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _NO_SPACE


class _WriteGuard:
    """A file object that remembers an OSError from write(): torch.save and zipfile turn it into an unrelated
    message ("unexpected pos ..."), so the real cause (e.g. no space left) would otherwise be lost."""

    def __init__(self, f: Any):
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _write_temp(path: Path, write: Callable[[Any], None], mode: str) -> str:
    """`write` into a temp file beside `path` (flushed to disk), whose name is returned; on failure nothing is left
    and a full disk is a DiskFullError naming `path`."""
    tmp = None
    guard = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, mode) as f:
            guard = _WriteGuard(f)
            write(guard)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        return tmp
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = guard.error if guard is not None and guard.error is not None else e
        if is_disk_full(cause):
            raise DiskFullError(cause.errno, f"no space left on device while writing {path}") from e
        raise


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    tmp = _write_temp(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_together(files: dict[Path, bytes]) -> None:
    """Files that belong together (an exported folder's weights and config): all are written to temp files before
    any is swapped in, so a failure while writing (a full disk) leaves every old one as it was."""
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            written.append((_write_temp(Path(path), lambda f, data=data: f.write(data), "wb"), Path(path)))
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, path in written:
        os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_with(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Atomic write for savers that take a binary file object (np.savez, torch.save)."""
    _atomic_write(path, write, "wb")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files (`.NAME.XXXX.tmp`) a killed atomic write left in `folder`. Call it only while holding
    the folder's lock: a live writer's temp file looks the same."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------------
# Reading JSON that someone else wrote


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a repeated key would silently drop the first value (a whole task, in a challenges
    file). (Keys that are not valid Unicode are left to the reader of each key, e.g. the task loader, so that one
    bad task id does not cost the whole file.)"""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadKey(f"key {_shorten(ascii(key))} appears twice in one object (the first would be lost)")
            seen.add(key)
    return obj


class _BadKey(ValueError):
    pass


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file strictly. Every problem raises InputFileError naming `what` and the path: missing,
    unreadable, a folder, not UTF-8, not JSON (with line and column), truncated, nested too deeply, a number too
    long to convert, a repeated key."""
    path = Path(path)

    def fail(problem: str) -> InputFileError:
        return InputFileError(path, problem, what)

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a folder, not a file") from None
    except OSError as e:
        raise fail(f"cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise fail("empty file, expected JSON")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        cut = " (the file may be truncated)" if e.pos >= len(text.rstrip()) else ""
        raise fail(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){cut}") from None
    except RecursionError:
        raise fail("nested too deeply to be ARC data") from None
    except _BadKey as e:
        raise fail(str(e)) from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise fail("a value JSON cannot hold: " + _shorten(str(e), 120)) from None


def check_fields(obj: Any, fields: dict[str, type | tuple[type, ...]], path: str | os.PathLike, what: str) -> dict:
    """`obj` as a JSON object holding every field of `fields` with its type (bool is never an int), or
    InputFileError naming the file and the first field that is missing or wrong."""
    if not isinstance(obj, dict):
        raise InputFileError(path, f"not a JSON object (got {type(obj).__name__})", what)
    for name, kind in fields.items():
        if name not in obj:
            raise InputFileError(path, f"missing {name!r}", what)
        value = obj[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ if k is not type(None) else "null" for k in kinds)
            raise InputFileError(path, f"{name!r} should be {names}, got {_shorten(repr(value), 60)}", what)
    return obj
