import numpy as np

from pipeline.inference.predictions import PredictionsWriter
from pipeline.inference.vote import SELECTORS, group_candidates, max_q, q_weighted, vote

A = np.array([[1, 2], [3, 4]], np.uint8)
B = np.array([[1, 2], [3, 5]], np.uint8)
C = np.array([[1, 2, 3, 4]], np.uint8)  # same cells as A in another shape: a different answer
D = np.array([[7]], np.uint8)


def _store(rows):
    """rows: (task, test_index, q, grid or None)."""
    w = PredictionsWriter()
    for k, (task, test, q, grid) in enumerate(rows):
        w.add(task, test, k, q, [grid])
    return w.finish()


def test_vote_ranks_by_count_then_mean_q():
    p = _store([
        ("t", 0, 0.1, A), ("t", 0, 0.2, A), ("t", 0, 0.3, A),  # 3 votes, mean 0.2
        ("t", 0, 0.9, B), ("t", 0, 0.7, B),  # 2 votes, mean 0.8
        ("t", 0, 0.5, C), ("t", 0, 0.6, C),  # 2 votes, mean 0.55
        ("t", 0, 0.99, D),  # 1 vote
    ])
    ranked = vote(p)[("t", 0)]
    assert [r.votes for r in ranked] == [3, 2, 2, 1]
    assert [r.grid.tolist() for r in ranked] == [A.tolist(), B.tolist(), C.tolist(), D.tolist()]
    assert np.isclose(ranked[0].mean_q, 0.2) and np.isclose(ranked[1].mean_q, 0.8)
    assert [r.grid.tolist() for r in vote(p, top_k=2)[("t", 0)]] == [A.tolist(), B.tolist()]


def test_tie_break_flips_with_mean_q():
    p = _store([("t", 0, 0.2, A), ("t", 0, 0.2, A), ("t", 0, 0.4, B), ("t", 0, 0.4, B)])
    assert np.array_equal(vote(p)[("t", 0)][0].grid, B)
    p = _store([("t", 0, 0.6, A), ("t", 0, 0.6, A), ("t", 0, 0.4, B), ("t", 0, 0.4, B)])
    assert np.array_equal(vote(p)[("t", 0)][0].grid, A)


def test_full_tie_is_first_seen():
    p = _store([("t", 0, 0.5, B), ("t", 0, 0.5, A)])
    assert np.array_equal(vote(p)[("t", 0)][0].grid, B)


def test_invalid_candidates_ignored_and_keys_separate():
    p = _store([
        ("t", 0, 0.9, None), ("t", 0, 0.9, None), ("t", 0, 0.9, None),
        ("t", 0, 0.1, A),
        ("t", 1, 0.5, A), ("t", 1, 0.5, A),
        ("u", 0, 0.5, A),
        ("u", 1, 0.5, None),  # only invalid: no entry at all
    ])
    ranked = vote(p)
    assert set(ranked) == {("t", 0), ("t", 1), ("u", 0)}
    assert [(r.votes, r.mean_q) for r in ranked[("t", 0)]] == [(1, np.float32(0.1).item())]
    assert ranked[("t", 1)][0].votes == 2 and ranked[("u", 0)][0].votes == 1
    groups = group_candidates(p)
    assert sorted(groups.votes.tolist()) == [1, 1, 2]


def test_other_selectors_differ_as_documented():
    # A: 3 doubtful votes (sum q 0.3); B: 2 confident votes (sum q 1.8); D: one very confident vote.
    p = _store([
        ("t", 0, 0.1, A), ("t", 0, 0.1, A), ("t", 0, 0.1, A),
        ("t", 0, 0.9, B), ("t", 0, 0.9, B),
        ("t", 0, 0.95, D),
    ])
    assert [r.grid.tolist() for r in vote(p)[("t", 0)]] == [A.tolist(), B.tolist(), D.tolist()]
    assert [r.grid.tolist() for r in q_weighted(p)[("t", 0)]] == [B.tolist(), D.tolist(), A.tolist()]
    assert [r.grid.tolist() for r in max_q(p)[("t", 0)]] == [D.tolist(), B.tolist(), A.tolist()]
    assert np.isclose(q_weighted(p)[("t", 0)][0].score, 1.8)
    assert set(SELECTORS) >= {"vote", "q_weighted", "max_q"}


def test_returned_grids_are_copies():
    p = _store([("t", 0, 0.5, A)])
    g = vote(p)[("t", 0)][0].grid
    g[0, 0] = 9
    assert p.grid(0)[0, 0] == 1


def test_empty_predictions():
    assert vote(PredictionsWriter(["t"]).finish()) == {}
