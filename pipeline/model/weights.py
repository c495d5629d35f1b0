"""Portable weights: a folder to publish a trained model in, readable without this pipeline's training state and
without running any code from it (safetensors holds tensors only; config.json is data).

    FOLDER/model.safetensors   tensors in pipeline.model.trm's names: the dense weights (the EMA copy by default) and
                               the puzzle table `puzzle_emb.weights` (all rows, or [blank row, mean of the rest])
    FOLDER/config.json         {"format": FORMAT, "pipeline_version", "model" (ModelConfig), "weights" ("ema" or
                               "live"), "puzzle_rows" ("all" or "mean"), "puzzle_table" (what the rows are, in
                               words), "trained_puzzle_rows", "dataset" ({"fingerprint", ...} or null), "step",
                               "run_config" (the resolved training config, or null)}

This module reads and writes the two files; what the tensors mean, and the other sources of weights (training
checkpoints, the reference's), are pipeline.model.loading's business.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline.core.errors import CheckpointError, InputFileError
from pipeline.core.io import atomic_write_together, read_json

FORMAT = "trm-arc-weights/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def pipeline_version() -> str:
    try:
        return metadata.version("trm-arc")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def is_weights_folder(path: str | Path) -> bool:
    """Whether `path` is an exported folder (or the model.safetensors inside one)."""
    folder = _folder(path)
    return folder.is_dir() and (folder / WEIGHTS_FILE).exists()


def write_weights_folder(folder: str | Path, tensors: dict[str, Tensor], config: dict[str, Any]) -> None:
    """Write model.safetensors and config.json as one unit: both are written in full before either replaces an
    earlier export's (a full disk leaves the earlier export whole, never its config beside new weights)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    described = {"format": FORMAT, "pipeline_version": pipeline_version(), **config}
    atomic_write_together({folder / WEIGHTS_FILE: save(plain, metadata={"format": "pt", "trm_arc": FORMAT}),
                           folder / CONFIG_FILE: (json.dumps(described, indent=1) + "\n").encode()})


def read_weights_config(path: str | Path) -> dict[str, Any]:
    """An exported folder's config.json (no tensors read): a foreign or malformed one is a CheckpointError."""
    config_path = _folder(path) / CONFIG_FILE
    try:
        config = read_json(config_path, "weights config")
    except InputFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(f"weights config {config_path}: not a trm-arc weights config (format "
                              f"{found!r}, expected {FORMAT!r})")
    if not isinstance(config.get("model"), dict) or config.get("puzzle_rows") not in ("all", "mean") or \
            not isinstance(config.get("dataset") or {}, dict):
        raise CheckpointError(f"weights config {config_path}: lacks its model config, puzzle_rows (all / mean) or "
                              "a readable dataset entry")
    return config


def check_weights_file(path: str | Path) -> None:
    """Read model.safetensors' header only: a malformed or truncated file is a CheckpointError."""
    from safetensors import safe_open

    weights_path = _folder(path) / WEIGHTS_FILE
    try:
        with safe_open(weights_path, framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type, or OSError; both mean the same
        raise CheckpointError(f"weights {weights_path}: not a readable safetensors file ({_short(e)})") from None


def read_weights_folder(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, config) of an exported folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_weights_config(path)
    weights_path = _folder(path) / WEIGHTS_FILE
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"weights {weights_path}: not a readable safetensors file ({_short(e)})") from None
    return tensors, config


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == WEIGHTS_FILE else path


def _short(error: Exception) -> str:
    return " ".join(str(error).split())[:160]
