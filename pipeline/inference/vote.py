"""Rank the distinct candidate grids of every held-out test input.

A selector is a plain function `selector(predictions, top_k=None) -> dict[(task_id, test_index), list[Ranked]]`
(best first; a test input with no valid candidate is absent). All of them share one grouping step: identical
grids of the same (task, test input) are merged into one group with its vote count and q statistics; a selector
only decides the order of the groups.

- `vote` (default, the reference's rule): most votes first; ties broken by the higher mean q.
- `q_weighted`: highest sum of q first, i.e. each candidate votes with its confidence instead of 1; ties by votes.
  Differs from `vote` when a popular answer is one the model itself doubts.
- `max_q`: the group holding the single most confident candidate first; ties by votes. Trusts the halting head
  over agreement between augmentations; mainly a diagnostic of whether q carries information.

- `likelihood`: the product of experts over augmented views: the top-K groups by vote are re-scored by the model
  (`pipeline.inference.rescore`, run by the predict stage, which stores a mean log-probability per candidate in
  `Predictions.logp`); the highest score first, unscored groups after, by votes.
- `likelihood_vote`: the log-posterior with the vote share as a prior: the score plus log(votes).
- `likelihood_cell`, `likelihood_cell_vote`: `likelihood` and `likelihood_vote` divided by the grid's scored label
  cells (its colours and its EOS edge), since a sum over cells favours small grids (measured on the dev split:
  docs/QUALITY.md).
The rule for the vote prior: it is added once, to the whole grid's log-likelihood, and a per-cell selector divides
that sum as a whole: (log p + log votes) / cells. So the prior weighs against the model exactly as much in
`likelihood_cell_vote` as in `likelihood_vote`; dividing only the likelihood would let log(votes) swamp a per-cell
mean (a few tenths) where it is a rounding error against a sum over hundreds of cells.
The model runs in `pipeline.inference.rescore`; the selectors here only read its stored scores.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.data.encoding import label_cells
from pipeline.inference.predictions import MAX_SIDE, Predictions


@dataclass(frozen=True)
class Ranked:
    grid: np.ndarray  # uint8 (h, w)
    votes: int  # number of candidates (augmentation variants) that produced this grid
    mean_q: float  # mean sigmoid(q_halt) over those candidates
    score: float  # the selector's primary ranking key (votes for `vote`, sum of q for `q_weighted`, ...)


Key = tuple[str, int]  # (task id, test index)
Selector = Callable[..., dict[Key, list[Ranked]]]


@dataclass
class CandidateGroups:
    """One entry per distinct grid per (task, test input); all columns have shape (G,)."""

    task: np.ndarray  # int32, index into predictions.task_ids
    test_index: np.ndarray  # int32
    row: np.ndarray  # int64, first candidate row holding this grid (its representative)
    votes: np.ndarray  # int64, candidates in the group
    q_sum: np.ndarray  # float64
    q_max: np.ndarray  # float64
    member: np.ndarray | None = None  # int64 (len(predictions),): each candidate row's group, -1 for invalid rows

    @property
    def mean_q(self) -> np.ndarray:
        return self.q_sum / self.votes


def group_candidates(predictions: Predictions) -> CandidateGroups:
    """Merge identical valid grids per (task, test input). Invalid rows are ignored.

    Keys are the raw grid bytes plus the shape in a Python dict: exact (no hash collisions) and measured at
    about 1 s per 400k candidates on one core (benchmarks/bench_vote.py), far below the model's cost.
    """
    rows = np.flatnonzero(predictions.valid)
    task = predictions.task[rows].tolist()
    test = predictions.test_index[rows].tolist()
    height = predictions.height[rows].tolist()
    width = predictions.width[rows].tolist()
    start = predictions.offset[rows].tolist()
    cells = predictions.cells.tobytes()
    group_of: dict[tuple, int] = {}
    first: list[int] = []  # first position (into `rows`) of each group, in creation order
    group = np.empty(len(rows), np.int64)
    for k in range(len(rows)):
        h, w, s = height[k], width[k], start[k]
        key = (task[k], test[k], h, w, cells[s : s + h * w])
        g = group_of.get(key)
        if g is None:
            g = group_of[key] = len(first)
            first.append(k)
        group[k] = g
    num_groups = len(first)
    q = predictions.q[rows].astype(np.float64)
    by_group = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[by_group], np.arange(num_groups))
    q_max = np.maximum.reduceat(q[by_group], starts) if num_groups else np.zeros(0)
    first_rows = rows[np.array(first, np.int64)]
    member = np.full(len(predictions), -1, np.int64)
    member[rows] = group
    return CandidateGroups(
        task=predictions.task[first_rows],
        test_index=predictions.test_index[first_rows],
        row=first_rows.astype(np.int64),
        votes=np.bincount(group, minlength=num_groups).astype(np.int64),
        q_sum=np.bincount(group, weights=q, minlength=num_groups),
        q_max=q_max,
        member=member,
    )


def rank_groups(
    predictions: Predictions,
    groups: CandidateGroups,
    primary: np.ndarray,
    secondary: np.ndarray,
    top_k: int | None = None,
) -> dict[Key, list[Ranked]]:
    """Order groups within each (task, test input) by primary, then secondary (both descending), then by first
    appearance, and return the best `top_k` (all if None) per test input."""
    order = np.lexsort((groups.row, -secondary, -primary, groups.test_index, groups.task))
    mean_q = groups.mean_q
    out: dict[Key, list[Ranked]] = {}
    for g in order.tolist():
        key = (predictions.task_ids[groups.task[g]], int(groups.test_index[g]))
        ranked = out.setdefault(key, [])
        if top_k is not None and len(ranked) >= top_k:
            continue
        grid = predictions.grid(int(groups.row[g])).copy()
        ranked.append(Ranked(grid=grid, votes=int(groups.votes[g]), mean_q=float(mean_q[g]), score=float(primary[g])))
    return out


def vote(predictions: Predictions, top_k: int | None = None) -> dict[Key, list[Ranked]]:
    """The reference's rule: most votes first, ties broken by mean q."""
    groups = group_candidates(predictions)
    return rank_groups(predictions, groups, groups.votes.astype(np.float64), groups.mean_q, top_k)


def q_weighted(predictions: Predictions, top_k: int | None = None) -> dict[Key, list[Ranked]]:
    """Each candidate votes with its q: highest sum of q first, ties by vote count."""
    groups = group_candidates(predictions)
    return rank_groups(predictions, groups, groups.q_sum, groups.votes.astype(np.float64), top_k)


def max_q(predictions: Predictions, top_k: int | None = None) -> dict[Key, list[Ranked]]:
    """The group holding the most confident single candidate first, ties by vote count."""
    groups = group_candidates(predictions)
    return rank_groups(predictions, groups, groups.q_max, groups.votes.astype(np.float64), top_k)


def group_logp(predictions: Predictions, groups: CandidateGroups) -> np.ndarray:
    """float64 (G,): each group's likelihood score (pipeline.inference.rescore), -inf where it was not scored."""
    if predictions.logp is None:
        warnings.warn("these predictions hold no likelihood scores (predict with predict.rescore_views > 0); "
                      "the likelihood selectors fall back to vote counts", stacklevel=3)
        return np.full(len(groups.row), -np.inf)
    logp = predictions.logp[groups.row].astype(np.float64)
    return np.where(np.isnan(logp), -np.inf, logp)


def likelihood(predictions: Predictions, top_k: int | None = None) -> dict[Key, list[Ranked]]:
    """Product of experts: the highest mean log-probability over the re-scored views first (only the top-K by vote
    are scored; the rest follow by votes)."""
    groups = group_candidates(predictions)
    logp = group_logp(predictions, groups)
    return rank_groups(predictions, groups, logp, groups.votes.astype(np.float64), top_k)


def likelihood_vote(predictions: Predictions, top_k: int | None = None) -> dict[Key, list[Ranked]]:
    """The product of experts with the vote share as a prior: summed log-probability + log(votes)."""
    groups = group_candidates(predictions)
    logp = group_logp(predictions, groups) + np.log(groups.votes)
    return rank_groups(predictions, groups, logp, groups.votes.astype(np.float64), top_k)


def scored_cells(predictions: Predictions, groups: CandidateGroups) -> np.ndarray:
    """float64 (G,): the label cells a group's score sums over (colours + EOS edge), as pipeline.inference.rescore counted
    them; for files without that count, the count on the 30x30 canvas (no EOS row under a 30-high grid, no EOS
    column right of a 30-wide one)."""
    if predictions.logp_cells is not None:
        counted = predictions.logp_cells[groups.row].astype(np.float64)
        return np.where(counted > 0, counted, np.nan)  # not scored: its score is -inf anyway
    h = predictions.height[groups.row].astype(np.int64)
    w = predictions.width[groups.row].astype(np.int64)
    return label_cells(h, w, MAX_SIDE).astype(np.float64)


def _per_cell(score: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """score / cells, keeping -inf (not scored) as -inf."""
    return np.where(np.isfinite(score), score / np.where(np.isnan(cells), 1.0, cells), -np.inf)


def likelihood_cell(predictions: Predictions, top_k: int | None = None) -> dict[Key, list[Ranked]]:
    """`likelihood` per scored cell: the summed log-probability favours small grids (fewer cells, fewer terms);
    dividing by the cell count removes that bias."""
    groups = group_candidates(predictions)
    logp = _per_cell(group_logp(predictions, groups), scored_cells(predictions, groups))
    return rank_groups(predictions, groups, logp, groups.votes.astype(np.float64), top_k)


def likelihood_cell_vote(predictions: Predictions, top_k: int | None = None) -> dict[Key, list[Ranked]]:
    """`likelihood_vote` per scored cell: (summed log-probability + log(votes)) / cells (the rule in the module
    docstring: the prior weighs as much as in likelihood_vote)."""
    groups = group_candidates(predictions)
    posterior = group_logp(predictions, groups) + np.log(groups.votes)
    logp = _per_cell(posterior, scored_cells(predictions, groups))
    return rank_groups(predictions, groups, logp, groups.votes.astype(np.float64), top_k)


SELECTORS: dict[str, Selector] = {
    "vote": vote, "q_weighted": q_weighted, "max_q": max_q, "likelihood": likelihood,
    "likelihood_vote": likelihood_vote, "likelihood_cell": likelihood_cell, "likelihood_cell_vote": likelihood_cell_vote,
}
DEFAULT_SELECTOR = "vote"
