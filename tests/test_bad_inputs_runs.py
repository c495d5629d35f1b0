"""What a run folder holds is what runs (issue 19, classes 3-7): a resumed run takes its own settings and says
which ones the command line changed (refusing those it could not continue with); a run is scored on every task it
held out; a checkpoint or predictions file of another dataset is refused; `--stage all` finishes what it can; the
training log is read forgivingly and never loses a row to a torn line. The resume rows check the steps run and the
settings used, not only the exit status.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from badinput import GOOD_TASK, SMALL, Case, Ws, run_case, submission_of, task_folder, truth_of
from pipeline.run import cli
from tiny import tiny_overrides


def killed_at(ws: Ws, step: int, torn: bool = False) -> None:
    """The run as a kill right after its checkpoint at `step` leaves it: later checkpoints, evaluations, log rows
    and every later stage's file gone; with `torn`, a log row cut off mid-write at the end."""
    for path in (ws.run / "checkpoints").rglob("step_*.pt"):
        if int(path.stem.split("_")[1]) > step:
            path.unlink()
    log = ws.run / "metrics.jsonl"
    rows = [line for line in log.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    log.write_text("".join(rows) + ('{"kind": "train", "step": 3, "epoch": 0.3, "lo' if torn else ""))
    for name in ("predictions.npz", "submission.json", "submission_report.json", "score.json", "score_per_task.csv",
                 "report.html"):
        (ws.run / name).unlink()


def resume(step: int, *extra: str, torn: bool = False, stage: str = "train") -> Callable[[Ws], list[str]]:
    def setup(ws: Ws) -> list[str]:
        killed_at(ws, step, torn)
        return ws.run_args(stage, *(["--resume"] if stage == "train" else []), *extra)
    return setup


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def ran(steps: list[int], said: str = "", **used: Any) -> Callable[[Ws, str, str], None]:
    """The checkpoints left are `steps`, the last one final; it and config.json hold the settings `used` (dots
    written as __); stdout says `said`."""
    def check(ws: Ws, out: str, err: str) -> None:
        names = sorted(p.name for p in (ws.run / "checkpoints").glob("step_*.pt"))
        assert names == [f"step_{s:08d}.pt" for s in steps], names
        last = torch.load(ws.run / "checkpoints" / names[-1], weights_only=True, mmap=True)
        assert last["step"] == steps[-1] and last["final"]
        for config in (flat(last["config"]), flat(json.loads((ws.run / "config.json").read_text()))):
            for key, value in used.items():
                assert config[key.replace("__", ".")] == value, (key, config[key.replace("__", ".")])
        assert f"resumed from {ws.run / 'checkpoints' / 'step_00000002.pt'} at step 2" in out
        assert said in out
    return check


def log_rows_kept(ws: Ws, out: str, err: str) -> None:
    lines = (ws.run / "metrics.jsonl").read_text().splitlines()
    torn = [line for line in lines if line.endswith('"lo')]
    assert len(torn) == 1, lines  # the torn row stays on a line of its own, and nothing else is torn
    steps = [json.loads(line)["step"] for line in lines if line not in torn]
    assert steps == [2, 4, 4], steps  # step 2 from before the kill; step 4's train and eval rows after it


def force_augment_kept_settings(ws: Ws, out: str, err: str) -> None:
    before, after = (json.loads(p.read_text()) for p in (ws.root / "run.json.before", ws.run / "run.json"))
    assert after["data"] == before["data"] and after["dataset_fingerprint"] == before["dataset_fingerprint"]
    assert cli(ws.run_args("predict")) == 0  # the checkpoints still belong to the (same) dataset


def cut_down_submission(ws: Ws) -> list[str]:
    """The run's submission cut down to one task, answered right."""
    task_id, truth = truth_of(ws)
    entries = [{"attempt_1": truth, "attempt_2": truth}] + submission_of(ws)[task_id][1:]
    ws.file("run/submission.json", {task_id: entries})
    return ws.run_args("score")


def scored_on_every_held_out_task(ws: Ws, out: str, err: str) -> None:
    from augment.dataset import AugmentedDataset

    held_out = {t.id: len(t.test_outputs) for t in AugmentedDataset.load(ws.run / "dataset").eval_tasks()}
    task_id, _ = truth_of(ws)
    report = json.loads((ws.run / "score.json").read_text())
    assert report["num_tasks"] == len(held_out) >= 2
    assert sorted(report["missing_tasks"]) == sorted(set(held_out) - {task_id})
    assert report["kaggle_score"] < 1 and report["num_test_outputs"] == sum(held_out.values())


def rebuilt(ws: Ws) -> None:
    """The run's dataset rebuilt with another seed (same tasks and sizes, other augmentations)."""
    assert cli(ws.run_args("augment", "--force", *SMALL, "--seed", "1")) == 0


def evaluated_weights_after_rebuild(ws: Ws) -> list[str]:
    rebuilt(ws)
    return ws.run_args("predict", "--checkpoint", str(ws.run / "checkpoints" / "evaluated" / "step_00000004.pt"))


def predictions_of_other_tasks(ws: Ws) -> list[str]:
    from pipeline.inference.predictions import PredictionsWriter

    writer = PredictionsWriter(["zzzzzzzz"])
    writer.add("zzzzzzzz", 0, 0, 0.5, [np.ones((2, 2), np.uint8)])
    writer.finish().save(ws.run / "predictions.npz")
    return ws.run_args("submit")


def all_without_solutions(*extra: str) -> Callable[[Ws], list[str]]:
    return lambda ws: ["--stage", "all", "--preset", "demo", "--out", str(ws.root / "new"), *SMALL,
                       *tiny_overrides(max_steps=2), *extra]


def hidden_tasks(ws: Ws) -> list[str]:
    """Kaggle-style: the held-out tasks' test outputs are unknown."""
    hidden = {"train": GOOD_TASK["train"], "test": [{"input": [[1, 1]]}]}
    folder = task_folder(ws, {"a.json": hidden, "b.json": hidden, "c.json": hidden})
    return ["--stage", "all", "--preset", "demo", "--out", str(ws.root / "new"), "--data", str(folder),
            "--eval-set", str(folder), "--canvas", "6", "--num-aug", "2", "--quiet", *tiny_overrides(max_steps=2)]


def finished_without_score(ws: Ws, out: str, err: str) -> None:
    new = ws.root / "new"
    assert "[score] skipped: the held-out tasks have no known solutions" in out
    assert (new / "submission.json").exists() and (new / "report.html").exists()
    assert not (new / "score.json").exists()


def bad_log_lines(ws: Ws) -> list[str]:
    with open(ws.run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "loss": %s}\n' % (b"9" * 401))
        f.write(b'{"step": %s, "loss": 1.0}\n' % (b"9" * 401))
        f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        f.write(b'{"step": 6, "loss": "\xff\xfe"}\n')
    (ws.run / "report.html").unlink()
    return ws.run_args("report")


def report_skips_them(ws: Ws, out: str, err: str) -> None:
    from submissions.report import read_metrics

    series, skipped = read_metrics(ws.run / "metrics.jsonl")
    assert skipped == 4 and [s for s, _ in series["loss"]] == [2, 4]
    assert (ws.run / "report.html").exists()


CASES: list[Case] = [
    # --- resume runs what was run (class 3)
    Case("resume-takes-the-runs-config", resume(2), (), rc=0,
         check=ran([2, 4], model__hidden_size=32, max_steps=4, checkpoint_every=2)),
    Case("all-on-a-killed-run-takes-the-runs-config", resume(2, stage="all"), (), rc=0,
         check=ran([2, 4], model__hidden_size=32, max_steps=4)),
    Case("resume-longer-is-named", resume(2, "--set", "max_steps=6"), (), rc=0,
         check=ran([4, 6], "changed on the command line: max_steps 4 -> 6", model__hidden_size=32, max_steps=6)),
    Case("resume-other-width-refused", resume(2, "--set", "model.hidden_size=64"),
         ("model.hidden_size=64", "trained with model.hidden_size=32")),
    Case("resume-other-optimizer-refused", resume(2, "--set", "optimizer=adamw"), ("optimizer='adamw'", "adam_atan2")),
    Case("resume-other-batch-refused", resume(2, "--set", "global_batch_size=16"), ("global_batch_size=16",)),
    Case("resume-without-a-checkpoint",
         lambda ws: (killed_at(ws, 0), ws.run_args("train", "--resume", *tiny_overrides(max_steps=2)))[1],
         ("--resume", "no checkpoint")),
    Case("resume-and-force", lambda ws: ws.run_args("train", "--resume", "--force"), ("--resume", "--force")),
    Case("resume-and-init", lambda ws: ws.run_args("train", "--resume", "--init", str(ws.latest)),
         ("--resume", "--init")),
    Case("resume-after-a-torn-log-line", resume(2, *tiny_overrides(max_steps=4, checkpoint_every=2), torn=True), (),
         rc=0, check=log_rows_kept),
    Case("force-augment-keeps-the-folders-settings",
         lambda ws: (ws.file("run.json.before", (ws.run / "run.json").read_bytes()),
                     ws.run_args("augment", "--force"))[1], (), rc=0, check=force_augment_kept_settings),
    # --- the scorer cannot be fooled (class 4)
    Case("score-a-cut-down-submission", cut_down_submission, (), rc=0,
         check=scored_on_every_held_out_task),
    Case("score-an-empty-submission", lambda ws: (ws.file("run/submission.json", {}), ws.run_args("score"))[1], (),
         rc=0, check=lambda ws, out, err: json.loads((ws.run / "score.json").read_text())["missing_tasks"] or
         pytest.fail("no task named missing")),
    # --- every checkpoint and predictions file carries its dataset (class 5)
    Case("evaluated-weights-of-another-dataset", evaluated_weights_after_rebuild,
         ("evaluated/step_00000004.pt", "another dataset")),
    Case("predictions-of-other-tasks", predictions_of_other_tasks, ("predictions.npz", "does not hold out")),
    Case("predictions-of-a-rebuilt-dataset", lambda ws: (rebuilt(ws), ws.run_args("submit"))[1],
         ("predictions.npz", "another dataset")),
    Case("report-with-predictions-of-a-rebuilt-dataset", lambda ws: (rebuilt(ws), ws.run_args("report"))[1],
         ("predictions.npz", "another dataset")),
    # --- --stage all finishes what it can (class 6)
    Case("all-with-no-held-out-tasks", all_without_solutions("--eval-set", ""), (), rc=0, check=finished_without_score),
    Case("all-on-tasks-without-solutions", hidden_tasks, (), rc=0, check=finished_without_score),
    # --- metrics.jsonl is a log, read forgivingly (class 7)
    Case("report-skips-unreadable-log-lines", bad_log_lines, (), rc=0, check=report_skips_them),
]


def test_the_table_covers_every_class():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_what_runs_is_what_was_run(case: Case, base_run: Path, tmp_path: Path, capsys, monkeypatch):
    run_case(case, base_run, tmp_path, capsys, monkeypatch)
