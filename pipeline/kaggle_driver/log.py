"""The driver's log lines: to the notebook's output and, once a run has a working folder, to trm_kaggle.log."""
from __future__ import annotations

import time
from pathlib import Path

_log_file: Path | None = None  # WORKING/trm_kaggle.log: the driver's lines, to read outside Kaggle


def start_log_file(path: Path) -> None:
    """This run's log file, emptied; without one (an unwritable folder) the notebook output still has every line."""
    global _log_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        _log_file = path
    except OSError:
        _log_file = None


def log(message: str) -> None:
    line = f"[kaggle {time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if _log_file is not None:
        try:
            with open(_log_file, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass  # the log file is a convenience; the notebook output has every line


def plural(n: int, word: str) -> str:
    """'1 attempt', '2 attempts', '2 out-of-memory retries'."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"
