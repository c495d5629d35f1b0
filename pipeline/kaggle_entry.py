"""The Kaggle ARC Prize entry: fine-tune a pretrained TRM-Att on the hidden test tasks and submit, inside a time
limit, offline, never leaving the notebook without a valid submission.

The notebook `kaggle/trm_arc_kaggle.ipynb` is a thin driver of `KaggleRun`, whose stages run in this order:

  write_fallback  read the challenges as raw JSON and write a complete, valid submission.json at once (each test
                  input answered with itself, or [[0]] where even the input is not a valid grid);
  augment         the augmented dataset of the test tasks (their train pairs are the training data, their test
                  inputs are held out), through `pipeline.run --stage augment`, in this process;
  finetune        `pipeline.run --stage train --init CHECKPOINT` in a child process (torchrun over every GPU when
                  there are several), stopped by its share of the time budget;
  predict         `pipeline.run --stage predict` in a child process, with whatever time is left;
  submit          vote, then merge: the tasks the model answered + the fallback entry of every other task
                  (malformed, too big for the canvas, or lost to a failure), validated against the raw challenge
                  ids and test counts before the atomic replace of submission.json.

Every stage catches its own exceptions (logged with the traceback); a failed or skipped stage leaves the best
complete submission written so far in place. Child processes get a timeout taken from the budget, so a hung
stage cannot eat the time of the ones after it.

Time: one wall-clock budget from the notebook's start (default: 12 h - 45 min). What is left after augmenting,
less a reserve for the final submit, is split: `train_fraction` for fine-tuning, the rest for prediction.
"""
from __future__ import annotations

import json
import math
import os
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
    "time_budget_s": "TRM_TIME_BUDGET_S",
    "train_fraction": "TRM_TRAIN_FRACTION",
    "submit_reserve_s": "TRM_SUBMIT_RESERVE_S",
    "stage_overhead_s": "TRM_STAGE_OVERHEAD_S",
    "min_train_s": "TRM_MIN_TRAIN_S",
    "min_predict_s": "TRM_MIN_PREDICT_S",
    "num_gpus": "TRM_NUM_GPUS",
    "overrides": "TRM_OVERRIDES",  # whitespace-separated key=value run-config overrides, like --set
    "progress": "TRM_PROGRESS",
}


def log(message: str) -> None:
    print(f"[kaggle {time.strftime('%H:%M:%S')}] {message}", flush=True)


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
    train_fraction: float = 0.7  # of the time left after augmenting (less submit_reserve_s), for fine-tuning
    submit_reserve_s: float = 300.0  # kept back at the end for voting and writing the submission
    stage_overhead_s: float = 180.0  # child start-up, dataset/model load, final checkpoint save, per stage
    min_train_s: float = 60.0  # below this much training time, don't fine-tune (the fallback stays)
    min_predict_s: float = 30.0
    num_gpus: int | None = None  # None = every visible GPU; 0 = CPU
    overrides: list[str] = field(default_factory=list)  # run-config key=value, applied last
    progress: bool = True  # tqdm bars in the child processes

    @property
    def submission(self) -> Path:
        return self.working / "submission.json"

    @property
    def deadline(self) -> float:
        return self.started_at + self.time_budget_s

    def remaining_s(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)


def _convert_setting(name: str, text: str) -> Any:
    if name == "num_gpus":
        return int(text)
    if name == "progress":
        return text.strip().lower() in ("1", "true", "yes", "on")
    if name == "overrides":
        return shlex.split(text)
    if name in ("challenges", "bundle", "checkpoint", "arch_config", "run_dir", "solutions", "working", "input_root"):
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


def settings_from_env(started_at: float | None = None, env: Mapping[str, str] | None = None, **params: Any) -> KaggleSettings:
    """Settings from notebook parameters (not None), else environment variables (ENV), else Kaggle defaults."""
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
    return KaggleSettings(working=working, **values)


# ---------------------------------------------------------------------------------------------- time budget
@dataclass(frozen=True)
class StagePlan:
    """How long one child stage may take: its own stop time (handed to the stage as time_budget_s) and the
    hard timeout of the child process (a little more: start-up and the final save). run=False: not enough time."""

    run: bool
    budget_s: float
    timeout_s: float
    reason: str = ""


def plan_finetune(s: KaggleSettings, now: float | None = None) -> StagePlan:
    """Fine-tuning gets train_fraction of what is left, less the submit reserve; the child's own time budget
    leaves stage_overhead_s of that share for its start-up and final checkpoint."""
    left = s.remaining_s(now) - s.submit_reserve_s
    share = max(0.0, left) * s.train_fraction
    budget = share - s.stage_overhead_s
    if budget < s.min_train_s:
        return StagePlan(False, 0.0, 0.0, f"{budget:.0f} s of training time left (< min_train_s {s.min_train_s:.0f})")
    # the child may overrun its share by up to one more overhead (a slow save), never into the submit reserve
    timeout = min(share + s.stage_overhead_s, left)
    return StagePlan(True, budget, timeout)


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


def run_child(cmd: Sequence[str], timeout_s: float, *, cwd: Path, env: Mapping[str, str] | None = None,
              log_path: Path | None = None, grace_s: float = 30.0, name: str = "child") -> ChildResult:
    """Run `cmd`, echoing its output live (and into log_path); after timeout_s, SIGTERM its process group, and
    SIGKILL it grace_s later. Its own session, so torchrun's workers go with it."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env) if env is not None else None, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log_file = open(log_path, "ab") if log_path is not None else None

    def pump() -> None:  # raw chunks, not lines: tqdm's \r updates must pass through
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
            if log_file is not None:
                log_file.write(chunk)

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
    return ChildResult(proc.returncode, timed_out, time.perf_counter() - start)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of the child we started (start_new_session: its pid is the pgid)
    except ProcessLookupError:
        pass


def launch_command(num_processes: int, args: Sequence[str]) -> list[str]:
    """`python -m pipeline.run ARGS`, through torchrun with one process per GPU when there are several."""
    if num_processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
                "-m", "pipeline.run", *args]
    return [sys.executable, "-m", "pipeline.run", *args]


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


# ---------------------------------------------------------------------------------------------- the run
class KaggleRun:
    """The notebook's state: one method per stage, each safe to call whatever happened before it."""

    def __init__(self, settings: KaggleSettings):
        self.s = settings
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
        """Run one stage: its detail string on success; an exception is logged, and the stage marked failed."""
        log(f"{name}: start ({self.s.remaining_s():.0f} s of the budget left)")
        start = time.time()
        try:
            detail = body()
            state = "skipped" if detail.startswith("skipped") else "ok"
        except Exception as e:  # noqa: BLE001 - every failure must leave the best submission in place
            traceback.print_exc(file=sys.stdout)
            detail, state = f"{type(e).__name__}: {e}", "failed"
        self.status[name] = {**self.status.get(name, {}), "state": state, "detail": detail,
                             "seconds": round(time.time() - start, 2)}
        log(f"{name}: {state} - {detail}")
        self._save_status()
        return state == "ok"

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
                "time_budget_s": self.s.time_budget_s, "num_processes": self.num_processes, "stages": self.status,
            })
        except (OSError, RuntimeError) as e:
            log(f"cannot write {self.status_path}: {e}")

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.s.num_gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU was asked for
        return env

    def _common_args(self) -> list[str]:
        return ["--out", str(self.s.run_dir)] + ([] if self.s.progress else ["--quiet"])

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

            plan = plan_finetune(self.s)
            if not plan.run:  # the dataset would serve only fine-tuning
                return f"skipped: no time to fine-tune ({plan.reason})"
            self._prepare_run_dir()
            detail = self._configure()
            args = ["--stage", "augment", "--preset", "kaggle", *self._common_args()]
            for item in config_overrides(asdict(self.cfg)):
                args += ["--set", item]
            run_main(args)
            manifest = json.loads((self.s.run_dir / "dataset" / "manifest.json").read_text())
            self.status["augment"] = {"num_eval_puzzles": manifest["num_eval_puzzles"],
                                      "skipped": len(manifest["skipped"]), "too_big": len(manifest["too_big"])}
            if manifest["num_eval_puzzles"] == 0:
                raise RuntimeError("no test task could be used (all malformed or too big for the canvas)")
            return (f"{detail}; {manifest['num_eval_puzzles']} puzzles, {manifest['num_variants']} variants, "
                    f"{len(manifest['skipped'])} malformed, {len(manifest['too_big'])} too big (fallback entries)")

        return self._stage("augment", body)

    def finetune(self) -> bool:
        def body() -> str:
            from dataclasses import asdict

            from pipeline.checkpoint import checkpoint_step, latest_checkpoint

            if self.cfg is None or self.status.get("augment", {}).get("state") != "ok":
                return "skipped: no dataset"
            plan = plan_finetune(self.s)
            self.status["finetune"] = {"budget_s": round(plan.budget_s, 1), "timeout_s": round(plan.timeout_s, 1)}
            if not plan.run:
                return f"skipped: {plan.reason}"
            self.cfg.time_budget_s = plan.budget_s
            args = ["--stage", "train", "--preset", "kaggle", "--init", str(self.checkpoint), *self._common_args()]
            for item in config_overrides(asdict(self.cfg)):
                args += ["--set", item]
            log(f"finetune: {plan.budget_s:.0f} s of training, child timeout {plan.timeout_s:.0f} s")
            result = run_child(launch_command(self.num_processes, args), plan.timeout_s, cwd=self.s.run_dir,
                               env=self._child_env(), log_path=self.s.run_dir / "finetune.log", name="finetune")
            last = latest_checkpoint(self.s.run_dir / "checkpoints")
            step = checkpoint_step(last) if last is not None else 0
            self.status["finetune"].update(step=step, returncode=result.returncode, timed_out=result.timed_out)
            if last is None:
                raise RuntimeError(f"training wrote no checkpoint (exit code {result.returncode}"
                                   f"{', timed out' if result.timed_out else ''}); see {self.s.run_dir / 'finetune.log'}")
            note = "" if result.returncode == 0 else f" (exit code {result.returncode}; using the last checkpoint)"
            return f"{step} steps in {result.seconds:.0f} s -> {last}{note}"

        return self._stage("finetune", body)

    def predict(self) -> bool:
        def body() -> str:
            from pipeline.checkpoint import latest_checkpoint

            last = latest_checkpoint(self.s.run_dir / "checkpoints")
            if last is None:
                return "skipped: no fine-tuned checkpoint"
            plan = plan_predict(self.s)
            self.status["predict"] = {"budget_s": round(plan.budget_s, 1), "timeout_s": round(plan.timeout_s, 1)}
            if not plan.run:
                return f"skipped: {plan.reason}"
            out = self.s.run_dir / "predictions.npz"
            out.unlink(missing_ok=True)
            args = ["--stage", "predict", "--checkpoint", str(last), *self._common_args(),
                    "--set", f"predict.time_budget_s={plan.budget_s!r}"]
            log(f"predict: {plan.budget_s:.0f} s, child timeout {plan.timeout_s:.0f} s")
            result = run_child(launch_command(self.num_processes, args), plan.timeout_s, cwd=self.s.run_dir,
                               env=self._child_env(), log_path=self.s.run_dir / "predict.log", name="predict")
            self.status["predict"].update(returncode=result.returncode, timed_out=result.timed_out)
            if result.returncode != 0 or not out.exists():
                raise RuntimeError(f"prediction failed (exit code {result.returncode}"
                                   f"{', timed out' if result.timed_out else ''}); see {self.s.run_dir / 'predict.log'}")
            return f"candidates in {result.seconds:.0f} s -> {out}"

        return self._stage("predict", body)

    def submit(self) -> bool:
        """Vote over the candidates, merge with the fallback, validate against the raw challenges, replace."""
        def body() -> str:
            from augment.dataset import AugmentedDataset
            from pipeline.predictions import Predictions
            from pipeline.submit import submit

            if self.fallback is None:
                raise RuntimeError("no fallback submission (the challenges could not be read)")
            predictions_path = self.s.run_dir / "predictions.npz"
            if not predictions_path.exists():
                return "skipped: no predictions; the fallback submission stays"
            tasks = AugmentedDataset.load(self.s.run_dir / "dataset").eval_tasks()
            selector = self.cfg.predict.selector if self.cfg is not None else "vote"
            report = submit(tasks, Predictions.load(predictions_path), self.s.run_dir / "submission.json", selector)
            model = json.loads((self.s.run_dir / "submission.json").read_text())
            merged, fell_back = merge_submission(self.fallback, model)
            write_validated(self.s.submission, merged, self.fallback)
            self.status["submit"] = {"model_tasks": len(merged) - len(fell_back), "fallback_tasks": fell_back}
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
        self.augment()
        self.finetune()
        self.predict()
        self.submit()
        self.score()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """The stage table, and a last check of the submission file on disk."""
        problems = ["no fallback (challenges unreadable)"]
        if self.fallback is not None:
            try:
                problems = validate_submission(json.loads(self.s.submission.read_text()), expected_tasks(self.fallback))
            except (OSError, ValueError) as e:
                problems = [f"{self.s.submission}: {e}"]
        elapsed = time.time() - self.s.started_at
        for name, st in self.status.items():
            log(f"  {name:9s} {st.get('state', '?'):8s} {st.get('seconds', 0):8.1f} s  {st.get('detail', '')}")
        log(f"{elapsed:.0f} s of the {self.s.time_budget_s:.0f} s budget used; submission "
            f"{'valid and complete' if not problems else 'INVALID: ' + '; '.join(problems[:3])}")
        self.status["summary"] = {"elapsed_s": round(elapsed, 2), "submission_problems": problems[:20]}
        self._save_status()
        return {"elapsed_s": elapsed, "stages": self.status, "submission": str(self.s.submission),
                "problems": problems}
