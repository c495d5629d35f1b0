"""Training checkpoints: one file per checkpoint (`checkpoints/step_00001000.pt`), written atomically, holding
everything a resumed run needs to continue exactly: weights, EMA, both optimizers, the sampler position, the ACT
carry of every row of the global batch, the RNG states, the step, the resolved config and the dataset's fingerprint.
Loading weights into a model from a checkpoint (or any other source) is pipeline.model.loading's.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.core.errors import CheckpointError
from pipeline.core.io import atomic_write_with
from pipeline.model.loading import check_weights_source, read_checkpoint_file
from pipeline.model.trm import TRM, Carry, ModelConfig

CHECKPOINT_PATTERN = "step_*.pt"


def checkpoint_step(path: Path) -> int:
    return int(Path(path).stem.split("_", 1)[1])


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.glob(CHECKPOINT_PATTERN):
        try:
            checkpoint_step(p)
        except (IndexError, ValueError):
            continue
        found.append(p)
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_training_state(path: str | Path, state: dict[str, Any], keep: int = 2) -> None:
    """Write atomically, then drop all but the newest `keep` checkpoints (0 keeps all). Only checkpoints of
    *earlier* steps are dropped: a higher step in the folder is not this run's, and never a reason to delete the
    one just written (the CLI refuses to train over another run's checkpoints in the first place)."""
    path = Path(path)
    atomic_write_with(path, lambda f: torch.save(state, f))
    if keep > 0:
        step = checkpoint_step(path)
        earlier = [p for p in list_checkpoints(path.parent) if checkpoint_step(p) < step]
        for old in earlier[: max(0, len(earlier) - (keep - 1))]:
            old.unlink(missing_ok=True)


def load_training_state(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file's contents, read as any weights source's file is (pipeline.model.loading: weights_only,
    anything unreadable a CheckpointError naming the file); mmap=True: a cheap look at a multi-GB checkpoint."""
    return read_checkpoint_file(path, mmap)


TRAINING_KEYS = ("step", "config", "model", "optimizer", "table_optimizer", "sampler", "rng")


def check_training_state(state: Any, path: str | Path) -> dict[str, Any]:
    """A resumable training state, or CheckpointError naming what is missing."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, not a training checkpoint")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint of this project (missing "
                              f"{', '.join(missing)})")
    return state


# A checkpoint belongs to the dataset it was trained on: its puzzle table has one row per puzzle variant of that
# dataset, in that order. The fingerprint (sha256 over the dataset files) is stored in every checkpoint and in the
# run folder's marker, and checked before a checkpoint is resumed or used to predict.
DATASET_FILES = ("manifest.json", "puzzles.json", "grids.npz", "variants.npz")


def dataset_fingerprint(dataset_dir: str | Path) -> str:
    """sha256 over the dataset folder's files (names, sizes and bytes); a few ms for a full ARC dataset."""
    digest = hashlib.sha256()
    for name in DATASET_FILES:
        path = Path(dataset_dir) / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"dataset {dataset_dir}: cannot read {name} ({e.strerror or e})") from None
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def check_checkpoint_dataset(path: str | Path, fingerprint: str, num_puzzle_identifiers: int,
                             dataset_dir: str | Path, resumable: bool = False) -> dict[str, Any] | None:
    """Refuse a checkpoint trained on another dataset (its puzzle embeddings would belong to other puzzles), and
    with `resumable` one that lacks what a resumed run needs. An old checkpoint without a fingerprint is accepted,
    with a warning, when its puzzle table has exactly the dataset's row count. To predict, an exported folder with
    all its rows must come from this dataset too; one with mean rows, or the reference's checkpoint, fits any
    (its rows are reset to their mean: load_model_for_inference). Returns a training checkpoint's contents (tensors
    memory-mapped); None for another source."""
    if not resumable:
        source = check_weights_source(path)
        if source.kind != "checkpoint":
            if source.rows_fingerprint not in (None, fingerprint):
                raise CheckpointError(
                    f"weights {path}: its puzzle rows belong to another dataset (fingerprint "
                    f"{source.rows_fingerprint[:12]}, {dataset_dir} has {fingerprint[:12]}); export it with "
                    "--puzzle-rows mean, or fine-tune from it with --init")
            return None
    state = load_training_state(path, mmap=True)
    if resumable:
        check_training_state(state, path)
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint of this project (no config inside)")
    theirs = state.get("dataset_fingerprint")
    if theirs is None:
        model = state["config"].get("model")
        rows = model.get("num_puzzle_identifiers") if isinstance(model, dict) else None
        if rows != num_puzzle_identifiers:
            raise CheckpointError(
                f"checkpoint {path}: has {rows} puzzle embeddings but the dataset {dataset_dir} has "
                f"{num_puzzle_identifiers}; a checkpoint works only with the dataset it was trained on "
                "(to train on new puzzles from it, use --init)")
        warnings.warn(f"checkpoint {path} records no dataset fingerprint (an older checkpoint); it has the dataset's "
                      "puzzle count, so it is used as trained on this dataset", stacklevel=2)
        return state
    if theirs != fingerprint:
        raise CheckpointError(
            f"checkpoint {path}: was trained on another dataset (fingerprint {theirs[:12]}, {dataset_dir} has "
            f"{fingerprint[:12]}); a checkpoint works only with the dataset it was trained on (to train on new "
            "puzzles from it, use --init)")
    return state


def stop_checkpoint_bytes(config: ModelConfig, ema: bool = True) -> int:
    """An upper bound of the bytes of the checkpoint saved on a stop request (no carry): the dense weights, their
    EMA copy and the optimizer's two moments, the puzzle table once (its sign-SGD keeps no state), in float32;
    a tenth more for the rest (sampler, RNG, config, zip records). From the config alone (meta device)."""
    with torch.device("meta"):
        model = TRM(config)
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table = model.puzzle_emb.weights.numel()
    return int(1.1 * 4 * (dense * (3 + int(ema)) + table))


def get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def carries_from_state(
    state: dict[str, Tensor], rank: int, world: int, micro_batches: int, device: torch.device | str
) -> list[Carry]:
    """This process's micro-batch carries, cut from a saved global carry (any split of the same global batch)."""
    local = state["halted"].shape[0] // world
    micro_rows = local // micro_batches
    carries = []
    for micro_batch in range(micro_batches):
        first = rank * local + micro_batch * micro_rows
        rows = slice(first, first + micro_rows)
        data = {key[5:]: value[rows].to(device) for key, value in state.items() if key.startswith("data.")}
        carries.append(Carry(state["z_H"][rows].to(device), state["z_L"][rows].to(device),
                             state["steps"][rows].to(device), state["halted"][rows].to(device), data))
    return carries
