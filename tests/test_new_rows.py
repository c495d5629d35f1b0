"""Where a fine-tune's new puzzle rows start (`new_rows`): mean (default), zeros, or per task the nearest trained
row; and the bundle that keeps the trained rows for it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from augment.dataset import AugmentedDataset
from pipeline.core.errors import ConfigError
from pipeline.data.encoding import IGNORE_LABEL
from pipeline.model.layers import log_stablemax
from pipeline.model.loading import init_from_checkpoint, mean_rows
from pipeline.model.new_rows import NEAREST_DEMOS, candidate_rows, start_new_rows
from pipeline.model.trm import TRM
from pipeline.training import checkpoint as ckpt
from tiny import build_tiny_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TABLE = "puzzle_emb.weights"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(a pretrained checkpoint, a dataset of other puzzles to fine-tune on)."""
    from pipeline.training.train import train

    root = tmp_path_factory.mktemp("new_rows")
    base = train(tiny_config(max_steps=4, puzzle_emb_lr=0.5), build_tiny_dataset(root / "base"), root / "run",
                 progress=False)
    return base, build_tiny_dataset(root / "other", num_tasks=3, num_aug=2, offset=6)


def _start(base: Path, other: Path, out: Path, **settings) -> torch.Tensor:
    """The new puzzle table a fine-tune starts from (puzzle rows frozen: lr 0, no weight decay)."""
    from pipeline.training.train import train

    cfg = tiny_config(max_steps=1, puzzle_emb_lr=0.0, puzzle_emb_weight_decay=0.0, **settings)
    return ckpt.load_training_state(train(cfg, other, out, init_checkpoint=base, progress=False))["model"][TABLE]


def test_zeros_start(runs, tmp_path: Path):
    base, other = runs
    assert not torch.equal(ckpt.load_training_state(base)["model"][TABLE][1:].mean(0), torch.zeros(32))
    table = _start(base, other, tmp_path / "ft", new_rows="zeros")
    assert torch.equal(table, torch.zeros_like(table))


def _demo_loss(model: TRM, ds: AugmentedDataset, p: int, row: torch.Tensor) -> float:
    """Mean per-cell cross-entropy of puzzle p's first demonstrations (original view) with every row set to `row`,
    after one ACT step: written out here, independently of new_rows.demo_losses."""
    model.eval()
    with torch.no_grad():
        model.puzzle_emb.weights[:] = row
        first, count = ds.variant_examples(np.array([ds.puzzle_first_variant[p]]))
        batch = {k: torch.from_numpy(v) for k, v in
                 ds.encode_train_examples(np.arange(first[0], first[0] + min(count[0], NEAREST_DEMOS))).items()}
        _, out = model(model.initial_carry(batch), batch)
        logp = log_stablemax(out["logits"].double())
        losses = []
        for i in range(len(batch["labels"])):
            mask = batch["labels"][i] != IGNORE_LABEL
            losses.append(-logp[i][mask].gather(-1, batch["labels"][i][mask].long()[:, None]).mean().item())
    return float(np.mean(losses))


def test_nearest_start_picks_the_row_that_fits_each_tasks_demonstrations(runs, tmp_path: Path):
    base, other = runs
    table = _start(base, other, tmp_path / "ft", new_rows="nearest", new_rows_candidates=4)
    ds = AugmentedDataset.load(other)
    cfg = tiny_config()
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = 36, ds.num_puzzle_identifiers
    model = TRM(cfg.model)
    candidates = candidate_rows(init_from_checkpoint(model, base, verbose=False), 4)
    assert candidates.shape[0] == 5 and torch.equal(table[0], candidates[0])  # the blank row at the mean
    chosen = set()
    for p in range(ds.num_puzzles):
        rows = table[1:][torch.from_numpy(ds.variant_puzzle == p)]
        assert (rows == rows[0]).all()  # every variant of a task starts at the same row
        pick = next(c for c in range(len(candidates)) if torch.equal(rows[0], candidates[c]))
        losses = [_demo_loss(model, ds, p, c) for c in candidates]
        assert losses[pick] == pytest.approx(min(losses), abs=1e-6)
        chosen.add(pick)
    assert chosen != {0}  # not simply the mean everywhere: trained rows were chosen


def test_nearest_start_needs_the_trained_rows(runs, tmp_path: Path):
    base, other = runs
    slim = ckpt.load_training_state(base)
    table = slim["model"][TABLE]
    slim["model"][TABLE] = torch.cat([table[:1], mean_rows(table, 1)])
    if slim.get("ema"):
        slim["ema"]["shadow"].pop(TABLE, None)
    slim["config"]["model"]["num_puzzle_identifiers"] = 2
    torch.save(slim, tmp_path / "slim.pt")
    ds = AugmentedDataset.load(other)
    cfg = tiny_config()
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = 36, ds.num_puzzle_identifiers
    model = TRM(cfg.model)
    source = init_from_checkpoint(model, tmp_path / "slim.pt", verbose=False)
    with pytest.raises(ConfigError, match="--keep-puzzle-rows"):
        start_new_rows(model, source, "nearest", ds)


def test_bundle_keeps_the_trained_rows_when_asked(runs, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("trm_build_bundle_rows", ROOT / "kaggle" / "build_bundle.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    base, _ = runs
    rows = ckpt.load_training_state(base)["model"][TABLE].shape[0]
    for keep, expected in ((False, 2), (True, rows)):
        entry = builder.bundle_checkpoint(base, tmp_path / str(keep), keep_rows=keep)
        saved = torch.load(tmp_path / str(keep) / "model.pt", weights_only=True)
        assert saved["model"][TABLE].shape[0] == expected == entry["model"]["num_puzzle_identifiers"]


def test_the_predict_only_start_takes_new_rows(runs, tmp_path: Path):
    """The Kaggle driver's predict-only path (no fine-tune) starts the new rows as a fine-tune would."""
    import shutil

    from pipeline.kaggle_driver.pretrained import pretrained_for_dataset

    base, other = runs
    shutil.copytree(other, tmp_path / "dataset")
    cfg = tiny_config(new_rows="zeros")
    cfg.model.seq_len = 36
    table = torch.load(pretrained_for_dataset(tmp_path, cfg, base), weights_only=True)["model"][TABLE]
    assert table.shape[0] == AugmentedDataset.load(other).num_puzzle_identifiers
    assert torch.equal(table, torch.zeros_like(table))
