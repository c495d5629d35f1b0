"""The command line: `python -m pipeline.run --stage STAGE ...`, one short function per stage.

A run folder (`--out`, default `runs/PRESET`) collects every stage's artifacts:
  dataset/ (+ manifest.json) · config.json · checkpoints/step_N.pt · metrics.jsonl · predictions.npz ·
  submission.json (+ submission_report.json) · score.json + score_per_task.csv · report.html
`--stage all` runs augment → train → predict → submit → score → report, skipping stages whose artifact is
already there (`--force STAGE` redoes one and everything after it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline.config import PRESETS, RunConfig, apply_overrides, from_dict, preset

STAGES = ("augment", "train", "predict", "submit", "score", "report")


# ---------------------------------------------------------------------------------------------- stages
def stage_augment(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from augment.dataset import build_dataset
    from pipeline.data import load_tasks, select_tasks

    d = cfg.data
    loaded = load_tasks(d.sources, skip_invalid=d.skip_invalid)
    tasks = select_tasks(loaded.tasks, max_side=d.max_side, max_tasks=d.max_tasks)
    eval_ids = set()
    if d.eval_set:
        eval_ids = {t.id for t in tasks if t.source == d.eval_set}
        if not eval_ids:  # a combined name ("arc-agi-1") or a path spelled differently: match by task id
            eval_ids = {t.id for t in load_tasks(d.eval_set, skip_invalid=True).tasks} & {t.id for t in tasks}
    for s in loaded.skipped:
        print(f"skipped task {s.task_id} ({s.file}): {s.reason}", file=sys.stderr)
    dataset = build_dataset(
        tasks, eval_ids, num_aug=d.num_aug, seed=d.seed, canvas=d.canvas,
        skipped=loaded.skipped, sources=d.sources, progress=not args.quiet,
    )
    dataset.save(out / "dataset")
    m = dataset.manifest
    print(
        f"augment: {m['num_puzzles']} puzzles, {m['num_variants']} variants, {m['num_train_examples']} training "
        f"examples, {m['num_test_inputs']} held-out test inputs, {len(m['short_puzzles'])} puzzles short of "
        f"{d.num_aug} augmentations -> {out / 'dataset'}"
    )


def _train_data_dir(out: Path, args: argparse.Namespace) -> Path:
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
    evaluator = None
    if cfg.eval_every > 0 or cfg.eval_every_epochs > 0:
        evaluator = HeldOutEvaluator.for_dataset(AugmentedDataset.load(data_dir), cfg.eval_views,
                                                 cfg.predict.batch_size, cfg.predict.selector)
    path = train(cfg, data_dir, out, resume=args.resume, init_checkpoint=args.init, progress=not args.quiet,
                 evaluator=evaluator)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets here; one line is enough
        print(f"train: last checkpoint {path}")


def stage_predict(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from pipeline.predict import predict_to_file

    path = predict_to_file(
        out / "dataset", args.checkpoint or latest_or_fail(out), out / "predictions.npz",
        cfg.predict, progress=not args.quiet,
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"predict: candidates -> {path}")


def stage_submit(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from pipeline.submit import submit_from_predictions

    report = submit_from_predictions(
        out / "dataset", out / "predictions.npz", out / "submission.json", selector=cfg.predict.selector
    )
    print(f"submit: {out / 'submission.json'} ({report})")


def stage_score(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from pipeline.data import load_solutions
    from pipeline.predictions import Predictions
    from submissions.score import format_score, score_submission, write_score

    submission_path = Path(args.submission) if args.submission else out / "submission.json"
    solutions_spec = args.solutions or cfg.data.eval_set
    if not solutions_spec:
        raise SystemExit("score: no --solutions given and the config has no eval_set")
    try:
        submission = json.loads(submission_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read submission {submission_path}: {e}") from e
    if not isinstance(submission, dict):
        raise ValueError(f"submission {submission_path}: expected a JSON object of task ids, got {type(submission).__name__}")
    solutions = load_solutions(solutions_spec)
    if not args.submission:  # scoring our own run: only the tasks that were held out
        solutions = {k: v for k, v in solutions.items() if k in submission}
    pred_path = Path(args.predictions) if args.predictions else out / "predictions.npz"
    predictions = Predictions.load(pred_path) if pred_path.exists() else None
    report = score_submission(submission, solutions, predictions)
    score_dir = submission_path.parent if args.submission else out
    write_score(report, score_dir)
    print(format_score(report))
    if predictions is not None and not args.submission and (out / "dataset" / "manifest.json").exists():
        from augment.dataset import AugmentedDataset
        from submissions.score import compare_selectors

        tasks = [t for t in AugmentedDataset.load(out / "dataset").eval_tasks() if t.id in solutions]
        print("selectors on the same candidates (pass@2 over test outputs / per task):")
        for name, r in compare_selectors(predictions, tasks, solutions).items():
            print(f"  {name:12} {r.kaggle_score:.4f} / {r.task_score:.4f}")


def stage_report(cfg: RunConfig, out: Path, args: argparse.Namespace) -> None:
    from augment.dataset import AugmentedDataset
    from pipeline.predictions import Predictions
    from submissions.report import write_report
    from submissions.score import score_submission

    dataset = AugmentedDataset.load(out / "dataset")
    tasks = dataset.eval_tasks()
    submission = json.loads((out / "submission.json").read_text())
    solutions = {t.id: t.test_outputs for t in tasks if t.test_outputs is not None}
    predictions = Predictions.load(out / "predictions.npz") if (out / "predictions.npz").exists() else None
    score = score_submission(submission, solutions, predictions) if solutions else None
    metrics = out / "metrics.jsonl"
    write_report(out / "report.html", tasks, submission, solutions or None, score, metrics if metrics.exists() else None)
    print(f"report: {out / 'report.html'}")


STAGE_FUNCS = {
    "plan": stage_plan, "augment": stage_augment, "train": stage_train, "predict": stage_predict,
    "submit": stage_submit, "score": stage_score, "report": stage_report,
}


def latest_or_fail(out: Path) -> Path:
    from pipeline.checkpoint import latest_checkpoint

    path = latest_checkpoint(out / "checkpoints")
    if path is None:
        raise SystemExit(f"no checkpoint under {out / 'checkpoints'}: run --stage train first or pass --checkpoint")
    return path


def stage_done(stage: str, out: Path) -> bool:
    """Whether a stage's artifact is already in the run folder (for --stage all)."""
    from pipeline.checkpoint import latest_checkpoint, load_training_state

    if stage == "augment":
        return (out / "dataset" / "manifest.json").exists()
    if stage == "train":
        last = latest_checkpoint(out / "checkpoints")
        return last is not None and bool(load_training_state(last).get("final"))
    return (out / {"predict": "predictions.npz", "submit": "submission.json", "score": "score.json",
                   "report": "report.html"}[stage]).exists()


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.run",
        description="TRM-Att ARC pipeline. Stages: augment (load + augment tasks), train, predict (candidates for "
        "every augmented view of every held-out test input), submit (vote, write submission.json), score, "
        "report (HTML pictures + training curves), all (the whole chain, skipping finished stages).",
    )
    p.add_argument("--stage", required=True, choices=STAGES + ("all", "plan"),
                   help="plan: write plan.json (steps, intervals, FLOPs, hours timed on this device) without training")
    p.add_argument("--preset", default="demo", choices=PRESETS, help="starting configuration (default: demo)")
    p.add_argument("--out", help="run folder (default: runs/PRESET)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. lr=2e-4, model.hidden_size=256, data.num_aug=100 (repeatable)")
    p.add_argument("--data", help="augment: task sources (arc-agi-1, arc-agi-2/evaluation, a Kaggle "
                   "*_challenges.json, a folder of task JSON; comma-separated); train: an augmented dataset folder")
    p.add_argument("--eval-set", help="augment: the set whose test inputs are held out for prediction")
    p.add_argument("--num-aug", type=int, help="augment: variants per puzzle besides the original")
    p.add_argument("--canvas", type=int, help="augment: canvas side (30 for the paper)")
    p.add_argument("--seed", type=int, help="seed for augmentation and training")
    p.add_argument("--strict", action="store_true", help="augment: stop at the first malformed task")
    p.add_argument("--skip-invalid", action="store_true", help="augment: skip malformed tasks (the default)")
    p.add_argument("--resume", action="store_true", help="train: continue from the latest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="train: only write plan.json (same as --stage plan)")
    p.add_argument("--plan-time-steps", type=int, default=2,
                   help="plan: training steps to time for the hours estimate (0 = no timing)")
    p.add_argument("--init", help="train: fine-tune from this checkpoint (ours or the reference's)")
    p.add_argument("--checkpoint", help="predict: checkpoint to use (default: the latest in --out)")
    p.add_argument("--max-variants", type=int, help="predict: augmented views per test input")
    p.add_argument("--selector", help="submit: how candidates are ranked (vote, q_weighted, ...)")
    p.add_argument("--submission", help="score: the submission file to score")
    p.add_argument("--solutions", help="score: built-in set name or a Kaggle *_solutions.json")
    p.add_argument("--predictions", help="score: a predictions file, for the oracle figure")
    p.add_argument("--force", action="append", default=[], choices=STAGES,
                   help="all: redo this stage (and the ones after it) even if its artifact exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_config(args: argparse.Namespace, out: Path) -> RunConfig:
    saved = out / "config.json"
    if args.stage in ("predict", "submit", "score", "report") and saved.exists():
        cfg = from_dict(json.loads(saved.read_text()))  # what training actually used
    else:
        cfg = preset(args.preset)
    flags = {
        "data.eval_set": args.eval_set, "data.num_aug": args.num_aug, "data.canvas": args.canvas,
        "data.seed": args.seed, "seed": args.seed, "predict.max_variants": args.max_variants,
        "predict.selector": args.selector,
    }
    if args.stage in ("augment", "all") and args.data:
        flags["data.sources"] = args.data
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.strict:
        overrides.append("data.skip_invalid=false")
    return apply_overrides(cfg, overrides + args.set)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"runs/{args.preset}")
    cfg = resolve_config(args, out)
    if args.stage != "all":
        STAGE_FUNCS[args.stage](cfg, out, args)
        return 0
    forced = min((STAGES.index(s) for s in args.force), default=len(STAGES))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun / accelerate launch: only train and predict are shared
    for i, stage in enumerate(STAGES):
        if rank != 0 and stage not in ("train", "predict"):
            while stage == "augment" and not stage_done("augment", out):
                time.sleep(1)  # rank 0 builds the dataset
            continue
        if i < forced and stage_done(stage, out):
            print(f"[{stage}] already done in {out}, skipping")
            continue
        print(f"[{stage}]")
        if stage == "train" and (out / "checkpoints").exists() and i < forced:
            args.resume = True  # an unfinished training run continues where it stopped
        STAGE_FUNCS[stage](cfg, out, args)
    return 0


def cli() -> int:
    """main() for the shell: bad input (a missing file, a malformed task or submission) is one clear line, not a
    traceback."""
    from pipeline.data import TaskError

    try:
        return main()
    except (TaskError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
