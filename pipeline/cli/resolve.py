"""Which configuration a command runs with: the run folder's preset and dataset settings, or the run's own
config.json when the command continues its training run, then the command's flags and `--set`, every setting
checked. A setting that contradicts the folder or the run is refused, naming both values."""
from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from pipeline.cli import runfolder
from pipeline.cli.stages import Request
from pipeline.config import (PRESETS, RunConfig, changed_settings, check_config, from_dict, preset, run_defining)
from pipeline.core import settings
from pipeline.core.errors import ConfigError, InputFileError
from pipeline.core.io import read_json
from pipeline.core.tracking import tracker_problem
from pipeline.training.collectives import world_size

RUN_STAGES = ("predict", "submit", "score", "report", "export")  # after training: they use what training used


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The dedicated flags as key=value settings (dataset flags only where a dataset is built)."""
    from pipeline.data.tasks import escape_spec

    builds = args.stage in ("augment", "all")
    sources = None
    if builds and args.data:  # several --data, or one path holding a comma: one spec string
        sources = ",".join(escape_spec(d) if "," in d and Path(d).exists() else d for d in args.data)
    flags = {
        "data.eval_set": args.eval_set, "data.num_aug": args.num_aug, "data.canvas": args.canvas,
        "data.identifiers": str(Path(args.identifiers).resolve()) if builds and args.identifiers else None,
        "data.seed": args.seed if builds else None, "seed": args.seed,
        "predict.max_variants": args.max_variants, "predict.selector": args.selector, "data.sources": sources,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.strict:
        overrides.append("data.skip_invalid=false")
    return overrides


def choose_preset(args: argparse.Namespace, marker: dict | None, out: Path, forced: frozenset[str]) -> str:
    """The run folder's preset; a new folder takes --preset, which it must be given."""
    if marker is not None and "augment" not in forced:
        recorded = marker["preset"]
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


def continues_run(req: Request) -> bool:
    """Whether the command goes on with the training run in the folder (and so with its config.json)."""
    if req.stage in RUN_STAGES:
        return True
    if req.stage == "train":
        return req.resume
    return req.stage == "all" and not req.forced & {"augment", "train"}


def resolve_config(args: argparse.Namespace, req: Request, marker: dict | None) -> tuple[RunConfig, list[str]]:
    """(config, notes to print). The base is the preset (the folder's own; --force augment may change it) with the
    folder's dataset settings, or, for a command that continues the training run, the run's config.json; then the
    flags and --set. Every setting is checked; one that contradicts the folder or the run is an error naming it."""
    preset_name = choose_preset(args, marker, req.out, req.forced)
    saved = req.out / "config.json"
    continuing = continues_run(req) and saved.exists()
    cfg = _run_config(saved) if continuing else preset(preset_name)
    # what the folder was augmented with (kept by --force augment too, unless it changes the preset)
    folder_data = marker["data"] if marker and preset_name == marker["preset"] else {}
    for key, value in folder_data.items():
        setattr(cfg.data, key, value)
    before = copy.deepcopy(cfg)
    given = settings.apply_settings(cfg, flag_overrides(args) + args.set)

    def origin(key: str) -> str:
        if key in given:
            return f"--set {key}"
        if key.startswith("data.") and key[5:] in folder_data:
            return f"{req.out / runfolder.MARKER}: {key}"
        return f"{saved}: {key}" if continuing else f"preset {preset_name}: {key}"

    check_config(cfg, world_size(), origin)
    if req.stage in ("train", "all") and (problem := tracker_problem(cfg.log_with)):  # a missing tracker package
        raise ConfigError(f"{origin('log_with')}: {problem}")
    if marker is not None and "augment" not in req.forced:
        conflicts = runfolder.data_conflicts(marker["data"], dataclasses.asdict(cfg.data))
        if conflicts:
            key, theirs, ours = conflicts[0]
            raise ConfigError(f"run folder {req.out} was augmented with data.{key}={theirs!r}, this command asks for "
                              f"data.{key}={ours!r}: use another --out, or --force augment to rebuild this folder")
    return cfg, _changes_to_the_run(before, cfg, saved, resuming=req.stage == "train") if continuing else []


def _run_config(path: Path) -> RunConfig:
    """The training run's own config.json; one that is not a file, or holds no settings, is named (a stage after
    training would otherwise run on the preset's settings without a word)."""
    if not path.is_file():
        raise InputFileError(path, "is a folder (or another non-file), not the run's settings", "run config")
    content = read_json(path, "run config")
    if isinstance(content, dict) and not isinstance(content.get("model"), dict):
        raise InputFileError(path, "holds no run settings (no model section); --force train rebuilds the run",
                             "run config")
    return from_dict(content, where=str(path))


def _changes_to_the_run(saved: RunConfig, cfg: RunConfig, path: Path, resuming: bool = False) -> list[str]:
    """A command that continues a training run takes the run's settings; one given that differs is named, and
    refused if the run could not continue with it."""
    changed = changed_settings(saved, cfg)
    for key, (old, new) in changed.items():
        if run_defining(key, resuming):
            raise ConfigError(f"{key}={new!r} on the command line: this run was trained with {key}={old!r} ({path}); "
                              "it cannot continue with another value: --force train starts the run over, or use "
                              "another --out")
    if not changed:
        return []
    shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
    return [f"{path.name}: the run's own settings, changed on the command line: {shown}"]
