"""The command line: every stage by itself, the whole chain with `--stage all`, and re-runs that skip work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.run import STAGES, build_parser, main
from submissions.validate import validate_submission
from tiny import base_run_args, tiny_overrides

SMALL = ["--preset", "demo", "--data", "arc-agi-1/training,arc-agi-1/evaluation", "--set", "data.max_side=6", "--set", "data.max_tasks=4",
         "--canvas", "6", "--num-aug", "3", "--quiet"]


def test_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for stage in STAGES + ("all",):
        assert stage in text


def test_augment_writes_dataset_and_manifest(tmp_path: Path):
    assert main(["--stage", "augment", "--out", str(tmp_path), *SMALL]) == 0
    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    for key in ("sources", "seed", "num_aug", "num_puzzles", "num_variants", "num_train_examples",
                "num_test_inputs", "short_puzzles", "skipped"):
        assert key in manifest
    assert manifest["num_puzzles"] == 8 and manifest["num_aug"] == 3
    assert manifest["num_test_inputs"] > 0  # the 4 evaluation tasks' test inputs are held out


def test_augment_reports_bad_tasks_and_strict_stops(tmp_path: Path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    good = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1]], "output": [[2]]}]}
    (folder / "good.json").write_text(json.dumps(good))
    (folder / "bad.json").write_text(json.dumps({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": []}))
    out = tmp_path / "run"
    assert main(["--stage", "augment", "--preset", "demo", "--out", str(out), "--data", str(folder),
                 "--eval-set", str(folder), "--canvas", "6", "--num-aug", "2", "--set", "data.max_side=0",
                 "--quiet"]) == 0
    skipped = json.loads((out / "dataset" / "manifest.json").read_text())["skipped"]
    assert len(skipped) == 1 and skipped[0]["task_id"] == "bad"
    from pipeline.data.tasks import TaskError

    with pytest.raises(TaskError, match="bad"):
        main(["--stage", "augment", "--preset", "demo", "--out", str(tmp_path / "strict"), "--data", str(folder),
              "--strict", "--quiet"])


def test_whole_chain_then_rerun_skips_and_force_redoes(base_run: Path, tmp_path: Path, capsys):
    """The session's base run is `--stage all` (tiny.base_run_args): on a copy of it every artifact is there, the
    same command again skips every stage, and `--force submit` redoes submit and what follows."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    args = base_run_args(run)
    for name in ("dataset/manifest.json", "config.json", "metrics.jsonl", "predictions.npz", "submission.json",
                 "score.json", "score_per_task.csv", "report.html"):
        assert (run / name).exists(), name

    from augment.dataset import AugmentedDataset

    tasks = AugmentedDataset.load(run / "dataset").eval_tasks()
    submission = json.loads((run / "submission.json").read_text())
    assert validate_submission(submission, tasks) == []
    assert len(submission) == len(tasks) == 3  # data.max_tasks=3 of ARC-AGI-1 evaluation

    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipping") == len(STAGES)

    before = (run / "score.json").stat().st_mtime_ns
    assert main(args + ["--force", "submit", "--selector", "q_weighted"]) == 0
    out = capsys.readouterr().out
    assert "[train] already done" in out and "[submit]" in out
    assert "kaggle" in out.lower()  # the printed score table
    assert (run / "score.json").stat().st_mtime_ns != before
    assert json.loads((run / "submission_report.json").read_text())["selector"] == "q_weighted"

    # scoring an outside submission file against a built-in set
    assert main(["--stage", "score", "--submission", str(run / "submission.json"),
                 "--solutions", "arc-agi-1/evaluation", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "missing" in out.lower()  # 397 evaluation tasks are not in this small submission


def test_bad_input_is_one_clear_error_line(tmp_path: Path, capsys):
    from pipeline.run import cli
    import sys as _sys

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        (["--stage", "score", "--submission", str(bad), "--solutions", "arc-agi-1/evaluation"], str(bad)),
        (["--stage", "score", "--submission", str(tmp_path / "missing.json"), "--solutions", "arc-agi-1/evaluation"],
         "missing.json"),
        (["--stage", "train", "--out", str(tmp_path / "empty")], "not a run folder"),
        (["--stage", "augment", "--preset", "demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
         "nowhere"),
    ]
    for argv, needle in cases:
        old = _sys.argv
        _sys.argv = ["pipeline.run", *argv]
        try:
            assert cli() == 2
        finally:
            _sys.argv = old
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err


def test_a_folder_claimed_while_a_command_starts_is_checked_not_overwritten(tmp_path: Path, monkeypatch, capsys):
    """The marker race: run.json is read before the lock and again under it; a command that claimed the folder in
    between (another preset) makes this one stop with the conflict, its marker untouched."""
    from pipeline.cli import runfolder
    from pipeline.run import cli

    out = tmp_path / "run"
    claimed = runfolder.new_marker("arc1", {"num_aug": 1000})
    real_acquire = runfolder.RunLock.acquire

    def acquire_after_another_command(self):
        if not (self.folder / runfolder.MARKER).exists():
            runfolder.write_marker(self.folder, claimed)  # the other command, between our check and our lock
        return real_acquire(self)

    monkeypatch.setattr(runfolder.RunLock, "acquire", acquire_after_another_command)
    assert cli(["--stage", "augment", "--out", str(out), *SMALL]) == 2
    assert "made with --preset arc1" in capsys.readouterr().err
    assert json.loads((out / runfolder.MARKER).read_text()) == claimed


def _torchrun(args: list[str], cwd: Path):
    import os
    import subprocess

    from tiny import TORCHRUN, free_port

    cmd = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "pipeline.run", *args]
    return subprocess.run(cmd, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def test_whole_chain_under_torchrun_with_force_augment(base_run: Path, tmp_path: Path):
    """`--stage all --force augment` launched as 2 processes on a copy of the base run: rank 0 alone rebuilds the
    dataset (canvas 6 -> 5, num_aug 2 -> 3), submits and scores, while rank 1 waits for the new dataset; both train,
    evaluate and predict on it (every held-out view predicted once), and the checkpoints carry its fingerprint. (A
    rank that built its evaluator from the old dataset would feed 6x6 canvases to a 5x5 model.)"""
    import shutil

    from augment.dataset import AugmentedDataset
    from pipeline.inference.predictions import Predictions
    from pipeline.training.checkpoint import dataset_fingerprint, latest_checkpoint

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    done = _torchrun(["--stage", "all", "--force", "augment", "--out", str(run), "--quiet", "--num-aug", "3",
                      "--canvas", "5", "--set", "data.max_side=5",
                      *tiny_overrides(max_steps=4, checkpoint_every=2), "--set", "predict.max_variants=0",
                      "--set", "log_with=tensorboard"],
                     Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("[augment]") == 1 and done.stdout.count("[score]") == 1
    assert done.stdout.count("submit: ") == 1  # only rank 0 does the folder's work
    assert "on 2 process(es)" in done.stdout
    dataset = AugmentedDataset.load(run / "dataset")
    assert dataset.manifest["num_aug"] == 3 and dataset.canvas == 5 and dataset.num_test_inputs > 0
    state = torch.load(latest_checkpoint(run / "checkpoints"), weights_only=True, mmap=True)
    assert state["dataset_fingerprint"] == dataset_fingerprint(run / "dataset")
    assert state["config"]["model"]["num_puzzle_identifiers"] == dataset.num_puzzle_identifiers
    predictions = Predictions.load(run / "predictions.npz")
    rows = dataset.test_rows()
    assert len(predictions) == len(rows["variant"])
    assert sorted(predictions.variant.tolist()) == sorted(rows["variant"].tolist())
    assert validate_submission(json.loads((run / "submission.json").read_text()), dataset.eval_tasks()) == []
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train", "train", "eval"]  # log_every=2, 4 steps, the final evaluation; rank 0 only
    # one TensorBoard writer (rank 0), closed without ending the process group that prediction still needed
    assert len(list((run / "tensorboard" / "trm-arc").glob("events.out.tfevents.*"))) == 1


def test_a_run_trained_on_a_dataset_from_elsewhere_predicts_with_it(base_run: Path, tmp_path: Path, capsys):
    """`--stage train --data D` records D (and its fingerprint) in run.json; predict, submit, score and report
    read D."""
    out = tmp_path / "run"
    assert main(["--stage", "train", "--preset", "demo", "--data", str(base_run / "dataset"), "--out", str(out),
                 "--quiet", *tiny_overrides(max_steps=2), "--set", "predict.max_variants=2"]) == 0
    marker = json.loads((out / "run.json").read_text())
    assert marker["dataset_dir"] == str((base_run / "dataset").resolve()) and marker["dataset_fingerprint"]
    for stage in ("predict", "submit", "score", "report"):
        assert main(["--stage", stage, "--out", str(out), "--quiet"]) == 0, stage
    assert not (out / "dataset").exists() and (out / "report.html").exists()
    assert "tasks" in capsys.readouterr().out


def test_whole_chain_on_canvas_buckets_and_its_checkpoint_on_the_full_canvas(tmp_path: Path, capsys):
    """`--set data.canvas_buckets` reaches training, its evaluations, prediction and re-scoring; the weights it
    trains predict on the full canvas too (one set of weights for every bucket)."""
    from augment.dataset import AugmentedDataset
    from pipeline.inference.predictions import Predictions

    args = ["--stage", "all", "--out", str(tmp_path), *SMALL, *tiny_overrides(max_steps=4, eval_every=2),
            "--set", "predict.max_variants=3", "--set", "data.canvas_buckets=3,4,5"]
    assert main(args) == 0
    assert json.loads((tmp_path / "config.json").read_text())["data"]["canvas_buckets"] == "3,4,5"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "eval", "train", "eval"]
    assert all(r["grid_tokens_per_row"] < 36 for r in rows if r["kind"] == "train")
    dataset = AugmentedDataset.load(tmp_path / "dataset")
    test_rows = dataset.test_rows(1)
    assert len(set(dataset.held_out_sides(test_rows["puzzle_index"], test_rows["test_index"], (3, 4, 5, 6)))) > 1
    bucketed = Predictions.load(tmp_path / "predictions.npz")
    assert bucketed.logp is not None and not np.isnan(bucketed.logp[bucketed.valid]).all()
    assert validate_submission(json.loads((tmp_path / "submission.json").read_text()), dataset.eval_tasks()) == []

    assert main(["--stage", "predict", "--out", str(tmp_path), "--quiet", "--set", "data.canvas_buckets="]) == 0
    full = Predictions.load(tmp_path / "predictions.npz")
    assert len(full) == len(bucketed)


def test_the_installed_trm_arc_command_is_the_module_form(monkeypatch):
    """`pip install` puts a `trm-arc` console script beside the interpreter: the same CLI as `python -m pipeline.run`."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    found = Path(sysconfig.get_path("scripts"), "trm-arc")
    command = str(found) if found.exists() else shutil.which("trm-arc")
    assert command, "trm-arc is not installed: pip install -e . installs it"
    done = subprocess.run([command, "--stage", "export", "--out", "/nonexistent/run"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --out /nonexistent/run: not a run folder")
    monkeypatch.setattr(sys, "argv", [command])
    assert build_parser().prog == "trm-arc"  # its help names the command it was started as


def test_a_commands_process_freezes_its_objects_for_the_garbage_collector(capsys):
    """pipeline.run.command (what `python -m pipeline.run`, `trm-arc` and the driver's children run) is cli() with
    the objects made so far frozen: the collector walks them neither during the stage nor at exit."""
    import gc

    from pipeline.run import command

    before = gc.get_freeze_count()
    made_before = [[] for _ in range(1000)]  # 1000 lists the collector tracks
    assert command(["--stage", "export", "--out", "/nonexistent/run"]) == 2  # cli's status, as the shell gets it
    assert "not a run folder" in capsys.readouterr().err
    assert gc.get_freeze_count() >= before + len(made_before)
