"""Likelihood re-scoring (pipeline.inference.rescore) and the selectors that read its scores (pipeline.inference.vote)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from augment.dataset import AugmentedDataset
from pipeline.config import PredictConfig
from pipeline.data.encoding import VOCAB_SIZE, encode_labels, encode_many, label_cells
from pipeline.core.errors import ConfigError
from pipeline.model.trm import log_stablemax
from pipeline.inference.predictions import Predictions, PredictionsWriter
from pipeline.inference.predict import check_rescore_settings
from pipeline.inference.rescore import candidate_logp, rescore, top_groups
from pipeline.inference.vote import (SELECTORS, group_candidates, likelihood, likelihood_cell_vote, likelihood_vote,
                           scored_cells, vote)
from tiny import build_tiny_dataset


class CopyModel(nn.Module):
    """A stand-in for TRM that answers every view by copying its input: it finds the test input itself likely."""

    def __init__(self, steps: int = 2):
        super().__init__()
        self.config = type("Config", (), {"halt_max_steps": steps})()
        self.calls = 0

    def initial_carry(self, batch):
        return None

    def forward(self, carry, batch):
        self.calls += 1
        return carry, {"logits": 20.0 * nn.functional.one_hot(batch["inputs"].long(), VOCAB_SIZE).float()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> AugmentedDataset:
    return AugmentedDataset.load(build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data", num_aug=3))


def _votes_against_likelihood(dataset: AugmentedDataset) -> tuple[Predictions, dict]:
    """Per held-out test input: a wrong grid with 3 votes, and the test input itself with 1 vote."""
    writer = PredictionsWriter()
    truth = {}
    for task in dataset.eval_tasks():
        for i, grid in enumerate(task.test_inputs):
            wrong = grid.copy()
            wrong[0, 0] = (wrong[0, 0] + 1) % 10
            for variant in range(3):
                writer.add(task.id, i, variant, 0.5, [wrong])
            writer.add(task.id, i, 3, 0.5, [grid])
            truth[(task.id, i)] = (grid, wrong)
    return writer.finish(), truth


def test_likelihood_overrules_votes_when_the_model_prefers_the_rarer_grid(dataset):
    predictions, truth = _votes_against_likelihood(dataset)
    model = CopyModel()
    predictions.logp, predictions.logp_cells = rescore(model, dataset, predictions, top_k=2, views=4, progress=False)
    assert model.calls == 2  # one batch of (test input, view) rows, all ACT steps; not one run per candidate
    assert not np.isnan(predictions.logp[predictions.valid]).any()
    by_vote, by_likelihood = vote(predictions), likelihood(predictions)
    for key, (grid, wrong) in truth.items():
        assert np.array_equal(by_vote[key][0].grid, wrong)
        assert np.array_equal(by_likelihood[key][0].grid, grid)  # the copy in every view, dihedral and colours undone
        assert by_likelihood[key][0].score > by_likelihood[key][1].score
    # with votes as a prior, a margin of 3:1 in votes does not outweigh one wrong cell under a confident model
    assert all(np.array_equal(likelihood_vote(predictions)[k][0].grid, g) for k, (g, _) in truth.items())


def test_candidate_logp_is_the_sum_over_label_cells():
    rng = np.random.default_rng(0)
    canvas = 4
    logits = torch.from_numpy(rng.normal(size=(canvas * canvas, VOCAB_SIZE)).astype(np.float32))
    logp = log_stablemax(logits).numpy()
    grid = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    identity = np.arange(10, dtype=np.uint8)
    labels = encode_labels(grid, canvas)
    expected = sum(logp[i, labels[i]] for i in range(canvas * canvas) if labels[i] >= 0)
    too_big = np.zeros((5, 1), np.uint8)
    scores = candidate_logp(logp, [grid, too_big], 0, identity)
    assert np.isclose(scores[0], expected) and scores[1] == -np.inf
    # a view's transform is applied before encoding: rot180 of the grid scored in that view
    rotated = encode_labels(np.rot90(grid, 2), canvas)
    expected_rot = sum(logp[i, rotated[i]] for i in range(canvas * canvas) if rotated[i] >= 0)
    assert np.isclose(candidate_logp(logp, [grid], 2, identity)[0], expected_rot)


def test_top_groups_follow_vote_order():
    writer = PredictionsWriter()
    a, b, c = (np.full((1, 1), v, np.uint8) for v in (1, 2, 3))
    for grid, n in ((b, 1), (a, 3), (c, 2)):
        for _ in range(n):
            writer.add("t", 0, 0, 0.5, [grid])
    p = writer.finish()
    best = top_groups(p, 2)[(0, 0)]
    assert len(best) == 2
    from pipeline.inference.vote import group_candidates

    groups = group_candidates(p)
    assert [int(groups.votes[g]) for g in best] == [3, 2]


def test_without_scores_the_likelihood_selectors_fall_back_to_votes(dataset):
    predictions, truth = _votes_against_likelihood(dataset)
    with pytest.warns(UserWarning, match="no likelihood scores"):
        ranked = likelihood(predictions)
    for key, (_, wrong) in truth.items():
        assert np.array_equal(ranked[key][0].grid, wrong)
    assert {"likelihood", "likelihood_vote"} <= set(SELECTORS)


def test_scores_survive_save_load_and_concatenate(dataset, tmp_path: Path):
    predictions, _ = _votes_against_likelihood(dataset)
    predictions.logp, predictions.logp_cells = rescore(CopyModel(), dataset, predictions, top_k=1, views=2,
                                                       progress=False)
    assert np.isnan(predictions.logp).sum() > 0  # only the top-1 group is scored
    predictions.save(tmp_path / "p.npz")
    loaded = Predictions.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.logp, predictions.logp)
    joined = Predictions.concatenate([loaded, PredictionsWriter(["x"]).finish()])
    assert joined.logp is not None and len(joined.logp) == len(loaded)


def test_per_cell_likelihood_removes_the_small_grid_bias():
    """Sums over more cells are lower; per cell, the bigger grid the model is surer of wins."""
    small, big = np.zeros((1, 1), np.uint8), np.ones((3, 3), np.uint8)
    writer = PredictionsWriter()
    writer.add("t", 0, 0, 0.5, [small])
    writer.add("t", 0, 1, 0.5, [big])
    p = writer.finish()
    p.logp = np.array([-3.0, -7.5], np.float32)  # per cell: -3 / 3 = -1.0 against -7.5 / 15 = -0.5
    from pipeline.inference.vote import likelihood_cell

    assert np.array_equal(likelihood(p)[("t", 0)][0].grid, small)
    assert np.array_equal(likelihood_cell(p)[("t", 0)][0].grid, big)
    assert np.isclose(likelihood_cell(p)[("t", 0)][0].score, -0.5)


def test_a_failed_rescoring_keeps_the_candidates(tmp_path: Path, monkeypatch):
    import pipeline.inference.predict as predict_module
    from pipeline.training.train import train
    from tiny import tiny_config

    data = build_tiny_dataset(tmp_path / "data")
    cfg = tiny_config(max_steps=2)
    checkpoint = train(cfg, data, tmp_path / "run", progress=False)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(predict_module, "rescore", out_of_memory)
    with pytest.warns(UserWarning, match="re-scoring failed"):
        path = predict_module.predict_to_file(data, checkpoint, tmp_path / "p.npz", cfg.predict, progress=False)
    predictions = Predictions.load(path)
    assert len(predictions) > 0 and predictions.logp is None


def test_truth_scores_are_the_rescoring_of_the_true_answer(dataset):
    """ce_true is the mean over views of −(the likelihood score of the true answer) per label cell; the shares of
    two processes merge to the figure of one; accuracy counts the label cells the argmax gets right."""
    from pipeline.data.encoding import encode_labels
    from pipeline.inference.rescore import merge_truth_scores, truth_scores, view_logprobs

    model = CopyModel()
    whole = truth_scores(model, dataset, views=3)
    halves = [truth_scores(model, dataset, views=3, rank=r, world=2) for r in range(2)]
    assert merge_truth_scores([whole]) == pytest.approx(merge_truth_scores(halves))
    assert merge_truth_scores([{}]) is None
    rows = dataset.test_rows(3)
    expected_ce, expected_acc = {}, {}
    for p, t, g, v in zip(rows["puzzle_index"], rows["test_index"], rows["grid"], rows["variant"]):
        task = dataset.task(int(p))
        logp = view_logprobs(model, dataset, np.array([g]), np.array([v]))[0]
        answer = task.test_outputs[int(t)]
        aug = dataset.augmentation(int(v))
        labels = encode_labels(aug.apply(answer), dataset.canvas)
        cells = int((labels >= 0).sum())
        score = candidate_logp(logp, [answer], int(dataset.variant_dihedral[v]), dataset.variant_colours[v])[0]
        expected_ce.setdefault((task.id, int(t)), []).append(-score / cells)
        expected_acc.setdefault((task.id, int(t)), []).append(
            float(((logp.argmax(-1) == labels) & (labels >= 0)).sum()) / cells)
    assert set(whole) == set(expected_ce)
    for key, (ce, acc, n) in whole.items():
        assert n == 3
        assert ce / n == pytest.approx(np.mean(expected_ce[key]))
        assert acc / n == pytest.approx(np.mean(expected_acc[key]))
    merged = merge_truth_scores([whole])
    assert merged["ce_true"] == pytest.approx(np.mean([np.mean(v) for v in expected_ce.values()]))
    assert 0 <= merged["cell_acc_true"] <= 1


# ------------------------------------------------------------------------------------------ counts and settings
@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), dihedral=st.integers(0, 7), canvas=st.sampled_from([30, 12]))
def test_the_per_cell_count_is_the_label_cells_scored(h, w, dihedral, canvas):
    """label_cells counts what candidate_logp sums over, in every view: no EOS row under a grid as high as the
    canvas, no EOS column right of one as wide (ARC-AGI-2 has many 30-wide grids)."""
    if max(h, w) > canvas:
        return
    grid = np.arange(h * w, dtype=np.uint8).reshape(h, w) % 10
    labels = encode_many(grid.ravel(), [0], [h], [w], canvas, dihedrals=[dihedral], labels=True)
    assert (labels != -100).sum() == label_cells(h, w, canvas)
    logp = np.zeros((canvas * canvas, VOCAB_SIZE), np.float32) - 1.0  # every label cell scores -1
    assert candidate_logp(logp, [grid], dihedral, np.arange(10, dtype=np.uint8))[0] == -label_cells(h, w, canvas)


def test_thirty_wide_grids_are_counted_without_an_eos_column():
    writer = PredictionsWriter()
    writer.add("t", 0, 0, 0.5, [np.zeros((2, 30), np.uint8), np.zeros((30, 30), np.uint8), np.zeros((3, 4), np.uint8)])
    p = writer.finish()
    groups = group_candidates(p)
    assert scored_cells(p, groups).tolist() == [60 + 30, 900, 12 + 4 + 3]  # files without logp_cells: canvas 30
    p.logp_cells = np.array([7, 8, 9], np.uint16)  # what rescore counted (any canvas) wins
    assert scored_cells(p, group_candidates(p)).tolist() == [7, 8, 9]


@settings(max_examples=50, deadline=None)
@given(scores=st.lists(st.floats(-500, 0), min_size=2, max_size=6), votes=st.lists(st.integers(1, 50), min_size=6,
                                                                                   max_size=6))
def test_the_vote_prior_weighs_the_same_per_cell_as_per_grid(scores, votes):
    """The rule of pipeline.inference.vote: (log p + log votes) / cells. With equal cell counts the per-cell selector must
    then rank exactly as likelihood_vote (dividing only log p would let the prior swamp a per-cell mean)."""
    writer = PredictionsWriter()
    for k, v in enumerate(votes[:len(scores)]):
        for _ in range(v):
            writer.add("t", 0, 0, 0.5, [np.full((2, 3), k, np.uint8)])
    p = writer.finish()
    groups = group_candidates(p)
    p.logp = np.asarray(scores, np.float32)[groups.member]
    p.logp_cells = np.full(len(p), 11, np.uint16)
    per_grid = [r.grid[0, 0] for r in likelihood_vote(p)[("t", 0)]]
    per_cell = likelihood_cell_vote(p)[("t", 0)]
    assert [r.grid[0, 0] for r in per_cell] == per_grid
    best = int(per_cell[0].grid[0, 0])
    assert per_cell[0].score == pytest.approx((scores[best] + np.log(votes[best])) / 11, rel=1e-5)


def test_rescoring_needs_at_least_one_candidate_and_one_view(dataset):
    predictions, _ = _votes_against_likelihood(dataset)
    for top_k, views in ((0, 2), (2, 0)):
        with pytest.raises(ValueError, match="at least 1"):
            rescore(CopyModel(), dataset, predictions, top_k=top_k, views=views, progress=False)
    with pytest.raises(ConfigError, match="predict.rescore_top_k: must be at least 1"):
        check_rescore_settings(PredictConfig(rescore_views=8, rescore_top_k=0))
    check_rescore_settings(PredictConfig(rescore_views=0, rescore_top_k=0))  # re-scoring off: no top-K needed
