"""Weights from any source, loaded into the model, for fine-tuning (`--init`) and prediction (`--checkpoint`): a
training checkpoint (its `model` and `ema` entries), an exported folder (pipeline.model.weights: model.safetensors +
config.json), or the reference's checkpoint, a state-dict file or its folder (pipeline.model.reference). Nothing is
loaded in a way that could run code from the file (torch.load weights_only, safetensors, yaml.safe_load).

It sits in the model's wing, below the training loop, because every stage that builds a model from a file needs it
(training's `--init`, prediction, export, the Kaggle driver); a training checkpoint's other contents (optimizers,
sampler, carry) are pipeline.training.checkpoint's.
"""
from __future__ import annotations

import dataclasses
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from pipeline.core.errors import CheckpointError
from pipeline.model.reference import (REFERENCE_CONFIG, REFERENCE_PREFIXES, from_reference_state_dict,
                                      is_reference_folder, read_reference_arch, reference_model_config,
                                      reference_step_file)
from pipeline.model.trm import TRM, ModelConfig
from pipeline.model.weights import (CONFIG_FILE, WEIGHTS_FILE, check_weights_file, is_weights_folder,
                                    read_weights_config, read_weights_folder)


def read_checkpoint_file(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A torch checkpoint file's contents (weights_only: a checkpoint never runs code). Anything unreadable (missing,
    empty, truncated, a folder, JSON, a pickle with code in it) raises CheckpointError naming the file.
    mmap=True maps tensors lazily: a cheap look at the metadata of a multi-GB checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a folder, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: empty file")
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # only the zip format maps; anything else is read (or refused) the ordinary way
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a foreign or broken file; all mean the same
        raise CheckpointError(f"checkpoint {path}: cannot be read as a torch checkpoint ({_reason(e, path)})") from e


def _reason(error: Exception, path: Path) -> str:
    """torch's load errors, shortened to what a user can act on."""
    if not zipfile.is_zipfile(path):
        return "not a zip archive: truncated, or another kind of file"
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
        return "it holds objects other than tensors and plain data, which are never loaded (weights_only)"
    first = " ".join(str(error).split()).split(". ")[0]
    return f"{type(error).__name__}: {first[:160]}"


PUZZLE_TABLE = "puzzle_emb.weights"  # (rows, puzzle_emb_ndim): row 0 the blank id, then one row per puzzle variant


@dataclass(frozen=True)
class WeightsSource:
    """What a path holds, from its metadata alone (no tensors read)."""

    kind: Literal["checkpoint", "export", "reference"]
    rows_fingerprint: str | None  # the dataset whose variants the puzzle rows are, when known and all are there


@dataclass
class Weights:
    """Model weights from any source, in pipeline.model.trm's names."""

    tensors: dict[str, Tensor]
    model_config: ModelConfig | None  # None: a bare reference state dict, without its all_config.yaml
    source: WeightsSource
    origin: Path  # the file the tensors came from (named in errors)
    mean_rows: bool = False  # the table is [blank row, mean of the trained rows] (an export for new puzzles)
    copy: Literal["ema", "live", "reference"] = "reference"  # which weights of the run these are
    # where they came from, for an export's config.json: the training dataset (also when only the mean row is
    # kept), the rows a mean was taken over, the step, the resolved training config
    dataset_fingerprint: str | None = None
    trained_rows: int | None = None
    step: int | None = None
    run_config: dict[str, Any] | None = None

    @property
    def rows_are_a_datasets(self) -> bool:
        """Whether the puzzle rows are one dataset's variants, usable as they are on that dataset."""
        return self.source.kind == "checkpoint" or (self.source.rows_fingerprint is not None and not self.mean_rows)


def _is_ours(state: Any) -> bool:
    return isinstance(state, dict) and "model" in state and isinstance(state.get("config"), dict)


def _is_reference(state: Any) -> bool:
    return isinstance(state, dict) and any(str(k).startswith(REFERENCE_PREFIXES) for k in state)


def check_weights_source(path: str | Path) -> WeightsSource:
    """What `path` holds, refusing with one CheckpointError anything this pipeline cannot load (cheap: metadata
    only, so it can run before any work)."""
    path = Path(path)
    if is_weights_folder(path):
        config = read_weights_config(path)
        check_weights_file(path)
        all_rows = config["puzzle_rows"] == "all"
        return WeightsSource("export", (config.get("dataset") or {}).get("fingerprint") if all_rows else None)
    if is_reference_folder(path):
        read_reference_arch(path)
        path = reference_step_file(path)
    elif path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a folder, but neither exported weights ({WEIGHTS_FILE} + "
                              f"{CONFIG_FILE}) nor the reference's checkpoint folder ({REFERENCE_CONFIG} + step_N)")
    state = read_checkpoint_file(path, mmap=True)
    if _is_ours(state):
        return WeightsSource("checkpoint", state.get("dataset_fingerprint"))
    if _is_reference(state):
        return WeightsSource("reference", None)
    raise CheckpointError(f"checkpoint {path}: neither a checkpoint of this project nor a reference TRM state dict")


def _model_config(settings: Any, where: Path) -> ModelConfig:
    try:
        return ModelConfig(**settings)
    except TypeError as e:
        raise CheckpointError(f"{where}: its model config is not this pipeline's ({e})") from None


def _reference_weights(state: dict[str, Tensor], arch: dict[str, Any] | None, origin: Path) -> Weights:
    try:
        tensors = from_reference_state_dict(state)
        config = reference_model_config(arch, tensors) if arch is not None else None
    except (KeyError, ValueError) as e:
        reason = e.args[0] if e.args else type(e).__name__  # a KeyError's str() would add quotes
        raise CheckpointError(f"checkpoint {origin}: not a TRM-Att checkpoint this pipeline can load ({reason})") from None
    return Weights(tensors, config, WeightsSource("reference", None), origin)


def load_weights(path: str | Path, use_ema: bool = True) -> Weights:
    """The weights `path` holds (see the module docstring for the sources). `use_ema` picks the EMA copy of a
    training checkpoint; an export holds the copy it was exported with."""
    source = check_weights_source(path)
    path = Path(path)
    if source.kind == "export":
        tensors, config = read_weights_folder(path)
        origin = (path.parent if path.name == WEIGHTS_FILE else path) / WEIGHTS_FILE
        model_config = _model_config(config["model"], origin.parent / CONFIG_FILE)
        _check_own_config(tensors, model_config, origin)
        return Weights(tensors, model_config, source, origin,
                       mean_rows=config["puzzle_rows"] == "mean", copy=config.get("weights", "ema"),
                       dataset_fingerprint=(config.get("dataset") or {}).get("fingerprint"),
                       trained_rows=config.get("trained_puzzle_rows"), step=config.get("step"),
                       run_config=config.get("run_config"))
    if path.is_dir():  # the reference's folder: its newest step_N file and its all_config.yaml
        origin = reference_step_file(path)
        return _reference_weights(read_checkpoint_file(origin, mmap=True), read_reference_arch(path), origin)
    state = read_checkpoint_file(path, mmap=True)  # mapped: a resumable checkpoint's ACT carry is never read
    if source.kind == "checkpoint":
        ema = use_ema and state.get("ema") is not None
        return Weights(_dense_weights(state, use_ema), _model_config(state["config"].get("model"), path), source, path,
                       copy="ema" if ema else "live", dataset_fingerprint=state.get("dataset_fingerprint"),
                       step=state.get("step"), run_config=state["config"])
    arch = read_reference_arch(path.parent) if is_reference_folder(path.parent) else None
    return _reference_weights(state, arch, path)


def _check_own_config(tensors: dict[str, Tensor], config: ModelConfig, origin: Path) -> None:
    """An export's tensors are those of the model its config.json describes (else --init would start from, and a
    new export would republish, a config that is not the weights'); checked on the meta device: no memory."""
    try:
        with torch.device("meta"):
            expected = TRM(config).state_dict()
        problem = _misfit(expected, tensors, unexpected=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        problem = " ".join(str(e).split())[:200]
    if problem:
        raise CheckpointError(f"checkpoint {origin}: its weights do not fit its own model config "
                              f"({origin.parent / CONFIG_FILE}: {problem})")


def _dense_weights(state: dict[str, Any], use_ema: bool) -> dict[str, Tensor]:
    """Our checkpoint's model state, with the EMA shadow in place of the live weights when asked and present."""
    weights = dict(state["model"])
    if use_ema and state.get("ema") is not None:
        weights.update(state["ema"]["shadow"])
    return weights


def mean_rows(table: Tensor, rows: int) -> Tensor:
    """A (rows, ndim) table whose every row is the mean of `table`'s trained rows (row 0, the blank, left out):
    where training on new puzzles starts. The reference does the same when shapes differ; random rows were
    measured to hurt."""
    trained = table[1:] if table.shape[0] > 1 else table
    return trained.mean(0, keepdim=True).expand(rows, -1).clone()


def init_from_checkpoint(model: TRM, path: str | Path, verbose: bool = True) -> None:
    """Fine-tuning start, from any weights source: the dense weights (EMA when saved), and every row of the
    model's puzzle table (the new dataset's variants) set to the mean of the source's trained rows. If the
    tables have the same shape the source's table is taken as it is."""
    own = model.state_dict()
    weights = _fitting_weights(path, own)
    how = "none"
    if PUZZLE_TABLE in own and PUZZLE_TABLE in weights:
        old = weights[PUZZLE_TABLE]
        if old.shape == own[PUZZLE_TABLE].shape:
            how = "loaded as is (same shape)"
        else:
            weights = {**weights, PUZZLE_TABLE: mean_rows(old, own[PUZZLE_TABLE].shape[0])}
            how = f"{own[PUZZLE_TABLE].shape[0]} rows set to the mean of the checkpoint's {max(old.shape[0] - 1, 1)} rows"
    model.load_state_dict({k: weights[k] for k in own}, strict=True)
    if verbose:
        print(f"init from {path}: dense weights loaded; puzzle table {how}")


def check_init_checkpoint(path: str | Path, config: ModelConfig) -> None:
    """What init_from_checkpoint will need, checked before a command changes anything: the weights are readable
    and their dense tensors fit a model of `config` (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = TRM(config)
    _fitting_weights(path, model.state_dict())


def _fitting_weights(path: str | Path, own: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights fine-tuning starts from (EMA when saved), refused unless every dense tensor of the model is
    there with its shape (the puzzle table may differ: it is reset to the mean of its rows)."""
    weights = load_weights(path, use_ema=True).tensors
    problem = _misfit(own, weights, skip=PUZZLE_TABLE)
    if problem:
        raise CheckpointError(f"checkpoint {path}: does not fit this model config ({problem})")
    return weights


def load_model_for_inference(path: str | Path, use_ema: bool = True, num_puzzle_identifiers: int | None = None,
                             rows_named: bool = False) -> TRM:
    """The model any weights source holds (EMA weights unless use_ema is False). When its puzzle rows are not
    a dataset's (an export with mean rows, the reference's checkpoint) and `num_puzzle_identifiers` is given, the
    table gets that many rows at the mean of the trained ones, as fine-tuning on new puzzles starts. With
    `rows_named` (the dataset was built from a reference dataset's identifiers.json, augment.identifiers) the
    reference's table is the dataset's, row for row, and is kept as it is."""
    weights = load_weights(path, use_ema)
    if weights.model_config is None:
        raise CheckpointError(f"checkpoint {path}: a reference state dict without its model config; give its "
                              f"checkpoint folder (the one with {REFERENCE_CONFIG})")
    config, tensors = weights.model_config, weights.tensors
    named = rows_named and weights.source.kind == "reference" and PUZZLE_TABLE in tensors
    if named and num_puzzle_identifiers and tensors[PUZZLE_TABLE].shape[0] != num_puzzle_identifiers:
        raise CheckpointError(f"checkpoint {path}: its puzzle table has {tensors[PUZZLE_TABLE].shape[0]} rows, the "
                              f"dataset's identifiers name {num_puzzle_identifiers}: it was trained on another "
                              "dataset (build this one from that dataset's identifiers.json)")
    if not weights.rows_are_a_datasets and not named and num_puzzle_identifiers and PUZZLE_TABLE in tensors:
        warnings.warn(f"{path}: its puzzle rows are not this dataset's; every row starts at the mean of its trained "
                      "rows (as fine-tuning on new puzzles does; a reference checkpoint keeps its rows on a dataset "
                      "built from its identifiers.json: augment --identifiers)", stacklevel=2)
        config = dataclasses.replace(config, num_puzzle_identifiers=num_puzzle_identifiers)
        tensors = {**tensors, PUZZLE_TABLE: mean_rows(tensors[PUZZLE_TABLE], num_puzzle_identifiers)}
    try:
        model = TRM(config)
        problem = _misfit(model.state_dict(), tensors, unexpected=True)
        if problem is None:
            model.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        problem = " ".join(str(e).split())[:200]
    if problem:
        raise CheckpointError(f"checkpoint {weights.origin}: its weights do not fit its own model config ({problem})")
    return model


def _misfit(expected: dict[str, Tensor], weights: dict[str, Tensor], skip: str = "", unexpected: bool = False
            ) -> str | None:
    """What keeps `weights` from loading into a model whose state dict is `expected`, in a few names; None if
    nothing. Tensors the model lacks count only with `unexpected` (fine-tuning ignores them)."""
    groups = {
        "missing": [k for k in expected if k != skip and k not in weights],
        "not TRM-Att's": [k for k in weights if k not in expected] if unexpected else [],
        "other shape": [f"{k} {tuple(weights[k].shape)}, not {tuple(expected[k].shape)}" for k in expected
                        if k != skip and k in weights and weights[k].shape != expected[k].shape],
    }
    parts = [f"{label}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
             for label, names in groups.items() if names]
    return "; ".join(parts) or None
