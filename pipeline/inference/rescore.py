"""Likelihood re-scoring: how probable does the model find each of the best candidates, seen through several views?

Voting counts how many augmented views *decode* to a grid; it ignores how close the runner-up was in each view.
Strong ARC systems rank candidates instead by the model's own probability of the whole grid under several
augmentations (a product of experts: each view is an expert, and their log-probabilities add). Here, after the
prediction pass, for every held-out test input:

  1. take the top-K distinct candidates by vote (`pipeline.inference.vote`);
  2. run the model on the first M views of that test input (the same views prediction starts with), all
     `halt_max_steps` ACT steps, and take the per-cell log-probabilities of the last step (log-stablemax, the
     distribution the training loss uses);
  3. transform every candidate into each view (dihedral + colours) and encode it as a label canvas (its colours
     and its EOS edge, so the size counts too); its score in that view is the sum of the log-probabilities of
     those labels;
  4. store the mean over the views that were run (= the product of experts up to a constant per test input) on
     every prediction row of that candidate (`Predictions.logp`; NaN = not scored), and the number of label cells
     the sum runs over (`Predictions.logp_cells`, for the per-cell selectors).

With canvas buckets the model runs on each test input's bucket: the one prediction started on, or the smallest
that holds its biggest candidate (prediction re-runs a view whose answer reaches its bucket's edge on a bigger one).

`truth_scores` applies the same machinery to the true answer of every held-out test output whose answer is known:
its per-cell cross-entropy and per-cell accuracy under each view, a held-out signal that moves smoothly while
pass@2 still moves by whole test outputs (evaluation during training reports it as `ce_true`, `cell_acc_true`).
With buckets it runs in the run's own mode (the buckets prediction runs on), never on a canvas prediction does not use.

The model is run once per (test input, view), not per candidate: every candidate of one test input is scored from
the same logits, so all of them always have the same views and compare fairly even when the time budget cuts the
pass short. The (test input, view) rows go round-robin over the test inputs (every input's first view, then every
input's second, ...), as prediction's do, so a cut-off pass still scores every input; with several processes each
takes an interleaved share of those rows and the per-candidate sums are added up over processes (every process
ends with the same scores). The cost is M views per test input, the same as M more views of prediction. The
selectors that read the scores (`likelihood`, `likelihood_vote`, ...) live in `pipeline.inference.vote` and need no model.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, ContextManager, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from augment.dataset import AugmentedDataset
from pipeline.training.collectives import all_reduce_sum
from pipeline.data.encoding import IGNORE_LABEL, encode_many, label_cells
from pipeline.model.rows import RowEngine
from pipeline.model.trm import TRM
from pipeline.inference.predictions import Predictions
from pipeline.training.loss import log_stablemax
from pipeline.inference.vote import group_candidates


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
    engine: RowEngine | None = None,
) -> np.ndarray:
    """float32 (n, side*side, vocab): log-probabilities after all ACT steps for test inputs `grid` (original
    grid indices) seen through `variant`s, on the bucket of side `side` (default the whole canvas)."""
    model.eval()
    engine = engine or RowEngine(dataset.canvas, puzzle_len=model.puzzle_len)
    side = engine.canvas if side is None else side
    inputs = dataset.encode_grids(grid, variant, canvas=side)
    batch = {
        "inputs": torch.from_numpy(inputs).to(device),
        "labels": torch.full(inputs.shape, IGNORE_LABEL, dtype=torch.int32, device=device),
        "puzzle_identifiers": torch.from_numpy((np.asarray(variant) + 1).astype(np.int32)).to(device),
    }
    carry = engine.fresh_carry(model, batch)
    with autocast() if autocast is not None else nullcontext():
        for _ in range(model.config.halt_max_steps):
            carry, outputs = engine.step(model, carry, batch, side)
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


class Likelihoods(NamedTuple):
    """Per prediction row: the mean over views of the summed label log-probability (float32, NaN = not scored),
    and how many label cells that sum runs over (uint16, 0 = not scored)."""

    logp: np.ndarray
    cells: np.ndarray


class RescoreError(RuntimeError):
    """Re-scoring failed on some process (out of memory, ...); every process raises it, none is left waiting."""


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
    rank: int = 0,
    world: int = 1,
    stop: Callable[[], object] | None = None,
    engine: RowEngine | None = None,
) -> Likelihoods:
    """The likelihood scores of the top-`top_k` candidates by vote of every test input, over its first `views`
    views; NaN / 0 for the rest. Every process passes the same (whole) `predictions` and scores its share of the
    (test input, view) rows; the sums are added up over processes. `time_budget_s` (this call's) or `stop()`
    returning true ends the pass early: candidates of inputs with no view run yet stay unscored (vote order).
    `engine`: the rows' canvas or buckets, as prediction ran them (default the whole canvas)."""
    if top_k < 1 or views < 1:
        raise ValueError(f"rescore: top_k and views must be at least 1, got top_k={top_k}, views={views}")
    engine = engine or RowEngine(dataset.canvas, puzzle_len=model.puzzle_len)
    groups = group_candidates(predictions)
    best = top_groups(predictions, top_k)
    sums = np.zeros((2, len(groups.row)))  # per group: summed log-probability over views, number of views
    failed, error = 0.0, None
    try:
        _score_share(model, dataset, predictions, groups, best, sums, batch_size, views, device, autocast,
                     time_budget_s, progress, rank, world, stop, engine)
    except Exception as e:  # noqa: BLE001 - said to every process below, so that none waits for this one
        failed, error = 1.0, e
    total = torch.from_numpy(np.concatenate([sums.ravel(), [failed]])).to(device)
    total = all_reduce_sum(total, world).cpu().numpy()
    if total[-1] > 0:
        raise RescoreError(f"re-scoring failed on {int(total[-1])} process(es)"
                           + (f": {error!r}" if error is not None else "")) from error
    group_sum, group_views = total[:-1].reshape(2, -1)
    scored = group_views > 0
    per_group = np.where(scored, group_sum / np.maximum(group_views, 1), np.nan)
    heights = predictions.height[groups.row].astype(np.int64)
    widths = predictions.width[groups.row].astype(np.int64)
    sides = _group_sides(dataset, predictions, groups, best, engine)  # the EOS edge stops at the bucket's edge
    cells = np.where(scored & np.isfinite(per_group), label_cells(heights, widths, sides), 0)
    logp = np.full(len(predictions), np.nan, np.float32)
    counts = np.zeros(len(predictions), np.uint16)
    valid_rows = np.flatnonzero(predictions.valid)
    logp[valid_rows] = per_group[groups.member[valid_rows]]
    counts[valid_rows] = cells[groups.member[valid_rows]]
    return Likelihoods(logp, counts)


def _input_sides(dataset: AugmentedDataset, predictions: Predictions, groups, best: dict,
                 engine: RowEngine) -> dict[tuple[int, int], int]:
    """(task index, test index) -> the side a test input is scored on: the one prediction started on, or the
    smallest holding its biggest top candidate (where prediction's re-run ended)."""
    task_index = {t: i for i, t in enumerate(predictions.task_ids)}
    rows = dataset.test_rows(1)
    first = engine.held_out_sides(dataset, rows["puzzle_index"], rows["test_index"])
    sides = {}
    for p, t, side in zip(rows["puzzle_index"].tolist(), rows["test_index"].tolist(), first.tolist()):
        key = (task_index.get(dataset.puzzles[p]["task_id"], -1), t)
        extent = max([max(int(predictions.height[groups.row[g]]), int(predictions.width[groups.row[g]]))
                      for g in best.get(key, [])], default=0)
        sides[key] = max(side, int(engine.side_for(np.array([extent]))[0]) if extent else side)
    return sides


def _group_sides(dataset: AugmentedDataset, predictions: Predictions, groups, best: dict,
                 engine: RowEngine) -> np.ndarray:
    """int64 (G,): the side each candidate group's test input is scored on (the canvas without buckets)."""
    if not engine.on_buckets:
        return np.full(len(groups.row), dataset.canvas, np.int64)
    side_of = _input_sides(dataset, predictions, groups, best, engine)
    return np.array([side_of.get((int(task), int(t)), dataset.canvas)
                     for task, t in zip(groups.task, groups.test_index)], np.int64)


def _score_share(model, dataset, predictions, groups, best, sums, batch_size, views, device, autocast,
                 time_budget_s, progress, rank, world, stop, engine) -> None:
    """This process's (test input, view) rows, round-robin over inputs, added into `sums` (2, G) in place."""
    start_time = time.perf_counter()
    task_index = {t: i for i, t in enumerate(predictions.task_ids)}
    grids = [predictions.grid(int(r)) for r in groups.row]
    rows = dataset.test_rows(views)
    keys = [(task_index.get(dataset.puzzles[int(p)]["task_id"], -1), int(t))
            for p, t in zip(rows["puzzle_index"], rows["test_index"])]
    view = rows["variant"] - dataset.puzzle_first_variant[rows["puzzle_index"]]
    order = [i for i in np.lexsort((np.arange(len(view)), view)).tolist() if keys[i] in best][rank::world]
    rows = {k: v[order] for k, v in rows.items()}
    keys = [keys[i] for i in order]
    side_of = _input_sides(dataset, predictions, groups, best, engine) if engine.on_buckets else {}
    rows["side"] = np.array([side_of.get(key, dataset.canvas) for key in keys], np.int64)
    bar = tqdm(total=len(keys), disable=not progress, desc="rescore", unit="view", dynamic_ncols=True)
    for start in range(0, len(keys), batch_size):
        end = min(len(keys), start + batch_size)
        for side, part in engine.groups(rows["side"][start:end]):
            picked = np.arange(start, end) if part is None else start + part
            logp = view_logprobs(model, dataset, rows["grid"][picked], rows["variant"][picked], device, autocast,
                                 side, engine)
            for i, row in enumerate(picked.tolist()):
                ids, variant = best[keys[row]], int(rows["variant"][row])
                scores = candidate_logp(logp[i], [grids[g] for g in ids], int(dataset.variant_dihedral[variant]),
                                        dataset.variant_colours[variant])
                sums[0, ids] += scores
                sums[1, ids] += 1
        bar.update(end - start)
        if stop is not None and stop():
            bar.write(f"rescore: stopped by a signal after {end} of {len(keys)} views")
            break
        if time_budget_s > 0 and time.perf_counter() - start_time > time_budget_s:
            bar.write(f"rescore: time budget of {time_budget_s:.0f} s reached after {end} of "
                      f"{len(keys)} views")
            break
    bar.close()


def truth_scores(
    model: TRM,
    dataset: AugmentedDataset,
    views: int,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] | None = None,
    rank: int = 0,
    world: int = 1,
    engine: RowEngine | None = None,
    stop: Callable[[], object] | None = None,
) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(task id, test index) -> (summed per-cell cross-entropy, summed per-cell accuracy, views) of the true answer
    of every held-out test output with a known answer, over its first `views` views (0 = all), after all ACT steps;
    this process's interleaved share of the rows (merge the shares with `merge_truth_scores`).

    Per view, the cells are the answer's label cells (its colours and its EOS edge, as `candidate_logp` scores
    them): cross-entropy is their mean −log-probability, accuracy the fraction the argmax gets right. On
    the `engine`'s buckets the model runs where prediction runs: the test input's bucket, or, when the answer does not fit
    there, the smallest bucket that holds it (where prediction's re-run on a bigger bucket ends up). `stop()` true
    ends it after the batch it is in (what is scored so far is returned)."""
    rows = dataset.test_rows(views if views > 0 else None)
    answer = np.array([_answer_grid(dataset, int(p), int(t)) for p, t in zip(rows["puzzle_index"], rows["test_index"])],
                      np.int64)
    known = answer >= 0
    h, w = dataset.augmented_shapes(np.where(known, answer, 0), rows["variant"])
    known &= (h <= dataset.canvas) & (w <= dataset.canvas)  # answers that fit the canvas (a dihedral may swap sides)
    share = np.flatnonzero(known)[rank::world]
    engine = engine or RowEngine(dataset.canvas, puzzle_len=model.puzzle_len)
    sides = np.maximum(engine.held_out_sides(dataset, rows["puzzle_index"][share], rows["test_index"][share]),
                       engine.side_for(np.maximum(h, w)[share]))
    out: dict[tuple[str, int], tuple[float, float, int]] = {}
    for start in range(0, len(share), batch_size):
        if stop is not None and stop():
            break
        for side, part in engine.groups(sides[start:start + batch_size]):
            picked_rows = share[start:start + batch_size] if part is None else share[start + part]
            _add_truth_scores(out, model, dataset, engine, rows, picked_rows, answer, side, device, autocast)
    return out


def _add_truth_scores(out, model, dataset, engine, rows, picked_rows, answer, side, device, autocast) -> None:
    """The truth scores of `picked_rows` of `rows`, all on the bucket of `side`, added into `out` in place."""
    logp = view_logprobs(model, dataset, rows["grid"][picked_rows], rows["variant"][picked_rows], device, autocast,
                         side, engine)
    labels = dataset.encode_grids(answer[picked_rows], rows["variant"][picked_rows], labels=True, canvas=side)
    mask = labels != IGNORE_LABEL
    picked = np.take_along_axis(logp, np.where(mask, labels, 0)[..., None].astype(np.int64), axis=-1)[..., 0]
    cells = mask.sum(axis=1)
    ce = -np.where(mask, picked, 0.0).sum(axis=1, dtype=np.float64) / cells
    acc = (mask & (logp.argmax(axis=-1) == labels)).sum(axis=1) / cells
    for p, t, c, a in zip(rows["puzzle_index"][picked_rows].tolist(), rows["test_index"][picked_rows].tolist(), ce, acc):
        key = (dataset.puzzles[p]["task_id"], t)
        old = out.get(key, (0.0, 0.0, 0))
        out[key] = (old[0] + float(c), old[1] + float(a), old[2] + 1)


def merge_truth_scores(parts: list[dict[tuple[str, int], tuple[float, float, int]]]) -> dict[str, float] | None:
    """The processes' `truth_scores` shares -> {"ce_true", "cell_acc_true"}: per test output the mean over its
    views, then the mean over test outputs; None when no answer is known."""
    merged: dict[tuple[str, int], list[float]] = {}
    for part in parts:
        for key, (ce, acc, n) in part.items():
            total = merged.setdefault(key, [0.0, 0.0, 0])
            total[0] += ce
            total[1] += acc
            total[2] += n
    if not merged:
        return None
    return {"ce_true": float(np.mean([ce / n for ce, _, n in merged.values()])),
            "cell_acc_true": float(np.mean([acc / n for _, acc, n in merged.values()]))}


def _answer_grid(dataset: AugmentedDataset, puzzle: int, test_index: int) -> int:
    """The grid index of a held-out test output's true answer, or -1 when it is not known."""
    outputs = dataset.puzzles[puzzle]["test_outputs"]
    return -1 if outputs is None else int(outputs[test_index])
