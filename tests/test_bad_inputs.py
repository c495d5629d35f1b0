"""Bad input of every kind, through the command line: one table of cases (the first probe: issue 9).

How a row is run and checked: tests/badinput.py. The second probe's classes (issue 19) have tables of their own
beside this one: test_bad_inputs_force.py (check before you destroy), test_bad_inputs_settings.py (one validation
path for settings and files), test_bad_inputs_runs.py (resume, scoring, fingerprints, --stage all, logs).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from badinput import (GOOD_TASK, SMALL, Case, Ws, augment_new, edit_checkpoint, fake_disk_full, run_case,
                      submission_of, task_folder, truth_of)
from pipeline.run import cli
from pipeline.cli.runfolder import RunLock
from tiny import tiny_overrides


# ---------------------------------------------------------------------------------------------------- helpers
def score_file(ws: Ws, submission: Path, *extra: str) -> list[str]:
    return ["--stage", "score", "--submission", str(submission), "--solutions", "arc-agi-1/evaluation", *extra]


def replace_checkpoint(ws: Ws, content: bytes | None = None, folder: bool = False) -> Path:
    """Make the run's latest checkpoint something else (it stays the latest)."""
    path = ws.latest
    path.unlink()
    if folder:
        path.mkdir()
    else:
        path.write_bytes(content or b"")
    return path


def _saved(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def fake_full_append(ws: Ws) -> None:
    """Appending to metrics.jsonl (a plain append, not an atomic write) fails as on a full disk."""
    import builtins

    import pipeline.core.tracking
    import pipeline.training.train

    def full_open(file, mode="r", *a, **kw):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return builtins.open(file, mode, *a, **kw)

    for module in (pipeline.training.train, pipeline.core.tracking):  # the rows are appended by pipeline.core.tracking.log_row
        ws.monkeypatch.setattr(module, "open", full_open, raising=False)


def hold_lock(ws: Ws) -> None:
    ws.held.append(RunLock(ws.run).acquire())  # another writer (a second open file: flock refuses it too)


def scored_submission(ws: Ws, attempt: object, extra_entries: int = 0) -> Path:
    """The run's submission with one task's attempt_1 replaced (and optional extra entries)."""
    sub = submission_of(ws)
    task_id, _ = truth_of(ws)
    sub[task_id][0]["attempt_1"] = attempt
    sub[task_id] += [{"attempt_1": [[0]], "attempt_2": [[0]]}] * extra_entries
    return ws.file("sub/submission.json", sub)


def check_malformed(task_word: str) -> Callable[[Ws, str, str], None]:
    def check(ws: Ws, out: str, err: str) -> None:
        report = json.loads((ws.root / "sub" / "score.json").read_text())
        task_id, _ = truth_of(ws)
        row = next(r for r in report["rows"] if r["task_id"] == task_id)
        assert row["solved_attempt_1"] == 0 and row["malformed"] >= 1, "a malformed attempt scored or went uncounted"
        assert any(task_id in m and task_word in m for m in report["malformed"]), report["malformed"]
        assert "malformed attempts" in out
    return check


def _nested(depth: int) -> list:
    value: list = [0]
    for _ in range(depth):
        value = [value]
    return value


def bool_twin(grid: list) -> list:
    """The grid with its 1s written as JSON true (equal in Python, invalid in ARC)."""
    return [[True if v == 1 else v for v in row] for row in grid]


def with_a_one(ws: Ws) -> Path:
    """A submission whose attempt_1 is the truth with 1s written as booleans (a truth holding a 1 is chosen)."""
    from pipeline.data.tasks import load_solutions

    sols = load_solutions("arc-agi-1/evaluation")
    sub = submission_of(ws)
    task_id = next((t for t in sorted(sub) if any(1 in row for row in sols[t][0].tolist())), None)
    if task_id is None:  # no truth holds a 1: use a submission of our own
        task_id, truth = "00576224", sols["00576224"][0].tolist()
        sub = {task_id: [{"attempt_1": truth, "attempt_2": truth} for _ in sols[task_id]]}
    truth = sols[task_id][0].tolist()
    sub[task_id][0]["attempt_1"] = bool_twin(truth)
    sub[task_id][0]["attempt_2"] = bool_twin(truth)
    ws.file("sub/submission.json", sub)
    (ws.root / "sub" / "task").write_text(task_id)
    return ws.root / "sub" / "submission.json"


def check_bool_not_scored(ws: Ws, out: str, err: str) -> None:
    task_id = (ws.root / "sub" / "task").read_text()
    report = json.loads((ws.root / "sub" / "score.json").read_text())
    row = next(r for r in report["rows"] if r["task_id"] == task_id)
    assert row["solved"] == 0 and any(task_id in m and "bool" in m for m in report["malformed"])


# ---------------------------------------------------------------------------------------------------- the cases
def _checkpoint_cases() -> list[Case]:
    kinds = {  # kind: (how the latest checkpoint is replaced, what the error says)
        "empty": (lambda ws: replace_checkpoint(ws, b""), "empty file"),
        "truncated": (lambda ws: replace_checkpoint(ws, ws.latest.read_bytes()[:300]), "not a zip archive"),
        "json": (lambda ws: replace_checkpoint(ws, b'{"step": 4}'), "not a zip archive"),
        "folder": (lambda ws: replace_checkpoint(ws, folder=True), "is a folder"),
        "evil-pickle": (lambda ws: replace_checkpoint(ws, __import__("pickle").dumps(Evil(), protocol=2)), "not a zip archive"),
        "random-bytes": (lambda ws: replace_checkpoint(ws, bytes(range(256)) * 20), "not a zip archive"),
        "zip-with-code": (lambda ws: replace_checkpoint(ws, _saved(Evil())), "never loaded"),
    }
    cases = []
    for kind, (make, problem) in kinds.items():
        def predict(ws, make=make):
            make(ws)
            return ws.run_args("predict")

        def resume(ws, make=make):
            make(ws)
            return ws.run_args("train", "--resume")

        def all_(ws, make=make):
            make(ws)
            return ws.run_args("all")

        needles = lambda ws, problem=problem: (ws.latest.name, "checkpoint", problem)  # noqa: E731
        cases += [Case(f"checkpoint-{kind}-predict", predict, needles),
                  Case(f"checkpoint-{kind}-resume", resume, needles),
                  Case(f"checkpoint-{kind}-stage-all", all_, needles)]
    return cases


def _other_dataset(ws: Ws) -> list[str]:
    """Item 8: a checkpoint trained on another (bigger) dataset."""
    path = edit_checkpoint(ws, ws.latest, lambda s: (s.__setitem__("dataset_fingerprint", "f" * 64),
                                                   s["config"]["model"].__setitem__("num_puzzle_identifiers", 999)),
                           out=ws.root / "other.pt")
    return ws.run_args("predict", "--checkpoint", str(path))


def _old_checkpoint_other_size(ws: Ws) -> list[str]:
    path = edit_checkpoint(ws, ws.latest, lambda s: (s.pop("dataset_fingerprint"),
                                                   s["config"]["model"].__setitem__("num_puzzle_identifiers", 999)),
                           out=ws.root / "old.pt")
    return ws.run_args("predict", "--checkpoint", str(path))


def _retrain_over_old(ws: Ws) -> list[str]:
    """Item 1: training again in a folder holding another run's checkpoints, without --resume."""
    return ws.run_args("train", *tiny_overrides(max_steps=2, checkpoint_every=1))


def _foreign(ws: Ws, stage: str, *extra: str) -> list[str]:
    """Item 2: --out is a folder of unrelated files that happen to look like a run."""
    foreign = ws.root / "mine"
    ws.file("mine/dataset/manifest.json", {"mine": True})
    ws.file("mine/config.json", {"mine": True})
    ws.file("mine/checkpoints/step_5000.pt", b"junk")
    ws.file("mine/notes.txt", "my notes")
    return ["--stage", stage, "--out", str(foreign), "--preset", "demo", "--quiet", *extra]


def _busy(ws: Ws, stage: str) -> list[str]:
    """Item 3: a second writer while the first holds the folder."""
    hold_lock(ws)
    return ws.run_args(stage)


def _check_filtered_listed(ws: Ws, out: str, err: str) -> None:
    manifest = json.loads((ws.root / "new" / "dataset" / "manifest.json").read_text())
    big = [t["task_id"] for t in manifest["too_big"]]
    assert "big" in big, manifest["too_big"]
    assert "over data.max_side" in out


def _check_skip_listed(name: str, problem: str) -> Callable[[Ws, str, str], None]:
    def check(ws: Ws, out: str, err: str) -> None:
        manifest = json.loads((ws.root / "new" / "dataset" / "manifest.json").read_text())
        assert manifest["num_puzzles"] == 1  # the valid task beside it was kept
        assert any(name in s["file"] and problem in s["reason"] for s in manifest["skipped"]), manifest["skipped"]
        assert f"skipped file {ws.root / 'tasks' / name}" in err and "task None" not in err
    return check


def _score_to_other_out(ws: Ws) -> list[str]:
    """Item 5: --out is honoured; the submission's own folder keeps its score.json."""
    return score_file(ws, ws.run / "submission.json", "--out", str(ws.root / "elsewhere"))


def _check_score_out(ws: Ws, out: str, err: str) -> None:
    assert (ws.root / "elsewhere" / "score.json").exists()
    assert (ws.run / "score.json").read_bytes() == (ws.root / "before_score.json").read_bytes()


def _csv_formula(ws: Ws) -> list[str]:
    sub = {"=HYPERLINK(\"http://x\")": [{"attempt_1": [[1]], "attempt_2": [[1]]}]}
    ws.file("sols_solutions.json", {"=HYPERLINK(\"http://x\")": [[[1]]], "+cmd": [[[2]]]})
    return ["--stage", "score", "--submission", str(ws.file("sub/submission.json", sub)),
            "--solutions", str(ws.root / "sols_solutions.json")]


def _check_csv(ws: Ws, out: str, err: str) -> None:
    import csv

    rows = list(csv.reader((ws.root / "sub" / "score_per_task.csv").read_text().splitlines()))[1:]
    assert sorted(r[0] for r in rows) == ["'+cmd", "'=HYPERLINK(\"http://x\")"]


def _stale_tmp(ws: Ws) -> list[str]:
    ws.file("run/.config.json.abc123.tmp", "half a file")
    ws.file("run/checkpoints/.step_00000006.pt.xyz.tmp", b"half a checkpoint")
    return ws.run_args("submit")


def _check_no_tmp(ws: Ws, out: str, err: str) -> None:
    assert not list(ws.run.rglob("*.tmp"))


CASES: list[Case] = [
    # --- data lost or corrupted (issue items 1-8)
    Case("item1-retrain-over-old-checkpoints", _retrain_over_old, ("already holds checkpoints", "--resume", "--force")),
    Case("item2-foreign-out-augment", lambda ws: _foreign(ws, "augment", *SMALL), ("mine", "not a run folder", "notes.txt")),
    Case("item2-foreign-out-train", lambda ws: _foreign(ws, "train"), ("mine", "not a run folder")),
    Case("item2-foreign-out-predict", lambda ws: _foreign(ws, "predict"), ("mine", "not a run folder")),
    Case("item2-foreign-out-all", lambda ws: _foreign(ws, "all"), ("mine", "not a run folder")),
    Case("item3-busy-augment", lambda ws: _busy(ws, "augment"), ("busy", f"pid {os.getpid()}")),
    Case("item3-busy-train", lambda ws: _busy(ws, "train"), ("busy", "pid")),
    Case("item3-busy-submit", lambda ws: _busy(ws, "submit"), ("busy", "pid")),
    Case("item4-bool-attempt-not-right", lambda ws: score_file(ws, with_a_one(ws)), (), rc=0,
         check=check_bool_not_scored),
    Case("item4-value-11-flagged", lambda ws: score_file(ws, scored_submission(ws, [[11]])), (), rc=0,
         check=check_malformed("colour 0-9")),
    Case("item4-negative-flagged", lambda ws: score_file(ws, scored_submission(ws, [[-1, 0]])), (), rc=0,
         check=check_malformed("colour 0-9")),
    Case("attempt-cell-nested-500-deep", lambda ws: score_file(ws, scored_submission(ws, [[_nested(500)]])),
         (), rc=0, check=check_malformed("[[[...]]]")),
    Case("item4-extra-entries-flagged", lambda ws: score_file(ws, scored_submission(ws, [[0]], extra_entries=2)),
         (), rc=0, check=check_malformed("entries")),
    Case("item5-score-out-honoured",
         lambda ws: (shutil.copy(ws.run / "score.json", ws.root / "before_score.json"), _score_to_other_out(ws))[1],
         (), rc=0, check=_check_score_out),
    Case("item6-duplicate-task-key", lambda ws: augment_new(ws, ws.file(
        "x_challenges.json", '{"dup": %s, "dup": %s}' % (json.dumps(GOOD_TASK), json.dumps(GOOD_TASK)))),
        ("x_challenges.json", "'dup' appears twice")),
    Case("item7-filtered-by-max-side-listed", lambda ws: augment_new(ws, task_folder(ws, {
        "small.json": GOOD_TASK, "big.json": {**GOOD_TASK, "test": [{"input": [[1] * 9], "output": [[1] * 9]}]}})),
        (), rc=0, check=_check_filtered_listed),
    Case("item8-checkpoint-of-another-dataset", _other_dataset, ("other.pt", "another dataset", "--init")),
    Case("item8-old-checkpoint-other-size", _old_checkpoint_other_size, ("old.pt", "999 puzzle embeddings")),
    # --- tracebacks: checkpoints (6 kinds x predict / resume / all)
    *_checkpoint_cases(),
    Case("checkpoint-not-resumable", lambda ws: (edit_checkpoint(ws, ws.latest, lambda s: s.pop("optimizer")),
                                                 ws.run_args("train", "--resume"))[1],
         ("step_00000004.pt", "missing optimizer")),
    Case("checkpoint-missing-file", lambda ws: ws.run_args("predict", "--checkpoint", str(ws.root / "nope.pt")),
         ("nope.pt", "no such file")),
    # --- tracebacks: deep nesting and huge numbers
    Case("deep-nesting-task-strict", lambda ws: augment_new(ws, task_folder(ws, {
        "deep.json": "[" * 100_000 + "]" * 100_000}), "--strict"), ("deep.json", "nested too deeply")),
    Case("deep-nesting-task-skipped", lambda ws: augment_new(ws, task_folder(ws, {
        "deep.json": "[" * 100_000 + "]" * 100_000, "good.json": GOOD_TASK})), (), rc=0,
        check=_check_skip_listed("deep.json", "nested too deeply")),
    Case("huge-int-task-strict", lambda ws: augment_new(ws, task_folder(ws, {
        "huge.json": '{"train": [{"input": [[%s]], "output": [[1]]}], "test": []}' % ("9" * 5000)}), "--strict"),
        ("huge.json", "5000 digits")),
    Case("huge-int-task-skipped", lambda ws: augment_new(ws, task_folder(ws, {
        "huge.json": '{"train": [{"input": [[%s]], "output": [[1]]}], "test": []}' % ("9" * 5000),
        "good.json": GOOD_TASK})), (), rc=0, check=_check_skip_listed("huge.json", "digits")),
    Case("big-int-value-named-short", lambda ws: augment_new(ws, task_folder(ws, {
        "big.json": '{"train": [{"input": [[%s]], "output": [[1]]}], "test": [{"input": [[1]]}]}' % ("9" * 3000)}),
        "--strict"), ("big.json", "'big'", "train[0].input", "...")),
    Case("deep-nesting-submission", lambda ws: score_file(ws, ws.file("s.json", "[" * 100_000 + "]" * 100_000)),
         ("s.json", "nested too deeply")),
    # --- tracebacks: disk full
    Case("disk-full-augment-marker", lambda ws: (fake_disk_full(ws, 100),
                                                 augment_new(ws, task_folder(ws, {"g.json": GOOD_TASK})))[1],
         ("no space left on device", "run.json")),
    Case("disk-full-augment-dataset", lambda ws: (fake_disk_full(ws, 100, names=("grids.npz",)),
                                                  augment_new(ws, task_folder(ws, {"g.json": GOOD_TASK})))[1],
         ("no space left on device", "grids.npz")),
    Case("disk-full-train-checkpoint",
         lambda ws: (fake_disk_full(ws, 2000, names=("step_",)),
                     ws.run_args("train", "--force", *tiny_overrides(max_steps=2, checkpoint_every=1)))[1],
         ("no space left on device", "step_00000001.pt"), unchanged=False),
    Case("disk-full-train-metrics",
         lambda ws: (fake_full_append(ws), ws.run_args("train", "--force", *tiny_overrides(max_steps=2)))[1],
         ("no space left on device", "metrics.jsonl"), unchanged=False),
    Case("disk-full-submit", lambda ws: (fake_disk_full(ws, 10), ws.run_args("submit"))[1],
         ("no space left on device", "submission.json")),
    Case("disk-full-score", lambda ws: (fake_disk_full(ws, 10), ws.run_args("score"))[1],
         ("no space left on device", "score")),
    Case("disk-full-report", lambda ws: (fake_disk_full(ws, 10), ws.run_args("report"))[1],
         ("no space left on device", "report.html")),
    # --- tracebacks: report and --out
    Case("report-submission-is-a-list", lambda ws: (ws.file("run/submission.json", [1, 2]), ws.run_args("report"))[1],
         ("submission.json", "(got list)")),
    Case("out-is-a-file-report", lambda ws: ["--stage", "report", "--out", str(ws.file("f.txt", "x"))], ("f.txt", "is a file")),
    Case("out-is-a-file-augment", lambda ws: ["--stage", "augment", "--preset", "demo", "--out", str(ws.file("f.txt", "x"))],
         ("f.txt", "is a file")),
    Case("out-is-a-file-score", lambda ws: score_file(ws, ws.run / "submission.json", "--out", str(ws.file("f.txt", "x"))),
         ("f.txt", "is a file")),
    # --- misleading answers
    Case("lone-surrogate-task-id-strict", lambda ws: augment_new(ws, ws.file(
        "s_challenges.json", '{"a\\ud800": %s}' % json.dumps(GOOD_TASK)), "--strict"), ("s_challenges.json", "Unicode")),
    Case("lone-surrogate-task-id-skipped", lambda ws: augment_new(ws, ws.file(
        "s_challenges.json", '{"a\\ud800": %s, "ok": %s}' % (json.dumps(GOOD_TASK), json.dumps(GOOD_TASK)))),
        (), rc=0, check=lambda ws, out, err: (
            json.loads((ws.root / "new" / "dataset" / "manifest.json").read_text())["num_puzzles"] == 1 or
            pytest.fail("the valid task was lost"))),
    Case("lone-surrogate-submission-key", lambda ws: score_file(ws, ws.file("s.json", '{"a\\udc00": []}')),
         ("s.json", "Unicode")),
    Case("solutions-empty-object", lambda ws: ["--stage", "score", "--submission", str(ws.run / "submission.json"),
                                               "--solutions", str(ws.file("e_solutions.json", {}))],
         ("e_solutions.json", "nothing to score")),
    Case("canvas-0", lambda ws: augment_new(ws, task_folder(ws, {"g.json": GOOD_TASK}), "--canvas", "0"),
         ("data.canvas", "at least 1")),
    Case("predict-batch-size-0", lambda ws: ws.run_args("predict", "--set", "predict.batch_size=0"),
         ("predict.batch_size", "at least 1")),
    Case("num-aug-negative", lambda ws: augment_new(ws, "arc-agi-1/training", "--num-aug", "-1"),
         ("data.num_aug", "at least 0")),
    Case("init-missing", lambda ws: ws.run_args("train", "--force", "--init", str(ws.root / "nope.pt")),
         ("nope.pt", "no such file")),
    Case("init-truncated", lambda ws: ws.run_args("train", "--force", "--init", str(ws.file("t.pt", b"PK\x03\x04"))),
         ("t.pt", "not a zip archive")),
    Case("train-data-not-a-dataset", lambda ws: ws.run_args("train", "--data", str(ws.root)),
         ("--data", "no augmented dataset")),
    Case("score-predictions-missing", lambda ws: ws.run_args("score", "--predictions", str(ws.root / "p.npz")),
         ("p.npz", "no such file")),
    Case("canvas-1-nothing-fits", lambda ws: augment_new(ws, task_folder(ws, {"g.json": GOOD_TASK}), "--canvas", "1"),
         ("no task left", "data.canvas=1")),
    Case("set-num-aug-not-a-number", lambda ws: augment_new(ws, "arc-agi-1/training", "--set", "data.num_aug=abc"),
         ("data.num_aug", "abc")),
    Case("set-unknown-key", lambda ws: augment_new(ws, "arc-agi-1/training", "--set", "data.nmu_aug=3"),
         ("data.nmu_aug", "unknown setting")),
    Case("set-bad-bool", lambda ws: augment_new(ws, "arc-agi-1/training", "--set", "ema=maybe"), ("ema", "maybe")),
    Case("set-without-equals", lambda ws: augment_new(ws, "arc-agi-1/training", "--set", "lr"), ("lr", "key=value")),
    Case("report-truncated-submission",
         lambda ws: (ws.file("run/submission.json", (ws.run / "submission.json").read_text()[:40]),
                     ws.run_args("report"))[1], ("submission.json", "truncated")),
    Case("score-non-utf8-submission", lambda ws: score_file(ws, ws.file("s.json", b'{"a": "\xff\xfe"}')),
         ("s.json", "not UTF-8")),
    Case("score-empty-submission", lambda ws: score_file(ws, ws.file("s.json", "")), ("s.json", "empty file")),
    Case("score-submission-is-a-folder", lambda ws: score_file(ws, ws.root / "sub_dir") if (ws.root / "sub_dir").mkdir()
         is None else [], ("sub_dir", "is a folder")),
    Case("score-submission-missing", lambda ws: score_file(ws, ws.root / "none.json"), ("none.json", "no such file")),
    Case("score-submission-not-json", lambda ws: score_file(ws, ws.file("s.json", "{not json")), ("s.json", "not valid JSON")),
    Case("score-submission-duplicate-key", lambda ws: score_file(ws, ws.file("s.json", '{"a": [], "a": []}')),
         ("s.json", "appears twice")),
    Case("score-submission-is-a-number", lambda ws: score_file(ws, ws.file("s.json", "5")), ("s.json", "(got int)")),
    Case("score-without-solutions", lambda ws: ["--stage", "score", "--submission", str(
        ws.file("sub/submission.json", submission_of(ws)))], ("--solutions",)),
    Case("solutions-file-broken", lambda ws: ["--stage", "score", "--submission", str(ws.run / "submission.json"),
                                              "--solutions", str(ws.file("b_solutions.json", "{"))],
         ("b_solutions.json", "not valid JSON")),
    Case("solutions-file-wrong-shape", lambda ws: ["--stage", "score", "--submission", str(ws.run / "submission.json"),
                                                   "--solutions", str(ws.file("w_solutions.json", {"a": 5}))],
         ("w_solutions.json", "'a'", "not a list of grids")),
    Case("path-with-a-comma", lambda ws: augment_new(ws, task_folder(ws, {"g.json": GOOD_TASK}, name="a,b")), (),
         rc=0, check=lambda ws, out, err: (ws.root / "new" / "dataset" / "manifest.json").exists() or pytest.fail()),
    Case("skip-line-names-the-file", lambda ws: augment_new(ws, task_folder(ws, {
        "broken.json": "{", "good.json": GOOD_TASK})), (), rc=0, check=_check_skip_listed("broken.json", "JSON")),
    Case("stale-tmp-files-removed", _stale_tmp, (), rc=0, check=_check_no_tmp),
    Case("csv-formula-neutralised", _csv_formula, (), rc=0, check=_check_csv),
    # --- a run folder is one configuration (issue 9, item 4)
    Case("preset-conflicts-with-folder", lambda ws: ws.run_args("train", "--preset", "arc1"),
         ("made with --preset demo", "--preset arc1", "--force augment")),
    Case("preset-conflicts-at-augment", lambda ws: ws.run_args("augment", "--preset", "arc1"),
         ("made with --preset demo", "--preset arc1")),
    Case("data-setting-conflicts-at-train", lambda ws: ws.run_args("train", "--resume", "--set", "data.num_aug=5"),
         ("data.num_aug=2", "data.num_aug=5")),
    Case("canvas-conflicts-at-predict", lambda ws: ws.run_args("predict", "--canvas", "8"),
         ("data.canvas=6", "data.canvas=8")),
    Case("sources-conflict-at-all", lambda ws: ws.run_args("all", "--data", "arc-agi-2/evaluation"),
         ("data.sources", "arc-agi-2/evaluation")),
    Case("new-folder-without-preset", lambda ws: ["--stage", "augment", "--out", str(ws.root / "new"),
                                                  "--data", "arc-agi-1/training"], ("new", "--preset")),
    Case("no-out-no-preset", lambda ws: ["--stage", "augment", "--data", "arc-agi-1/training"], ("--out",)),
    Case("broken-run-marker", lambda ws: (ws.file("run/run.json", "{"), ws.run_args("submit"))[1],
         ("run.json", "unreadable")),
    Case("dataset-changed-since-augment",
         lambda ws: (ws.file("run/dataset/puzzles.json", "[]"), ws.run_args("predict"))[1],
         ("dataset", "changed since augment")),
    Case("stage-needs-a-run-folder", lambda ws: ["--stage", "predict", "--out", str(ws.root / "empty")],
         ("empty", "not a run folder")),
    Case("force-unknown-stage", lambda ws: ws.run_args("all", "--force", "everything"), ("--force everything",)),
    Case("force-another-stage", lambda ws: ws.run_args("train", "--force", "augment"),
         ("--force augment", "--stage train")),
    Case("unknown-selector", lambda ws: ws.run_args("submit", "--selector", "best"), ("best", "selector")),
    Case("predictions-file-broken", lambda ws: (ws.file("run/predictions.npz", b"PK\x03\x04junk"),
                                                ws.run_args("submit"))[1], ("predictions.npz",)),
    Case("bad-task-file-strict", lambda ws: augment_new(ws, task_folder(ws, {
        "ragged.json": {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]}}),
        "--strict"), ("ragged.json", "'ragged'", "train[0].input", "rows have different lengths")),
    Case("task-value-bool-strict", lambda ws: augment_new(ws, task_folder(ws, {
        "b.json": {"train": [{"input": [[True]], "output": [[1]]}], "test": [{"input": [[1]]}]}}), "--strict"),
        ("b.json", "True", "not an integer 0-9")),
    Case("no-task-loadable", lambda ws: augment_new(ws, task_folder(ws, {"x.json": "[]"})),
         ("x.json", "no task could be loaded")),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base_run: Path, tmp_path: Path, capsys, monkeypatch):
    run_case(case, base_run, tmp_path, capsys, monkeypatch)


# ---------------------------------------------------------------------------------------------------- beyond the table
def test_force_train_replaces_another_runs_checkpoints_and_predict_uses_the_new_ones(base_run: Path, tmp_path: Path,
                                                                                      capsys):
    """Item 1 end to end: a folder holding steps 10 and 20 of an older run; retraining 4 steps with --force leaves
    only the new run's steps 2 and 4, and predict uses step 4."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    ckpts = run / "checkpoints"
    for old, new in zip(sorted(ckpts.glob("step_*.pt")), ("step_00000010.pt", "step_00000020.pt")):
        old.rename(ckpts / new)
    argv = ["--stage", "train", "--out", str(run), "--quiet", *tiny_overrides(max_steps=4, checkpoint_every=2)]
    assert cli(argv) == 2  # refused without --resume / --force
    assert cli(argv + ["--force"]) == 0
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    assert cli(["--stage", "predict", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()


def test_checkpoint_cleanup_never_removes_a_newer_step(tmp_path: Path):
    from pipeline.training.checkpoint import list_checkpoints, save_training_state

    (tmp_path / "step_00000020.pt").write_bytes(b"someone else's")
    for step in (1, 2, 3):
        save_training_state(tmp_path / f"step_{step:08d}.pt", {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt", "step_00000020.pt"]


def test_old_checkpoint_without_fingerprint_of_the_same_size_predicts_with_a_warning(base_run: Path, tmp_path: Path,
                                                                                     capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    latest = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(latest, weights_only=True)
    del state["dataset_fingerprint"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="no dataset fingerprint"):
        assert cli(["--stage", "predict", "--out", str(run), "--checkpoint", str(tmp_path / "old.pt"), "--quiet"]) == 0


def test_the_lock_is_per_process_and_gone_with_it(base_run: Path, tmp_path: Path):
    """Another process holding the folder makes this one busy; once it exits (here: killed), the folder is free."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.cli.runfolder import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"busy.*pid {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    RunLock(run).acquire().release()


def test_force_augment_rebuilds_with_new_settings_and_old_checkpoints_are_refused(base_run: Path, tmp_path: Path,
                                                                                   capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = json.loads((run / "run.json").read_text())
    base = ["--out", str(run), "--quiet"]
    assert cli(["--stage", "augment", *base, "--num-aug", "3"]) == 2  # contradicts the folder
    assert cli(["--stage", "augment", *base, "--num-aug", "3", "--force"]) == 0
    after = json.loads((run / "run.json").read_text())
    assert after["data"]["num_aug"] == 3 and after["preset"] == "demo"
    assert after["dataset_fingerprint"] != before["dataset_fingerprint"]
    capsys.readouterr()
    assert cli(["--stage", "predict", *base]) == 2  # the checkpoints belong to the old dataset
    assert "another dataset" in capsys.readouterr().err
