"""The command line: `python -m pipeline.run --stage STAGE ...`.

A run folder (`--out`, default `runs/PRESET`) collects every stage's artifacts:
  run.json · dataset/ (+ manifest.json) · config.json · checkpoints/step_N.pt · metrics.jsonl · predictions.npz ·
  submission.json (+ submission_report.json) · score.json + score_per_task.csv · report.html · export/
and is one configuration: run.json (pipeline.cli.runfolder) fixes its preset and dataset settings, and a command that
contradicts them, writes into a foreign folder, or trains over another run's checkpoints is refused.
`--stage all` runs augment → train → predict → submit → score → report, skipping stages whose artifact is
already there (`--force STAGE` redoes one and everything after it).

A command goes in three steps, and changes nothing before the third:
  1. read: the command line becomes a Request (pipeline.cli.stages) and a RunConfig (pipeline.cli.resolve): the
     folder's preset and dataset settings, the run's own config.json when the command continues a training run (a
     setting given that differs is named, and refused where the run could not continue with it), then the flags and
     --set; every setting is checked (pipeline.core.settings, pipeline.config.check_config);
  2. take the folder: created if new, locked, and its run.json read again under the lock (a command that claimed
     the folder meanwhile is checked against, never overwritten);
  3. run the stages; each checks what it reads (the dataset, --init, the checkpoint) before it removes anything.
Under torchrun / accelerate launch only rank 0 touches the folder; the others run train, predict and plan, and
with `--stage all` wait for rank 0's dataset. Every process checks what it will read and the processes agree before
any work (pipeline.core.job.agree, pipeline.cli.inputs): one that fails makes them all stop, with one error line.

Expected failures are `pipeline.core.errors.PipelineError`s; `cli()` prints each as one `error:` line, exit status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gc
import sys
from pathlib import Path
from typing import Any, NoReturn, get_args

from pipeline.cli import export, inputs, runfolder
from pipeline.cli.resolve import choose_preset, resolve_config
from pipeline.model import hub
from pipeline.training.collectives import is_main_process, world_size
from pipeline.training.checkpoint import latest_checkpoint
from pipeline.config import PRESETS, RunConfig, Selector
from pipeline.core.errors import ConfigError, DiskFullError, InputFileError, PipelineError, RunFolderError
from pipeline.core.io import is_disk_full
from pipeline.core.job import agree, leave, start_job
from pipeline.cli.stages import (SHARED_STAGES, STAGE_FUNCS, STAGES, Request, run_solutions, score_file, stage_augment,
                             stage_done)

FORCE_THIS = "(this stage)"


# ---------------------------------------------------------------------------------------------- the command line
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ConfigError (one `error:` line, exit 2) instead of usage text."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="trm-arc" if Path(sys.argv[0]).name == "trm-arc" else "python -m pipeline.run",  # the installed command
        description="TRM-Att ARC pipeline. Stages: augment (load + augment tasks), train, predict (candidates for "
        "every augmented view of every held-out test input), submit (vote, write submission.json), score, "
        "report (HTML pictures + training curves), all (the whole chain, skipping finished stages).",
    )
    p.add_argument("--stage", required=True, choices=(*STAGES, "all", "plan", "export"),
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
    p.add_argument("--identifiers", metavar="FILE", help="augment: a reference dataset's identifiers.json: build "
                   "exactly its variants under its row numbers, so that a checkpoint trained on it (--checkpoint, "
                   "--init) keeps its puzzle rows (docs/PUBLISHED.md)")
    p.add_argument("--canvas", type=int, help="augment: canvas side (30 for the paper)")
    p.add_argument("--seed", type=int, help="augment: seed for augmentation and training; other stages: training")
    p.add_argument("--strict", action="store_true", help="augment: stop at the first malformed task")
    p.add_argument("--skip-invalid", action="store_true", help="augment: skip malformed tasks (the default)")
    p.add_argument("--resume", action="store_true", help="train: continue from the latest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="train: only write plan.json (same as --stage plan)")
    p.add_argument("--plan-time-steps", type=int, default=2,
                   help="plan: training steps to time for the hours estimate (0 = no timing)")
    p.add_argument("--init", help="train: fine-tune from these weights: a checkpoint, an exported folder, or the "
                   "reference's checkpoint (its file or folder); or hf:ORG/NAME[@REVISION][/SUBFOLDER] on the Hugging "
                   "Face Hub (offline with HF_HUB_OFFLINE=1: its cache)")
    p.add_argument("--checkpoint", help="predict, export: the weights to use (default: the latest checkpoint in --out): "
                   "a checkpoint, an exported folder, the reference's checkpoint (its file or folder), hf:ORG/NAME[@REV][/SUB] "
                   "(the Hugging Face Hub), or 'best' / "
                   "'best:FIGURE' = the evaluated checkpoint with the best held-out figure (ce_true by default; "
                   "pipeline.cli.choose)")
    export.add_arguments(p)
    p.add_argument("--max-variants", type=int, help="predict: augmented views per test input")
    p.add_argument("--selector", help=f"submit: how candidates are ranked ({', '.join(get_args(Selector))})")
    p.add_argument("--submission", help="score: the submission file to score (score.json goes to --out, or beside it)")
    p.add_argument("--solutions", help="score: built-in set name or a Kaggle *_solutions.json")
    p.add_argument("--predictions", help="score: a predictions file, for the oracle figure")
    p.add_argument("--force", action="append", nargs="?", const=FORCE_THIS, default=[], metavar="STAGE",
                   help="redo STAGE (and, with --stage all, the ones after it) even if its artifact exists; alone: "
                   "the stage being run. Also what allows replacing this run folder's checkpoints (train) or "
                   "its preset and dataset settings (augment)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _forced(args: argparse.Namespace) -> frozenset[str]:
    forced = set()
    for name in args.force:
        if name == FORCE_THIS:
            name = STAGES[0] if args.stage == "all" else args.stage
        if name not in STAGES:
            raise ConfigError(f"--force {name}: not a stage; choose one of {', '.join(STAGES)}")
        if args.stage not in ("all", name):
            raise ConfigError(f"--force {name} applies to --stage {name} or --stage all, not --stage {args.stage}")
        forced.add(name)
    return frozenset(forced)


def _check_arguments(args: argparse.Namespace, forced: frozenset[str]) -> None:
    """Arguments that contradict each other, or that no stage can use."""
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out: an empty path; give the run folder")
    for flag, value in (("--puzzle-rows", args.puzzle_rows), ("--export-dir", args.export_dir)):
        if value is not None and args.stage != "export":
            raise ConfigError(f"{flag} applies to --stage export, not --stage {args.stage}")
    if args.resume:
        if args.stage not in ("train", "all"):
            raise ConfigError(f"--resume applies to --stage train (or all), not --stage {args.stage}")
        if forced & {"augment", "train"}:
            raise ConfigError(f"--resume continues this folder's training run and --force {min(forced)} starts it "
                              "over: give one of them")
        if args.init:
            raise ConfigError("--resume continues this folder's training run and --init starts a new one from a "
                              "checkpoint: give one of them")


def _request(args: argparse.Namespace, out: Path, marker: dict[str, Any] | None, forced: frozenset[str]) -> Request:
    data_dir = runfolder.dataset_dir(out, marker)
    if args.stage in ("train", "plan") and args.data:  # a dataset from elsewhere
        if len(args.data) > 1:
            raise ConfigError(f"--data at --stage {args.stage} is one augmented dataset folder, got {len(args.data)}")
        data_dir = Path(args.data[0])
        if not (data_dir / "manifest.json").is_file():
            raise InputFileError(data_dir, "no augmented dataset here (no manifest.json)", "--data")
    optional = lambda value: Path(value) if value else None  # noqa: E731
    from pipeline.cli.choose import is_best_spec

    best = args.checkpoint if is_best_spec(args.checkpoint) else None
    return Request(stage=args.stage, out=out, data_dir=data_dir, forced=forced, resume=args.resume,
                   init=hub.weights_path(args.init, "--init"),
                   checkpoint=None if best else hub.weights_path(args.checkpoint, "--checkpoint"), best=best,
                   preset=args.preset or (marker or {}).get("preset"),
                   submission=optional(args.submission), solutions=args.solutions,
                   predictions=optional(args.predictions), plan_time_steps=args.plan_time_steps, quiet=args.quiet,
                   export_dir=optional(args.export_dir), puzzle_rows=args.puzzle_rows or "all")


# ---------------------------------------------------------------------------------------------- running
def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except OSError as e:  # the environment, not a bug: said in one line, naming the file
        if isinstance(e, PipelineError):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        if is_disk_full(e):
            raise DiskFullError(e.errno, f"no space left on device{where}") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
            raise InputFileError(e.filename or "?", e.strerror or str(e), "file") from e
        raise


def _main(argv: list[str] | None) -> int:
    start_job()  # first: a process that fails a check below must still be able to tell the others
    facts: dict[str, str] = {}
    with contextlib.ExitStack() as held:
        try:
            args = build_parser().parse_args(argv)
            forced = _forced(args)
            _check_arguments(args, forced)
            if args.stage == "score" and args.submission:
                return _score_file(args)
            cfg, req, marker = _take_folder(args, forced, held)
            facts = inputs.read_by(req, marker) if world_size() > 1 else {}
            problem = None
        except PipelineError as e:
            problem = e
        agree(problem, facts, "every process's checks before the work starts")
        if not is_main_process():  # under torchrun rank 0 owns the folder; the others only read and compute
            if args.stage in SHARED_STAGES or args.stage == "all":
                _run_stages(cfg, req, marker)
            return 0
        _run_stages(cfg, req, marker)
    return 0


def _take_folder(args: argparse.Namespace, forced: frozenset[str],
                 held: contextlib.ExitStack) -> tuple[RunConfig, Request, dict[str, Any] | None]:
    """Steps 1 and 2: the request and its config; on rank 0 (the folder's only writer), also the folder: created if
    new, locked (held until `held` closes), its marker read again under the lock and claimed. A new folder is
    removed again if the command then fails."""
    if not args.out and not args.preset:
        raise ConfigError("say which run folder with --out (or --preset, for runs/PRESET)")
    out = Path(args.out or f"runs/{args.preset}")
    marker = runfolder.check_writable_folder(out)  # refuses a file or a foreign folder; touches nothing
    if marker is None and args.stage not in ("augment", "all") and not (args.stage == "train" and args.data):
        raise RunFolderError(f"--out {out}: not a run folder (no {runfolder.MARKER}); {args.stage} needs its "
                             f"dataset: first run {_augment_command(args, out)}")
    req = _request(args, out, marker, forced)
    cfg, notes = resolve_config(args, req, marker)
    if not is_main_process():
        return cfg, req, marker
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(runfolder.RunLock(out))
    now = runfolder.check_writable_folder(out)  # again, under the lock: another command may have claimed it
    if now != marker:
        marker = now
        req = _request(args, out, marker, forced)
        cfg, notes = resolve_config(args, req, marker)
    for note in notes:
        print(note)
    if marker is None:
        held.push(lambda kind, error, tb: runfolder.undo_new_folder(out, created) if kind else None)
    return cfg, req, _claim(args, req, cfg, marker)


def _augment_command(args: argparse.Namespace, out: Path) -> str:
    """The command that makes `out` a run folder with this command's settings (what `--stage plan` needs first)."""
    import shlex

    preset_name = args.preset or "PRESET"
    words = ["python", "-m", "pipeline.run", "--stage", "augment", "--preset", preset_name, "--out", str(out)]
    for flag in ("data", "eval_set", "num_aug", "canvas", "seed"):
        value = getattr(args, flag)
        for item in (value if isinstance(value, list) else [value] if value is not None else []):
            words += [f"--{flag.replace('_', '-')}", str(item)]
    for item in args.set:
        if item.startswith("data."):
            words += ["--set", item]
    return shlex.join(words)


def _claim(args: argparse.Namespace, req: Request, cfg: RunConfig, marker: dict | None) -> dict[str, Any]:
    """The marker this command works under: a new folder's is written at once (claiming it); a rebuilt folder's
    is written by augment once the new dataset is complete; training on a dataset from elsewhere records it."""
    if marker is None or "augment" in req.forced:
        pending = runfolder.new_marker(choose_preset(args, marker, req.out, req.forced), dataclasses.asdict(cfg.data))
        if args.stage == "train" and args.data:  # its dataset settings are that dataset's
            pending = runfolder.adopt_dataset(req.out, {**pending, "data": {}}, req.data_dir)
        if marker is None:
            runfolder.write_marker(req.out, pending)
        return pending
    if args.stage == "train" and args.data:
        adopted = runfolder.adopt_dataset(req.out, marker, req.data_dir)
        if adopted != marker:
            runfolder.write_marker(req.out, adopted)
        return adopted
    return marker


def _run_stages(cfg: RunConfig, req: Request, marker: dict | None) -> None:
    if req.stage != "all":
        if req.stage != "augment":
            runfolder.check_dataset_unchanged(req.out, marker)
        STAGE_FUNCS[req.stage](cfg, req)
        if req.stage == "augment":
            runfolder.record_dataset(req.out, marker)
        return
    first_forced = min((STAGES.index(s) for s in req.forced), default=len(STAGES))
    main = is_main_process()
    say = print if main else (lambda *a, **k: None)
    for i, stage in enumerate(STAGES):
        redo = i >= first_forced
        if stage == "augment":
            req, marker = _augment_then_agree(cfg, req, marker, redo)
            continue
        if not main and stage not in SHARED_STAGES:
            continue
        if not redo and stage_done(stage, req):
            say(f"[{stage}] already done in {req.out}, skipping")
            continue
        if stage == "score" and not req.solutions and not run_solutions(req):
            say(f"[score] skipped: the held-out tasks have no known solutions (data.eval_set="
                f"{cfg.data.eval_set!r}); --stage score --solutions FILE scores them later")
            continue
        say(f"[{stage}]")
        stage_req = req
        if stage == "train":
            if redo:  # redoing training replaces the old checkpoints
                stage_req = dataclasses.replace(req, forced=req.forced | {"train"})
            elif latest_checkpoint(req.out / "checkpoints") is not None:  # an unfinished run goes on where it stopped
                stage_req = dataclasses.replace(req, resume=True)
        STAGE_FUNCS[stage](cfg, stage_req)


def _augment_then_agree(cfg: RunConfig, req: Request, marker: dict | None,
                        redo: bool) -> tuple[Request, dict | None]:
    """Rank 0 augments while the others wait; then every process reads the dataset rank 0 left (never the one it
    replaced), and all check that they read the same one (a node without the shared folder has none, or its own)."""
    problem = None
    try:
        if is_main_process():
            _augment_unless_done(cfg, req, marker, redo)
    except PipelineError as e:
        problem = e
    agree(problem, {}, "rank 0's augment stage (the dataset every process trains on)")
    facts: dict[str, str] = {}
    try:
        marker = runfolder.read_marker(req.out)
        req = dataclasses.replace(req, data_dir=runfolder.dataset_dir(req.out, marker))
        facts = inputs.dataset_facts(req.data_dir) if world_size() > 1 else {}
        problem = None
    except PipelineError as e:
        problem = e
    agree(problem, facts, "every process reading the new dataset")
    return req, marker


def _augment_unless_done(cfg: RunConfig, req: Request, marker: dict | None, redo: bool) -> None:
    if not redo and stage_done("augment", req):
        runfolder.check_dataset_unchanged(req.out, marker)
        print(f"[augment] already done in {req.out}, skipping")
        return
    print("[augment]")
    stage_augment(cfg, req)
    runfolder.record_dataset(req.out, marker)


def _score_file(args: argparse.Namespace) -> int:
    """`--stage score --submission FILE`: score.json and score_per_task.csv go to --out when given (a new, empty
    or run folder), else beside the submission."""
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
    req = _request(args, out, marker, frozenset())
    eval_set = (marker or {}).get("data", {}).get("eval_set", "")
    if marker is None:
        score_file(req, eval_set)
        return 0
    with runfolder.RunLock(out):
        score_file(req, eval_set)
    return 0


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def cli(argv: list[str] | None = None) -> int:
    """main() for the shell: an expected failure (a PipelineError: bad input, a busy or foreign run folder, an
    unreadable checkpoint, a full disk, a diverged training run) is one `error:` line and exit status 2; anything
    else is a bug and keeps its traceback."""
    try:
        status = main(argv)
        leave(ok=True)  # under torchrun: every process leaves together (no abort in gloo's teardown)
        return status
    except PipelineError as e:
        if not getattr(e, "quiet", False):  # a failure the processes agreed on is said once, by rank 0
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
        leave(ok=False)
        return 2
    except BaseException:
        leave(ok=False)  # a stop (SIGTERM) or a bug: at once, without waiting for the others
        raise


def command(argv: list[str] | None = None) -> int:
    """cli() for a process that runs one command and ends (`python -m pipeline.run`, `trm-arc`, the driver's children).
    The imports' ~200k objects (mostly torch's) live as long as the process: frozen, the collector never walks them
    again, while a stage runs or at exit (about a second of every short command: docs/BENCHMARKS.md)."""
    gc.freeze()
    status = cli(argv)
    gc.freeze()  # and what the stage made: the exit would walk it too
    return status


if __name__ == "__main__":
    sys.exit(command())
