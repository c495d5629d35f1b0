"""The pretrained checkpoint fine-tuning starts from: found in the settings or the bundle (sha256 checked), its
model config read (ours carry it; a reference checkpoint comes with its arch config), and, when fine-tuning did
not happen, turned into a checkpoint of this run's dataset so that prediction can use it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.kaggle_driver.log import log
from pipeline.kaggle_driver.settings import ENV, KaggleSettings


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_any(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: a big table stays on disk
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format cannot mmap


def load_arch_config(path: Path) -> dict[str, Any]:
    """A reference model config: JSON, or YAML when pyyaml is installed; the reference's whole all_config.yaml
    (with an `arch` section) or the section alone."""
    text = Path(path).read_text()
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml  # Kaggle's image has pyyaml; not a dependency of this project

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping of model settings")
    arch = data.get("arch", data)
    # the reference sets these from its dataset at run time, so its all_config.yaml may lack them
    return {"vocab_size": 12, "seq_len": 900, "num_puzzle_identifiers": 1, **arch}


def checkpoint_model_config(path: str | os.PathLike, arch_config: str | os.PathLike | None = None):
    """(ModelConfig, "ours" | "reference") of a pretrained checkpoint: ours carry their run config; a reference
    state dict needs `arch_config`."""
    from pipeline.model.reference import REFERENCE_PREFIXES, config_from_reference
    from pipeline.model.trm import ModelConfig

    path = Path(path)
    state = _load_any(path)
    if isinstance(state, dict) and "model" in state and "config" in state:
        return ModelConfig(**state["config"]["model"]), "ours"
    if isinstance(state, dict) and any(str(k).startswith(REFERENCE_PREFIXES) for k in state):
        if arch_config is None:
            raise ValueError(f"{path} is a reference TRM state dict: give its model config too "
                             f"({ENV['arch_config']} or the bundle's arch_config)")
        return config_from_reference(load_arch_config(Path(arch_config))), "reference"
    raise ValueError(f"{path}: neither a checkpoint of this project nor a reference TRM state dict")


def find_pretrained(s: KaggleSettings) -> tuple[Path, Path | None]:
    """(checkpoint, arch config or None), from the settings or the bundle's manifest (sha256 checked)."""
    checkpoint, arch = s.checkpoint, s.arch_config
    if checkpoint is None:
        if s.bundle is None:
            raise FileNotFoundError(f"no checkpoint: attach the bundle dataset (or set {ENV['bundle']} / "
                                    f"{ENV['checkpoint']})")
        manifest = json.loads((s.bundle / "manifest.json").read_text())
        entry = manifest["checkpoint"]
        checkpoint = s.bundle / entry["path"]
        if arch is None and entry.get("arch_config"):
            arch = s.bundle / entry["arch_config"]
        expected = {f["path"]: f["sha256"] for f in manifest.get("files", [])}.get(entry["path"])
        if expected is not None and sha256_of(checkpoint) != expected:
            raise ValueError(f"{checkpoint}: sha256 differs from the bundle manifest (a broken upload?)")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    return Path(checkpoint), (Path(arch) if arch is not None else None)


def _run_config(checkpoint: Path) -> dict[str, Any]:
    """The run config the weights were trained with ({} for the reference's checkpoints)."""
    from pipeline.model.loading import load_weights

    return load_weights(checkpoint).run_config or {}


def trained_canvas_buckets(checkpoint: Path) -> str:
    """The canvas buckets the pretrained weights were trained on ("" = the whole canvas, as every reference
    checkpoint): weights run on another canvas mode than their own predict worse (docs/QUALITY.md, issue 25)."""
    return str((_run_config(checkpoint).get("data") or {}).get("canvas_buckets") or "")


def trained_variants(checkpoint: Path) -> int:
    """How many variants of each puzzle the checkpoint's fine-tune trained (train_variants, set by a planned
    fine-tune; 0 = all): prediction and the truth figures use at most that many views
    (pipeline.training.compute.capped_views)."""
    return int(_run_config(checkpoint).get("train_variants") or 0)


def pretrained_for_dataset(run_dir: Path, cfg: Any, checkpoint: Path, canvas_buckets: str | None = None) -> Path:
    """The pretrained checkpoint as one of ours for this run's dataset (the new puzzle rows started as fine-tuning
    starts them: `new_rows`; on the canvas mode it was trained in), so prediction can run when fine-tuning failed
    or did not fit."""
    from dataclasses import asdict, replace

    import torch

    from augment.dataset import AugmentedDataset
    from pipeline.model.loading import init_from_checkpoint
    from pipeline.model.new_rows import start_new_rows
    from pipeline.training.checkpoint import dataset_fingerprint
    from pipeline.config import to_dict
    from pipeline.core.io import atomic_write_with
    from pipeline.model.trm import TRM

    dataset = AugmentedDataset.load(run_dir / "dataset")
    model_cfg = replace(cfg.model, seq_len=dataset.canvas ** 2, num_puzzle_identifiers=dataset.num_puzzle_identifiers)
    torch.manual_seed(cfg.seed)
    model = TRM(model_cfg)
    source = init_from_checkpoint(model, checkpoint, verbose=False)
    log(f"predict-only start: {start_new_rows(model, source, cfg.new_rows, dataset, cfg.new_rows_candidates)}")
    config = to_dict(cfg)
    config["model"] = asdict(model_cfg)
    # the canvas mode the weights were trained in (given when the caller has read it), not the fine-tune's buckets
    config["data"]["canvas_buckets"] = trained_canvas_buckets(checkpoint) if canvas_buckets is None else canvas_buckets
    state = {"step": 0, "config": config, "model": model.state_dict(), "ema": None, "final": True,
             "pretrained": str(checkpoint), "dataset_fingerprint": dataset_fingerprint(run_dir / "dataset")}
    path = run_dir / "pretrained_for_predict.pt"
    atomic_write_with(path, lambda f: torch.save(state, f))
    return path
