"""The reference's checkpoints: its tensor names, its model config, its folder layout.

The published TRM code names its tensors differently from pipeline.model.trm and
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

Its pretrain.py saves a checkpoint folder: `all_config.yaml` (the run's config; the model's is its `arch`
section) beside `step_N` files, each a plain state dict (torch.save). Published TRM checkpoints come that way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from pipeline.core.errors import CheckpointError
from pipeline.model.trm import TRM, ModelConfig

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


# ----------------------------------------------------------------------------------------------------------
# The reference's checkpoint folder

REFERENCE_CONFIG = "all_config.yaml"
_STEP_FILE = re.compile(r"step_(\d+)(\.pth?)?")


def is_reference_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / REFERENCE_CONFIG).is_file()


def reference_step_file(folder: str | Path) -> Path:
    """The newest `step_N` state dict in a reference checkpoint folder."""
    folder = Path(folder)
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := _STEP_FILE.fullmatch(p.name))]
    if not steps:
        raise CheckpointError(f"reference checkpoint folder {folder}: no step_N weights file in it")
    return max(steps)[1]


def read_reference_arch(folder: str | Path) -> dict[str, Any]:
    """The `arch` section of a reference folder's all_config.yaml (yaml.safe_load: data only, never code)."""
    import yaml

    path = Path(folder) / REFERENCE_CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:160]
        raise CheckpointError(f"reference config {path}: cannot be read as YAML ({reason})") from None
    arch = data.get("arch", data) if isinstance(data, dict) else None
    if not isinstance(arch, dict):
        raise CheckpointError(f"reference config {path}: no `arch` section (the model config)")
    return arch


def reference_model_config(arch: dict[str, Any], weights: dict[str, Tensor]) -> ModelConfig:
    """config_from_reference, with what the reference sets from its dataset at run time (so its all_config.yaml
    lacks it) read off the tensors: vocabulary, puzzle rows, and the sequence length when positions are learned
    (with RoPE it leaves no trace: the ARC canvas, 30x30, is assumed)."""
    arch = dict(arch)
    arch.setdefault("vocab_size", int(weights["embed_tokens.weight"].shape[0]))
    if "puzzle_emb.weights" in weights:
        arch.setdefault("num_puzzle_identifiers", int(weights["puzzle_emb.weights"].shape[0]))
    arch.setdefault("num_puzzle_identifiers", 1)
    probe = config_from_reference({**arch, "seq_len": arch.get("seq_len", 900)})
    if "embed_pos.weight" in weights:
        arch.setdefault("seq_len", int(weights["embed_pos.weight"].shape[0]) - probe.puzzle_len)
    arch.setdefault("seq_len", 900)
    return config_from_reference(arch)
