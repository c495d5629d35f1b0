"""Where a fine-tune's new puzzle rows start (the setting `new_rows`). A task the model has never seen has no row:
its rows must be learned from its demonstrations, so their start matters most when the fine-tune is short.

  mean     every row at the mean of the source's trained rows (loading.mean_rows: the reference's start)
  zeros    every row zero
  nearest  per new task, the candidate row under which the pretrained model predicts the task's demonstrations
           best, chosen once before fine-tuning: the candidates are `new_rows_candidates` trained rows of the
           source (evenly spaced through its table) and their mean, so the choice is never worse than the mean
           on the demonstrations; the score is the per-cell cross-entropy of the demonstration outputs (the
           task's original view, at most NEAREST_DEMOS pairs, on the whole canvas) after one ACT step, as the
           fine-tune's first step sees them. Every variant of the task starts at the winner. It needs the
           source's trained rows: a bundle built with --keep-puzzle-rows (a slim bundle keeps only their mean).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from augment.dataset import AugmentedDataset
from pipeline.core.errors import ConfigError
from pipeline.data.encoding import IGNORE_LABEL
from pipeline.model.flops import model_flops_per_row_step
from pipeline.model.layers import log_stablemax
from pipeline.model.loading import mean_rows
from pipeline.model.trm import TRM

NEAREST_DEMOS = 2  # demonstration pairs per new task that score the candidates
SCORE_BATCH = 256  # rows per forward while scoring


@dataclass(frozen=True)
class NearestChoice:
    """What `nearest` chose: per new puzzle the candidate index (0 = the mean), and what choosing cost."""

    picks: np.ndarray  # int64 (puzzles,)
    candidates: int
    rows_scored: int
    flops: float
    seconds: float

    def describe(self) -> str:
        return (f"nearest of {self.candidates} candidates (the mean and {self.candidates - 1} trained rows) for "
                f"{len(self.picks)} tasks, {int((self.picks == 0).sum())} at the mean; {self.rows_scored} rows "
                f"scored, {self.flops / 1e12:.3f} TFLOP, {self.seconds:.0f} s")


def candidate_rows(source: Tensor, count: int) -> Tensor:
    """(1 + k, ndim): the mean of the source's trained rows, then k <= count of them, evenly spaced."""
    trained = source[1:]
    if trained.shape[0] < 2:
        raise ConfigError("new_rows=nearest: the checkpoint keeps no trained puzzle rows (a slim bundle keeps only "
                          "their mean); build the bundle with --keep-puzzle-rows, or use new_rows=mean")
    pick = torch.linspace(0, trained.shape[0] - 1, min(count, trained.shape[0])).round().long().unique()
    return torch.cat([mean_rows(source, 1), trained[pick]])


@torch.no_grad()
def demo_losses(model: TRM, dataset: AugmentedDataset, rows: Tensor) -> tuple[np.ndarray, int]:
    """(float64 (puzzles, candidates) mean per-cell cross-entropy of each puzzle's first NEAREST_DEMOS
    demonstration outputs (original view) under each candidate row after one ACT step, rows scored)."""
    device = model.puzzle_emb.weights.device
    first, count = dataset.variant_examples(dataset.puzzle_first_variant)
    examples = [np.arange(f, f + min(c, NEAREST_DEMOS)) for f, c in zip(first.tolist(), count.tolist())]
    owner = np.repeat(np.arange(len(examples)), [len(e) for e in examples])
    batch = dataset.encode_train_examples(np.concatenate(examples))
    n, k = len(owner), rows.shape[0]
    pair_example, pair_row = np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
    table, training = model.puzzle_emb.weights, model.training
    model.puzzle_emb.weights = rows.to(device=device, dtype=table.dtype)  # the candidates as the table, for now
    model.eval()
    losses = np.empty(n * k)
    try:
        for start in range(0, n * k, SCORE_BATCH):
            ex, row = pair_example[start:start + SCORE_BATCH], pair_row[start:start + SCORE_BATCH]
            part = {"inputs": torch.from_numpy(batch["inputs"][ex]).to(device),
                    "labels": torch.from_numpy(batch["labels"][ex]).to(device),
                    "puzzle_identifiers": torch.from_numpy(row.astype(np.int32)).to(device)}
            _, outputs = model(model.initial_carry(part), part)
            logp = log_stablemax(outputs["logits"].double())
            mask = part["labels"] != IGNORE_LABEL
            picked = logp.gather(-1, torch.where(mask, part["labels"], 0).long().unsqueeze(-1)).squeeze(-1)
            ce = -(torch.where(mask, picked, 0).sum(-1) / mask.sum(-1).clamp_min(1))
            losses[start:start + len(ex)] = ce.cpu().numpy()
    finally:
        model.puzzle_emb.weights = table
        model.train(training)
    per_example = losses.reshape(n, k)
    sums = np.zeros((len(examples), k))
    np.add.at(sums, owner, per_example)
    return sums / np.maximum(np.bincount(owner, minlength=len(examples)), 1)[:, None], n * k


def nearest_rows(model: TRM, source: Tensor, dataset: AugmentedDataset, candidates: int) -> tuple[Tensor, NearestChoice]:
    """The new table (every variant of a puzzle at its puzzle's best candidate; row 0 at the mean) and the choice."""
    start = time.perf_counter()
    rows = candidate_rows(source, candidates)
    losses, scored = demo_losses(model, dataset, rows)
    picks = losses.argmin(axis=1)
    table = rows[0:1].expand(dataset.num_puzzle_identifiers, -1).clone()
    table[1:] = rows[torch.from_numpy(picks[dataset.variant_puzzle]).long()]
    flops = scored * model_flops_per_row_step(model.config, backward=False)
    return table, NearestChoice(picks, rows.shape[0], scored, flops, time.perf_counter() - start)


def start_new_rows(model: TRM, source: Tensor | None, how: str, dataset: AugmentedDataset,
                   candidates: int = 32) -> str:
    """Set the model's new puzzle rows as `how` says (init_from_checkpoint left them at the mean); `source` is the
    checkpoint's table it returned (None: the table was loaded as it is, nothing is new). Returns what was done."""
    if source is None or how == "mean":
        return "new puzzle rows at the mean of the trained rows" if source is not None else "puzzle table as saved"
    if how == "zeros":
        table, done = torch.zeros_like(model.puzzle_emb.weights), "new puzzle rows at zero"
    elif how == "nearest":
        table, choice = nearest_rows(model, source, dataset, candidates)
        done = "new puzzle rows: " + choice.describe()
    else:
        raise ConfigError(f"new_rows: {how!r} is not one of mean, zeros, nearest")
    with torch.no_grad():
        model.puzzle_emb.weights.copy_(table.to(model.puzzle_emb.weights))
    return done
