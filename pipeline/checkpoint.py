"""Checkpoints.

Reference conversion (this part): the published TRM code names its tensors differently from pipeline.model and
prefixes them by how the model was wrapped. These functions translate explicitly, both ways, so a reference
checkpoint loads into `TRM` and ours can be given back to the reference code.

    reference (after the prefix)                      ours
    inner.embed_tokens.embedding_weight               embed_tokens.weight
    inner.embed_pos.embedding_weight                  embed_pos.weight          (pos_encodings="learned")
    inner.puzzle_emb.weights                          puzzle_emb.weights        (buffer)
    inner.H_init / inner.L_init                       H_init / L_init           (buffers: y's and z's start)
    inner.lm_head.weight                              lm_head.weight
    inner.q_head.weight / .bias                       q_head.weight / .bias
    inner.L_level.layers.{i}.self_attn.qkv_proj.weight  blocks.{i}.attn.qkv.weight
    inner.L_level.layers.{i}.self_attn.o_proj.weight    blocks.{i}.attn.out.weight
    inner.L_level.layers.{i}.mlp.gate_up_proj.weight    blocks.{i}.mlp.gate_up.weight
    inner.L_level.layers.{i}.mlp.down_proj.weight       blocks.{i}.mlp.down.weight
    inner.L_level.layers.{i}.mlp_t.gate_up_proj.weight  blocks.{i}.token_mlp.gate_up.weight   (mlp_t)
    inner.L_level.layers.{i}.mlp_t.down_proj.weight     blocks.{i}.token_mlp.down.weight      (mlp_t)

Accepted reference prefixes: "inner." (the ACT model itself), "model.inner." (its loss-head wrapper) and
"_orig_mod.model.inner." (the torch.compile'd wrapper, as pretrain.py saves it).
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from pipeline.errors import CheckpointError
from pipeline.io import atomic_write_with
from pipeline.model import TRM, Carry, ModelConfig

# ----------------------------------------------------------------------------------------------------------
# Reference key names

REFERENCE_PREFIXES = ("_orig_mod.model.inner.", "model.inner.", "inner.")  # longest first

_TOP_LEVEL = {  # reference name (without prefix) -> ours
    "embed_tokens.embedding_weight": "embed_tokens.weight",
    "embed_pos.embedding_weight": "embed_pos.weight",
    "puzzle_emb.weights": "puzzle_emb.weights",
    "H_init": "H_init",
    "L_init": "L_init",
    "lm_head.weight": "lm_head.weight",
    "q_head.weight": "q_head.weight",
    "q_head.bias": "q_head.bias",
}
_PER_LAYER = {  # reference name inside L_level.layers.{i} -> ours inside blocks.{i}
    "self_attn.qkv_proj.weight": "attn.qkv.weight",
    "self_attn.o_proj.weight": "attn.out.weight",
    "mlp.gate_up_proj.weight": "mlp.gate_up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
    "mlp_t.gate_up_proj.weight": "token_mlp.gate_up.weight",
    "mlp_t.down_proj.weight": "token_mlp.down.weight",
}
_REF_LAYERS, _OUR_LAYERS = "L_level.layers.", "blocks."


def strip_reference_prefix(key: str) -> str:
    """'_orig_mod.model.inner.X' / 'model.inner.X' / 'inner.X' -> 'X'; a key without one is an error."""
    for prefix in REFERENCE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    raise KeyError(f"reference state dict: key {key!r} has none of the prefixes {REFERENCE_PREFIXES}")


def _reference_to_ours(name: str) -> str:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    if name.startswith(_REF_LAYERS):
        index, _, rest = name[len(_REF_LAYERS) :].partition(".")
        if index.isdigit() and rest in _PER_LAYER:
            return f"{_OUR_LAYERS}{index}.{_PER_LAYER[rest]}"
    raise KeyError(f"reference state dict: unknown tensor {name!r} (not part of TRM-Att)")


def _ours_to_reference(name: str) -> str:
    for ref, ours in _TOP_LEVEL.items():
        if name == ours:
            return ref
    if name.startswith(_OUR_LAYERS):
        index, _, rest = name[len(_OUR_LAYERS) :].partition(".")
        for ref, ours in _PER_LAYER.items():
            if index.isdigit() and rest == ours:
                return f"{_REF_LAYERS}{index}.{ref}"
    raise KeyError(f"state dict: tensor {name!r} has no reference counterpart")


def from_reference_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A reference state dict (any accepted prefix; non-persistent buffers may be present and are dropped)
    -> our names. Tensors are shared, not copied."""
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = strip_reference_prefix(key)
        if name.startswith("rotary_emb.") or name in ("puzzle_emb.local_weights", "puzzle_emb.local_ids"):
            continue  # rebuilt or per-batch state, never part of a checkpoint's meaning
        ours = _reference_to_ours(name)
        if ours in converted:
            raise KeyError(f"reference state dict: {key!r} duplicates another key after removing its prefix")
        converted[ours] = value
    return converted


def to_reference_state_dict(state_dict: dict[str, Tensor], prefix: str = "inner.") -> dict[str, Tensor]:
    """Our state dict -> reference names under `prefix` ("inner." for the ACT model itself)."""
    return {prefix + _ours_to_reference(name): value for name, value in state_dict.items()}


def config_from_reference(arch: dict) -> ModelConfig:
    """A reference model config (the `arch` section of its all_config.yaml, or the fixture's model_config)
    -> ModelConfig. Settings that only change how the reference runs (batch_size, forward_dtype, H_layers,
    loss) are ignored; the Q-continue variant (no_ACT_continue=False) is not supported."""
    if not arch.get("no_ACT_continue", True):
        raise ValueError("reference config: no_ACT_continue=False (the Q-continue loss) is not supported")
    return ModelConfig(
        vocab_size=int(arch["vocab_size"]),
        seq_len=int(arch["seq_len"]),
        hidden_size=int(arch["hidden_size"]),
        num_heads=int(arch["num_heads"]),
        expansion=float(arch["expansion"]),
        num_layers=int(arch["L_layers"]),
        H_cycles=int(arch["H_cycles"]),
        L_cycles=int(arch["L_cycles"]),
        halt_max_steps=int(arch["halt_max_steps"]),
        halt_exploration_prob=float(arch["halt_exploration_prob"]),
        puzzle_emb_len=int(arch.get("puzzle_emb_len", 16)),
        puzzle_emb_ndim=int(arch.get("puzzle_emb_ndim", 0)),
        num_puzzle_identifiers=int(arch["num_puzzle_identifiers"]),
        pos_encodings=arch["pos_encodings"],
        rope_theta=float(arch.get("rope_theta", 10000.0)),
        rms_norm_eps=float(arch.get("rms_norm_eps", 1e-5)),
        mlp_t=bool(arch.get("mlp_t", False)),
    )


@dataclass
class ReferenceLoadReport:
    """What `load_reference_state_dict` did. The puzzle rows differ when the checkpoint was trained on a
    different augmented dataset; `puzzle_table` says which table the model now holds."""

    checkpoint_puzzle_rows: int | None
    model_puzzle_rows: int | None
    puzzle_table: Literal["loaded", "resized_to_checkpoint", "kept_model"] | None

    @property
    def puzzle_rows_differ(self) -> bool:
        return self.checkpoint_puzzle_rows != self.model_puzzle_rows


def load_reference_state_dict(
    model: TRM,
    state_dict: dict[str, Tensor],
    on_puzzle_mismatch: Literal["error", "resize", "keep_model"] = "error",
) -> ReferenceLoadReport:
    """Load a reference state dict into `model` (strict: every tensor must match in name and shape).

    When the puzzle tables have different row counts: "error" raises (naming both counts); "resize" makes the
    model's table the checkpoint's (e.g. to evaluate the checkpoint on its own dataset); "keep_model" keeps the
    model's table and loads everything else (e.g. to fine-tune on a new dataset's variants)."""
    ours = from_reference_state_dict(state_dict)
    key = "puzzle_emb.weights"
    ckpt_rows = ours[key].shape[0] if key in ours else None
    model_rows = model.puzzle_emb.weights.shape[0] if model.config.puzzle_emb_ndim > 0 else None
    action = "loaded" if key in ours else None
    if ckpt_rows != model_rows and ckpt_rows is not None and model_rows is not None:
        if on_puzzle_mismatch == "error":
            raise ValueError(
                f"reference checkpoint: its puzzle table has {ckpt_rows} rows but the model's has {model_rows} "
                "(choose on_puzzle_mismatch='resize' or 'keep_model')"
            )
        if on_puzzle_mismatch == "resize":
            model.puzzle_emb.resize(ckpt_rows)
            model.config.num_puzzle_identifiers = ckpt_rows
            action = "resized_to_checkpoint"
        elif on_puzzle_mismatch == "keep_model":
            ours = dict(ours)
            ours[key] = model.puzzle_emb.weights
            action = "kept_model"
        else:
            raise ValueError(f"on_puzzle_mismatch must be 'error', 'resize' or 'keep_model', not {on_puzzle_mismatch!r}")
    model.load_state_dict(ours, strict=True)
    return ReferenceLoadReport(ckpt_rows, model_rows, action)


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: one file per checkpoint (`checkpoints/step_00001000.pt`), written atomically, holding
# everything a resumed run needs to continue exactly: weights, EMA, both optimizers, the sampler position,
# the ACT carry of every row of the global batch, the RNG states, the step and the resolved config.
# ---------------------------------------------------------------------------------------------------------

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
    """A checkpoint file's contents (weights_only: a checkpoint never runs code). Anything unreadable (missing,
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
                             dataset_dir: str | Path, resumable: bool = False) -> dict[str, Any]:
    """Refuse a checkpoint trained on another dataset (its puzzle embeddings would belong to other puzzles), and
    with `resumable` one that lacks what a resumed run needs. An old checkpoint without a fingerprint is accepted,
    with a warning, when its puzzle table has exactly the dataset's row count. Returns the checkpoint's contents
    (tensors memory-mapped)."""
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
    rows = state["halted"].shape[0]
    local = rows // world
    carries = []
    for i in range(micro_batches):
        lo = rank * local + i * (local // micro_batches)
        sl = slice(lo, lo + local // micro_batches)
        data = {k[5:]: v[sl].to(device) for k, v in state.items() if k.startswith("data.")}
        carries.append(Carry(state["z_H"][sl].to(device), state["z_L"][sl].to(device), state["steps"][sl].to(device),
                             state["halted"][sl].to(device), data))
    return carries


def _dense_weights(state: dict[str, Any], use_ema: bool) -> dict[str, Tensor]:
    """Our checkpoint's model state, with the EMA shadow in place of the live weights when asked and present."""
    weights = dict(state["model"])
    if use_ema and state.get("ema") is not None:
        weights.update(state["ema"]["shadow"])
    return weights


def read_weights(path: str | Path, use_ema: bool = True) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state dict in our naming, our saved run config or None) from our training checkpoint or a reference
    checkpoint / state dict (any of its key prefixes)."""
    state = load_training_state(path)
    if isinstance(state, dict) and "model" in state and "config" in state:
        return _dense_weights(state, use_ema), state["config"]
    if isinstance(state, dict) and any(isinstance(k, str) and k.startswith(REFERENCE_PREFIXES) for k in state):
        try:
            return from_reference_state_dict(state), None
        except KeyError as e:  # a tensor TRM-Att does not have: a checkpoint of another model
            raise CheckpointError(f"checkpoint {path}: {e.args[0]}") from None
    raise CheckpointError(f"checkpoint {path}: neither a checkpoint of this project nor a reference TRM state dict")


def init_from_checkpoint(model: TRM, path: str | Path, verbose: bool = True) -> None:
    """Fine-tuning start: dense weights (EMA when saved) from a checkpoint trained on other puzzles; every row of
    the model's puzzle table (the new dataset's variants) set to the mean of the checkpoint's trained rows
    (row 0, the blank, left out). The reference does the same when shapes differ; random rows were measured
    to hurt. If the tables have the same shape the checkpoint's table is taken as it is."""
    weights, _ = read_weights(path, use_ema=True)
    key = "puzzle_emb.weights"
    own = model.state_dict()
    _check_fits(own, weights, path)
    if key in own:
        old = weights[key]
        if old.shape == own[key].shape:
            how = "loaded as is (same shape)"
        else:
            trained = old[1:] if old.shape[0] > 1 else old
            weights = dict(weights)
            weights[key] = trained.mean(0, keepdim=True).expand_as(own[key]).clone()
            how = f"{own[key].shape[0]} rows set to the mean of the checkpoint's {trained.shape[0]} rows"
    else:
        how = "none"
    model.load_state_dict({k: weights[k] for k in own}, strict=True)
    if verbose:
        print(f"init from {path}: dense weights loaded; puzzle table {how}")


def _check_fits(own: dict[str, Tensor], weights: dict[str, Tensor], path: str | Path) -> None:
    """Every dense tensor of the model is in the checkpoint with the same shape (the puzzle table may differ)."""
    mismatched = [k for k in own
                  if k != "puzzle_emb.weights" and (k not in weights or weights[k].shape != own[k].shape)]
    if mismatched:
        raise CheckpointError(f"checkpoint {path}: does not fit this model config; mismatched or missing: "
                              f"{', '.join(mismatched[:8])}")


def check_init_checkpoint(path: str | Path, config: ModelConfig) -> None:
    """What init_from_checkpoint will need, checked before a command changes anything: the checkpoint is readable
    and its dense weights fit a model of `config` (built on the meta device: no memory, no time)."""
    weights, _ = read_weights(path, use_ema=True)
    with torch.device("meta"):
        model = TRM(config)
    _check_fits(model.state_dict(), weights, path)


def load_model_for_inference(path: str | Path, use_ema: bool = True) -> TRM:
    """The model of one of our training checkpoints, with its EMA weights unless use_ema is False."""
    state = load_training_state(path)
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and "model" in state):
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint of this project (no config/model inside)")
    try:
        model = TRM(ModelConfig(**state["config"]["model"]))
        model.load_state_dict(_dense_weights(state, use_ema), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its own model config ({reason})") from e
    return model
