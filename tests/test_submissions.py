import json

import numpy as np
import pytest

from pipeline.data.tasks import Task
from pipeline.inference.vote import Ranked
from submissions.validate import validate_submission, validate_submission_file
from submissions.write import Answer, build_submission, fallback_submission, write_submission


def _task(task_id, *shapes):
    inputs = [np.full(s, k + 1, np.uint8) for k, s in enumerate(shapes)]
    return Task(id=task_id, train=[], test_inputs=inputs, test_outputs=None, source="test")


TASKS = [_task("aa", (2, 2)), _task("bb", (1, 3), (3, 1)), _task("cc", (30, 30))]


def _ranked(*values):
    return [Ranked(grid=np.full((2, 2), v, np.uint8), votes=10 - k, mean_q=0.5, score=10 - k) for k, v in enumerate(values)]


def test_build_submission_top_two_single_and_fallback():
    ranked = {("aa", 0): _ranked(5, 6, 7), ("bb", 1): _ranked(8), ("zz", 0): _ranked(1), ("bb", 4): _ranked(1)}
    submission, report = build_submission(TASKS, ranked)
    assert list(submission) == ["aa", "bb", "cc"]
    assert submission["aa"] == [{"attempt_1": [[5, 5], [5, 5]], "attempt_2": [[6, 6], [6, 6]]}]
    assert submission["bb"][1] == {"attempt_1": [[8, 8], [8, 8]], "attempt_2": [[2], [2], [2]]}  # + the fallback
    assert submission["bb"][0] == {"attempt_1": [[1, 1, 1]], "attempt_2": [[1, 1, 1]]}  # fallback: the test input
    assert submission["cc"][0]["attempt_1"] == np.ones((30, 30), int).tolist()
    assert [(f.task_id, f.test_index) for f in report.fallbacks] == [("bb", 0), ("cc", 0)]
    assert all(f.reason for f in report.fallbacks)
    assert (report.num_tasks, report.num_test_inputs, report.num_two_attempts, report.num_one_candidate) == (3, 4, 1, 1)
    assert sorted(report.ignored) == ["bb test 4", "zz test 0"]
    assert report.answers == {"aa": [Answer.TWO], "bb": [Answer.FALLBACK, Answer.ONE], "cc": [Answer.FALLBACK]}
    assert report.summary().startswith("4 test inputs in 3 tasks: 1 two model candidates, 1 one model candidate + "
                                       "fallback, 2 fallback only")
    assert validate_submission(submission, TASKS) == []
    assert type(submission["aa"][0]["attempt_1"][0][0]) is int


def test_fallback_submission_is_complete_and_valid():
    submission = fallback_submission(TASKS)
    assert validate_submission(submission, TASKS) == []
    assert submission["bb"][1]["attempt_2"] == [[2], [2], [2]]


def test_unknown_fallback_rejected():
    with pytest.raises(ValueError, match="fallback"):
        build_submission(TASKS, {}, fallback="zeros")


def test_write_submission_compact_and_atomic(tmp_path):
    submission, _ = build_submission(TASKS, {})
    path = tmp_path / "submission.json"
    write_submission(path, submission)
    text = path.read_text()
    assert " " not in text and json.loads(text) == submission
    assert [p.name for p in tmp_path.iterdir()] == ["submission.json"]
    assert validate_submission_file(path, TASKS) == []


def _valid():
    return fallback_submission(TASKS)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s.pop("bb"), "task bb: missing"),
        (lambda s: s.update(extra=[]), "not in the challenges: extra"),
        (lambda s: s.update(aa={"attempt_1": [[1]]}), "task aa: is a dict"),
        (lambda s: s["bb"].pop(), "task bb: has 1 entries, expected 2"),
        (lambda s: s["bb"].__setitem__(1, [[1]]), "task bb test 1: is a list"),
        (lambda s: s["bb"][1].pop("attempt_2"), "task bb test 1: attempt_2 missing"),
        (lambda s: s["aa"][0].update(attempt_1=[]), "task aa test 0 attempt_1: grid has no rows"),
        (lambda s: s["aa"][0].update(attempt_1=[[]]), "task aa test 0 attempt_1: grid row 0 is empty"),
        (lambda s: s["aa"][0].update(attempt_1=[[1, 2], [3]]), "attempt_1: grid is not rectangular"),
        (lambda s: s["aa"][0].update(attempt_2=[[1, 10]]), "attempt_2: grid cell (0,1) is 10, not a colour"),
        (lambda s: s["aa"][0].update(attempt_2=[[1, -1]]), "cell (0,1) is -1"),
        (lambda s: s["aa"][0].update(attempt_2=[[True]]), "cell (0,0) is True (bool)"),
        (lambda s: s["aa"][0].update(attempt_2=[[1.0]]), "cell (0,0) is 1.0 (float)"),
        (lambda s: s["aa"][0].update(attempt_2=[["1"]]), "(str)"),
        (lambda s: s["aa"][0].update(attempt_2=[[0] * 31]), "row 0 has 31 cells"),
        (lambda s: s["aa"][0].update(attempt_2=[[0]] * 31), "has 31 rows"),
        (lambda s: s["aa"][0].update(attempt_2=5), "attempt_2: grid is a int"),
        (lambda s: s["aa"][0].update(attempt_2=[1, 2]), "row 0 is a int"),
    ],
)
def test_validator_names_each_problem(mutate, expected):
    submission = _valid()
    mutate(submission)
    problems = validate_submission(submission, TASKS)
    assert len(problems) >= 1
    assert any(expected in p for p in problems), problems


def test_validator_lists_every_problem_once_per_grid():
    submission = _valid()
    submission["aa"][0]["attempt_1"] = [["x"] * 30] * 30
    submission.pop("cc")
    problems = validate_submission(submission, TASKS)
    assert sum("attempt_1" in p for p in problems) <= 4  # capped, not 900 lines
    assert "task cc: missing" in problems


def test_validator_rejects_non_dict():
    assert "expected an object" in validate_submission([], TASKS)[0]


def test_validate_file_reports_unreadable_and_bad_json(tmp_path):
    missing = tmp_path / "nope.json"
    assert "cannot read" in validate_submission_file(missing, TASKS)[0]
    broken = tmp_path / "broken.json"
    broken.write_text('{"aa": [')
    (problem,) = validate_submission_file(broken, TASKS)
    assert "broken.json" in problem and "not valid JSON" in problem and "line 1" in problem
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"aa": _valid()["aa"]}))
    problems = validate_submission_file(partial, TASKS)
    assert all(str(partial) in p for p in problems) and len(problems) == 2
