"""The in-process stages: the fallback, augment (with the run's configuration), submit and score; the child stages
(fine-tuning, prediction) are pipeline.kaggle_driver.child_stages.

Augment and submit run in the driver's own process, so their window of the time plan is kept by an interval timer
(`time_window`), not a child's timeout: a pathological input cannot eat the budget of the stages after them.

Scoring (draft runs with known answers only, settings.solutions) gives pass@2, and how likely the weights prediction
used make the true answers, `ce_true` (per-cell cross-entropy of each test output's answer under its first views,
the model's last ACT step; mean over views, then over test outputs) and `cell_acc_true`, as evaluation during
training computes them (pipeline.inference.rescore.truth_scores): pass@2 moves by whole test outputs, ce_true with
every step of a fine-tune. The run's dataset holds no answers (hidden tasks), so the same tasks are built again with
them: the same order, seed and augmentations give the same variants (drawn from the demonstrations and test inputs
only), which is checked, so every answer is scored under the puzzle row the run trained for it."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pipeline.kaggle_driver.budget import SAVE_SAFETY, PlanMode, augment_window_s, plan_time, stop_grace_s, submit_window_s
from pipeline.kaggle_driver.fallback import fallback_from_raw, merge_submission, read_raw_challenges, write_validated
from pipeline.kaggle_driver.log import log
from pipeline.kaggle_driver.pretrained import checkpoint_model_config, find_pretrained, trained_variants
from pipeline.kaggle_driver.state import RunState, StageResult, set_args
from submissions.write import Answer, count_answers, describe_answers

RUN_MARKER = ".trm_kaggle_run"  # marks a run folder as ours, so a re-run may clear it
TRUTH_VIEWS = 8  # views per test output when a draft is scored (mini's evaluations use 8)


class WindowExceeded(RuntimeError):
    """A stage run in the driver's process did not end within its window (the stage fails; the fallback stays)."""


@contextmanager
def time_window(seconds: float, name: str) -> Iterator[None]:
    """Run the body for at most `seconds`: then WindowExceeded is raised in it (SIGALRM, on the main thread, where
    the notebook runs; elsewhere signals cannot be handled and the body runs unbounded). The body's own `finally`
    clauses run, so locks and temp files are let go as on any error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise WindowExceeded(f"{name}: no end within its window of {seconds:.0f} s; stopped")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def claim_run_dir(st: RunState) -> None:
    """Make sure the run folder is ours (marked), creating it; a foreign non-empty folder is an error, since a
    later run clears the folder."""
    run = st.run_dir
    if (run / RUN_MARKER).exists():
        return
    if run.exists() and any(run.iterdir()):
        raise RuntimeError(f"run folder {run} holds files not written by this notebook; choose another "
                           f"(TRM_RUN_DIR / run_dir)")
    run.mkdir(parents=True, exist_ok=True)
    (run / RUN_MARKER).write_text("written by pipeline.kaggle_driver; cleared on the next run\n")


def write_fallback(st: RunState) -> StageResult:
    """First thing: a complete, valid submission.json from the raw challenges."""
    s = st.settings
    fallback = fallback_from_raw(read_raw_challenges(s.challenges), s.challenges)
    write_validated(s.submission, fallback, fallback)
    st.fallback = fallback
    n_tests = sum(len(v) for v in fallback.values())
    return StageResult.ok(f"{len(fallback)} tasks, {n_tests} test inputs -> {s.submission}")


# what a planned fine-tune replaces (pipeline.training.compute.apply_plan); its ema_rate and lr_warmup_steps are
# caps, so the user's smaller values still apply
PLANNED_KEYS = ("lr", "train_variants")


def planned_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's overrides that a planned fine-tune replaces (they would have no effect), unless the same
    overrides say whether to plan."""
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    return [] if "finetune_plan" in keys else [key for key in keys if key in PLANNED_KEYS]


def configure(st: RunState) -> str:
    """The run config: the kaggle preset, the pretrained model's architecture (the canvas follows from its
    sequence length), the challenges as both source and held-out set, the devices' precision, then the user's
    overrides; the global batch rounded to a multiple of the processes."""
    from pipeline.config import apply_overrides, preset

    checkpoint, arch = find_pretrained(st.settings)
    model_cfg, kind = checkpoint_model_config(checkpoint, arch)
    cfg = preset("kaggle")
    cfg.model = model_cfg
    cfg.data.sources = cfg.data.eval_set = str(st.settings.challenges)
    cfg.data.canvas = math.isqrt(model_cfg.seq_len)
    cfg.keep_checkpoints = 1
    cfg.mixed_precision = st.devices.mixed_precision
    apply_overrides(cfg, list(st.settings.overrides))
    if cfg.finetune_plan and (replaced := planned_overrides(st.settings.overrides)):
        log(f"WARNING: TRM_OVERRIDES sets {', '.join(replaced)}, which the fine-tune plan replaces (finetune_plan, "
            f"kaggle/README.md section 5): add finetune_plan=false to set them yourself")
    if cfg.data.canvas ** 2 != cfg.model.seq_len:
        raise ValueError(f"data.canvas {cfg.data.canvas} does not fit the checkpoint's sequence length "
                         f"{cfg.model.seq_len} (canvas {math.isqrt(cfg.model.seq_len)})")
    unit = st.devices.processes * cfg.grad_accum_steps
    if cfg.global_batch_size % unit:
        rounded = max(unit, cfg.global_batch_size // unit * unit)
        log(f"global_batch_size {cfg.global_batch_size} -> {rounded} (a multiple of {unit} processes x micro-batches)")
        cfg.global_batch_size = rounded
    st.cfg, st.checkpoint, st.checkpoint_kind = cfg, checkpoint, kind
    return f"{kind} checkpoint {checkpoint}, canvas {cfg.data.canvas}, {st.devices.describe()}"


def augment(st: RunState) -> StageResult:
    """A fresh run folder (a previous session's dataset and checkpoints would be picked up by the stages), the
    configuration, then the augmented dataset of the test tasks, in this process."""
    from pipeline.run import main as run_main

    plan = plan_time(st.settings)
    if plan.mode == PlanMode.FALLBACK_ONLY:  # the dataset would serve nothing
        return StageResult.skipped(f"no time to predict ({plan.reason})")
    window = augment_window_s(st.settings)
    st.status["augment"] = {"planned_s": round(window, 1)}
    claim_run_dir(st)
    shutil.rmtree(st.run_dir)
    claim_run_dir(st)
    detail = configure(st)
    with time_window(window, "augment"):
        run_main(["--stage", "augment", "--preset", "kaggle", *st.common_args(), *set_args(asdict(st.cfg))])
    manifest = json.loads((st.run_dir / "dataset" / "manifest.json").read_text())
    skipped, too_big = len(manifest["skipped"]), len(manifest["too_big"])
    st.status["augment"].update(num_eval_puzzles=manifest["num_eval_puzzles"], skipped=skipped, too_big=too_big)
    canvas = st.cfg.data.canvas
    if too_big and canvas < 30:
        log(f"WARNING: {too_big} task(s) do not fit the checkpoint's {canvas}x{canvas} canvas and keep the identity "
            f"fallback; a real submission needs a 30x30 checkpoint (kaggle/README.md)")
    if manifest["num_eval_puzzles"] == 0:
        raise RuntimeError(f"no test task could be used ({skipped} malformed, {too_big} too big for the "
                           f"{canvas}x{canvas} canvas)")
    derive_kill_grace(st, int(manifest["num_variants"]) + 1)
    return StageResult.ok(f"{detail}; {manifest['num_eval_puzzles']} puzzles, {manifest['num_variants']} variants, "
                          f"{skipped} malformed, {too_big} too big (fallback entries)")


def write_rate(folder: Path, size: int = 32 << 20) -> float:
    """Bytes per second this disk writes (and syncs) in `folder`: a temp file of `size` bytes, then removed."""
    path = folder / ".write_rate.tmp"
    data = os.urandom(1 << 20)
    start = time.perf_counter()
    try:
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        path.unlink(missing_ok=True)
    return size / max(time.perf_counter() - start, 1e-6)


def derive_kill_grace(st: RunState, puzzle_rows: int) -> None:
    """The children's kill grace from what their stop checkpoint costs here: its size (the model with this many
    puzzle rows) at this disk's measured rate (budget.stop_grace_s); never below the kill_grace_s setting."""
    from pipeline.training.checkpoint import stop_checkpoint_bytes

    model = replace(st.cfg.model, num_puzzle_identifiers=puzzle_rows)
    size, rate = stop_checkpoint_bytes(model, st.cfg.ema), write_rate(st.run_dir)
    grace = stop_grace_s(st.settings, size, rate)
    st.status["kill_grace"] = {"save_bytes": size, "write_bytes_per_s": round(rate), "kill_grace_s": round(grace, 1)}
    log(f"kill grace {grace:.0f} s: kill_grace_s {st.settings.kill_grace_s:.0f} s for a step and the exit, and a "
        f"{size / 1e6:.0f} MB stop checkpoint at {rate / 1e6:.0f} MB/s measured here (x{SAVE_SAFETY:g})")
    st.settings = replace(st.settings, kill_grace_s=grace)


def submit(st: RunState) -> StageResult:
    """Vote over the candidates, merge with the fallback, validate against the raw challenges, replace; then say
    what every test input got (submissions.write.Answer), counted over the raw challenges: a task the model did
    not answer (malformed, too big for the canvas) is fallback only."""
    from augment.dataset import AugmentedDataset
    from pipeline.inference.predictions import Predictions
    from pipeline.cli.submit import submit as vote_and_write

    s = st.settings
    window = submit_window_s(s)
    st.status["submit"] = {"planned_s": round(window, 1)}
    if st.fallback is None:
        raise RuntimeError("no fallback submission (the challenges could not be read)")
    predictions_path = st.run_dir / "predictions.npz"
    predicted = st.outcome("predict")
    if predicted is None or not predicted.usable or not predictions_path.exists():
        return StageResult.skipped("no predictions; the fallback submission stays")
    with time_window(window, "submit"):  # the fallback submission stays if this is cut short
        tasks = AugmentedDataset.load(st.run_dir / "dataset").eval_tasks()
        selector = st.cfg.predict.selector if st.cfg is not None else "vote"
        report = vote_and_write(tasks, Predictions.load(predictions_path), st.run_dir / "submission.json", selector)
        model = json.loads((st.run_dir / "submission.json").read_text())
        merged, fell_back = merge_submission(st.fallback, model)
        write_validated(s.submission, merged, st.fallback)
    answers = merged_answers(st.fallback, report.answers, fell_back)
    st.status["submit"].update(answer_record(answers))
    return StageResult.ok(f"{describe_merged(answers)} -> {s.submission}")


def merged_answers(fallback: Mapping[str, list], model_answers: Mapping[str, list[Answer]],
                   fell_back: list[str]) -> dict[str, list[Answer]]:
    """What each test input of the raw challenges got: the model's Answer for the tasks merged from its
    submission, fallback only for every input of the tasks that fell back."""
    gone = set(fell_back)
    return {task_id: ([Answer.FALLBACK] * len(entries) if task_id in gone or task_id not in model_answers
                      else list(model_answers[task_id]))
            for task_id, entries in fallback.items()}


def task_counts(answers: Mapping[str, list[Answer]]) -> dict[str, int]:
    """Tasks by what their test inputs got, in the same words: every input a model candidate, some inputs
    fallback only, fallback only."""
    kinds = [sum(a == Answer.FALLBACK for a in per_task) for per_task in answers.values()]
    lengths = [len(per_task) for per_task in answers.values()]
    return {"model candidates for every test input": sum(k == 0 for k in kinds),
            "some test inputs fallback only": sum(0 < k < n for k, n in zip(kinds, lengths)),
            "fallback only": sum(k == n for k, n in zip(kinds, lengths))}


def answer_record(answers: Mapping[str, list[Answer]]) -> dict[str, Any]:
    """The submit stage's kaggle_status.json entry: test inputs and tasks counted by what they got, and which."""
    return {"test_inputs": count_answers(a for per_task in answers.values() for a in per_task),
            "tasks": task_counts(answers),
            "fallback_only_tasks": [t for t, per_task in answers.items() if all(a == Answer.FALLBACK for a in per_task)],
            "fallback_only_inputs": [f"{t} test {i}" for t, per_task in answers.items()
                                     for i, a in enumerate(per_task) if a == Answer.FALLBACK]}


def describe_merged(answers: Mapping[str, list[Answer]]) -> str:
    """'167 test inputs in 120 tasks: 90 two model candidates, 26 one model candidate + fallback, 51 fallback
    only (tasks: 95 model candidates for every test input, 7 some test inputs fallback only, 18 fallback only)'."""
    record = answer_record(answers)
    inputs = sum(record["test_inputs"].values())
    tasks = ", ".join(f"{n} {words}" for words, n in record["tasks"].items())
    return f"{inputs} test inputs in {len(answers)} tasks: {describe_answers(record['test_inputs'])} (tasks: {tasks})"


def answered_dataset(run_dataset: Path, solutions: Mapping[str, Sequence[Any]]):
    """The dataset at `run_dataset` rebuilt with the answers of its held-out tasks that `solutions` has (tasks
    without them keep none and are not scored); an error if the variants came out different."""
    import numpy as np

    from augment.dataset import AugmentedDataset, build_dataset

    run = AugmentedDataset.load(run_dataset)
    manifest = json.loads((Path(run_dataset) / "manifest.json").read_text())
    tasks = []
    for task in run.eval_tasks():
        answers = solutions.get(task.id)
        if answers is not None and len(answers) == len(task.test_inputs):
            task.test_outputs = [np.asarray(g, np.uint8) for g in answers]
        tasks.append(task)
    answered = build_dataset(tasks, {t.id for t in tasks}, num_aug=manifest["num_aug"], seed=manifest["seed"],
                             canvas=run.canvas, progress=False)
    for name in ("variant_puzzle", "variant_dihedral", "variant_colours"):
        if not np.array_equal(getattr(answered, name), getattr(run, name)):
            raise RuntimeError(f"rebuilding {run_dataset} with the answers gave other variants ({name})")
    return answered


def truth_figures(checkpoint: Path, dataset: Any, views: int = TRUTH_VIEWS, canvas_buckets: str = "") -> dict[str, float]:
    """{"ce_true", "cell_acc_true"} of the weights prediction loads from `checkpoint` (EMA when saved), on the canvas
    buckets prediction ran on (`data.canvas_buckets`; "" = the whole canvas), over the first `views` views of each
    test output (at most the variants a planned fine-tune trained: prediction's); {} when no answer is known."""
    import torch

    from pipeline.inference.rescore import merge_truth_scores, truth_scores
    from pipeline.model.rows import RowEngine
    from pipeline.model.loading import load_model_for_inference
    from pipeline.training.compute import capped_views

    views = capped_views(views, trained_variants(checkpoint))
    model = load_model_for_inference(checkpoint, use_ema=True, num_puzzle_identifiers=dataset.num_puzzle_identifiers)
    model.eval()
    engine = RowEngine.build(canvas_buckets, dataset.canvas, model.config)
    with torch.no_grad():
        return merge_truth_scores([truth_scores(model, dataset, views, engine=engine)]) or {}


def score(st: RunState) -> StageResult:
    """Editing runs only: score submission.json against known solutions (settings.solutions): pass@2, and ce_true
    of the weights prediction used (truth_figures), which moves where pass@2 cannot."""
    from pipeline.data.tasks import load_solutions
    from submissions.score import format_score, score_submission

    s = st.settings
    submission = json.loads(s.submission.read_text())
    solutions = {k: v for k, v in load_solutions(str(s.solutions)).items() if k in submission}
    report = score_submission(submission, solutions)
    print(format_score(report))
    record = st.status["score"] = {"pass2": report.kaggle_score, "task_pass2": report.task_score,
                                   "tasks_solved": report.tasks_solved, "test_outputs": report.num_test_outputs}
    detail = (f"pass@2 {100 * report.kaggle_score:.1f}% of {report.num_test_outputs} test outputs "
              f"({report.tasks_solved} of {len(solutions)} tasks solved)")
    predicted = st.status.get("predict", {})  # the weights prediction used, on the canvas it ran them on
    weights = predicted.get("checkpoint_path")
    if weights and (st.run_dir / "dataset").exists():
        record.update(truth_figures(Path(weights), answered_dataset(st.run_dir / "dataset", solutions),
                                    canvas_buckets=predicted.get("canvas_buckets") or ""))
        if "ce_true" in record:
            detail += f", ce_true {record['ce_true']:.4f} (cell accuracy {record['cell_acc_true']:.3f})"
    return StageResult.ok(f"{detail} against {s.solutions}")
