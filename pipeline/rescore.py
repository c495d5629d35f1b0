"""Likelihood re-scoring: how probable does the model find each of the best candidates, seen through several views?

Voting counts how many augmented views *decode* to a grid; it ignores how close the runner-up was in each view.
Strong ARC systems rank candidates instead by the model's own probability of the whole grid under several
augmentations (a product of experts: each view is an expert, and their log-probabilities add). Here, after the
prediction pass, for every held-out test input:

  1. take the top-K distinct candidates by vote (`pipeline.vote`);
  2. run the model on the first M views of that test input (the same views prediction starts with), all
     `halt_max_steps` ACT steps, and take the per-cell log-probabilities of the last step (log-stablemax, the
     distribution the training loss uses);
  3. transform every candidate into each view (dihedral + colours) and encode it as a label canvas (its colours
     and its EOS edge, so the size counts too); its score in that view is the sum of the log-probabilities of
     those labels;
  4. store the mean over views (= the product of experts up to a constant per test input) on every prediction
     row of that candidate (`Predictions.logp`; NaN = not scored).

With canvas buckets the model runs on each test input's bucket (the one prediction used), so every candidate it
produced fits there; a candidate larger than the bucket scores -inf.

The model is run once per (test input, view), not per candidate: every candidate of one test input is scored from
the same logits. The cost is therefore M views per test input, the same as M more views of prediction (M / N of
a prediction with N views). The selectors that read the scores (`likelihood`, `likelihood_vote`) live in
`pipeline.vote` and need no model.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm import tqdm

from augment.dataset import AugmentedDataset
from pipeline.encoding import IGNORE_LABEL, encode_many
from pipeline.model import TRM, log_stablemax
from pipeline.predictions import Predictions
from pipeline.rows import bucket_groups
from pipeline.vote import group_candidates


def top_groups(predictions: Predictions, top_k: int) -> dict[tuple[int, int], list[int]]:
    """(task index, test index) -> the ids of its best `top_k` candidate groups by vote (as `vote` ranks them)."""
    groups = group_candidates(predictions)
    order = np.lexsort((groups.row, -groups.mean_q, -groups.votes, groups.test_index, groups.task))
    out: dict[tuple[int, int], list[int]] = {}
    for g in order.tolist():
        best = out.setdefault((int(groups.task[g]), int(groups.test_index[g])), [])
        if len(best) < top_k:
            best.append(g)
    return out


@torch.inference_mode()
def view_logprobs(
    model: TRM,
    dataset: AugmentedDataset,
    grid: np.ndarray,
    variant: np.ndarray,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] | None = None,
    side: int | None = None,
) -> np.ndarray:
    """float32 (n, side*side, vocab): log-probabilities after all ACT steps for test inputs `grid` (original
    grid indices) seen through `variant`s, on the bucket of side `side` (default the whole canvas)."""
    model.eval()
    inputs = dataset.encode_grids(grid, variant, canvas=side)
    batch = {
        "inputs": torch.from_numpy(inputs).to(device),
        "labels": torch.full(inputs.shape, IGNORE_LABEL, dtype=torch.int32, device=device),
        "puzzle_identifiers": torch.from_numpy((np.asarray(variant) + 1).astype(np.int32)).to(device),
    }
    carry = model.initial_carry(batch)
    with autocast() if autocast is not None else nullcontext():
        for _ in range(model.config.halt_max_steps):
            carry, outputs = model(carry, batch)
    return log_stablemax(outputs["logits"].float()).cpu().numpy()


def candidate_logp(logp: np.ndarray, candidates: list[np.ndarray], dihedral: int, colours: np.ndarray) -> np.ndarray:
    """float64 (K,): summed log-probability of each candidate grid (original space) under one view's
    log-probabilities `logp` (canvas*canvas, vocab); -inf for a candidate that does not fit the canvas."""
    canvas = int(round(logp.shape[0] ** 0.5))
    scores = np.full(len(candidates), -np.inf)
    fits = [k for k, g in enumerate(candidates) if max(g.shape) <= canvas]
    if not fits:
        return scores
    pixels = np.concatenate([candidates[k].ravel() for k in fits]).astype(np.uint8)
    heights = np.array([candidates[k].shape[0] for k in fits])
    widths = np.array([candidates[k].shape[1] for k in fits])
    starts = np.cumsum(heights * widths) - heights * widths
    n = len(fits)
    labels = encode_many(
        pixels, starts, heights, widths, canvas, dihedrals=np.full(n, dihedral),
        colour_luts=np.repeat(np.asarray(colours, np.uint8)[None], n, axis=0), labels=True,
    )
    mask = labels != IGNORE_LABEL
    picked = np.take_along_axis(logp[None], np.where(mask, labels, 0)[..., None].astype(np.int64), axis=-1)[..., 0]
    scores[fits] = np.where(mask, picked, 0.0).sum(axis=1, dtype=np.float64)
    return scores


def rescore(
    model: TRM,
    dataset: AugmentedDataset,
    predictions: Predictions,
    *,
    top_k: int = 8,
    views: int = 8,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] | None = None,
    time_budget_s: float = 0.0,
    progress: bool = True,
    buckets: tuple[int, ...] = (),
) -> np.ndarray:
    """float32 (len(predictions),): each candidate row's mean over `views` views of its summed log-probability,
    for the top-`top_k` candidates by vote of every test input; NaN for the rest (and for test inputs left when
    `time_budget_s` runs out: those keep their vote order). `buckets`: the canvas buckets prediction ran on."""
    start_time = time.perf_counter()
    groups = group_candidates(predictions)
    best = top_groups(predictions, top_k)
    group_logp = np.zeros(len(groups.row))
    group_views = np.zeros(len(groups.row), np.int64)
    task_index = {t: i for i, t in enumerate(predictions.task_ids)}
    grids = [predictions.grid(int(r)) for r in groups.row]

    rows = dataset.test_rows(views if views > 0 else None)
    keys = [(task_index.get(dataset.puzzles[int(p)]["task_id"], -1), int(t))
            for p, t in zip(rows["puzzle_index"], rows["test_index"])]
    wanted = np.array([key in best for key in keys], bool)  # inputs with at least one valid candidate
    rows = {k: v[wanted] for k, v in rows.items()}
    rows["side"] = dataset.held_out_sides(rows["puzzle_index"], rows["test_index"], buckets)
    keys = [key for key, w in zip(keys, wanted) if w]
    bar = tqdm(total=len(keys), disable=not progress, desc="rescore", unit="view", dynamic_ncols=True)
    for start in range(0, len(keys), batch_size):
        stop = min(len(keys), start + batch_size)
        for side, part in bucket_groups(rows["side"][start:stop], dataset.canvas):
            at = np.arange(start, stop) if part is None else start + part
            logp = view_logprobs(model, dataset, rows["grid"][at], rows["variant"][at], device, autocast, side)
            for i, row in enumerate(at.tolist()):
                ids, variant = best[keys[row]], int(rows["variant"][row])
                scores = candidate_logp(logp[i], [grids[g] for g in ids], int(dataset.variant_dihedral[variant]),
                                        dataset.variant_colours[variant])
                group_logp[ids] += scores
                group_views[ids] += 1
        bar.update(stop - start)
        if time_budget_s > 0 and time.perf_counter() - start_time > time_budget_s:
            bar.write(f"rescore: time budget of {time_budget_s:.0f} s reached after {stop} of "
                      f"{len(keys)} views")
            break
    bar.close()
    # a test input cut off midway has fewer views for some candidates than others: score only complete ones
    complete = np.zeros(len(groups.row), bool)
    for ids in best.values():
        counts = group_views[ids]
        if counts[0] > 0 and (counts == counts[0]).all():
            complete[ids] = True
    per_group = np.where(complete, group_logp / np.maximum(group_views, 1), np.nan)
    out = np.full(len(predictions), np.nan, np.float32)
    valid_rows = np.flatnonzero(predictions.valid)
    out[valid_rows] = per_group[groups.member[valid_rows]]
    return out
