"""The command line: `python -m pipeline.run --stage STAGE ...`, one short function per stage.

A run folder (`--out`, default `runs/PRESET`) collects every stage's artifacts:
  run.json · dataset/ (+ manifest.json) · config.json · checkpoints/step_N.pt · metrics.jsonl · predictions.npz ·
  submission.json (+ submission_report.json) · score.json + score_per_task.csv · report.html
and is one configuration: run.json (pipeline.runfolder) fixes its preset and dataset settings, and a command that
contradicts them, writes into a foreign folder, or trains over another run's checkpoints is refused.
`--stage all` runs augment → train → predict → submit → score → report, skipping stages whose artifact is
already there (`--force STAGE` redoes one and everything after it).

Expected failures are `pipeline.errors.PipelineError`s; `cli()` prints each as one `error:` line, exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

from pipeline import export, runfolder
from pipeline.config import PRESETS, RunConfig, apply_overrides, from_dict, preset
from pipeline.errors import ConfigError, DiskFullError, InputFileError, PipelineError, RunFolderError
from pipeline.io import is_disk_full
from pipeline.tracking import tracker_names

STAGES = ("augment", "train", "predict", "submit", "score", "report")


# ---------------------------------------------------------------------------------------------- stages
def stage_augment(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from augment.dataset import build_dataset
    from pipeline.data import load_tasks, select_tasks
    from pipeline.splits import held_out_ids

    d = cfg.data
    loaded = load_tasks(d.sources, skip_invalid=d.skip_invalid)
    tasks = select_tasks(loaded.tasks, max_side=d.max_side, max_tasks=d.max_tasks)
    left_out = _left_out_by_selection(loaded.tasks, tasks, d.max_side, d.max_tasks)
    eval_ids = held_out_ids(tasks, d.eval_set, lambda spec: load_tasks(spec, skip_invalid=True).tasks)
    for s in loaded.skipped:
        what = f"task {s.task_id!r} ({s.file})" if s.task_id is not None else f"file {s.file}"
        print(f"skipped {what}: {s.reason}", file=sys.stderr)
    dataset = build_dataset(
        tasks, eval_ids, num_aug=d.num_aug, seed=d.seed, canvas=d.canvas,
        skipped=[*loaded.skipped, *left_out["skipped"]], sources=d.sources, progress=not args.quiet,
    )
    m = dataset.manifest
    m["too_big"] = m.get("too_big", []) + left_out["too_big"]
    if m["num_puzzles"] == 0:
        raise ConfigError(
            f"augment: no task left to build a dataset from ({len(loaded.tasks)} loaded from {d.sources!r}; "
            f"{len(m['too_big'])} too big for data.canvas={d.canvas} or data.max_side={d.max_side}, "
            f"{len(loaded.skipped)} malformed)")
    dataset.save(out / "dataset")
    if left_out["too_big"] or left_out["skipped"]:
        print(f"augment: {len(left_out['too_big'])} tasks over data.max_side={d.max_side} and "
              f"{len(left_out['skipped'])} over data.max_tasks={d.max_tasks} left out (listed in the manifest)")
    print(
        f"augment: {m['num_puzzles']} puzzles, {m['num_variants']} variants, {m['num_train_examples']} training "
        f"examples, {m['num_test_inputs']} held-out test inputs, {len(m['short_puzzles'])} puzzles short of "
        f"{d.num_aug} augmentations -> {out / 'dataset'}"
    )


def _left_out_by_selection(loaded: list, kept: list, max_side: int, max_tasks: int) -> dict[str, list]:
    """The tasks select_tasks dropped, with why: a size limit (as `too_big`) or the per-source cap (`skipped`),
    so that every loaded task is accounted for in the manifest."""
    kept_ids = {t.id for t in kept}
    too_big, capped = [], []
    for task in loaded:
        if task.id in kept_ids:
            continue
        grids = [g for pair in task.train for g in pair] + list(task.test_inputs) + list(task.test_outputs or [])
        largest = max(max(g.shape) for g in grids)
        if max_side and largest > max_side:
            too_big.append({"task_id": task.id, "source": task.source, "largest_side": int(largest),
                            "reason": f"over data.max_side={max_side}"})
        else:
            capped.append({"file": task.source, "task_id": task.id,
                           "reason": f"over data.max_tasks={max_tasks} tasks per source"})
    return {"too_big": too_big, "skipped": capped}


def _train_data_dir(out: Path, args: argparse.Namespace) -> Path:
    if args.stage in ("train", "plan") and args.data and not Path(args.data, "manifest.json").exists():
        raise InputFileError(args.data, "no augmented dataset here (no manifest.json)", "--data")
    return Path(args.data) if args.data and Path(args.data, "manifest.json").exists() else out / "dataset"


def stage_plan(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from pipeline.plan import write_plan

    write_plan(cfg, _train_data_dir(out, args), out, time_steps_n=args.plan_time_steps)


def stage_train(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    if args.dry_run:
        return stage_plan(cfg, out, args)
    from augment.dataset import AugmentedDataset
    from pipeline.evaluate import HeldOutEvaluator
    from pipeline.train import train

    data_dir = _train_data_dir(out, args)
    _read_manifest(data_dir)  # everything that can be refused is checked before --force removes anything
    if args.init:
        from pipeline.checkpoint import check_weights_source

        check_weights_source(args.init)
    _own_checkpoints(out, data_dir, args)
    from pipeline.canvas import parse_buckets

    evaluator = None
    if cfg.eval_every > 0 or cfg.eval_every_epochs > 0:
        dataset = AugmentedDataset.load(data_dir)
        evaluator = HeldOutEvaluator.for_dataset(dataset, cfg.eval_views, cfg.predict.batch_size, cfg.predict.selector,
                                                 parse_buckets(cfg.data.canvas_buckets, dataset.canvas))
    path = train(cfg, data_dir, out, resume=args.resume, init_checkpoint=args.init, progress=not args.quiet,
                 evaluator=evaluator)
    if _is_main_process():  # under torchrun every process gets here; one line is enough
        print(f"train: last checkpoint {path}")


def _own_checkpoints(out: Path, data_dir: Path, args: argparse.Namespace) -> None:
    """Training writes only over its own checkpoints: another run's are refused (or, with --force train, removed
    first), and a resumed one must belong to this dataset."""
    from pipeline import checkpoint as ckpt

    existing = ckpt.list_checkpoints(out / "checkpoints")
    if existing and not args.resume:
        if "train" not in args.forced:
            raise RunFolderError(
                f"run folder {out} already holds checkpoints of a training run (latest {existing[-1].name}): "
                "--resume continues it, --force train discards them and starts over")
        if _is_main_process():
            for path in existing + ckpt.list_checkpoints(out / "checkpoints" / "evaluated"):
                path.unlink(missing_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
            print(f"train: --force: {len(existing)} checkpoints of the previous training run removed")
    elif existing:
        _check_checkpoint(existing[-1], data_dir, resumable=True)


def _check_checkpoint(path: Path, data_dir: Path, resumable: bool = False) -> None:
    """A checkpoint may be resumed or predicted with only on the dataset it was trained on (fingerprint)."""
    from pipeline import checkpoint as ckpt

    manifest = _read_manifest(data_dir)
    rows = int(manifest.get("num_variants", 0)) + 1
    ckpt.check_checkpoint_dataset(path, ckpt.dataset_fingerprint(data_dir), rows, data_dir, resumable=resumable)


def _read_manifest(data_dir: Path) -> dict:
    from pipeline.io import read_json

    path = data_dir / "manifest.json"
    if not path.exists():
        raise RunFolderError(f"{path}: no augmented dataset here (run --stage augment first)")
    manifest = read_json(path, "dataset manifest")
    if not isinstance(manifest, dict):
        raise InputFileError(path, "not a dataset manifest (not a JSON object)", "dataset manifest")
    return manifest


def stage_predict(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from pipeline.predict import predict_to_file

    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_or_fail(out)
    _check_checkpoint(checkpoint, out / "dataset")
    path = predict_to_file(out / "dataset", checkpoint, out / "predictions.npz", cfg.predict, progress=not args.quiet,
                           canvas_buckets=cfg.data.canvas_buckets)
    if _is_main_process():
        print(f"predict: candidates -> {path}")


def stage_submit(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from pipeline.submit import submit_from_predictions

    report = submit_from_predictions(
        out / "dataset", out / "predictions.npz", out / "submission.json", selector=cfg.predict.selector
    )
    print(f"submit: {out / 'submission.json'} ({report})")


def stage_score(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    """Score this run's submission.json on its held-out tasks (or --submission, see score_file)."""
    from pipeline.data import load_solutions
    from pipeline.splits import is_dev_split
    from submissions.score import format_score, score_submission, write_score
    from submissions.validate import read_submission_file

    submission_path = Path(args.submission) if args.submission else out / "submission.json"
    solutions_spec = args.solutions or cfg.data.eval_set
    if not solutions_spec:
        raise ConfigError("score: no --solutions given and the run's config has no data.eval_set")
    submission = read_submission_file(submission_path)
    if is_dev_split(solutions_spec):  # a dev split's answers are kept in the run's dataset
        from augment.dataset import AugmentedDataset

        solutions = {t.id: t.test_outputs for t in AugmentedDataset.load(out / "dataset").eval_tasks()}
    else:
        solutions = load_solutions(solutions_spec)
    if not args.submission:  # scoring our own run: only the tasks that were held out
        solutions = {k: v for k, v in solutions.items() if k in submission}
    if not solutions:
        raise InputFileError(solutions_spec, f"no solutions for any task of {submission_path}: nothing to score",
                             "solutions")
    if args.predictions and not Path(args.predictions).is_file():
        raise InputFileError(args.predictions, "no such file", "--predictions")
    predictions = _load_predictions(Path(args.predictions) if args.predictions else out / "predictions.npz")
    report = score_submission(submission, solutions, predictions)
    write_score(report, out)
    print(format_score(report))
    if predictions is not None and not args.submission and (out / "dataset" / "manifest.json").exists():
        from augment.dataset import AugmentedDataset
        from submissions.score import compare_selectors

        tasks = [t for t in AugmentedDataset.load(out / "dataset").eval_tasks() if t.id in solutions]
        print("selectors on the same candidates (pass@2 over test outputs / per task):")
        for name, r in compare_selectors(predictions, tasks, solutions).items():
            print(f"  {name:21} {r.kaggle_score:.4f} / {r.task_score:.4f}")


def _load_predictions(path: Path):
    from pipeline.predictions import Predictions

    return Predictions.load(path) if path.exists() else None


def stage_report(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from augment.dataset import AugmentedDataset
    from submissions.report import write_report
    from submissions.score import score_submission
    from submissions.validate import read_submission_file

    dataset = AugmentedDataset.load(out / "dataset")
    tasks = dataset.eval_tasks()
    submission = read_submission_file(out / "submission.json")
    solutions = {t.id: t.test_outputs for t in tasks if t.test_outputs is not None}
    predictions = _load_predictions(out / "predictions.npz")
    score = score_submission(submission, solutions, predictions) if solutions else None
    metrics = out / "metrics.jsonl"
    write_report(out / "report.html", tasks, submission, solutions or None, score, metrics if metrics.exists() else None)
    print(f"report: {out / 'report.html'}")


def stage_export(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    """The weights prediction uses (EMA unless predict.use_ema=false) as a portable folder (pipeline.export)."""
    if not _is_main_process():
        return  # one writer
    source = Path(args.checkpoint) if args.checkpoint else latest_or_fail(out)
    folder = Path(args.export_dir) if args.export_dir else out / export.EXPORT_DIR
    written = export.export_weights(source, folder, args.puzzle_rows, cfg.predict.use_ema, out / "dataset")
    print(f"export: {source} -> {folder} ({written['weights']} weights, puzzle rows: {written['puzzle_rows']})")


STAGE_FUNCS = {
    "plan": stage_plan, "augment": stage_augment, "train": stage_train, "predict": stage_predict,
    "submit": stage_submit, "score": stage_score, "report": stage_report, "export": stage_export,
}


def latest_or_fail(out: Path) -> Path:
    from pipeline.checkpoint import latest_checkpoint

    path = latest_checkpoint(out / "checkpoints")
    if path is None:
        raise RunFolderError(f"no checkpoint under {out / 'checkpoints'}: run --stage train first or pass --checkpoint")
    return path


def stage_done(stage: str, out: Path) -> bool:
    """Whether a stage's artifact is already in the run folder (for --stage all)."""
    from pipeline.checkpoint import latest_checkpoint, load_training_state

    if stage == "augment":
        return (out / "dataset" / "manifest.json").exists()
    if stage == "train":
        last = latest_checkpoint(out / "checkpoints")
        return last is not None and bool(load_training_state(last, mmap=True).get("final"))
    return (out / {"predict": "predictions.npz", "submit": "submission.json", "score": "score.json",
                   "report": "report.html"}[stage]).exists()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch set RANK; alone we are rank 0


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trm-arc" if Path(sys.argv[0]).name == "trm-arc" else "python -m pipeline.run",  # the installed command
        description="TRM-Att ARC pipeline. Stages: augment (load + augment tasks), train, predict (candidates for "
        "every augmented view of every held-out test input), submit (vote, write submission.json), score, "
        "report (HTML pictures + training curves), all (the whole chain, skipping finished stages).",
    )
    p.add_argument("--stage", required=True, choices=STAGES + ("all", "plan", "export"),
                   help="plan: write plan.json (steps, intervals, FLOPs, hours timed on this device) without training; "
                   "export: the weights as a portable folder (model.safetensors + config.json)")
    p.add_argument("--preset", choices=PRESETS,
                   help="starting configuration for a new run folder; a run folder keeps the one it was made with")
    p.add_argument("--out", help="run folder (default: runs/PRESET)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. lr=2e-4, model.hidden_size=256, data.num_aug=100 (repeatable)")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="augment: task sources (arc-agi-1, arc-agi-2/evaluation, a Kaggle *_challenges.json, a folder "
                   "of task JSON); repeatable or comma-separated (a path with a comma: give it alone, or write \\,); "
                   "train: an augmented dataset folder")
    p.add_argument("--eval-set", help="augment: the set whose test inputs are held out for prediction")
    p.add_argument("--num-aug", type=int, help="augment: variants per puzzle besides the original")
    p.add_argument("--canvas", type=int, help="augment: canvas side (30 for the paper)")
    p.add_argument("--seed", type=int, help="augment: seed for augmentation and training; other stages: training")
    p.add_argument("--strict", action="store_true", help="augment: stop at the first malformed task")
    p.add_argument("--skip-invalid", action="store_true", help="augment: skip malformed tasks (the default)")
    p.add_argument("--resume", action="store_true", help="train: continue from the latest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="train: only write plan.json (same as --stage plan)")
    p.add_argument("--plan-time-steps", type=int, default=2,
                   help="plan: training steps to time for the hours estimate (0 = no timing)")
    p.add_argument("--init", help="train: fine-tune from these weights: a checkpoint, an exported folder, or the "
                   "reference's checkpoint (its file or folder)")
    p.add_argument("--checkpoint", help="predict, export: the weights to use (default: the latest checkpoint in --out): "
                   "a checkpoint, an exported folder, or the reference's checkpoint (its file or folder)")
    export.add_arguments(p)
    p.add_argument("--max-variants", type=int, help="predict: augmented views per test input")
    p.add_argument("--selector", help="submit: how candidates are ranked (vote, q_weighted, ...)")
    p.add_argument("--submission", help="score: the submission file to score (score.json goes to --out, or beside it)")
    p.add_argument("--solutions", help="score: built-in set name or a Kaggle *_solutions.json")
    p.add_argument("--predictions", help="score: a predictions file, for the oracle figure")
    p.add_argument("--force", action="append", nargs="?", const=FORCE_THIS, default=[], metavar="STAGE",
                   help="redo STAGE (and, with --stage all, the ones after it) even if its artifact exists; alone: "
                   "the stage being run. Also what allows replacing this run folder's checkpoints (train) or "
                   "its preset and dataset settings (augment)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


FORCE_THIS = "(this stage)"


def _normalise_args(args: argparse.Namespace) -> argparse.Namespace:
    from pipeline.data import escape_spec

    forced = []
    for name in args.force:
        if name == FORCE_THIS:
            name = STAGES[0] if args.stage == "all" else args.stage
        if name not in STAGES:
            raise ConfigError(f"--force {name}: not a stage; choose one of {', '.join(STAGES)}")
        if args.stage not in ("all", name):
            raise ConfigError(f"--force {name} applies to --stage {name} or --stage all, not --stage {args.stage}")
        forced.append(name)
    args.forced = forced
    if args.data:  # several --data, or one path holding a comma: one spec string
        args.data = ",".join(escape_spec(d) if "," in d and Path(d).exists() else d for d in args.data)
    return args


def _set_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """apply_overrides, one at a time, so that every error names the key it is about (and the type expected)."""
    for item in overrides:
        try:
            apply_overrides(cfg, [item])
        except (ValueError, TypeError) as e:
            key, _, value = item.partition("=")
            if key and key in str(e):
                raise ConfigError(str(e)) from None
            raise ConfigError(f"--set {key}: expected {_setting_type(cfg, key)}, got {value!r}") from None
    return cfg


def _setting_type(cfg: RunConfig, key: str) -> str:
    import typing

    target: object = cfg
    *sections, name = key.split(".")
    for section in sections:
        target = getattr(target, section)
    kind = typing.get_type_hints(type(target)).get(name)
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(kind, str(kind))


# Settings whose value outside these bounds would only fail deep inside a stage, naming nothing.
_AT_LEAST = {"global_batch_size": 1, "grad_accum_steps": 1, "log_every": 1, "keep_checkpoints": 0, "max_steps": 0,
             "data.num_aug": 0, "data.canvas": 1, "data.max_side": 0, "data.max_tasks": 0,
             "predict.batch_size": 1, "predict.max_variants": 0}


def _check_ranges(cfg: RunConfig) -> None:
    from pipeline.canvas import parse_buckets

    try:
        parse_buckets(cfg.data.canvas_buckets, cfg.data.canvas)
    except ValueError as e:
        raise ConfigError(f"--set {e}") from None
    for key, low in _AT_LEAST.items():
        target: object = cfg
        for part in key.split("."):
            target = getattr(target, part, None)
        if isinstance(target, (int, float)) and target < low:
            raise ConfigError(f"--set {key}: must be at least {low}, got {target}")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The dedicated flags as key=value settings (dataset flags only where a dataset is built)."""
    builds = args.stage in ("augment", "all")
    flags = {
        "data.eval_set": args.eval_set, "data.num_aug": args.num_aug, "data.canvas": args.canvas,
        "data.seed": args.seed if builds else None, "seed": args.seed,
        "predict.max_variants": args.max_variants, "predict.selector": args.selector,
        "data.sources": args.data if builds else None,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.strict:
        overrides.append("data.skip_invalid=false")
    return overrides


def _choose_preset(args: argparse.Namespace, marker: dict | None, out: Path) -> str:
    """The run folder's preset; a new folder takes --preset, which it must be given."""
    rebuilding = "augment" in args.forced
    if marker is not None and not rebuilding:
        recorded = marker.get("preset")
        if args.preset is not None and args.preset != recorded:
            raise ConfigError(f"run folder {out} was made with --preset {recorded}, this command gives --preset "
                              f"{args.preset}: use another --out, or --force augment to rebuild this folder")
        return recorded
    if args.preset is None:
        if marker is not None:
            return marker["preset"]
        raise ConfigError(f"--out {out} is a new run folder: say which configuration it is with --preset "
                          f"({', '.join(PRESETS)})")
    return args.preset


def resolve_config(args: argparse.Namespace, out: Path, marker: dict | None = None) -> RunConfig:
    """The preset (the run folder's own), the folder's dataset settings, config.json for stages after training,
    then the flags and --set overrides; a dataset setting that contradicts the folder is an error."""
    preset_name = _choose_preset(args, marker, out)
    saved = out / "config.json"
    if args.stage in ("predict", "submit", "score", "report", "export") and saved.exists():
        from pipeline.io import read_json

        try:
            cfg = from_dict(read_json(saved, "run config"))  # what training actually used
        except (TypeError, KeyError, AttributeError) as e:
            raise InputFileError(saved, f"not a run config of this pipeline ({e})", "run config") from None
    else:
        cfg = preset(preset_name)
    rebuilding = "augment" in args.forced
    if marker is not None and not rebuilding:
        for key, value in (marker.get("data") or {}).items():
            setattr(cfg.data, key, value)
    _set_overrides(cfg, _flag_overrides(args) + args.set)
    _check_ranges(cfg)
    if marker is not None and not rebuilding:
        conflicts = runfolder.data_conflicts(marker.get("data") or {}, dataclasses.asdict(cfg.data))
        if conflicts:
            key, theirs, ours = conflicts[0]
            raise ConfigError(f"run folder {out} was augmented with data.{key}={theirs!r}, this command asks for "
                              f"data.{key}={ours!r}: use another --out, or --force augment to rebuild this folder")
    return cfg


def _check_dataset_unchanged(out: Path, marker: dict | None) -> None:
    """The dataset in the folder is the one augment built (not half of another build, not edited)."""
    from pipeline.checkpoint import dataset_fingerprint

    recorded = (marker or {}).get("dataset_fingerprint")
    data_dir = out / "dataset"
    if recorded and (data_dir / "manifest.json").exists() and dataset_fingerprint(data_dir) != recorded:
        raise RunFolderError(f"{data_dir}: the dataset's files changed since augment built them (fingerprint "
                             "differs from run.json); rebuild it with --force augment")


def _run_stages(cfg: RunConfig, out: Path, args: argparse.Namespace, marker: dict | None) -> None:
    if args.stage != "all":
        if args.stage != "augment":
            _check_dataset_unchanged(out, marker)
        STAGE_FUNCS[args.stage](cfg, out, args)
        if args.stage == "augment":
            _record_dataset(out, args)
        return
    forced = min((STAGES.index(s) for s in args.forced), default=len(STAGES))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun / accelerate launch: only train and predict are shared
    for i, stage in enumerate(STAGES):
        if rank != 0 and stage not in ("train", "predict"):
            while stage == "augment" and not stage_done("augment", out):
                time.sleep(1)  # rank 0 builds the dataset
            continue
        if i < forced and stage_done(stage, out):
            if stage == "augment":
                _check_dataset_unchanged(out, runfolder.read_marker(out))
            print(f"[{stage}] already done in {out}, skipping")
            continue
        print(f"[{stage}]")
        if stage == "train":
            if (out / "checkpoints").exists() and i < forced:
                args.resume = True  # an unfinished training run continues where it stopped
            elif i >= forced:
                args.forced = [*args.forced, "train"]  # redoing training replaces the old checkpoints
        STAGE_FUNCS[stage](cfg, out, args)
        if stage == "augment" and rank == 0:
            _record_dataset(out, args)


def _record_dataset(out: Path, args: argparse.Namespace) -> None:
    """After augment: run.json gets the dataset's fingerprint (and, after --force augment, the new settings)."""
    from pipeline.checkpoint import dataset_fingerprint

    marker = getattr(args, "pending_marker", None) or runfolder.read_marker(out)
    marker["dataset_fingerprint"] = dataset_fingerprint(out / "dataset")
    runfolder.write_marker(out, marker)


def score_file(args: argparse.Namespace) -> int:
    """`--stage score --submission FILE`: any submission against any solutions. score.json and
    score_per_task.csv go to --out when given (a new, empty or run folder), else beside the submission."""
    from submissions.score import SCORE_FILES

    submission = Path(args.submission)
    if args.out:
        out = Path(args.out)
        marker = None
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out}: is a file, not a folder")
        if out.is_dir() and not set(runfolder.visible_entries(out)) <= set(SCORE_FILES):
            marker = runfolder.check_writable_folder(out)
    else:  # beside the submission; if that is a run folder, as its writer (it may be busy)
        out = submission.parent
        marker = runfolder.read_marker(out) if out.is_dir() else None
    if not args.solutions and marker is None:
        raise ConfigError("score: --solutions is needed to score a submission file (a built-in set or a "
                          "*_solutions.json)")
    cfg = preset("demo")  # only its empty slots are used: everything comes from the flags
    if marker is not None:
        cfg.data.eval_set = (marker.get("data") or {}).get("eval_set", "")
    with runfolder.RunLock(out) if marker is not None else contextlib.nullcontext():
        stage_score(cfg, out, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _normalise_args(build_parser().parse_args(argv))
    if args.stage == "score" and args.submission:
        return score_file(args)
    if not args.out and not args.preset:
        raise ConfigError("say which run folder with --out (or --preset, for runs/PRESET)")
    out = Path(args.out or f"runs/{args.preset}")
    marker = runfolder.check_writable_folder(out)  # refuses a file or a foreign folder; touches nothing
    if marker is None and args.stage not in ("augment", "all") and not (args.stage == "train" and args.data):
        raise RunFolderError(f"--out {out}: not a run folder (no {runfolder.MARKER}); run --stage augment "
                             "(or --stage all) first")
    cfg = resolve_config(args, out, marker)
    if args.stage in ("train", "all"):
        tracker_names(cfg.log_with)  # a missing tracker package stops the command before any work
    if not _is_main_process():  # under torchrun rank 0 owns the folder; the others only read and compute
        _run_stages(cfg, out, args, marker)
        return 0
    created = not out.exists()
    new_folder = marker is None
    out.mkdir(parents=True, exist_ok=True)
    lock = runfolder.RunLock(out).acquire()
    try:
        if new_folder or "augment" in args.forced:
            pending = runfolder.new_marker(_choose_preset(args, marker, out), dataclasses.asdict(cfg.data))
            if args.stage == "train" and args.data:
                pending["data"] = {}  # trained on a dataset from elsewhere: its settings are that dataset's
            if new_folder:  # claims the folder at once; a rebuilt folder keeps its old marker until augment is done
                runfolder.write_marker(out, pending)
            args.pending_marker = marker = pending
        _run_stages(cfg, out, args, marker)
    except BaseException as e:
        if new_folder:
            _undo_new_folder(out, created)
        if isinstance(e, OSError) and is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(e.errno, f"no space left on device while writing in {out}"
                                + (f" ({e.filename})" if e.filename else "")) from e
        raise
    finally:
        lock.release()
    return 0


def _undo_new_folder(out: Path, created: bool) -> None:
    """A command that failed in a new folder before a dataset was complete leaves no trace: the folder was empty
    when it was claimed (and locked), so what is in it now is this command's half-built work. Checkpoints are
    never removed (a training run on a dataset from elsewhere keeps what it saved)."""
    import shutil

    names = runfolder.visible_entries(out)
    marker = runfolder.read_marker(out) if runfolder.MARKER in names else None
    if "checkpoints" in names or (marker is not None and marker.get("dataset_fingerprint")):
        return
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if created:
        (out / runfolder.LOCK).unlink(missing_ok=True)
        try:
            out.rmdir()
        except OSError:
            pass  # something else is in it now: leave it


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def cli(argv: list[str] | None = None) -> int:
    """main() for the shell: an expected failure (bad input, a busy or foreign run folder, an unreadable
    checkpoint, a full disk) is one `error:` line and exit status 2; anything else is a bug and keeps its
    traceback."""
    try:
        return main(argv)
    except PipelineError as e:
        message = str(e)
    except (FileNotFoundError, ValueError) as e:  # other modules' checks of input and settings
        message = str(e)
    except OSError as e:
        if is_disk_full(e):
            message = f"no space left on device{f' while writing {e.filename}' if e.filename else ''}"
        else:
            message = f"{e.filename}: {e.strerror}" if e.filename else str(e)
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(cli())
