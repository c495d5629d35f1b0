"""What the stages share: the run's settings and devices, its resolved config, the fallback, and each stage's
record (kaggle_status.json); the run config as a child's arguments; and what a stage returns: its outcome, as a
value."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from pipeline.kaggle_driver.fallback import Submission
from pipeline.kaggle_driver.settings import ENV, Devices, KaggleSettings


class Outcome(Enum):
    OK = "ok"
    PARTIAL = "partial"  # prediction died part-way: its candidates so far are used
    SKIPPED = "skipped"  # nothing to do, or no time for it
    FAILED = "failed"  # an exception; the best submission so far stays

    @property
    def usable(self) -> bool:
        return self in (Outcome.OK, Outcome.PARTIAL)


@dataclass(frozen=True)
class StageResult:
    outcome: Outcome
    detail: str

    @classmethod
    def ok(cls, detail: str) -> "StageResult":
        return cls(Outcome.OK, detail)

    @classmethod
    def skipped(cls, detail: str) -> "StageResult":
        return cls(Outcome.SKIPPED, detail)


def config_overrides(cfg_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every setting of a run config as `key=value` for --set, so a child process runs exactly this config."""
    out: list[str] = []
    for key, value in cfg_dict.items():
        if isinstance(value, Mapping):
            out += config_overrides(value, f"{prefix}{key}.")
        elif isinstance(value, bool):
            out.append(f"{prefix}{key}={'true' if value else 'false'}")
        else:
            out.append(f"{prefix}{key}={value!r}" if isinstance(value, float) else f"{prefix}{key}={value}")
    return out


def set_args(cfg_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """config_overrides as `--set key=value` arguments."""
    return [arg for item in config_overrides(cfg_dict, prefix) for arg in ("--set", item)]


@dataclass
class RunState:
    """The driver's state, handed to every stage."""

    settings: KaggleSettings
    devices: Devices
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: plan, attempts, outcome, ...
    fallback: Submission | None = None
    cfg: Any = None  # the resolved RunConfig, once augment has configured the run
    checkpoint: Path | None = None  # the pretrained checkpoint fine-tuning starts from
    checkpoint_kind: str = ""  # "ours" or "reference"

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    def outcome(self, stage: str) -> Outcome | None:
        state = self.status.get(stage, {}).get("state")
        return Outcome(state) if state is not None else None

    @property
    def dataset_ready(self) -> bool:
        return self.cfg is not None and self.outcome("augment") == Outcome.OK

    def common_args(self) -> list[str]:
        """Every child stage's arguments: the run folder (absolute: children run inside it), progress bars."""
        return ["--out", str(self.run_dir)] + ([] if self.settings.progress else ["--quiet"])

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.devices.gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU: asked for, or no GPU present
        env.pop(ENV["faults"], None)
        if self.settings.faults:
            env[ENV["faults"]] = self.settings.faults
        return env
