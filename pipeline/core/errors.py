"""Expected failures: bad input, a busy or foreign run folder, an unreadable checkpoint, a full disk.

Every expected failure raises a `PipelineError` whose message names the file (or folder) and the problem; the
command line prints it as one `error: ...` line and exits with status 2. Any other exception is a bug in this
project and keeps its traceback.
"""
from __future__ import annotations


class PipelineError(Exception):
    """An expected failure; str() is the whole message (file and problem), printed as one line."""


class InputFileError(PipelineError, ValueError):
    """A file given to the pipeline that cannot be used (unreadable, not UTF-8, not JSON, wrong shape)."""

    def __init__(self, path: object, problem: str, what: str = "file"):
        super().__init__(path, problem, what)
        self.path, self.problem, self.what = str(path), problem, what

    def __str__(self) -> str:
        return f"{self.what} {self.path}: {self.problem}"


class ConfigError(PipelineError, ValueError):
    """A setting that cannot be used (unknown key, wrong type, a value that contradicts the run folder)."""


class RunFolderError(PipelineError):
    """A run folder that is not ours, is busy, or holds artifacts this command must not mix with its own."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint that cannot be read, is not ours, or belongs to another dataset."""


class DiskFullError(PipelineError, OSError):
    """No space left (or quota exceeded) while writing a file; names the file."""

    def __str__(self) -> str:
        return str(self.strerror)
