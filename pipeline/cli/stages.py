"""The stages of the command line, one function each: `stage_X(cfg, request)`.

A stage gets the resolved, checked config and a Request (what the command line asked: the run folder, its
dataset, a checkpoint, a submission file, ...) and reads nothing else. The rules of the run folder (which
checkpoint may be resumed, what --force removes, how a dataset is replaced) are pipeline.cli.runfolder's; the order in
which stages run, and what a command checks before it changes anything, is pipeline.run's.
"""
from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.cli import runfolder
from pipeline.training.collectives import is_main_process
from pipeline.config import RunConfig, changed_settings, run_defining
from pipeline.core.errors import CheckpointError, ConfigError, DiskFullError, InputFileError, RunFolderError

STAGES = ("augment", "train", "predict", "submit", "score", "report")  # the order of `--stage all`
SHARED_STAGES = ("plan", "train", "predict")  # under torchrun every process runs these; rank 0 alone the others


@dataclass(frozen=True)
class Request:
    """What one command asks of the stages (from the command line, checked)."""

    stage: str
    out: Path  # the run folder
    data_dir: Path  # the dataset the stages read: the run's own, or the one training was given (--data)
    forced: frozenset[str] = frozenset()  # stages to redo; "train" also allows replacing the folder's checkpoints
    resume: bool = False  # train: continue from the latest checkpoint
    init: Path | None = None  # train: fine-tune from these weights (a checkpoint, an exported folder, the reference's)
    checkpoint: Path | None = None  # predict, export: these weights instead of the run's latest checkpoint
    best: str | None = None  # predict, export: `best[:FIGURE]`, the evaluated checkpoint best by a held-out figure
    preset: str | None = None  # the run's preset (plan: with its fast counterpart, config.FAST_RECIPES)
    submission: Path | None = None  # score: this file instead of the run's submission.json
    solutions: str | None = None  # score: a built-in set or a *_solutions.json instead of the run's held-out answers
    predictions: Path | None = None  # score: candidates for the oracle figure
    plan_time_steps: int = 2
    export_dir: Path | None = None  # export: this folder instead of RUN/export
    puzzle_rows: str = "all"  # export: every puzzle row, or only their mean (pipeline.cli.export.PUZZLE_ROWS)
    quiet: bool = False


# ---------------------------------------------------------------------------------------------- augment
def stage_augment(cfg: RunConfig, req: Request) -> None:
    from augment.dataset import build_dataset
    from augment.identifiers import read_identifiers
    from pipeline.data.tasks import left_out_by_selection, load_tasks, select_tasks
    from pipeline.data.splits import held_out_ids

    d = cfg.data
    rows = read_identifiers(d.identifiers) if d.identifiers else None
    loaded = load_tasks(d.sources, skip_invalid=d.skip_invalid)
    tasks = select_tasks(loaded.tasks, max_side=d.max_side, max_tasks=d.max_tasks)
    left_out = left_out_by_selection(loaded.tasks, tasks, d.max_side, d.max_tasks)
    eval_ids = held_out_ids(tasks, d.eval_set, lambda spec: load_tasks(spec, skip_invalid=True).tasks)
    for s in loaded.skipped:
        what = f"task {s.task_id!r} ({s.file})" if s.task_id is not None else f"file {s.file}"
        print(f"skipped {what}: {s.reason}", file=sys.stderr)
    dataset = build_dataset(
        tasks, eval_ids, num_aug=d.num_aug, seed=d.seed, canvas=d.canvas,
        skipped=[*loaded.skipped, *left_out["skipped"]], sources=d.sources, progress=not req.quiet, rows=rows,
    )
    m = dataset.manifest
    m["too_big"] = m.get("too_big", []) + left_out["too_big"]
    if m["num_puzzles"] == 0:
        raise ConfigError(
            f"augment: no task left to build a dataset from ({len(loaded.tasks)} loaded from {d.sources!r}; "
            f"{len(m['too_big'])} too big for data.canvas={d.canvas} or data.max_side={d.max_side}, "
            f"{len(loaded.skipped)} malformed)")
    _check_free_space(req.out, dataset)
    runfolder.replace_dataset(req.out, dataset.save)  # beside the old one, then swapped in: never half of each
    if left_out["too_big"] or left_out["skipped"]:
        print(f"augment: {len(left_out['too_big'])} tasks over data.max_side={d.max_side} and "
              f"{len(left_out['skipped'])} over data.max_tasks={d.max_tasks} left out (listed in the manifest)")
    drawn = f"the rows of {d.identifiers}" if rows else f"{len(m['short_puzzles'])} puzzles short of {d.num_aug} " \
        "augmentations"
    print(f"augment: {m['num_puzzles']} puzzles, {m['num_variants']} variants, {m['num_train_examples']} training "
          f"examples, {m['num_test_inputs']} held-out test inputs, {drawn} -> {req.out / runfolder.DATASET}")


def _check_free_space(out: Path, dataset: Any) -> None:
    """Refuse before writing when the disk cannot hold even the uncompressed grids and the puzzle list (a lower
    bound of the dataset's size, so this never refuses a dataset that would fit)."""
    import json
    import shutil

    needed = dataset.pixels.nbytes + dataset.grid_table.nbytes + len(json.dumps(dataset.puzzles))
    free = shutil.disk_usage(out).free
    if free < needed:
        raise DiskFullError(errno.ENOSPC, f"no space left on device for the dataset in {out}: it needs at least "
                            f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free")



# ---------------------------------------------------------------------------------------------- plan, train
def stage_plan(cfg: RunConfig, req: Request) -> None:
    from pipeline.cli.plan import write_plan

    write_plan(cfg, req.data_dir, req.out, time_steps_n=req.plan_time_steps, preset_name=req.preset)


def stage_train(cfg: RunConfig, req: Request) -> None:
    """Everything training needs is checked (the dataset, --init, the checkpoint resumed and the settings it was
    made with) before --force train removes the previous run; then train."""
    from augment.dataset import AugmentedDataset
    from pipeline.cli.evaluate import HeldOutEvaluator
    from pipeline.model.rows import RowEngine
    from pipeline.training.train import train

    dataset = AugmentedDataset.load(req.data_dir)
    if req.init is not None:
        _check_init(cfg, req, dataset)
    previous: list[Path] = []
    if req.resume:
        latest, state = runfolder.resumable_checkpoint(req.out, req.data_dir)
        _check_same_run(state.get("config"), cfg, latest)
    else:
        previous = runfolder.previous_training(req.out, force="train" in req.forced)
    def on_start() -> None:  # once the run is accepted (its weights loaded, its trackers started): rank 0
        runfolder.clear_training(req.out, previous)
        _end_torn_line(req.out / "metrics.jsonl")

    evaluator = None
    if cfg.eval_every > 0 or cfg.eval_every_epochs > 0:
        evaluator = HeldOutEvaluator.for_dataset(dataset, cfg.eval_views, cfg.predict.batch_size, cfg.predict.selector,
                                                 RowEngine.build(cfg.data.canvas_buckets, dataset.canvas, cfg.model))
    path = train(cfg, req.data_dir, req.out, resume=req.resume, init_checkpoint=req.init, progress=not req.quiet,
                 evaluator=evaluator, on_start=on_start)
    if is_main_process():  # under torchrun every process gets here; one line is enough
        print(f"train: last checkpoint {path}")


def _check_init(cfg: RunConfig, req: Request, dataset: Any) -> None:
    """--init is a checkpoint whose weights fit this model, and not one of those --force train would remove."""
    import dataclasses

    from pipeline.model.loading import check_init_checkpoint

    init = req.init.resolve()
    if "train" in req.forced and init.is_relative_to((req.out / "checkpoints").resolve()):
        raise RunFolderError(f"--init {req.init}: is one of the checkpoints --force train removes from {req.out}; "
                             "copy it out of the run folder first")
    model = dataclasses.replace(cfg.model, seq_len=dataset.canvas ** 2,
                                num_puzzle_identifiers=dataset.num_puzzle_identifiers)
    check_init_checkpoint(req.init, model)


def _check_same_run(saved: Any, cfg: RunConfig, path: Path) -> None:
    """A resumed checkpoint continues only with the settings it was trained with (the weights' shapes, the
    optimizer's state, the rows' carry and the sampler's stream depend on them)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path}: holds no config to resume with")
    fixed = [(k, old, new) for k, (old, new) in changed_settings(saved, cfg).items() if run_defining(k, resuming=True)]
    if fixed:
        key, old, new = fixed[0]
        raise ConfigError(f"{key}: checkpoint {path} was trained with {key}={old!r}, this command has {new!r} "
                          "(from config.json or the command line); a resumed run keeps it: --force train starts over")


def _end_torn_line(path: Path) -> None:
    """A run killed while writing metrics.jsonl leaves its last line torn: the next row must start on a new line
    (the torn one stays, and readers skip it)."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


# ---------------------------------------------------------------------------------------------- predict, submit
def stage_predict(cfg: RunConfig, req: Request) -> None:
    """Predict with the chosen weights; a `best` choice is stored inside the predictions file it made (one unit:
    a refused command changes neither)."""
    from pipeline.cli.choose import to_text
    from pipeline.inference.predict import predict_to_file

    checkpoint, choice = chosen_weights(cfg, req, "predict")
    runfolder.check_checkpoint(checkpoint, req.data_dir)
    path = predict_to_file(req.data_dir, checkpoint, req.out / "predictions.npz", cfg.predict, progress=not req.quiet,
                           canvas_buckets=cfg.data.canvas_buckets,
                           checkpoint_choice=None if choice is None else to_text(choice))
    if is_main_process():
        print(f"predict: candidates -> {path}")


def chosen_weights(cfg: RunConfig, req: Request, stage: str) -> tuple[Path, Any]:
    """--checkpoint PATH, `best[:FIGURE]` (pipeline.cli.choose: the evaluated checkpoint with the best held-out figure)
    or the latest checkpoint; with the choice when `best` made it."""
    from augment.dataset import AugmentedDataset
    from pipeline.cli import choose

    if req.best is not None:
        known = {t.id: t.test_outputs for t in AugmentedDataset.load(req.data_dir).eval_tasks()
                 if t.test_outputs is not None}
        choice = choose.choose_checkpoint(req.out, req.best, cfg.data.eval_set, choose.output_keys(known))
        if is_main_process():
            print(f"{stage}: {choice.describe()}")
        return Path(choice.path), choice
    if req.checkpoint is not None and not req.checkpoint.exists():
        raise CheckpointError(f"--checkpoint {req.checkpoint}: no such file or folder")
    return req.checkpoint or latest_or_fail(req.out), None


def stage_submit(cfg: RunConfig, req: Request) -> None:
    from augment.dataset import AugmentedDataset
    from pipeline.cli.submit import submit

    tasks = AugmentedDataset.load(req.data_dir).eval_tasks()
    predictions = run_predictions(req, required=True)
    report = submit(tasks, predictions, req.out / "submission.json", selector=cfg.predict.selector)
    print(f"submit: {req.out / 'submission.json'} ({report.summary()})")


def run_predictions(req: Request, path: Path | None = None, required: bool = False):
    """The run's predictions.npz (or `path`), refused when it answers another dataset: its fingerprint differs
    (or, in a file from before fingerprints, it holds tasks this run does not hold out)."""
    from augment.dataset import AugmentedDataset
    from pipeline.training.checkpoint import dataset_fingerprint
    from pipeline.inference.predictions import Predictions

    if path is not None and not path.is_file():
        raise InputFileError(path, "no such file", "--predictions")
    path = path or req.out / "predictions.npz"
    if not path.exists():
        if required:
            raise RunFolderError(f"{path}: no predictions here; run --stage predict first")
        return None
    predictions = Predictions.load(path)
    theirs = predictions.dataset_fingerprint
    if theirs is not None:
        ours = dataset_fingerprint(req.data_dir)
        if theirs != ours:
            raise InputFileError(path, f"was made on another dataset (fingerprint {theirs[:12]}, this run's "
                                 f"{req.data_dir} is {ours[:12]}); run --stage predict again", "predictions")
        return predictions
    held_out = {t.id for t in AugmentedDataset.load(req.data_dir).eval_tasks()}
    foreign = sorted(set(predictions.task_ids) - held_out)
    if foreign:
        raise InputFileError(path, f"holds candidates for {len(foreign)} task(s) this run does not hold out (e.g. "
                             f"{foreign[0]!r}): predictions of another dataset; run --stage predict again",
                             "predictions")
    return predictions


# ---------------------------------------------------------------------------------------------- score, report
def run_solutions(req: Request) -> dict[str, list]:
    """The known answers of every held-out task of the run (from its dataset, or from --solutions): a run is scored
    on all of them, whatever its submission holds."""
    from augment.dataset import AugmentedDataset
    from pipeline.data.tasks import load_solutions

    tasks = AugmentedDataset.load(req.data_dir).eval_tasks()
    if req.solutions:
        known = load_solutions(req.solutions)
        return {t.id: known[t.id] for t in tasks if t.id in known}
    return {t.id: t.test_outputs for t in tasks if t.test_outputs is not None}


def stage_score(cfg: RunConfig, req: Request) -> None:
    """Score the run's submission.json on every held-out task of the run: missing ones count as wrong and are
    named (a submission cut down to the tasks it got right scores what the run got right, no more)."""
    from submissions.validate import read_submission_file

    solutions = run_solutions(req)
    if not solutions:
        raise InputFileError(req.solutions or req.data_dir, "none of the run's held-out tasks has known solutions: "
                             "nothing to score (give --solutions)", "solutions")
    submission = read_submission_file(req.out / "submission.json")
    predictions = run_predictions(req, req.predictions)
    _write_score(req, submission, solutions, predictions, compare=True, choice=run_choice(req, solutions))


def run_choice(req: Request, scored: dict[str, list]) -> tuple[str | None, dict[str, Any] | None]:
    """What the run's predictions say about how their checkpoint was chosen, against the test outputs `scored`
    (pipeline.cli.choose.scored_choice): a line for the terminal and the entry for score.json and the report."""
    from pipeline.cli.choose import scored_choice

    own = run_predictions(req)
    return scored_choice(own.checkpoint_choice if own is not None else None, scored)


def score_file(req: Request, eval_set: str = "") -> None:
    """`--stage score --submission FILE`: any submission against any solutions (--solutions, else `eval_set`, the
    run folder's; a dev split's answers are in the run folder's dataset)."""
    from pipeline.data.tasks import load_solutions
    from pipeline.inference.predictions import Predictions
    from pipeline.data.splits import is_dev_split
    from submissions.validate import read_submission_file

    spec = req.solutions or eval_set
    if not spec:
        raise ConfigError("score: no --solutions given and the run's config has no data.eval_set")
    submission = read_submission_file(req.submission)
    if is_dev_split(spec):
        from augment.dataset import AugmentedDataset

        solutions = {t.id: t.test_outputs for t in AugmentedDataset.load(req.data_dir).eval_tasks()}
    else:
        solutions = load_solutions(spec)
    if not solutions:
        raise InputFileError(spec, f"no solutions for any task of {req.submission}: nothing to score", "solutions")
    predictions = None
    if req.predictions is not None:
        if not req.predictions.is_file():
            raise InputFileError(req.predictions, "no such file", "--predictions")
        predictions = Predictions.load(req.predictions)
    _write_score(req, submission, solutions, predictions, compare=False)


def _write_score(req: Request, submission: dict, solutions: dict, predictions: Any, compare: bool,
                 choice: tuple[str | None, dict[str, Any] | None] = (None, None)) -> None:
    from submissions.score import compare_selectors, format_score, score_submission, write_score

    report = score_submission(submission, solutions, predictions)
    note, entry = choice
    write_score(report, req.out, extra={"checkpoint_choice": entry} if compare else None)
    print(format_score(report))
    if note:
        print(f"score: {note}")
    if compare and predictions is not None:
        from augment.dataset import AugmentedDataset

        tasks = [t for t in AugmentedDataset.load(req.data_dir).eval_tasks() if t.id in solutions]
        print("selectors on the same candidates (pass@2 over test outputs / per task):")
        for name, r in compare_selectors(predictions, tasks, solutions).items():
            print(f"  {name:21} {r.kaggle_score:.4f} / {r.task_score:.4f}")


def stage_report(cfg: RunConfig, req: Request) -> None:
    from augment.dataset import AugmentedDataset
    from submissions.report import write_report
    from submissions.score import score_submission
    from submissions.validate import read_submission_file

    tasks = AugmentedDataset.load(req.data_dir).eval_tasks()
    submission = read_submission_file(req.out / "submission.json")
    solutions = {t.id: t.test_outputs for t in tasks if t.test_outputs is not None}
    predictions = run_predictions(req)
    score = score_submission(submission, solutions, predictions) if solutions else None
    metrics = req.out / "metrics.jsonl"
    if metrics.exists() and not metrics.is_file():
        raise InputFileError(metrics, "is a folder, not the training log", "metrics")
    note, _ = run_choice(req, solutions) if solutions else (None, None)
    write_report(req.out / "report.html", tasks, submission, solutions or None, score,
                 metrics if metrics.exists() else None, notes=[note] if note else [])
    print(f"report: {req.out / 'report.html'}")


# ---------------------------------------------------------------------------------------------- export
def stage_export(cfg: RunConfig, req: Request) -> None:
    """The weights prediction uses (EMA unless predict.use_ema=false) as a portable folder (pipeline.cli.export)."""
    from pipeline.cli import export

    source, _ = chosen_weights(cfg, req, "export")
    folder = req.export_dir or req.out / export.EXPORT_DIR
    written = export.export_weights(source, folder, req.puzzle_rows, cfg.predict.use_ema, req.data_dir)
    print(f"export: {source} -> {folder} ({written['weights']} weights, puzzle rows: {written['puzzle_rows']})")


STAGE_FUNCS: dict[str, Callable[[RunConfig, Request], None]] = {
    "plan": stage_plan, "augment": stage_augment, "train": stage_train, "predict": stage_predict,
    "submit": stage_submit, "score": stage_score, "report": stage_report, "export": stage_export,
}


def latest_or_fail(out: Path) -> Path:
    from pipeline.training.checkpoint import latest_checkpoint

    path = latest_checkpoint(out / "checkpoints")
    if path is None:
        raise RunFolderError(f"no checkpoint under {out / 'checkpoints'}: run --stage train first or pass --checkpoint")
    return path


def stage_done(stage: str, req: Request) -> bool:
    """Whether a stage's artifact is already in the run folder (for --stage all)."""
    from pipeline.training.checkpoint import latest_checkpoint, load_training_state

    if stage == "augment":
        return (req.data_dir / "manifest.json").exists()
    if stage == "train":
        last = latest_checkpoint(req.out / "checkpoints")
        return last is not None and bool(load_training_state(last, mmap=True).get("final"))
    return (req.out / {"predict": "predictions.npz", "submit": "submission.json", "score": "score.json",
                       "report": "report.html"}[stage]).exists()
