"""The Kaggle ARC Prize entry: fine-tune a pretrained TRM-Att on the hidden test tasks and submit, inside a time
limit, offline, never leaving the notebook without a valid submission, and using the time it has when something
fails on the day.

The notebook `kaggle/trm_arc_kaggle.ipynb` writes the fallback submission itself (standard library only, before
the bundle is looked up or installed), then drives `KaggleRun`, whose stages run in this order:

  write_fallback  the same fallback from the raw challenges JSON, validated (each test input answered with
                  itself, or [[0]] where even the input is not a valid grid);
  plan            the run kind (scored rerun or draft, see `detect_scored_run`) and the time plan, printed first:
                  fine-tune + predict, predict only (with the pretrained checkpoint), or the fallback only;
  augment         the augmented dataset of the test tasks (their train pairs are the training data, their test
                  inputs are held out), through `pipeline.run --stage augment`, in this process;
  finetune        `pipeline.run --stage train --init CHECKPOINT` in a child process (torchrun over every GPU when
                  there are several), stopped by its share of the time budget; out of memory (exit -9 or a CUDA
                  OOM error) -> again with half the micro-batch (gradient accumulation keeps the global batch);
  predict         `pipeline.run --stage predict` in a child process with the fine-tuned checkpoint, else the
                  pretrained one; out of memory -> again with half the batch; a run that dies part-way leaves
                  its candidates so far (predict.save_partial_every_s), and those are submitted;
  submit          vote, then merge: the tasks the model answered + the fallback entry of every other task
                  (malformed, too big for the canvas, or lost to a failure), validated against the raw challenge
                  ids and test counts before the atomic replace of submission.json.

Every stage catches its own exceptions (logged with the traceback) and logs one line: planned seconds, used
seconds, outcome. Child processes get a timeout taken from the budget, so a hung stage cannot eat the time of the
ones after it.

Time: one wall-clock budget from the notebook's start: `time_budget_s` (default 12 h - 45 min) in the scored
rerun, `draft_time_budget_s` (default 30 min) in every other run (interactive, "Save & Run All", outside Kaggle).
See `plan_time` for the split.

Testing hook: `TRM_FAULTS` (setting `faults`) makes the child processes fail on purpose, deterministically; see
`parse_faults`. Empty in real runs.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.data import Task
from pipeline.io import atomic_write_json
from submissions.validate import grid_problems, validate_submission
from submissions.write import write_submission

BUNDLE_KIND = "trm-arc-kaggle-bundle"  # manifest.json "kind" of a folder built by kaggle/build_bundle.py
KAGGLE_TIME_LIMIT_S = 12 * 3600.0  # the ARC Prize 2025 notebook limit
SAFETY_MARGIN_S = 45 * 60.0  # kernel start, installs, writing the output; Kaggle's clock is not ours
DRAFT_TIME_BUDGET_S = 30 * 60.0  # runs that are not the scored rerun: a check, not 11 h of GPU quota
RERUN_VARIABLE = "KAGGLE_IS_COMPETITION_RERUN"  # set by Kaggle in the scoring rerun of a code competition
RUN_MARKER = ".trm_kaggle_run"  # marks a run folder as ours, so a re-run may clear it

Submission = dict[str, list[dict[str, list[list[int]]]]]

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
    "min_train_s": "TRM_MIN_TRAIN_S",
    "min_predict_s": "TRM_MIN_PREDICT_S",
    "max_retries": "TRM_MAX_RETRIES",
    "partial_every_s": "TRM_PARTIAL_EVERY_S",
    "num_gpus": "TRM_NUM_GPUS",
    "overrides": "TRM_OVERRIDES",  # whitespace-separated key=value run-config overrides, like --set
    "draft_overrides": "TRM_DRAFT_OVERRIDES",  # the same, applied after overrides, only outside the scored rerun
    "progress": "TRM_PROGRESS",
    "faults": "TRM_FAULTS",  # testing hook: see parse_faults
}


LOG_FILE: Path | None = None  # WORKING/trm_kaggle.log once a KaggleRun exists: the driver's lines, to read outside Kaggle


def log(message: str) -> None:
    line = f"[kaggle {time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if LOG_FILE is not None:
        try:
            with open(LOG_FILE, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass  # the log file is a convenience; the notebook output has every line


# ---------------------------------------------------------------------------------------------- settings
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
    train_fraction: float = 0.7  # of the time left (less submit_reserve_s) for fine-tuning, when both fit
    submit_reserve_s: float = 120.0  # kept back at the end for voting and writing the submission
    stage_overhead_s: float = 90.0  # child start-up, dataset/model load, final checkpoint save, per stage
    min_train_s: float = 60.0  # below this much training time, don't fine-tune (predict with the pretrained model)
    min_predict_s: float = 30.0  # below this much prediction time, don't predict (the fallback stays)
    max_retries: int = 3  # per stage: attempts again after running out of memory, each with half the batch
    partial_every_s: float = 120.0  # prediction saves its candidates so far this often (and when it fails)
    num_gpus: int | None = None  # None = every visible GPU; 0 = CPU
    overrides: list[str] = field(default_factory=list)  # run-config key=value, applied last
    progress: bool = True  # tqdm bars in the child processes
    faults: str = ""  # testing hook (parse_faults); empty in real runs

    @property
    def submission(self) -> Path:
        return self.working / "submission.json"

    @property
    def deadline(self) -> float:
        return self.started_at + self.time_budget_s

    def remaining_s(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)


_PATHS = ("challenges", "bundle", "checkpoint", "arch_config", "run_dir", "solutions", "working", "input_root")


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


def settings_from_env(started_at: float | None = None, env: Mapping[str, str] | None = None, **params: Any) -> KaggleSettings:
    """Settings from notebook parameters (not None), else environment variables (ENV), else Kaggle defaults.

    The scored rerun uses time_budget_s and overrides; any other run uses draft_time_budget_s and overrides +
    draft_overrides, so a quick check saved in the notebook cannot leak into the scored run."""
    env = os.environ if env is None else env
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
    if not scored:
        values["time_budget_s"] = draft_budget
        values["overrides"] = list(values.get("overrides", [])) + draft_overrides
    values["overrides"] = list(values.get("overrides", []))
    return KaggleSettings(working=working, scored=scored, run_kind=why, **values)


# ---------------------------------------------------------------------------------------------- time budget
@dataclass(frozen=True)
class TimePlan:
    """How the time left is spent. mode: "finetune+predict", "predict-only" (the pretrained checkpoint) or
    "fallback-only"; finetune_s / predict_s are the stages' shares, each including stage_overhead_s."""

    mode: str
    finetune_s: float
    predict_s: float
    left_s: float
    reason: str = ""


def plan_time(s: KaggleSettings, now: float | None = None) -> TimePlan:
    """The split of what is left after the submit reserve, degrading step by step as the budget shrinks:
    enough for both stages' minimums -> fine-tune gets train_fraction (never cutting prediction below its
    minimum), prediction the rest; enough for prediction only -> predict with the pretrained checkpoint (the
    round-robin order gives every test input its first views first, so fewer views fit, not fewer inputs);
    less -> the fallback stays."""
    left = s.remaining_s(now) - s.submit_reserve_s
    need_predict = s.stage_overhead_s + s.min_predict_s
    need_train = s.stage_overhead_s + s.min_train_s
    if left < need_predict:
        return TimePlan("fallback-only", 0.0, 0.0, left,
                        f"{left:.0f} s left after the {s.submit_reserve_s:.0f} s submit reserve; predicting needs "
                        f"{need_predict:.0f} s (stage_overhead_s + min_predict_s)")
    if left < need_train + need_predict:
        return TimePlan("predict-only", 0.0, left, left,
                        f"{left:.0f} s left after the submit reserve; fine-tuning as well needs "
                        f"{need_train + need_predict:.0f} s (2 x stage_overhead_s + min_train_s + min_predict_s)")
    train = min(max(left * s.train_fraction, need_train), left - need_predict)
    return TimePlan("finetune+predict", train, left - train, left)


@dataclass(frozen=True)
class StagePlan:
    """How long one child stage may take: its own stop time (handed to the stage as time_budget_s) and the
    hard timeout of the child process (a little more: start-up and the final save). run=False: not enough time."""

    run: bool
    budget_s: float
    timeout_s: float
    reason: str = ""


def plan_finetune(s: KaggleSettings, now: float | None = None) -> StagePlan:
    """Fine-tuning gets its share of plan_time; the child's own time budget leaves stage_overhead_s of that share
    for its start-up and final checkpoint."""
    plan = plan_time(s, now)
    if plan.mode != "finetune+predict":
        return StagePlan(False, 0.0, 0.0, f"{plan.mode}: {plan.reason}")
    budget = plan.finetune_s - s.stage_overhead_s
    # the child may overrun its share by up to one more overhead (a slow save), never into the submit reserve
    return StagePlan(True, budget, min(plan.finetune_s + s.stage_overhead_s, plan.left_s))


def plan_predict(s: KaggleSettings, now: float | None = None) -> StagePlan:
    """Prediction gets everything left but the submit reserve."""
    left = s.remaining_s(now) - s.submit_reserve_s
    budget = left - s.stage_overhead_s
    if budget < s.min_predict_s:
        return StagePlan(False, 0.0, 0.0, f"{budget:.0f} s of prediction time left (< min_predict_s {s.min_predict_s:.0f})")
    return StagePlan(True, budget, left)


# ---------------------------------------------------------------------------------------------- fallback
def _fallback_grid(pair: Any) -> list[list[int]]:
    """The test input itself when it is a valid grid (what Kaggle accepts), else [[0]]."""
    grid = pair.get("input") if isinstance(pair, dict) else None
    return grid if not grid_problems(grid) else [[0]]


def fallback_from_raw(challenges: Any, file: str | os.PathLike = "challenges") -> Submission:
    """A complete submission from the raw challenges JSON, whatever shape each task is in.

    A task whose "test" is a list gets one entry per element; a task too broken to count its test inputs gets
    one entry. Only a file that is not a {task_id: task} object at all raises (naming the file)."""
    if not isinstance(challenges, dict):
        raise ValueError(f"{file}: not a JSON object mapping task id -> task (got {type(challenges).__name__})")
    submission: Submission = {}
    for task_id, task in challenges.items():
        tests = task.get("test") if isinstance(task, dict) else None
        pairs = tests if isinstance(tests, list) else [None]
        submission[str(task_id)] = [{"attempt_1": g, "attempt_2": g} for g in map(_fallback_grid, pairs)]
    return submission


def read_raw_challenges(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"challenges file {path} does not exist (attach the competition data, or set "
                                f"{ENV['challenges']})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"challenges file {path}: not valid JSON ({e})") from None


def expected_tasks(fallback: Submission) -> list[Task]:
    """Stand-in Tasks with the raw ids and test counts, for validate_submission (which reads only those)."""
    return [Task(task_id, [], [np.zeros((1, 1), np.uint8)] * len(entries), None, "raw challenges")
            for task_id, entries in fallback.items()]


def _valid_entries(answer: Any, count: int) -> bool:
    return isinstance(answer, list) and len(answer) == count and all(
        isinstance(e, dict) and all(k in e and not grid_problems(e[k]) for k in ("attempt_1", "attempt_2"))
        for e in answer)


def merge_submission(fallback: Submission, model: Mapping[str, Any]) -> tuple[Submission, list[str]]:
    """The model's entries for every task it answered completely and validly, the fallback entries for every other
    task; in the challenges' task order. Returns (merged, ids of the tasks that fell back)."""
    merged: Submission = {}
    fell_back: list[str] = []
    for task_id, entries in fallback.items():
        answer = model.get(task_id)
        if _valid_entries(answer, len(entries)):
            merged[task_id] = answer
        else:
            merged[task_id] = entries
            fell_back.append(task_id)
    return merged, fell_back


def write_validated(path: Path, submission: Submission, fallback: Submission) -> None:
    """Atomic replace of `path`, only with a submission complete and valid against the raw challenges."""
    problems = validate_submission(submission, expected_tasks(fallback))
    if problems:
        raise RuntimeError(f"refusing to write an invalid submission to {path}:\n" + "\n".join(problems[:20]))
    write_submission(path, submission)


# ---------------------------------------------------------------------------------------------- checkpoints
def _load_any(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: a big table stays on disk
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format cannot mmap


def load_arch_config(path: Path) -> dict[str, Any]:
    """A reference model config: JSON, or YAML when pyyaml is installed; the reference's whole all_config.yaml
    (with an `arch` section) or the section alone."""
    text = Path(path).read_text()
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml  # Kaggle's image has pyyaml; not a dependency of this project

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping of model settings")
    arch = data.get("arch", data)
    # the reference sets these from its dataset at run time, so its all_config.yaml may lack them
    return {"vocab_size": 12, "seq_len": 900, "num_puzzle_identifiers": 1, **arch}


def checkpoint_model_config(path: str | os.PathLike, arch_config: str | os.PathLike | None = None):
    """(ModelConfig, "ours" | "reference") of a pretrained checkpoint: ours carry their run config; a reference
    state dict needs `arch_config`."""
    from pipeline.checkpoint import REFERENCE_PREFIXES, config_from_reference
    from pipeline.model import ModelConfig

    path = Path(path)
    state = _load_any(path)
    if isinstance(state, dict) and "model" in state and "config" in state:
        return ModelConfig(**state["config"]["model"]), "ours"
    if isinstance(state, dict) and any(str(k).startswith(REFERENCE_PREFIXES) for k in state):
        if arch_config is None:
            raise ValueError(f"{path} is a reference TRM state dict: give its model config too "
                             f"({ENV['arch_config']} or the bundle's arch_config)")
        return config_from_reference(load_arch_config(Path(arch_config))), "reference"
    raise ValueError(f"{path}: neither a checkpoint of this project nor a reference TRM state dict")


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- child processes
@dataclass
class ChildResult:
    returncode: int | None
    timed_out: bool
    seconds: float
    tail: str = ""  # the last 64 kB of its output (what went wrong is at the end)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_child(cmd: Sequence[str], timeout_s: float, *, cwd: Path, env: Mapping[str, str] | None = None,
              log_path: Path | None = None, grace_s: float = 30.0, name: str = "child") -> ChildResult:
    """Run `cmd`, echoing its output live (and into log_path); after timeout_s, SIGTERM its process group, and
    SIGKILL it grace_s later. Its own session, so torchrun's workers go with it."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env) if env is not None else None, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log_file = open(log_path, "ab") if log_path is not None else None
    tail = bytearray()

    def pump() -> None:  # raw chunks, not lines: tqdm's \r updates must pass through
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
            if log_file is not None:
                log_file.write(chunk)
            tail.extend(chunk)
            del tail[:-(1 << 16)]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout_s, 0.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"{name}: no end after {timeout_s:.0f} s, stopping it")
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    finally:
        reader.join(timeout=10)
        if log_file is not None:
            log_file.close()
    return ChildResult(proc.returncode, timed_out, time.perf_counter() - start, tail.decode("utf-8", errors="replace"))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of the child we started (start_new_session: its pid is the pgid)
    except ProcessLookupError:
        pass


def launch_command(num_processes: int, args: Sequence[str], module: str = "pipeline.run") -> list[str]:
    """`python -m pipeline.run ARGS`, through torchrun with one process per GPU when there are several."""
    if num_processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
                "-m", module, *args]
    return [sys.executable, "-m", module, *args]


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


# ---------------------------------------------------------------------------------------------- failures
OOM_PATTERN = re.compile(r"out of memory|OutOfMemoryError|exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)", re.IGNORECASE)
FAULT_KINDS = ("oom_rows_over", "kill_rows_over", "oom_after_calls", "kill_after_calls")


def is_out_of_memory(result: ChildResult) -> bool:
    """Did the child die for memory? SIGKILL (the host's OOM killer: exit -9, 137 through a shell) or a CUDA
    out-of-memory error in its output (torchrun reports a worker's -9 as text). A child we stopped for time is not."""
    if result.timed_out:
        return False
    return result.returncode in (-9, 137) or bool(OOM_PATTERN.search(result.tail))


def parse_faults(text: str) -> dict[str, dict[str, int]]:
    """The testing hook: `STAGE:KIND=N` items, whitespace-separated, e.g. "train:oom_rows_over=4
    predict:oom_after_calls=6". STAGE is a pipeline.run stage (train, predict); KIND is one of
      oom_rows_over=N     a forward pass over more than N rows raises a CUDA-out-of-memory error
      kill_rows_over=N    ... the process kills itself with SIGKILL (exit -9, as the host's OOM killer does)
      oom_after_calls=N   forward passes after the first N raise the out-of-memory error
      kill_after_calls=N  ... SIGKILL
    so that "out of memory at a big batch" is retried successfully at a smaller one, and "fails after N
    batches" happens at the same point in every run."""
    faults: dict[str, dict[str, int]] = {}
    for item in text.split():
        stage, _, rest = item.partition(":")
        kind, _, number = rest.partition("=")
        if not stage or kind not in FAULT_KINDS or not number.isdigit():
            raise ValueError(f"{ENV['faults']}: cannot read {item!r}; expected STAGE:KIND=N with KIND one of "
                             f"{', '.join(FAULT_KINDS)}")
        faults.setdefault(stage, {})[kind] = int(number)
    return faults


def install_faults(faults: Mapping[str, int]) -> None:
    """Wrap TRM.forward in this process so that it fails as `faults` (one stage's part of parse_faults) says."""
    import torch

    from pipeline.model import TRM

    original = TRM.forward
    calls = 0

    def forward(self, carry, batch, *args, **kwargs):
        nonlocal calls
        calls += 1
        rows = int(batch["inputs"].shape[0])
        oom = rows > faults.get("oom_rows_over", 1 << 62) or calls > faults.get("oom_after_calls", 1 << 62)
        kill = rows > faults.get("kill_rows_over", 1 << 62) or calls > faults.get("kill_after_calls", 1 << 62)
        if kill:
            print(f"TRM_FAULTS: SIGKILL at forward pass {calls} ({rows} rows)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if oom:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {ENV['faults']} at forward pass "
                                         f"{calls}, {rows} rows)")
        return original(self, carry, batch, *args, **kwargs)

    TRM.forward = forward


def child_main(argv: Sequence[str]) -> int:
    """`python -m pipeline.kaggle_entry ARGS`: `python -m pipeline.run ARGS` with the TRM_FAULTS of its stage
    installed first (the driver starts children this way only when faults are set)."""
    from pipeline.run import cli

    argv = list(argv)
    stage = argv[argv.index("--stage") + 1] if "--stage" in argv[:-1] else ""
    faults = parse_faults(os.environ.get(ENV["faults"], "")).get(stage)
    if faults:
        install_faults(faults)
    sys.argv = ["pipeline.run", *argv]
    return cli()


# ---------------------------------------------------------------------------------------------- the run
def next_grad_accum(global_batch: int, num_processes: int, accum: int) -> int | None:
    """The next number of micro-batches for an out-of-memory retry: the smallest >= 2 x accum that splits each
    process's share of the global batch evenly (a micro-batch at most half as big, the same global batch); None
    when the micro-batch is already one row."""
    local = global_batch // max(1, num_processes)
    for candidate in range(2 * accum, local + 1):
        if local % candidate == 0:
            return candidate
    return None


def _plural(n: int, word: str) -> str:
    """'1 attempt', '2 attempts', '2 out-of-memory retries'."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


class KaggleRun:
    """The notebook's state: one method per stage, each safe to call whatever happened before it."""

    def __init__(self, settings: KaggleSettings):
        global LOG_FILE
        self.s = settings
        LOG_FILE = settings.working / "trm_kaggle.log"
        try:
            settings.working.mkdir(parents=True, exist_ok=True)
            LOG_FILE.write_text("")  # this run's lines only
        except OSError:
            LOG_FILE = None
        self.status: dict[str, dict[str, Any]] = {}
        self.fallback: Submission | None = None
        self.cfg = None  # the resolved RunConfig (after augment's configuration step)
        self.checkpoint: Path | None = None  # the pretrained checkpoint fine-tuning starts from
        self.checkpoint_kind = ""  # "ours" or "reference"
        self.num_processes = 1

    # --- bookkeeping
    @property
    def status_path(self) -> Path:
        return self.s.run_dir / "kaggle_status.json"

    def _stage(self, name: str, body: Callable[[], str]) -> bool:
        """Run one stage: its detail string on success (a detail starting with "skipped" or "partial: " names that
        outcome); an exception is logged, and the stage marked failed. Ends with the phase line: planned seconds
        (what the body put in status[name]["planned_s"]), used seconds, outcome."""
        log(f"{name}: start ({self.s.remaining_s():.0f} s of the budget left)")
        start = time.time()
        try:
            detail = body()
            state = next((w for w in ("skipped", "partial") if detail.startswith(w)), "ok")
            detail = detail.removeprefix("partial: ")
        except Exception as e:  # noqa: BLE001 - every failure must leave the best submission in place
            traceback.print_exc(file=sys.stdout)
            detail, state = f"{type(e).__name__}: {e}", "failed"
        used = time.time() - start
        self.status[name] = {**self.status.get(name, {}), "state": state, "detail": detail, "seconds": round(used, 2)}
        planned = self.status[name].get("planned_s")
        log(f"PHASE {name}: planned {'-' if planned is None else f'{planned:.0f} s'}, used {used:.0f} s, "
            f"outcome {state}: {detail}")
        self._save_status()
        return state in ("ok", "partial")

    def _claim_run_dir(self) -> None:
        """Make sure the run folder is ours (marked), creating it; a foreign non-empty folder is an error, since a
        later run clears the folder."""
        run = self.s.run_dir
        if (run / RUN_MARKER).exists():
            return
        if run.exists() and any(run.iterdir()):
            raise RuntimeError(f"run folder {run} holds files not written by this notebook; choose another "
                               f"({ENV['run_dir']})")
        run.mkdir(parents=True, exist_ok=True)
        (run / RUN_MARKER).write_text("written by pipeline.kaggle_entry; cleared on the next run\n")

    def _save_status(self) -> None:
        try:
            self._claim_run_dir()
            atomic_write_json(self.status_path, {
                "started_at": self.s.started_at, "deadline": self.s.deadline, "written_at": time.time(),
                "time_budget_s": self.s.time_budget_s, "scored": self.s.scored, "run_kind": self.s.run_kind,
                "num_processes": self.num_processes, "stages": self.status,
            })
        except (OSError, RuntimeError) as e:
            log(f"cannot write {self.status_path}: {e}")

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.s.num_gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU was asked for
        env.pop(ENV["faults"], None)
        if self.s.faults:
            env[ENV["faults"]] = self.s.faults
        return env

    def _launch(self, args: Sequence[str]) -> list[str]:
        """The child's command; through this module's child_main only when the testing hook is set."""
        return launch_command(self.num_processes, args, "pipeline.kaggle_entry" if self.s.faults else "pipeline.run")

    def _common_args(self) -> list[str]:
        return ["--out", str(self.s.run_dir)] + ([] if self.s.progress else ["--quiet"])

    def _dataset_ready(self) -> bool:
        return self.cfg is not None and self.status.get("augment", {}).get("state") == "ok"

    # --- stages
    def write_fallback(self) -> bool:
        """First thing: a complete, valid submission.json from the raw challenges."""
        def body() -> str:
            raw = read_raw_challenges(self.s.challenges)
            fallback = fallback_from_raw(raw, self.s.challenges)
            write_validated(self.s.submission, fallback, fallback)
            self.fallback = fallback
            n_tests = sum(len(v) for v in fallback.values())
            return f"{len(fallback)} tasks, {n_tests} test inputs -> {self.s.submission}"

        return self._stage("fallback", body)

    def plan(self) -> TimePlan:
        """Say at the top of the log what kind of run this is and what the time allows (and, if it allows
        nothing, why and which setting to change)."""
        p = plan_time(self.s)
        budget_name = "time_budget_s" if self.s.scored else "draft_time_budget_s"
        log(f"run kind: {self.s.run_kind}; budget {self.s.time_budget_s:.0f} s ({budget_name}), "
            f"{self.s.remaining_s():.0f} s of it left")
        if p.mode == "fallback-only":
            log(f"TIME PLAN: FALLBACK ONLY (every test input answered with itself) - {p.reason}; raise {budget_name} "
                f"or lower stage_overhead_s / submit_reserve_s / min_predict_s")
        elif p.mode == "predict-only":
            log(f"TIME PLAN: predict only, with the pretrained checkpoint, about {p.predict_s:.0f} s (as many views "
                f"as fit), no fine-tuning - {p.reason}")
        else:
            log(f"TIME PLAN: fine-tune about {p.finetune_s:.0f} s, then predict about {p.predict_s:.0f} s, "
                f"submit reserve {self.s.submit_reserve_s:.0f} s")
        self.status["plan"] = {"mode": p.mode, "finetune_s": round(p.finetune_s, 1), "predict_s": round(p.predict_s, 1),
                               "reason": p.reason, "scored": self.s.scored, "run_kind": self.s.run_kind,
                               "time_budget_s": self.s.time_budget_s}
        self._save_status()
        return p

    def _prepare_run_dir(self) -> None:
        """An empty run folder: a previous session's dataset and checkpoints would be picked up by the stages."""
        import shutil

        self._claim_run_dir()
        shutil.rmtree(self.s.run_dir)
        self._claim_run_dir()

    def _pretrained(self) -> tuple[Path, Path | None]:
        """(checkpoint, arch config or None), from the settings or the bundle's manifest (sha256 checked)."""
        checkpoint, arch = self.s.checkpoint, self.s.arch_config
        if checkpoint is None:
            if self.s.bundle is None:
                raise FileNotFoundError(f"no checkpoint: attach the bundle dataset (or set {ENV['bundle']} / "
                                        f"{ENV['checkpoint']})")
            manifest = json.loads((self.s.bundle / "manifest.json").read_text())
            entry = manifest["checkpoint"]
            checkpoint = self.s.bundle / entry["path"]
            if arch is None and entry.get("arch_config"):
                arch = self.s.bundle / entry["arch_config"]
            expected = {f["path"]: f["sha256"] for f in manifest.get("files", [])}.get(entry["path"])
            if expected is not None and sha256_of(checkpoint) != expected:
                raise ValueError(f"{checkpoint}: sha256 differs from the bundle manifest (a broken upload?)")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        return Path(checkpoint), (Path(arch) if arch is not None else None)

    def _configure(self) -> str:
        """The run config: the kaggle preset, the pretrained model's architecture (the canvas follows from its
        sequence length), the challenges as both source and held-out set, then the user's overrides."""
        import torch

        from pipeline.config import apply_overrides, preset

        checkpoint, arch = self._pretrained()
        model_cfg, kind = checkpoint_model_config(checkpoint, arch)
        cfg = preset("kaggle")
        cfg.model = model_cfg
        cfg.data.sources = cfg.data.eval_set = str(self.s.challenges)
        cfg.data.canvas = math.isqrt(model_cfg.seq_len)
        cfg.keep_checkpoints = 1
        apply_overrides(cfg, list(self.s.overrides))
        if cfg.data.canvas ** 2 != cfg.model.seq_len:
            raise ValueError(f"data.canvas {cfg.data.canvas} does not fit the checkpoint's sequence length "
                             f"{cfg.model.seq_len} (canvas {math.isqrt(cfg.model.seq_len)})")
        gpus = torch.cuda.device_count() if self.s.num_gpus is None else self.s.num_gpus
        self.num_processes = max(1, gpus)
        unit = self.num_processes * cfg.grad_accum_steps
        if cfg.global_batch_size % unit:
            rounded = max(unit, cfg.global_batch_size // unit * unit)
            log(f"global_batch_size {cfg.global_batch_size} -> {rounded} (a multiple of {unit} processes x micro-batches)")
            cfg.global_batch_size = rounded
        self.cfg = cfg
        self.checkpoint, self.checkpoint_kind = checkpoint, kind
        return f"{kind} checkpoint {checkpoint}, canvas {cfg.data.canvas}, {self.num_processes} process(es)"

    def augment(self) -> bool:
        def body() -> str:
            from dataclasses import asdict

            from pipeline.run import main as run_main

            plan = plan_time(self.s)
            if plan.mode == "fallback-only":  # the dataset would serve nothing
                return f"skipped: no time to predict ({plan.reason})"
            self._prepare_run_dir()
            detail = self._configure()
            args = ["--stage", "augment", "--preset", "kaggle", *self._common_args()]
            for item in config_overrides(asdict(self.cfg)):
                args += ["--set", item]
            run_main(args)
            manifest = json.loads((self.s.run_dir / "dataset" / "manifest.json").read_text())
            self.status["augment"] = {"num_eval_puzzles": manifest["num_eval_puzzles"],
                                      "skipped": len(manifest["skipped"]), "too_big": len(manifest["too_big"])}
            canvas = self.cfg.data.canvas
            if manifest["too_big"] and canvas < 30:
                log(f"WARNING: {len(manifest['too_big'])} task(s) do not fit the checkpoint's {canvas}x{canvas} canvas "
                    f"and keep the identity fallback; a real submission needs a 30x30 checkpoint (kaggle/README.md)")
            if manifest["num_eval_puzzles"] == 0:
                raise RuntimeError(f"no test task could be used ({len(manifest['skipped'])} malformed, "
                                   f"{len(manifest['too_big'])} too big for the {canvas}x{canvas} canvas)")
            return (f"{detail}; {manifest['num_eval_puzzles']} puzzles, {manifest['num_variants']} variants, "
                    f"{len(manifest['skipped'])} malformed, {len(manifest['too_big'])} too big (fallback entries)")

        return self._stage("augment", body)

    def finetune(self) -> bool:
        """Fine-tune within the planned share; out of memory -> again with twice the micro-batches (the global
        batch stays), continuing from a checkpoint the failed attempt left, if any."""
        def body() -> str:
            from dataclasses import asdict, replace

            from pipeline.checkpoint import checkpoint_step, latest_checkpoint

            if not self._dataset_ready():
                return "skipped: no dataset"
            plan = plan_time(self.s)
            st = self.status["finetune"] = {"planned_s": round(plan.finetune_s, 1), "attempts": []}
            if plan.mode != "finetune+predict":
                return f"skipped: {plan.mode} ({plan.reason})"
            stage_end = time.time() + plan.finetune_s
            global_batch, accum = self.cfg.global_batch_size, self.cfg.grad_accum_steps
            local = global_batch // self.num_processes
            ckpt_dir = self.s.run_dir / "checkpoints"
            result = None
            for attempt in range(1 + self.s.max_retries):
                now = time.time()
                budget = stage_end - now - self.s.stage_overhead_s
                if budget < self.s.min_train_s:
                    log(f"finetune: {budget:.0f} s of training time left, below min_train_s: no further attempt")
                    break
                cfg = replace(self.cfg, time_budget_s=budget, grad_accum_steps=accum)
                resume = latest_checkpoint(ckpt_dir) is not None  # a failed attempt's checkpoint is progress
                args = ["--stage", "train", "--preset", "kaggle", *self._common_args(),
                        *(["--resume"] if resume else ["--init", str(self.checkpoint)])]
                for item in config_overrides(asdict(cfg)):
                    args += ["--set", item]
                timeout = min(stage_end - now + self.s.stage_overhead_s, self.s.remaining_s() - self.s.submit_reserve_s)
                log(f"finetune attempt {attempt + 1}: {budget:.0f} s of training, micro-batch {local // accum} "
                    f"(grad_accum_steps {accum}, global batch {global_batch}), child timeout {timeout:.0f} s")
                result = run_child(self._launch(args), timeout, cwd=self.s.run_dir, env=self._child_env(),
                                   log_path=self.s.run_dir / "finetune.log", name="finetune")
                oom = is_out_of_memory(result)
                st["attempts"].append({"budget_s": round(budget, 1), "grad_accum_steps": accum, "micro_batch": local // accum,
                                       "returncode": result.returncode, "timed_out": result.timed_out,
                                       "out_of_memory": oom, "seconds": round(result.seconds, 1)})
                if result.ok or not oom:
                    break
                more = next_grad_accum(global_batch, self.num_processes, accum)
                if more is None or attempt == self.s.max_retries:
                    log(f"finetune: out of memory at micro-batch {local // accum}; "
                        f"{'no retries left (max_retries)' if more is not None else 'it cannot be halved'}")
                    break
                log(f"finetune: out of memory at micro-batch {local // accum} (exit code {result.returncode}); "
                    f"retrying with grad_accum_steps {more} (micro-batch {local // more}, global batch "
                    f"{global_batch} kept)")
                accum = more
            last = latest_checkpoint(ckpt_dir)
            retries = max(0, len(st["attempts"]) - 1)
            st.update(step=checkpoint_step(last) if last is not None else 0, grad_accum_steps=accum, retries=retries,
                      returncode=result.returncode if result else None,
                      timed_out=result.timed_out if result else False)
            if last is None:
                raise RuntimeError(f"fine-tuning failed for good ({_plural(len(st['attempts']), 'attempt')}, last exit "
                                   f"code {st['returncode']}); prediction uses the pretrained checkpoint; see "
                                   f"{self.s.run_dir / 'finetune.log'}")
            note = "" if result is not None and result.ok else f" (last exit code {st['returncode']}; using the last checkpoint)"
            again = f" after {_plural(retries, 'out-of-memory retry')} (grad_accum_steps {accum})" if retries else ""
            return f"{st['step']} steps{again} -> {last}{note}"

        return self._stage("finetune", body)

    def _pretrained_for_dataset(self) -> Path:
        """The pretrained checkpoint as one of ours for this dataset (every puzzle row at the mean of the trained
        rows, as fine-tuning starts), so prediction can run when fine-tuning failed or did not fit."""
        import torch
        from dataclasses import asdict, replace

        from augment.dataset import AugmentedDataset
        from pipeline.checkpoint import init_from_checkpoint
        from pipeline.config import to_dict
        from pipeline.io import atomic_write_with
        from pipeline.model import TRM

        dataset = AugmentedDataset.load(self.s.run_dir / "dataset")
        model_cfg = replace(self.cfg.model, seq_len=dataset.canvas ** 2,
                            num_puzzle_identifiers=dataset.num_puzzle_identifiers)
        torch.manual_seed(self.cfg.seed)
        model = TRM(model_cfg)
        init_from_checkpoint(model, self.checkpoint, verbose=False)
        config = to_dict(self.cfg)
        config["model"] = asdict(model_cfg)
        state = {"step": 0, "config": config, "model": model.state_dict(), "ema": None, "final": True,
                 "pretrained": str(self.checkpoint)}
        path = self.s.run_dir / "pretrained_for_predict.pt"
        atomic_write_with(path, lambda f: torch.save(state, f))
        return path

    def _collect_partial(self) -> Any:
        """The candidates a failed prediction child left, joined: each process's partial file, or its finished
        shard (several processes: a rank that got through its share saved it whole); None if none."""
        from pipeline.predictions import Predictions, PredictionsError

        parts = []
        found = set(self.s.run_dir.glob("predictions*.partial.npz")) | set(self.s.run_dir.glob("predictions.rank*.npz"))
        for path in sorted(found):
            try:
                parts.append(Predictions.load(path))
            except PredictionsError as e:
                log(f"predict: ignoring {path}: {e}")
            path.unlink(missing_ok=True)
        return Predictions.concatenate(parts) if parts else None

    def predict(self) -> bool:
        """Predict with the fine-tuned checkpoint (else the pretrained one) in whatever time is left; out of
        memory -> again with half the batch; a run that dies part-way -> its candidates so far (the most any
        attempt made) are what is submitted."""
        def body() -> str:
            from dataclasses import asdict, replace

            from pipeline.checkpoint import latest_checkpoint

            if not self._dataset_ready():
                return "skipped: no dataset"
            plan = plan_predict(self.s)
            st = self.status["predict"] = {"planned_s": round(max(plan.timeout_s, 0.0), 1), "attempts": []}
            if not plan.run:
                return f"skipped: {plan.reason}"
            last = latest_checkpoint(self.s.run_dir / "checkpoints")
            if last is not None:
                source, checkpoint = "fine-tuned", last
            else:
                why = self.status.get("finetune", {}).get("state", "not run")
                source, checkpoint = f"pretrained (fine-tune {why})", self._pretrained_for_dataset()
            st["checkpoint"] = source
            out = self.s.run_dir / "predictions.npz"
            out.unlink(missing_ok=True)
            self._collect_partial()  # nothing stale
            batch = self.cfg.predict.batch_size
            best = None
            for attempt in range(1 + self.s.max_retries):
                plan = plan_predict(self.s)
                if not plan.run:
                    log(f"predict: {plan.reason}; no further attempt")
                    break
                pcfg = replace(self.cfg.predict, time_budget_s=plan.budget_s, batch_size=batch,
                               save_partial_every_s=self.s.partial_every_s)
                args = ["--stage", "predict", "--preset", "kaggle", "--checkpoint", str(checkpoint), *self._common_args()]
                for item in config_overrides(asdict(pcfg), "predict."):
                    args += ["--set", item]
                args += ["--set", f"data.canvas_buckets={self.cfg.data.canvas_buckets}"]  # also without a fine-tune
                log(f"predict attempt {attempt + 1} ({source} checkpoint): {plan.budget_s:.0f} s, batch {batch}, "
                    f"child timeout {plan.timeout_s:.0f} s")
                result = run_child(self._launch(args), plan.timeout_s, cwd=self.s.run_dir, env=self._child_env(),
                                   log_path=self.s.run_dir / "predict.log", name="predict")
                oom = is_out_of_memory(result)
                record = {"budget_s": round(plan.budget_s, 1), "batch_size": batch, "returncode": result.returncode, "timed_out": result.timed_out,
                          "out_of_memory": oom, "seconds": round(result.seconds, 1)}
                st["attempts"].append(record)
                if result.ok and out.exists():
                    break
                partial = self._collect_partial()
                record["partial_candidates"] = len(partial) if partial is not None else 0
                if partial is not None and len(partial) > (len(best) if best is not None else 0):
                    best = partial
                if not oom:
                    break
                if batch <= 1 or attempt == self.s.max_retries:
                    log(f"predict: out of memory at batch {batch}; "
                        f"{'no retries left (max_retries)' if batch > 1 else 'it cannot be halved'}")
                    break
                log(f"predict: out of memory at batch {batch} (exit code {result.returncode}); retrying with "
                    f"batch {batch // 2}")
                batch //= 2
            st["retries"] = max(0, len(st["attempts"]) - 1)
            if out.exists():
                return f"candidates from the {source} checkpoint -> {out}"
            if best is not None and len(best):
                best.save(out)
                st["partial_candidates"] = len(best)
                return (f"partial: prediction failed ({_plural(len(st['attempts']), 'attempt')}); submitting the "
                        f"{len(best)} candidates it made (from the {source} checkpoint) -> {out}")
            raise RuntimeError(f"prediction failed ({_plural(len(st['attempts']), 'attempt')}) and left no candidates; "
                               f"see {self.s.run_dir / 'predict.log'}")

        return self._stage("predict", body)

    def submit(self) -> bool:
        """Vote over the candidates, merge with the fallback, validate against the raw challenges, replace."""
        def body() -> str:
            from augment.dataset import AugmentedDataset
            from pipeline.predictions import Predictions
            from pipeline.submit import submit

            self.status["submit"] = {"planned_s": self.s.submit_reserve_s}
            if self.fallback is None:
                raise RuntimeError("no fallback submission (the challenges could not be read)")
            predictions_path = self.s.run_dir / "predictions.npz"
            if self.status.get("predict", {}).get("state") not in ("ok", "partial") or not predictions_path.exists():
                return "skipped: no predictions; the fallback submission stays"
            tasks = AugmentedDataset.load(self.s.run_dir / "dataset").eval_tasks()
            selector = self.cfg.predict.selector if self.cfg is not None else "vote"
            report = submit(tasks, Predictions.load(predictions_path), self.s.run_dir / "submission.json", selector)
            model = json.loads((self.s.run_dir / "submission.json").read_text())
            merged, fell_back = merge_submission(self.fallback, model)
            write_validated(self.s.submission, merged, self.fallback)
            self.status["submit"].update(model_tasks=len(merged) - len(fell_back), fallback_tasks=fell_back)
            return (f"{len(merged) - len(fell_back)} tasks from the model ({report.summary()}), {len(fell_back)} "
                    f"fallback -> {self.s.submission}")

        return self._stage("submit", body)

    def score(self) -> bool:
        """Editing runs only: score submission.json against known solutions (settings.solutions)."""
        if self.s.solutions is None:
            return False

        def body() -> str:
            from pipeline.data import load_solutions
            from submissions.score import format_score, score_submission

            submission = json.loads(self.s.submission.read_text())
            solutions = {k: v for k, v in load_solutions(str(self.s.solutions)).items() if k in submission}
            report = score_submission(submission, solutions)
            print(format_score(report))
            return f"scored {len(solutions)} tasks against {self.s.solutions}"

        return self._stage("score", body)

    def run_all(self) -> dict[str, Any]:
        self.write_fallback()
        self.plan()
        self.augment()
        self.finetune()
        self.predict()
        self.submit()
        self.score()
        return self.summary()

    def path_taken(self) -> str:
        """One line: which way the run went (for the log's last lines and kaggle_status.json)."""
        st = self.status
        state = {name: st.get(name, {}).get("state", "not run") for name in ("augment", "finetune", "predict", "submit")}
        if state["submit"] != "ok":
            broken = [f"{name} {state[name]}" for name in ("augment", "predict", "submit") if state[name] not in ("ok", "partial")]
            return f"fallback submission only ({', '.join(broken)}; time plan {st.get('plan', {}).get('mode', '?')})"
        ft = st.get("finetune", {})
        if state["finetune"] == "ok":
            retries = ft.get("retries", 0)
            tune = f"fine-tuned {ft.get('step', 0)} steps" + (
                f" after {_plural(retries, 'out-of-memory retry')} (grad_accum_steps {ft.get('grad_accum_steps')})"
                if retries else "")
        elif state["finetune"] == "skipped":
            tune = "no fine-tuning (time plan: predict only)"
        else:
            tune = f"fine-tuning {state['finetune']}"
        pr = st.get("predict", {})
        pred = f"predicted with the {pr.get('checkpoint', '?')} checkpoint" + (
            f", PARTIAL ({pr.get('partial_candidates', 0)} candidates)" if state["predict"] == "partial" else "") + (
            f" after {_plural(pr.get('retries', 0), 'out-of-memory retry')}" if pr.get("retries") else "")
        sub = st.get("submit", {})
        return f"{tune} -> {pred} -> {sub.get('model_tasks', 0)} tasks from the model, " \
               f"{len(sub.get('fallback_tasks', []))} fallback"

    def summary(self) -> dict[str, Any]:
        """The phase table, the path taken, and a last check of the submission file on disk."""
        problems = ["no fallback (challenges unreadable)"]
        if self.fallback is not None:
            try:
                problems = validate_submission(json.loads(self.s.submission.read_text()), expected_tasks(self.fallback))
            except (OSError, ValueError) as e:
                problems = [f"{self.s.submission}: {e}"]
        elapsed = time.time() - self.s.started_at
        log("phase      outcome   planned s   used s  detail")
        for name, st in self.status.items():
            if "state" not in st:
                continue
            planned = st.get("planned_s")
            log(f"  {name:9s} {st['state']:8s} {'-' if planned is None else f'{planned:.0f}':>9s} "
                f"{st.get('seconds', 0):8.1f}  {st.get('detail', '')}")
        path = self.path_taken()
        log(f"PATH: {path}")
        log(f"{elapsed:.0f} s of the {self.s.time_budget_s:.0f} s budget used; submission "
            f"{'valid and complete' if not problems else 'INVALID: ' + '; '.join(problems[:3])}")
        self.status["summary"] = {"elapsed_s": round(elapsed, 2), "submission_problems": problems[:20], "path": path}
        self._save_status()
        return {"elapsed_s": elapsed, "stages": self.status, "submission": str(self.s.submission),
                "problems": problems, "path": path}


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
