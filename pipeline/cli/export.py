"""Stage `export`: weights to publish. A checkpoint (or any source pipeline.model.loading.load_weights reads) becomes
a portable folder (pipeline.model.weights: model.safetensors + config.json) that `--init` and `--checkpoint` take, here
or on another machine, and that the Kaggle bundle builder takes.

    trm-arc --stage export --out runs/arc1                      # runs/arc1/export/: EMA weights, every puzzle row
    trm-arc --stage export --out runs/arc1 --puzzle-rows mean   # [blank, mean] only: to fine-tune on new puzzles

Every puzzle row is needed to predict the run's own held-out tasks (their rows were trained on their
demonstrations); new puzzles start every row at the mean of the trained ones, so that is all a fine-tune needs
(the paper's table is 1.8 GB, the rest of the model 27 MB).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.model.loading import PUZZLE_TABLE, Weights, load_weights, mean_rows
from pipeline.training.checkpoint import dataset_fingerprint
from pipeline.core.errors import CheckpointError, RunFolderError
from pipeline.core.io import TMP_SUFFIX, read_json
from pipeline.model.weights import CONFIG_FILE, FORMAT, WEIGHTS_FILE, read_weights_config, write_weights_folder

PUZZLE_ROWS = ("all", "mean")
EXPORT_DIR = "export"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export-dir", help=f"export: the folder to write (default RUN/{EXPORT_DIR})")
    parser.add_argument("--puzzle-rows", choices=PUZZLE_ROWS,
                        help="export: every puzzle row (to predict this run's held-out tasks), or only their mean "
                        "(to fine-tune on new puzzles; the model without its table)")


def _dataset_summary(fingerprint: str | None, dataset_dir: Path | None) -> dict[str, Any] | None:
    """The dataset the rows were trained on: its fingerprint, and what its manifest says when it is at hand."""
    if fingerprint is None:
        return None
    summary: dict[str, Any] = {"fingerprint": fingerprint}
    if dataset_dir is not None and (dataset_dir / "manifest.json").exists() and \
            dataset_fingerprint(dataset_dir) == fingerprint:
        manifest = read_json(dataset_dir / "manifest.json", "dataset manifest")
        summary.update({k: manifest.get(k) for k in ("sources", "num_aug", "canvas", "num_puzzles", "num_variants")})
    return summary


def _describe_rows(weights: Weights, mean: bool, trained: int) -> str:
    if mean:
        return (f"row 0: the blank puzzle id; row 1: the mean of the {trained} trained rows, where every row of a new "
                "dataset starts when fine-tuning (--init)")
    if weights.source.kind == "reference":
        return "the reference's own puzzle identifiers, in its dataset's order (not a dataset of this pipeline)"
    return (f"row 0: the blank puzzle id; rows 1..{trained}: the puzzle variants of the dataset with this "
            "fingerprint, in its order (its variants.npz)")


def _target_folder(folder: Path) -> None:
    """Write only into a new or empty folder, or over an earlier export of this pipeline: one whose config.json is
    ours and that holds nothing but its two files (and the temp files of a killed export, which do not count)."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--export-dir {folder}: is a file, not a folder")
    if not folder.is_dir():
        return
    names = sorted(p.name for p in folder.iterdir() if not _is_temp_file(p))
    if not names:
        return
    others = [n for n in names if n not in (WEIGHTS_FILE, CONFIG_FILE)]
    ours = not others and CONFIG_FILE in names
    if ours:
        try:
            read_weights_config(folder)
        except CheckpointError:
            ours = False
    if not ours:
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise RunFolderError(f"--export-dir {folder}: not empty ({shown}) and not an export of this pipeline (one "
                             f"holds only {WEIGHTS_FILE} and a {CONFIG_FILE} of format {FORMAT}); give a new or empty "
                             "folder")


def _is_temp_file(path: Path) -> bool:
    """A temp file of pipeline.core.io's atomic writes (`.NAME.XXXX.tmp`): a killed export's leftovers."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and path.is_file()


def export_weights(source: str | Path, folder: str | Path, puzzle_rows: str = "all", use_ema: bool = True,
                   dataset_dir: str | Path | None = None) -> dict[str, Any]:
    """Write `source`'s weights to `folder`; return the config.json written."""
    if puzzle_rows not in PUZZLE_ROWS:
        raise CheckpointError(f"--puzzle-rows {puzzle_rows}: choose {' or '.join(PUZZLE_ROWS)}")
    folder = Path(folder)
    _target_folder(folder)
    weights = load_weights(source, use_ema)
    if weights.model_config is None:
        raise CheckpointError(f"checkpoint {source}: a reference state dict without its model config; export its "
                              "checkpoint folder (the one with all_config.yaml)")
    tensors, model = dict(weights.tensors), dataclasses.asdict(weights.model_config)
    table = tensors.get(PUZZLE_TABLE)
    trained = 0 if table is None else max(table.shape[0] - 1, 1)
    mean = weights.mean_rows or (puzzle_rows == "mean" and table is not None)
    if mean and not weights.mean_rows:
        tensors[PUZZLE_TABLE] = torch.cat([table[:1], mean_rows(table, 1)])
        model["num_puzzle_identifiers"] = 2
    config = {
        "model": model,
        "weights": weights.copy,
        "puzzle_rows": "mean" if mean else "all",
        "puzzle_table": _describe_rows(weights, mean, weights.trained_rows or trained),
        "trained_puzzle_rows": weights.trained_rows or trained,
        "dataset": _dataset_summary(weights.dataset_fingerprint, Path(dataset_dir) if dataset_dir else None),
        "step": weights.step,
        "run_config": weights.run_config,
        "source": str(source),
    }
    created = not folder.exists()
    for stale in folder.glob(f".*{TMP_SUFFIX}") if not created else ():  # what a killed export left
        if _is_temp_file(stale):
            stale.unlink(missing_ok=True)
    try:
        write_weights_folder(folder, tensors, config)
    except BaseException:
        if created:  # a failed first export leaves no folder behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return config
