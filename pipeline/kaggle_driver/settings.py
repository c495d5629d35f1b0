"""What this run is: where things are (absolute paths), how the time is spent, on which devices.

Notebook parameters win over environment variables (ENV), which win over the Kaggle defaults. Every path is
made absolute here, because the child stages run with the run folder as their working directory.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

BUNDLE_KIND = "trm-arc-kaggle-bundle"  # manifest.json "kind" of a folder built by kaggle/build_bundle.py
KAGGLE_TIME_LIMIT_S = 12 * 3600.0  # the ARC Prize 2025 notebook limit
SAFETY_MARGIN_S = 45 * 60.0  # kernel start, installs, writing the output; Kaggle's clock is not ours
DRAFT_TIME_BUDGET_S = 30 * 60.0  # runs that are not the scored rerun: a check, not 11 h of GPU quota
RERUN_VARIABLE = "KAGGLE_IS_COMPETITION_RERUN"  # set by Kaggle in the scoring rerun of a code competition
GPU_TRAIN_FRACTION = 0.7  # the default share of fine-tuning with GPUs; without, 0 (see settings_from_env)

# Environment variables read by settings_from_env (notebook parameters take precedence).
ENV = {
    "input_root": "TRM_KAGGLE_INPUT",  # default /kaggle/input
    "working": "TRM_KAGGLE_WORKING",  # default /kaggle/working
    "challenges": "TRM_CHALLENGES",  # default INPUT/arc-prize-2025/arc-agi_test_challenges.json
    "bundle": "TRM_BUNDLE",  # the attached bundle folder (manifest.json inside)
    "checkpoint": "TRM_CHECKPOINT",  # default: the bundle's checkpoint
    "arch_config": "TRM_ARCH_CONFIG",  # a reference checkpoint's model config (JSON, or YAML with pyyaml)
    "run_dir": "TRM_RUN_DIR",  # default WORKING/trm_run
    "solutions": "TRM_SOLUTIONS",  # optional *_solutions.json to score against (editing runs only)
    "time_budget_s": "TRM_TIME_BUDGET_S",  # the scored rerun's budget
    "draft_time_budget_s": "TRM_DRAFT_TIME_BUDGET_S",  # every other run's budget
    "train_fraction": "TRM_TRAIN_FRACTION",
    "submit_reserve_s": "TRM_SUBMIT_RESERVE_S",
    "stage_overhead_s": "TRM_STAGE_OVERHEAD_S",
    "kill_grace_s": "TRM_KILL_GRACE_S",
    "min_train_s": "TRM_MIN_TRAIN_S",
    "min_predict_s": "TRM_MIN_PREDICT_S",
    "max_retries": "TRM_MAX_RETRIES",
    "partial_every_s": "TRM_PARTIAL_EVERY_S",
    "num_gpus": "TRM_NUM_GPUS",
    "overrides": "TRM_OVERRIDES",  # whitespace-separated key=value run-config overrides, like --set
    "draft_overrides": "TRM_DRAFT_OVERRIDES",  # the same, applied after overrides, only outside the scored rerun
    "progress": "TRM_PROGRESS",
    "faults": "TRM_FAULTS",  # testing hook: see pipeline.kaggle_driver.faults
}
_PATHS = ("challenges", "bundle", "checkpoint", "arch_config", "run_dir", "solutions", "working", "input_root")


@dataclass(frozen=True)
class Devices:
    """The devices the child stages run on, after checking what is present: one process per GPU (torchrun when
    several), or one CPU process."""

    gpus: int  # 0 = CPU
    bf16: bool  # the GPUs compute in bf16 natively (pipeline.training.train.native_bf16); else training runs in fp32
    note: str = ""  # why this differs from what was asked, for the log

    @property
    def processes(self) -> int:
        return max(1, self.gpus)

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.gpus and self.bf16 else "no"

    def describe(self) -> str:
        kind = f"{self.gpus} GPU(s), {'bf16' if self.bf16 else 'fp32 (no native bf16)'}" if self.gpus else "CPU"
        return kind + (f" - {self.note}" if self.note else "")


def resolve_devices(asked: int | None, present: int, bf16: bool) -> Devices:
    """`asked` GPUs (None = all present), never more than are present."""
    if asked is not None and asked < 0:
        raise ValueError(f"num_gpus: must be 0 (CPU) or more, got {asked}")
    if asked is None:
        return Devices(present, bf16)
    if asked > present:
        note = (f"{asked} GPU(s) asked, {present} present: using {present}"
                + ("" if present else " (the CPU)"))
        return Devices(present, bf16, note)
    return Devices(asked, bf16)


def probe_devices() -> tuple[int, bool]:
    """(GPUs present, native bf16 on them)."""
    import torch

    from pipeline.training.train import native_bf16

    count = torch.cuda.device_count()
    return count, count > 0 and native_bf16()


@dataclass
class KaggleSettings:
    """Where things are and how the time is spent; see ENV for the environment variable of each field."""

    challenges: Path
    working: Path
    run_dir: Path
    bundle: Path | None = None
    checkpoint: Path | None = None
    arch_config: Path | None = None
    solutions: Path | None = None
    started_at: float = field(default_factory=time.time)  # wall-clock start of the notebook (time.time())
    time_budget_s: float = KAGGLE_TIME_LIMIT_S - SAFETY_MARGIN_S  # from started_at to a final submission
    scored: bool = True  # the competition's scoring rerun (settings_from_env decides, see detect_scored_run)
    run_kind: str = ""  # why scored is what it is, for the log
    train_fraction: float = GPU_TRAIN_FRACTION  # of the time left (less submit_reserve_s) for fine-tuning
    submit_reserve_s: float = 120.0  # kept back at the end for voting and writing the submission
    stage_overhead_s: float = 90.0  # per child stage: start-up, dataset/model load, final save (pipeline budget)
    kill_grace_s: float = 30.0  # a child still running at its timeout: SIGTERM (it saves), then SIGKILL this later
    min_train_s: float = 60.0  # below this much training time, don't fine-tune (predict with the pretrained model)
    min_predict_s: float = 30.0  # below this much prediction time, don't predict (the fallback stays)
    max_retries: int = 3  # per stage: attempts again after running out of memory, each with half the batch
    partial_every_s: float = 120.0  # prediction saves its candidates so far this often (and when it fails)
    num_gpus: int | None = None  # None = every visible GPU; 0 = CPU
    overrides: list[str] = field(default_factory=list)  # run-config key=value, applied last
    progress: bool = True  # tqdm bars in the child processes
    faults: str = ""  # testing hook (pipeline.kaggle_driver.faults); empty in real runs
    devices: Devices | None = None  # resolved by settings_from_env; None = resolve when the run starts

    def __post_init__(self) -> None:
        for name in _PATHS:
            value = getattr(self, name, None)
            if value is not None:
                setattr(self, name, Path(value).expanduser().absolute())

    @property
    def submission(self) -> Path:
        return self.working / "submission.json"



def _convert_setting(name: str, text: str) -> Any:
    if name in ("num_gpus", "max_retries"):
        return int(text)
    if name == "progress":
        return text.strip().lower() in ("1", "true", "yes", "on")
    if name in ("overrides", "draft_overrides"):
        return shlex.split(text)
    if name == "faults":
        return text
    if name in _PATHS:
        return Path(text)
    return float(text)


def find_bundle(input_root: Path) -> Path | None:
    """The first folder up to two levels under input_root whose manifest.json says it is our bundle."""
    for pattern in ("*/manifest.json", "*/*/manifest.json"):
        for path in sorted(input_root.glob(pattern)):
            try:
                if json.loads(path.read_text()).get("kind") == BUNDLE_KIND:
                    return path.parent
            except (OSError, ValueError, AttributeError):
                continue
    return None


def detect_scored_run(env: Mapping[str, str], challenges: Path) -> tuple[bool, str]:
    """(is this the competition's scoring rerun?, why), for the choice between the full and the draft budget.

    Kaggle sets KAGGLE_IS_COMPETITION_RERUN in the rerun of a code competition notebook that scores it (its
    own `kaggle_evaluation` serving code branches on it; kaggle/README.md cites what we relied on). In case the
    variable is ever missing there, a second sign is read too: while editing, the ARC Prize's test challenges
    file is a placeholder holding public evaluation tasks, so test task ids that are not all in
    arc-agi_evaluation_challenges.json beside it mean hidden tasks, hence the scored run. Either sign -> scored."""
    value = env.get(RERUN_VARIABLE)
    if value:
        return True, f"scored rerun ({RERUN_VARIABLE}={value})"
    evaluation = Path(challenges).with_name("arc-agi_evaluation_challenges.json")
    try:
        test_ids = set(json.loads(Path(challenges).read_bytes()))
        public_ids = set(json.loads(evaluation.read_bytes()))
    except (OSError, ValueError, TypeError):
        return False, f"draft run ({RERUN_VARIABLE} not set)"
    hidden = test_ids - public_ids
    if hidden:
        return True, (f"scored run: {RERUN_VARIABLE} not set, but {len(hidden)} test task(s) are not public "
                      f"evaluation tasks (hidden tasks)")
    return False, f"draft run ({RERUN_VARIABLE} not set; the test tasks are the public placeholder)"


def _given_values(env: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings given as parameters (not None) or environment variables, converted."""
    unknown = set(params) - set(ENV)
    if unknown:
        raise ValueError(f"unknown Kaggle setting(s): {', '.join(sorted(unknown))}; known: {', '.join(ENV)}")
    values: dict[str, Any] = {}
    for name, var in ENV.items():
        if params.get(name) is not None:
            value = params[name]
            values[name] = _convert_setting(name, value) if isinstance(value, str) else value
        elif env.get(var):
            values[name] = _convert_setting(name, env[var])
    return values


def settings_from_env(started_at: float | None = None, env: Mapping[str, str] | None = None,
                      probe: Callable[[], tuple[int, bool]] = probe_devices, **params: Any) -> KaggleSettings:
    """Settings from notebook parameters (not None), else environment variables (ENV), else Kaggle defaults.

    The scored rerun uses time_budget_s and overrides; any other run uses draft_time_budget_s and overrides +
    draft_overrides, so a quick check saved in the notebook cannot leak into the scored run. The devices are
    checked here (`probe`: GPUs present, native bf16): without a GPU, train_fraction defaults to 0 (predict with
    the pretrained checkpoint: fine-tuning the paper model on a CPU gets nowhere in hours)."""
    env = os.environ if env is None else env
    values = _given_values(env, params)
    input_root = Path(values.pop("input_root", "/kaggle/input"))
    working = Path(values.pop("working", "/kaggle/working"))
    if "challenges" not in values:
        default = input_root / "arc-prize-2025" / "arc-agi_test_challenges.json"
        found = sorted(input_root.glob("*/arc-agi_test_challenges.json"))
        values["challenges"] = default if default.exists() or not found else found[0]
    if "bundle" not in values:
        values["bundle"] = find_bundle(input_root)
    values.setdefault("run_dir", working / "trm_run")
    if started_at is not None:
        values["started_at"] = started_at
    scored, why = detect_scored_run(env, Path(values["challenges"]))
    draft_budget = float(values.pop("draft_time_budget_s", DRAFT_TIME_BUDGET_S))
    draft_overrides = list(values.pop("draft_overrides", []))
    values["overrides"] = list(values.get("overrides", []))
    if not scored:
        values["time_budget_s"] = draft_budget
        values["overrides"] += draft_overrides
    devices = resolve_devices(values.get("num_gpus"), *probe())
    if "train_fraction" not in values:
        values["train_fraction"] = GPU_TRAIN_FRACTION if devices.gpus else 0.0
    return KaggleSettings(working=working, scored=scored, run_kind=why, devices=devices, **values)
