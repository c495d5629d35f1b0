import csv
import json

import numpy as np
import pytest

from pipeline.data.tasks import Task
from pipeline.inference.predictions import PredictionsWriter
from submissions.score import compare_selectors, format_score, score_submission, write_score
from submissions.write import build_submission

RIGHT = {"a": [np.array([[1, 2]])], "b": [np.array([[3]])], "c": [np.array([[4]]), np.array([[5, 5], [5, 5]])]}
WRONG = [[0]]


def _submission(answers):
    """answers: task -> list of (attempt_1, attempt_2), grids as arrays or lists."""
    return {
        t: [{"attempt_1": np.asarray(a).tolist(), "attempt_2": np.asarray(b).tolist()} for a, b in pairs]
        for t, pairs in answers.items()
    }


def test_all_right():
    s = _submission({t: [(g, WRONG) for g in gs] for t, gs in RIGHT.items()})
    r = score_submission(s, RIGHT)
    assert (r.kaggle_score, r.task_score, r.pass1_score, r.pass1_task_score) == (1.0, 1.0, 1.0, 1.0)
    assert (r.num_tasks, r.num_test_outputs, r.tasks_solved) == (3, 4, 3)
    assert r.missing_tasks == [] and r.oracle_score is None


def test_all_wrong():
    s = _submission({t: [(WRONG, WRONG) for _ in gs] for t, gs in RIGHT.items()})
    r = score_submission(s, RIGHT)
    assert (r.kaggle_score, r.task_score, r.pass1_score, r.tasks_solved) == (0.0, 0.0, 0.0, 0)


def test_only_attempt_2_right():
    s = _submission({t: [(WRONG, g) for g in gs] for t, gs in RIGHT.items()})
    r = score_submission(s, RIGHT)
    assert (r.kaggle_score, r.task_score) == (1.0, 1.0)
    assert (r.pass1_score, r.pass1_task_score) == (0.0, 0.0)
    assert [row.solved_attempt_1 for row in r.rows] == [0, 0, 0]


def test_half_right_two_test_task_separates_the_averages():
    # a right, b wrong, c: first test right, second wrong -> 2/4 test outputs, tasks (1 + 0 + 0.5) / 3.
    s = _submission({"a": [(RIGHT["a"][0], WRONG)], "b": [(WRONG, WRONG)], "c": [(RIGHT["c"][0], WRONG), (WRONG, WRONG)]})
    r = score_submission(s, RIGHT)
    assert r.kaggle_score == pytest.approx(2 / 4)
    assert r.task_score == pytest.approx(1.5 / 3)
    assert r.tasks_solved == 1
    row_c = next(row for row in r.rows if row.task_id == "c")
    assert (row_c.n_test, row_c.solved, row_c.score) == (2, 1, 0.5)


def test_shape_must_match_exactly():
    s = _submission({"a": [([[1], [2]], [[1, 2, 0]])]})
    assert score_submission(s, {"a": RIGHT["a"]}).kaggle_score == 0.0


def test_missing_tasks_scored_wrong_and_named():
    s = _submission({"a": [(RIGHT["a"][0], WRONG)], "zz": [(WRONG, WRONG)]})
    r = score_submission(s, RIGHT)
    assert r.missing_tasks == ["b", "c"]
    assert r.extra_tasks == ["zz"]
    assert r.kaggle_score == pytest.approx(1 / 4) and r.task_score == pytest.approx(1 / 3)
    assert "missing tasks (scored wrong): 2: b, c" in format_score(r)


def test_malformed_attempts_scored_wrong_not_raised():
    s = {"a": [{"attempt_1": [[1, 2], [3]], "attempt_2": "x"}], "b": [{"attempt_1": [[True]]}], "c": []}
    r = score_submission(s, RIGHT)
    assert r.kaggle_score == 0.0 and len(r.malformed) >= 3


def _predictions():
    w = PredictionsWriter(["a", "b", "c"])
    # a: truth wins the vote; b: truth present but outvoted to rank 3; c test 0: truth absent; c test 1: none valid.
    w.add("a", 0, [0, 1, 2], 0.5, [RIGHT["a"][0], RIGHT["a"][0], np.array([[9]])])
    w.add("b", 0, range(6), 0.5, [np.array([[1]])] * 3 + [np.array([[2]])] * 2 + [RIGHT["b"][0]])
    w.add("c", 0, [0], 0.5, [np.array([[8]])])
    w.add("c", 1, [0], 0.5, [None])
    return w.finish()


def test_oracle_and_truth_ranks():
    p = _predictions()
    tasks = [Task(t, [], [np.zeros((1, 1), np.uint8)] * len(gs), None, "x") for t, gs in RIGHT.items()]
    from pipeline.inference.vote import vote

    submission, _ = build_submission(tasks, vote(p))
    r = score_submission(submission, RIGHT, p)
    ranks = {row.task_id: row.truth_rank for row in r.rows}
    assert ranks == {"a": [1], "b": [3], "c": [None, None]}
    assert r.oracle_score == pytest.approx(2 / 4) and r.oracle_task_score == pytest.approx(2 / 3)
    assert r.kaggle_score == pytest.approx(1 / 4)  # voting costs task b
    assert "oracle" in format_score(r)
    reports = compare_selectors(p, tasks, RIGHT)
    assert reports["vote"].kaggle_score == pytest.approx(1 / 4)


def test_write_score(tmp_path):
    p = _predictions()
    s = _submission({"a": [(RIGHT["a"][0], WRONG)]})
    r = score_submission(s, RIGHT, p)
    write_score(r, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "score.json").read_text())
    assert data["kaggle_score"] == pytest.approx(0.25) and data["missing_tasks"] == ["b", "c"]
    with open(tmp_path / "out" / "score_per_task.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["task_id"] for row in rows] == ["a", "b", "c"]
    assert rows[0]["solved"] == "1" and rows[1]["truth_rank"] == "3" and rows[2]["truth_rank"] == "-;-"
    assert rows[1]["missing"] == "1"
