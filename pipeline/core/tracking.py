"""Watching a run from elsewhere: experiment trackers through Accelerate's tracker API, fed the metrics.jsonl rows.

`--set log_with=tensorboard` (or `wandb`, or both, comma-separated) hands the names to `Accelerator(log_with=...)`;
rank 0 starts them with `init_trackers` (the resolved config, flattened to `section.key` scalars, as
hyperparameters), and every row it appends to metrics.jsonl goes to `accelerator.log` too: each numeric column as
`KIND/COLUMN` (`train/lm_loss`, `eval/pass2`) at the row's step. Columns are forwarded generically, so one added
to a row later reaches the trackers with no change here. metrics.jsonl stays the record; a tracker is a view.

Where they write: TensorBoard under RUN/tensorboard/PROJECT/ (each start purges what a killed run logged after its
checkpoint: `purge_step`); W&B under RUN/wandb/, as project PROJECT (`log_project`), run named after the run
folder. Without network, WANDB_MODE=offline keeps the W&B run on disk for `wandb sync` later.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError

TRACKERS = ("tensorboard", "wandb")  # each one's Python module and pip extra are named alike
TENSORBOARD_DIR = "tensorboard"


def tracker_problem(log_with: str, installed: bool = True) -> str | None:
    """Why a `log_with` setting cannot be used (an unknown tracker; with `installed`, one whose package is missing,
    naming the extra to install: Accelerate itself would silently drop it); None when it can."""
    for name in _names(log_with):
        if name not in TRACKERS:
            return f"unknown tracker {name!r} in {log_with!r}; choose {' or '.join(TRACKERS)} (comma-separated for both)"
        if installed and importlib.util.find_spec(name) is None:
            return f"the {name} package is not installed; install the extra: pip install 'trm-arc[{name}]'"
    return None


def tracker_names(log_with: str) -> list[str]:
    """The trackers a `log_with` setting asks for; one that cannot be used is a ConfigError (tracker_problem)."""
    problem = tracker_problem(log_with)
    if problem:
        raise ConfigError(f"log_with: {problem}")
    return _names(log_with)


def _names(log_with: str) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in log_with.split(",") if n.strip()))


def accelerator_settings(log_with: str, out_dir: Path | None) -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)`: the trackers and where the file-based ones write. Without a run
    folder (e.g. the plan stage timing a few steps) there are no rows to send, so no trackers."""
    names = tracker_names(log_with)
    if not names or out_dir is None:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / TENSORBOARD_DIR))}


def flat_hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as `section.key` -> scalar (what TensorBoard's hparams accept); anything else as JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker scalars: every numeric column (nested dicts joined with '/') under the row's
    kind, except the step, which is the x axis."""
    kind = str(row.get("kind", "train"))
    values: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{name}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = float(value)

    for column, value in row.items():
        if column not in ("kind", "step"):
            add(f"{kind}/{column}", value)
    return values


def start_trackers(accelerator: Any, config: dict[str, Any], out_dir: Path, project: str, step: int) -> None:
    """Start the trackers given to the Accelerator (rank 0; a no-op without any). `step` is where training
    (re)starts: TensorBoard hides what an earlier, killed process logged after it."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    names = [str(t) for t in accelerator.log_with]
    init_kwargs = {"tensorboard": {"purge_step": step + 1}, "wandb": {"name": Path(out_dir).resolve().name,
                                                                       "dir": str(out_dir)}}
    try:
        accelerator.init_trackers(project, config=flat_hyperparameters(config), init_kwargs=init_kwargs)
    except Exception as e:  # noqa: BLE001 - a tracker library failing to start (no login, no network) is the user's to fix
        reason = " ".join(str(e).split())[:200]
        hint = "; without network set WANDB_MODE=offline (and `wandb sync` the run later)" if "wandb" in names else ""
        raise ConfigError(f"log_with: a tracker of {','.join(names)} did not start ({type(e).__name__}: "
                          f"{reason}){hint}") from e


def log_row(accelerator: Any, metrics_path: Path, row: dict[str, Any]) -> None:
    """Append one row to metrics.jsonl and send it to the trackers (call on rank 0)."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if accelerator.trackers:
        accelerator.log(tracker_values(row), step=int(row["step"]))


def finish_trackers(accelerator: Any) -> None:
    """Close the trackers (flush TensorBoard, finish the W&B run). Not `accelerator.end_training()`: that also
    destroys the process group, which `--stage all` under torchrun still needs for prediction."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
