"""The Kaggle entry: the notebook on CPU against fake /kaggle trees (bundle built by the bundle script) on every
path the day can take - executed in a kernel with the project wheel really installed for the happy path; its
cells run in this process for no bundle and a corrupt bundle (the install cell refusing it), and, all but the
install cell, for fine-tuning out of memory then retried at half batch, fine-tuning killed for good (prediction from the pretrained checkpoint),
prediction failing part-way (its partial candidates submitted), budgets of 60, 300 and 600 s, the scored rerun
variable set and unset - with failures simulated through the TRM_FAULTS testing hook; and the pieces that keep
submission.json valid and complete whatever happens (fallback from raw JSON, merge, time plans, child timeouts,
rerun detection)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from pipeline import kaggle_driver as ke
from pipeline.kaggle_driver import child_stages, faults
from pipeline.kaggle_driver.pretrained import find_pretrained, pretrained_for_dataset
from pipeline.kaggle_driver.state import config_overrides
from pipeline.model.loading import init_from_checkpoint
from pipeline.model.reference import to_reference_state_dict
from pipeline.training.checkpoint import latest_checkpoint, load_training_state
from pipeline.training.compute import capped_views
from pipeline.config import apply_overrides, preset, to_dict
from pipeline.data.tasks import load_tasks, select_tasks
from pipeline.model.trm import TRM, ModelConfig
from pipeline.inference.predictions import Predictions
from pipeline.training.train import train
from submissions.validate import validate_submission
from tiny import CANVAS, build_tiny_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "kaggle" / "trm_arc_kaggle.ipynb"

# The test's run settings, through the same environment variables a user would set (tiny model from the
# checkpoint; few augmentations and views).
OVERRIDES = ("global_batch_size=8 lr=1e-3 lr_warmup_steps=2 data.num_aug=3 predict.max_variants=4 "
             "predict.batch_size=64 log_every=1 ema_rate=0.9")

MALFORMED = {  # a colour 12 in a train grid; test[1] is ragged, so only test[0] is a usable grid
    "train": [{"input": [[1, 12]], "output": [[1, 1]]}],
    "test": [{"input": [[3, 4], [5, 6]]}, {"input": [[1, 2], [3]]}],
}
TOO_BIG = {  # valid, but larger than the 6x6 canvas of the tiny checkpoint
    "train": [{"input": [[1] * 9] * 9, "output": [[2] * 9] * 9}],
    "test": [{"input": [[7] * 9] * 9}],
}


def _load_build_bundle():
    spec = importlib.util.spec_from_file_location("trm_build_bundle", ROOT / "kaggle" / "build_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_bundle = _load_build_bundle()


def _raw(task) -> dict:
    return {"train": [{"input": i.tolist(), "output": o.tolist()} for i, o in task.train],
            "test": [{"input": g.tolist()} for g in task.test_inputs]}


@pytest.fixture(scope="module")
def kaggle_tree(build_once) -> Path:
    """Built once per session (conftest.built_once): a tiny checkpoint trained here on a few ARC-AGI-1 training
    tasks (6x6 canvas), and a fake /kaggle/input: the competition file (3 small evaluation tasks without solutions,
    one malformed, one too big) and the bundle from kaggle/build_bundle.py (project wheel + checkpoint)."""
    def build(root: Path) -> None:
        build_tiny_dataset(root / "dataset", num_tasks=4, num_aug=2)
        checkpoint = train(tiny_config(max_steps=4), root / "dataset", root / "run", progress=False)
        evals = select_tasks(load_tasks("arc-agi-1/evaluation").tasks, max_side=CANVAS)[:3]
        challenges = {t.id: _raw(t) for t in evals}
        challenges["bad00000"] = MALFORMED
        challenges["big00000"] = TOO_BIG
        comp = root / "input" / "arc-prize-2025"
        comp.mkdir(parents=True)
        (comp / "arc-agi_test_challenges.json").write_text(json.dumps(challenges))
        build_bundle.main(["--checkpoint", str(checkpoint), "--out", str(root / "input" / "trm-arc-bundle"),
                           "--no-dependency-wheels"])

    return build_once("kaggle", build)


@pytest.fixture(scope="module")
def pretrained(kaggle_tree) -> Path:
    return latest_checkpoint(kaggle_tree / "run" / "checkpoints")


@pytest.fixture(scope="module")
def kaggle_input(kaggle_tree) -> Path:
    return kaggle_tree / "input"


def _notebook_env(tmp_path: Path, kaggle_input: Path, **env: object) -> dict[str, object]:
    """The environment the notebook tests run it with (a None value: the variable unset)."""
    return {
        "TRM_KAGGLE_INPUT": kaggle_input, "TRM_KAGGLE_WORKING": tmp_path / "working",
        "TRM_INSTALL_TARGET": tmp_path / "site",  # the wheel really installs, into a folder the kernel then uses
        "TRM_NUM_GPUS": 0, "TRM_PROGRESS": 0, "TRM_OVERRIDES": OVERRIDES, "TRM_SUBMIT_RESERVE_S": 1,
        "TRM_STAGE_OVERHEAD_S": 8, "TRM_KILL_GRACE_S": 2, "TRM_MIN_TRAIN_S": 1, "TRM_MIN_PREDICT_S": 1,
        "TRM_PARTIAL_EVERY_S": 1, "TRM_TRAIN_FRACTION": 0.7,  # fine-tuning on the CPU too (its default there is 0)
        "TRM_FAULTS": None, "TRM_MAX_RETRIES": None, "TRM_TIME_BUDGET_S": None, "TRM_DRAFT_TIME_BUDGET_S": None,
        "TRM_DRAFT_OVERRIDES": None, "KAGGLE_IS_COMPETITION_RERUN": None, **env,
    }


def _execute_notebook(tmp_path: Path, monkeypatch, kaggle_input: Path, **env: object) -> tuple[Path, dict | None, str]:
    """Execute the notebook as a draft run (KAGGLE_IS_COMPETITION_RERUN unset unless given; a None in `env` unsets
    that variable, i.e. the Kaggle default); return the working
    folder, kaggle_status.json (None when the run never got that far) and the text the cells printed."""
    working = tmp_path / "working"
    settings = _notebook_env(tmp_path, kaggle_input, **env)
    for key, value in settings.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    try:
        NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # the cells' output, to read when something fails
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    status_path = working / "trm_run" / "kaggle_status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else None
    return working, status, printed


def _run_notebook_cells(tmp_path: Path, monkeypatch, kaggle_input: Path, install_fails: bool = False,
                        **env: object) -> tuple[Path, dict | None, str]:
    """What _execute_notebook returns, from the notebook's own code cells executed in this process. The install
    cell's place takes the already imported package (what its found bundle would give), unless `install_fails`:
    then the install cell itself runs, for a bundle it must refuse before pip (sys.path and PYTHONPATH, which it
    would change after pip, are restored afterwards). The kernel, pip and a real install are covered by the test
    that executes the notebook; these run its time plans and failure paths without paying a kernel's start, an
    install and a second torch import each."""
    working = tmp_path / "working"
    for key, value in _notebook_env(tmp_path, kaggle_input, **env).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    namespace: dict[str, object] = {"__name__": "__main__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for source in cells:
            if INSTALL_CELL in source and not install_fails:
                namespace.update(kaggle_driver=ke, BUNDLE=str(ke.find_bundle(Path(namespace["INPUT"]))))
            else:
                exec(compile(source, "notebook cell", "exec"), namespace)
    if install_fails:
        assert namespace["kaggle_driver"] is None, "the install cell did not refuse the bundle"
    status_path = working / "trm_run" / "kaggle_status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else None
    return working, status, printed.getvalue()


INSTALL_CELL = "import pipeline.kaggle_driver as kaggle_driver"  # the one cell _run_notebook_cells leaves out


def test_the_notebook_has_one_install_cell_and_the_others_need_no_kernel():
    """_run_notebook_cells stands for the notebook only while the install cell is the one cell it leaves out."""
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert sum(INSTALL_CELL in source for source in cells) == 1
    assert not any("get_ipython" in source or source.lstrip().startswith(("!", "%")) for source in cells)


def _check_complete(submission_path: Path, kaggle_input: Path) -> dict:
    raw = json.loads((kaggle_input / "arc-prize-2025" / "arc-agi_test_challenges.json").read_text())
    submission = json.loads(submission_path.read_text())
    assert list(submission) == list(raw)
    assert validate_submission(submission, ke.expected_tasks(ke.fallback_from_raw(raw))) == []
    assert submission["bad00000"] == [{"attempt_1": [[3, 4], [5, 6]], "attempt_2": [[3, 4], [5, 6]]},
                                      {"attempt_1": [[0]], "attempt_2": [[0]]}]
    assert submission["big00000"] == [{"attempt_1": TOO_BIG["test"][0]["input"], "attempt_2": TOO_BIG["test"][0]["input"]}]
    return submission


def _check_answers(submit: dict) -> None:
    """kaggle_status.json counts every test input of the raw challenges by what it got (3 usable tasks with 4
    test inputs, the malformed task's 2 and the too-big task's 1), and the two tasks the model never saw are
    fallback only."""
    assert sum(submit["test_inputs"].values()) == 7 and submit["test_inputs"]["fallback only"] >= 3
    assert sum(submit["tasks"].values()) == 5
    assert {"bad00000", "big00000"} <= set(submit["fallback_only_tasks"])
    assert {"bad00000 test 0", "bad00000 test 1", "big00000 test 0"} <= set(submit["fallback_only_inputs"])


def _raw_challenges(kaggle_input: Path) -> dict:
    return json.loads((kaggle_input / "arc-prize-2025" / "arc-agi_test_challenges.json").read_text())


def test_notebook_end_to_end_fine_tunes_within_budget_and_gives_malformed_and_too_big_tasks_fallbacks(tmp_path, monkeypatch, kaggle_input):
    """Fine-tuning is planned from its share of an 80 s budget (max_steps is unlimited in the kaggle preset: the
    plan's probe turns the time into steps), then prediction of every trained view, voting and a merged
    submission: the model's tasks + fallback entries for the malformed and the too-big task. Every phase logs
    planned / used seconds and its outcome. TRM_OVERRIDES="data.canvas_buckets=..." reaches the fine-tune and the
    prediction children (these 6x6 tasks all need the whole canvas: what buckets compute is tested in
    test_buckets.py and test_cli.py). What is asserted is what was done (the steps planned from the time budget,
    no child needing the driver's timeout), not how many seconds it took, which a busy machine stretches."""
    budget = 80.0  # a stage overhead of 20 s (a child's start on a busy machine); fine-tuning gets its minimum,
    # 2 s of work (train_fraction 0.2 of the budget is less than a stage's cost + min_train_s)
    working, status, printed = _execute_notebook(tmp_path, monkeypatch, kaggle_input, TRM_DRAFT_TIME_BUDGET_S=budget,
                                                 TRM_TRAIN_FRACTION=0.2, TRM_STAGE_OVERHEAD_S=20, TRM_MIN_TRAIN_S=2,
                                                 TRM_OVERRIDES=OVERRIDES + " data.canvas_buckets=3,4,5")
    stages = status["stages"]
    for name in ("fallback", "augment", "finetune", "predict", "submit"):
        assert stages[name]["state"] == "ok", (name, stages[name])
    _check_complete(working / "submission.json", kaggle_input)
    _check_answers(stages["submit"])
    assert stages["augment"]["skipped"] == 1 and stages["augment"]["too_big"] == 1
    assert "WARNING: 1 task(s) do not fit the checkpoint's 6x6 canvas" in printed
    assert stages["plan"]["mode"] == "finetune+predict" and not status["scored"]

    run = working / "trm_run"
    assert stages["finetune"]["step"] > 0 and stages["finetune"]["retries"] == 0
    last = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    assert load_training_state(last)["final"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == stages["finetune"]["step"]
    # the steps come from the time budget (the plan's probe; max_steps is unlimited), and the run ends at them or,
    # if the probe was optimistic, at the clock
    log_text = (run / "finetune.log").read_text()
    planned = int(re.search(r"fine-tune plan: (\d+) steps \(the time left buys \1 at", log_text).group(1))
    assert stages["finetune"]["step"] == planned or "time budget of" in log_text
    assert stages["finetune"]["attempts"][0]["budget_s"] == 2 and 2 < stages["finetune"]["planned_s"] < budget
    for name in ("finetune", "predict"):  # each child ended by itself inside its window (the driver's timeout
        # that would end it otherwise is tested with a hung child: test_child_timeout_stops_a_hung_stage)
        assert not any(a.get("timed_out") for a in stages[name].get("attempts", [])), name
        assert stages[name]["seconds"] > 0 and stages[name]["planned_s"] > 0, name
    assert stages["predict"]["checkpoint"] == "fine-tuned"
    assert status["stages"]["summary"]["submission_problems"] == []
    assert (tmp_path / "site" / "pipeline" / "kaggle_driver" / "driver.py").exists()  # the installed wheel ran
    for name in ("fallback", "augment", "finetune", "predict", "submit"):
        assert re.search(rf"PHASE {name}: planned (-|\d+ s), used \d+ s, outcome ok", printed), name
    assert "TIME PLAN: fine-tune about" in printed
    assert f"PATH: fine-tuned {stages['finetune']['step']} steps -> predicted with the fine-tuned checkpoint" in printed
    log_file = (working / "trm_kaggle.log").read_text()  # the driver's lines, also in a file
    assert "TIME PLAN: fine-tune about" in log_file and "PATH: fine-tuned" in log_file
    config = json.loads((run / "config.json").read_text())  # the fine-tune's
    assert config["data"]["canvas_buckets"] == "3,4,5" and 0 < config["train_variants"]
    views = capped_views(4, config["train_variants"])  # predict.max_variants 4, at most the trained variants
    assert len(Predictions.load(run / "predictions.npz")) == 4 * views  # 4 test inputs, every trained view
    assert "predict: on canvas buckets, test inputs per side: 3:" in (run / "predict.log").read_text()


def test_notebook_60_s_with_kaggles_overheads_says_at_the_top_that_only_the_fallback_fits(tmp_path, monkeypatch, kaggle_input):
    """With the real defaults (submit reserve 120 s, stage overhead 90 s) a 60 s budget allows nothing but the
    fallback; the log says so, and why, before anything else runs."""
    working, status, printed = _run_notebook_cells(
        tmp_path, monkeypatch, kaggle_input, TRM_DRAFT_TIME_BUDGET_S=60, TRM_SUBMIT_RESERVE_S=None,
        TRM_STAGE_OVERHEAD_S=None, TRM_MIN_TRAIN_S=None, TRM_MIN_PREDICT_S=None)
    stages = status["stages"]
    assert stages["plan"]["mode"] == "fallback-only"
    assert stages["augment"]["state"] == "skipped" and stages["submit"]["state"] == "skipped"
    assert _check_complete(working / "submission.json", kaggle_input) == ke.fallback_from_raw(_raw_challenges(kaggle_input))
    assert not (working / "trm_run" / "checkpoints").exists()
    plan_line = printed.index("TIME PLAN: FALLBACK ONLY")
    assert plan_line < printed.index("augment: start") and "raise draft_time_budget_s" in printed
    assert "PATH: fallback submission only (augment skipped" in printed


def test_notebook_60_s_budget_predicts_with_the_pretrained_checkpoint_without_fine_tuning(tmp_path, monkeypatch, kaggle_input):
    """60 s with this machine's overheads: too little to fine-tune as well (min_train_s 45), enough to predict
    with the pretrained checkpoint, which gives the model's answers for the tasks that fit."""
    working, status, printed = _run_notebook_cells(tmp_path, monkeypatch, kaggle_input, TRM_DRAFT_TIME_BUDGET_S=60,
                                                 TRM_MIN_TRAIN_S=45)
    stages = status["stages"]
    assert stages["plan"]["mode"] == "predict-only" and "TIME PLAN: predict only" in printed
    assert stages["finetune"]["state"] == "skipped" and not (working / "trm_run" / "checkpoints").exists()
    assert stages["predict"]["state"] == "ok" and stages["predict"]["checkpoint"].startswith("pretrained")
    _check_answers(stages["submit"])
    _check_complete(working / "submission.json", kaggle_input)
    assert "PATH: no fine-tuning (time plan: predict only) -> predicted with the pretrained" in printed


def test_budgets_of_300_and_600_s_give_fine_tuning_its_share(tmp_path, kaggle_input):
    """Enough time for both stages: fine-tuning gets train_fraction (0.7) of what is left after the submit reserve,
    prediction the rest (the time-stopped fine-tune and the prediction of every view run in the end-to-end test)."""
    for budget in (300, 600):
        env = _notebook_env(tmp_path, kaggle_input, TRM_DRAFT_TIME_BUDGET_S=budget, TRM_MIN_TRAIN_S=45)
        settings = ke.settings_from_env(started_at=1000.0, env={k: str(v) for k, v in env.items() if v is not None})
        planned = ke.plan_time(settings, now=1001.0)
        assert planned.mode == ke.PlanMode.FINETUNE_AND_PREDICT
        assert planned.finetune_s == pytest.approx(0.7 * (budget - 1 - 1), abs=1e-6), budget
        assert planned.predict_s == pytest.approx(budget - 1 - 1 - planned.finetune_s), budget


def test_notebook_without_a_bundle_writes_the_fallback_before_anything_else(tmp_path, monkeypatch, kaggle_input):
    bare = tmp_path / "input"
    (bare / "arc-prize-2025").mkdir(parents=True)
    shutil.copy(kaggle_input / "arc-prize-2025" / "arc-agi_test_challenges.json", bare / "arc-prize-2025")
    working, status, printed = _run_notebook_cells(tmp_path, monkeypatch, bare, install_fails=True,
                                                   TRM_DRAFT_TIME_BUDGET_S=60)
    assert status is None  # the project never ran
    assert _check_complete(working / "submission.json", bare) == ke.fallback_from_raw(_raw_challenges(bare))
    assert printed.index("fallback: 5 tasks") < printed.index("install: FAILED - FileNotFoundError: no trm-arc bundle")
    assert "PATH: fallback submission only" in printed


def test_notebook_with_a_corrupt_bundle_keeps_the_fallback(tmp_path, monkeypatch, kaggle_input):
    broken = tmp_path / "input"
    shutil.copytree(kaggle_input, broken)
    wheel = next((broken / "trm-arc-bundle" / "wheels").glob("trm_arc-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])  # an upload cut short
    working, status, printed = _run_notebook_cells(tmp_path, monkeypatch, broken, install_fails=True,
                                                   TRM_DRAFT_TIME_BUDGET_S=60)
    assert status is None
    assert _check_complete(working / "submission.json", broken) == ke.fallback_from_raw(_raw_challenges(broken))
    assert f"wheels/{wheel.name} in" in printed and "sha256 differs from manifest.json" in printed
    assert "PATH: fallback submission only" in printed
    assert not (tmp_path / "site").exists()  # nothing was installed from the broken wheel


def test_notebook_scored_rerun_retries_fine_tuning_at_half_batch_and_submits_partial_predictions(tmp_path, monkeypatch, kaggle_input):
    """The scored rerun (KAGGLE_IS_COMPETITION_RERUN set) takes time_budget_s (600 s), not the draft budget (1 s,
    which would allow only the fallback). Fine-tuning runs out of memory at its micro-batch of 8 rows (simulated)
    and succeeds again at 4 with 2 micro-batches (the global batch of 8 kept); prediction runs out of memory after
    2 batches in every attempt, and the candidates of the best attempt are submitted."""
    working, status, printed = _run_notebook_cells(
        tmp_path, monkeypatch, kaggle_input, KAGGLE_IS_COMPETITION_RERUN="Batch", TRM_TIME_BUDGET_S=600,
        TRM_DRAFT_TIME_BUDGET_S=1, TRM_MIN_TRAIN_S=40, TRM_MAX_RETRIES=1,
        TRM_OVERRIDES=OVERRIDES + " max_steps=3 predict.batch_size=4 finetune_plan=false",  # every view predicted
        TRM_FAULTS="train:oom_rows_over=4 predict:oom_after_calls=6")
    stages = status["stages"]
    assert status["scored"] and status["time_budget_s"] == 600 and "KAGGLE_IS_COMPETITION_RERUN=Batch" in printed
    assert stages["plan"]["mode"] == "finetune+predict"

    ft = stages["finetune"]
    assert ft["state"] == "ok" and ft["step"] == 3 and ft["retries"] == 1
    first, second = ft["attempts"]
    assert (first["micro_batch"], first["out_of_memory"], second["micro_batch"], second["returncode"]) == (8, True, 4, 0)
    run = working / "trm_run"
    config = json.loads((run / "config.json").read_text())
    assert (config["global_batch_size"], config["grad_accum_steps"]) == (8, 2)
    assert "retrying with grad_accum_steps 2 (micro-batch 4, global batch 8 kept)" in printed

    pr = stages["predict"]
    assert pr["state"] == "partial" and pr["checkpoint"] == "fine-tuned"
    assert [a["batch_size"] for a in pr["attempts"]] == [4, 2] and all(a["out_of_memory"] for a in pr["attempts"])
    assert [a["partial_candidates"] for a in pr["attempts"]] == [8, 4] and pr["partial_candidates"] == 8
    assert stages["submit"]["state"] == "ok"
    _check_answers(stages["submit"])
    _check_complete(working / "submission.json", kaggle_input)
    assert "PHASE predict: planned" in printed and "outcome partial" in printed
    assert "PARTIAL (8 candidates)" in stages["summary"]["path"]


def test_notebook_fine_tuning_killed_for_good_predicts_with_the_pretrained_checkpoint(tmp_path, monkeypatch, kaggle_input):
    """A draft run (the variable unset) takes draft_time_budget_s (300 s), not time_budget_s (1 s). Every
    fine-tuning attempt is killed (exit -9, as by the host's OOM killer), the retry at half batch too; prediction
    then uses the pretrained checkpoint, and the model's answers are submitted."""
    working, status, printed = _run_notebook_cells(
        tmp_path, monkeypatch, kaggle_input, TRM_TIME_BUDGET_S=1, TRM_DRAFT_TIME_BUDGET_S=300, TRM_MIN_TRAIN_S=40,
        TRM_MAX_RETRIES=1, TRM_FAULTS="train:kill_rows_over=0")
    stages = status["stages"]
    assert not status["scored"] and status["time_budget_s"] == 300
    ft = stages["finetune"]
    assert ft["state"] == "failed" and "fine-tuning failed for good (2 attempts" in ft["detail"]
    assert [a["returncode"] for a in ft["attempts"]] == [-9, -9] and [a["micro_batch"] for a in ft["attempts"]] == [8, 4]
    assert stages["predict"]["state"] == "ok" and stages["predict"]["checkpoint"] == "pretrained (fine-tune failed)"
    _check_answers(stages["submit"])
    _check_complete(working / "submission.json", kaggle_input)
    assert "PATH: fine-tuning failed -> predicted with the pretrained (fine-tune failed) checkpoint" in printed


def test_notebook_fallback_cell_matches_fallback_from_raw(tmp_path):
    """The notebook's standard-library fallback gives exactly what kaggle_driver's would, on every odd shape."""
    raw = {
        "ok": {"train": [], "test": [{"input": [[1, 2]]}, {"input": [[3]]}]},
        "bool": {"test": [{"input": [[True]]}]}, "wide": {"test": [{"input": [[1] * 31]}]},
        "ragged": {"test": [{"input": [[1, 2], [3]]}]}, "colour": {"test": [{"input": [[10]]}]},
        "float": {"test": [{"input": [[1.0]]}]}, "empty_row": {"test": [{"input": [[]]}]},
        "no_input": {"test": [{"output": [[1]]}]}, "pair_not_dict": {"test": [[[1]]]},
        "test_not_list": {"test": {"input": [[1]]}}, "not_a_task": [1, 2], "no_tests": {"train": [], "test": []},
    }
    (tmp_path / "c.json").write_text(json.dumps(raw))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "def fallback_entries" in c.source)
    namespace = {"os": os, "time": time, "PARAMS": {"challenges": str(tmp_path / "c.json"), "working": str(tmp_path)}}
    exec(compile(cell, "fallback cell", "exec"), namespace)
    assert namespace["FALLBACK_WRITTEN"]
    assert json.loads((tmp_path / "submission.json").read_text()) == ke.fallback_from_raw(raw)


# ------------------------------------------------------------------------------------------ the pieces
def test_fallback_from_raw_answers_every_test_input_of_any_shape_of_task():
    raw = {
        "ok": {"train": [], "test": [{"input": [[1, 2]]}, {"input": [[3]]}]},
        "bool": {"test": [{"input": [[True]]}]},
        "wide": {"test": [{"input": [[1] * 31]}]},
        "no_input": {"test": [{"output": [[1]]}]},
        "pair_not_dict": {"test": [[[1]]]},
        "test_not_list": {"test": {"input": [[1]]}},
        "not_a_task": [1, 2],
        "no_tests": {"train": [], "test": []},
    }
    sub = ke.fallback_from_raw(raw)
    zero = {"attempt_1": [[0]], "attempt_2": [[0]]}
    assert sub["ok"] == [{"attempt_1": [[1, 2]], "attempt_2": [[1, 2]]}, {"attempt_1": [[3]], "attempt_2": [[3]]}]
    for key in ("bool", "wide", "no_input", "pair_not_dict", "test_not_list", "not_a_task"):
        assert sub[key] == [zero], key
    assert sub["no_tests"] == []
    assert validate_submission(sub, ke.expected_tasks(sub)) == []
    with pytest.raises(ValueError, match="challenges.json"):
        ke.fallback_from_raw([], "challenges.json")


def test_merge_takes_only_complete_valid_model_entries_and_write_refuses_invalid(tmp_path):
    fallback = ke.fallback_from_raw({"a": {"test": [{"input": [[1]]}]}, "b": {"test": [{"input": [[2]]}] * 2},
                                     "c": {"test": [{"input": [[3]]}]}})
    good = [{"attempt_1": [[5]], "attempt_2": [[6]]}]
    model = {"a": good, "b": good, "c": [{"attempt_1": [[10]], "attempt_2": [[1]]}], "extra": good}
    merged, fell_back = ke.merge_submission(fallback, model)
    assert merged == {"a": good, "b": fallback["b"], "c": fallback["c"]} and fell_back == ["b", "c"]
    path = tmp_path / "submission.json"
    ke.write_validated(path, merged, fallback)
    with pytest.raises(RuntimeError, match="task b"):
        ke.write_validated(path, {"a": good, "c": good}, fallback)
    assert json.loads(path.read_text()) == merged  # the refused write left the good file in place


def _settings(tmp_path, **kw) -> ke.KaggleSettings:
    return ke.KaggleSettings(challenges=tmp_path / "c.json", working=tmp_path, run_dir=tmp_path / "run",
                             started_at=1000.0, **kw)


def test_settings_from_env_and_parameters(tmp_path):
    env = {"TRM_KAGGLE_INPUT": str(tmp_path / "in"), "TRM_KAGGLE_WORKING": str(tmp_path / "out"),
           "TRM_DRAFT_TIME_BUDGET_S": "123", "TRM_OVERRIDES": "lr=1e-3  data.num_aug=5", "TRM_NUM_GPUS": "0",
           "TRM_FAULTS": "train:oom_rows_over=2", "TRM_MAX_RETRIES": "2"}
    s = ke.settings_from_env(started_at=5.0, env=env, train_fraction=0.5)
    assert s.challenges == tmp_path / "in" / "arc-prize-2025" / "arc-agi_test_challenges.json"
    assert s.submission == tmp_path / "out" / "submission.json" and s.run_dir == tmp_path / "out" / "trm_run"
    assert (s.time_budget_s, s.train_fraction, s.num_gpus, ke.deadline(s), s.max_retries) == (123.0, 0.5, 0, 128.0, 2)
    assert s.overrides == ["lr=1e-3", "data.num_aug=5"] and s.bundle is None and s.faults == "train:oom_rows_over=2"
    with pytest.raises(ValueError, match="unknown"):
        ke.settings_from_env(env=env, time_limit=3)


def test_rerun_variable_set_takes_the_full_budget_and_unset_the_draft_one(tmp_path):
    """A quick check saved in the notebook (draft budget and overrides) must not reach the scored rerun."""
    env = {"TRM_KAGGLE_INPUT": str(tmp_path), "TRM_OVERRIDES": "lr=1e-3", "TRM_DRAFT_OVERRIDES": "data.num_aug=5"}
    params = {"draft_time_budget_s": 300}
    draft = ke.settings_from_env(env=env, **params)
    assert (draft.scored, draft.time_budget_s, draft.overrides) == (False, 300, ["lr=1e-3", "data.num_aug=5"])
    assert "KAGGLE_IS_COMPETITION_RERUN not set" in draft.run_kind
    scored = ke.settings_from_env(env={**env, "KAGGLE_IS_COMPETITION_RERUN": "1"}, **params)
    assert (scored.scored, scored.time_budget_s, scored.overrides) == (True, 40_500, ["lr=1e-3"])
    assert "KAGGLE_IS_COMPETITION_RERUN=1" in scored.run_kind
    assert ke.settings_from_env(env={**env, "KAGGLE_IS_COMPETITION_RERUN": "1", "TRM_TIME_BUDGET_S": "7200"},
                                **params).time_budget_s == 7200
    assert ke.settings_from_env(env={**env, "KAGGLE_IS_COMPETITION_RERUN": ""}, **params).scored is False


def test_hidden_test_tasks_count_as_the_scored_run_even_without_the_variable(tmp_path):
    """The fail-safe: test task ids that are not all public evaluation tasks are the hidden set."""
    comp = tmp_path / "arc-prize-2025"
    comp.mkdir()
    challenges = comp / "arc-agi_test_challenges.json"
    (comp / "arc-agi_evaluation_challenges.json").write_text(json.dumps({"a": {}, "b": {}, "c": {}}))
    challenges.write_text(json.dumps({"a": {}, "b": {}}))  # the editing placeholder: public evaluation tasks
    assert ke.detect_scored_run({}, challenges) == (False, "draft run (KAGGLE_IS_COMPETITION_RERUN not set; the test "
                                                           "tasks are the public placeholder)")
    challenges.write_text(json.dumps({"a": {}, "zz": {}}))
    scored, why = ke.detect_scored_run({}, challenges)
    assert scored and "1 test task(s) are not public evaluation tasks" in why
    (comp / "arc-agi_evaluation_challenges.json").unlink()
    assert ke.detect_scored_run({}, challenges)[0] is False  # nothing to compare with: the variable decides


def test_faults_hook_parses_and_out_of_memory_is_recognised():
    assert faults.parse_faults("train:oom_rows_over=4  predict:kill_after_calls=6 predict:oom_after_calls=9") == {
        "train": {"oom_rows_over": 4}, "predict": {"kill_after_calls": 6, "oom_after_calls": 9}}
    for bad in ("train:oom=4", "oom_rows_over=4", "train:oom_rows_over=x"):
        with pytest.raises(ValueError, match="TRM_FAULTS"):
            faults.parse_faults(bad)
    result = lambda code, tail="", timed_out=False: ke.ChildResult(code, timed_out, 1.0, tail)  # noqa: E731
    assert child_stages.is_out_of_memory(result(-9)) and child_stages.is_out_of_memory(result(137))
    assert child_stages.is_out_of_memory(result(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"))
    assert child_stages.is_out_of_memory(result(1, "rank 1 (local_rank: 1)\n  exitcode  : -9 (pid: 42)"))  # torchrun's report
    assert not child_stages.is_out_of_memory(result(1, "ValueError: bad task"))
    assert not child_stages.is_out_of_memory(result(-9, timed_out=True))  # we stopped it for time
    assert (child_stages.next_grad_accum(768, 4, 1), child_stages.next_grad_accum(768, 4, 2), child_stages.next_grad_accum(20, 1, 4)) == (2, 4, 10)
    assert child_stages.next_grad_accum(8, 1, 8) is None  # already one row per micro-batch


def test_child_timeout_stops_a_hung_stage(tmp_path):
    result = ke.run_child([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], 1.0,
                          cwd=tmp_path, log_path=tmp_path / "child.log", grace_s=2)
    assert result.timed_out and result.returncode == -15  # ended by the SIGTERM at its timeout, not by its sleep's end
    assert "up" in (tmp_path / "child.log").read_text()


def test_prediction_killed_part_way_leaves_its_candidates_so_far(tmp_path, kaggle_input):
    """SIGKILL cannot be caught: the periodic partial file is what survives (here saved after every batch), and
    the Kaggle driver's child entry point installs the TRM_FAULTS hook in the child. The run folder and the
    checkpoint are the driver's own (augment, then the pretrained checkpoint made to fit the dataset)."""
    env = {"TRM_KAGGLE_INPUT": str(kaggle_input), "TRM_KAGGLE_WORKING": str(tmp_path), "TRM_NUM_GPUS": "0",
           "TRM_OVERRIDES": OVERRIDES, "TRM_DRAFT_TIME_BUDGET_S": "600", "TRM_STAGE_OVERHEAD_S": "8"}
    driver = ke.KaggleRun(ke.settings_from_env(env=env))
    assert driver.write_fallback() and driver.augment()
    run = driver.s.run_dir
    checkpoint = pretrained_for_dataset(run, driver.state.cfg, driver.state.checkpoint)
    args = ["--stage", "predict", "--preset", "kaggle", "--out", str(run), "--checkpoint", str(checkpoint), "--quiet",
            "--set", "predict.batch_size=2", "--set", "predict.max_variants=3", "--set", "predict.save_partial_every_s=1e-9"]
    child_env = {**os.environ, "TRM_FAULTS": "predict:kill_after_calls=6"}  # halt_max_steps 3: dies in batch 3
    result = ke.run_child(ke.launch_command(1, args, faults.CHILD_MODULE), 120, cwd=tmp_path, env=child_env,
                          log_path=tmp_path / "predict.log")
    assert result.returncode == -9 and child_stages.is_out_of_memory(result) and "TRM_FAULTS: SIGKILL" in result.tail
    assert not (run / "predictions.npz").exists()
    partial = Predictions.load(run / "predictions.partial.npz")
    assert len(partial) == 4  # two batches of 2 rows


def test_launch_command_uses_torchrun_for_several_gpus():
    assert ke.launch_command(1, ["--stage", "train"])[1:] == ["-m", "pipeline.run", "--stage", "train"]
    cmd = ke.launch_command(4, ["--stage", "train"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=4" in cmd
    assert cmd[-4:] == ["-m", "pipeline.run", "--stage", "train"]


def test_config_overrides_reproduce_the_config_in_a_child():
    cfg = preset("kaggle")
    cfg.model = ModelConfig(hidden_size=32, num_heads=2, expansion=4, mlp_t=True, pos_encodings="learned")
    cfg.data.sources = cfg.data.eval_set = "/in/arc-agi_test_challenges.json"
    cfg.time_budget_s = 1234.5
    again = apply_overrides(preset("demo"), config_overrides(asdict(cfg)))
    assert to_dict(again) == to_dict(cfg)


# ------------------------------------------------------------------------------------------ bundle and checkpoints
def test_bundle_manifest_lists_every_file_and_the_slim_checkpoint_fine_tunes_like_the_full_one(kaggle_input, pretrained):
    bundle = kaggle_input / "trm-arc-bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] == ke.BUNDLE_KIND and ke.find_bundle(kaggle_input) == bundle
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(listed) == on_disk
    for path, entry in listed.items():
        assert entry["size"] == (bundle / path).stat().st_size and entry["sha256"] == ke.sha256_of(bundle / path)
    with zipfile.ZipFile(bundle / manifest["project_wheel"]) as wheel:
        assert "pipeline/kaggle_driver/driver.py" in wheel.namelist()
    assert manifest["checkpoint"]["slim"] and manifest["checkpoint"]["step"] == 4
    slim = load_training_state(bundle / manifest["checkpoint"]["path"])
    assert manifest["checkpoint"]["model"]["num_puzzle_identifiers"] == slim["config"]["model"]["num_puzzle_identifiers"] == 2
    source_rows = load_training_state(pretrained)["config"]["model"]["num_puzzle_identifiers"]
    assert manifest["checkpoint"]["trained_puzzle_rows"] == source_rows - 1 > 2  # the source's count, said as such

    config = tiny_config().model
    config.seq_len, config.num_puzzle_identifiers = CANVAS * CANVAS, 7
    models = []
    for path in (pretrained, bundle / manifest["checkpoint"]["path"]):
        torch.manual_seed(0)
        model = TRM(ModelConfig(**asdict(config)))
        init_from_checkpoint(model, path, verbose=False)
        models.append(model.state_dict())
    assert models[0].keys() == models[1].keys()
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key
    assert ke.checkpoint_model_config(bundle / manifest["checkpoint"]["path"])[1] == "ours"


def test_bundle_takes_dependency_wheels_from_a_folder(tmp_path, pretrained, monkeypatch):
    monkeypatch.setattr(build_bundle, "build_project_wheel", lambda wheels: _fake_wheel(wheels, "trm_arc-0.1.0"))
    source = tmp_path / "wheelhouse"
    source.mkdir()
    names = [f"{build_bundle._wheel_stem(n)}-{build_bundle.pinned(n).partition('==')[2] or '1.0'}-py3-none-any"
             for n in build_bundle.KAGGLE_MISSING]
    for name in names:
        _fake_wheel(source, name)
    manifest = json.loads(build_bundle.build_bundle(tmp_path / "b", pretrained, wheels_from=source).read_text())
    assert sorted(manifest["dependency_wheels"]) == sorted(f"wheels/{n}.whl" for n in names)
    (source / f"{names[0]}.whl").unlink()
    with pytest.raises(FileNotFoundError, match=build_bundle.KAGGLE_MISSING[0]):
        build_bundle.build_bundle(tmp_path / "b", pretrained, wheels_from=source)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_bundle.build_bundle(tmp_path / "foreign", pretrained, wheels_from=source)


def _fake_wheel(folder: Path, stem: str) -> Path:
    path = folder / f"{stem}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("placeholder.txt", stem)
    return path


def test_reference_checkpoint_with_its_arch_config(tmp_path, pretrained, monkeypatch):
    """A reference state dict + its model config: resolved to our ModelConfig, bundled together, and the bundle's
    sha256 catches a broken upload."""
    state = load_training_state(pretrained)
    ref = tmp_path / "ref.pt"
    torch.save(to_reference_state_dict(state["model"], prefix="_orig_mod.model.inner."), ref)
    m = state["config"]["model"]
    arch = {"L_layers": m["num_layers"], "H_cycles": m["H_cycles"], "L_cycles": m["L_cycles"],
            "hidden_size": m["hidden_size"], "num_heads": m["num_heads"], "expansion": m["expansion"],
            "halt_max_steps": m["halt_max_steps"], "halt_exploration_prob": m["halt_exploration_prob"],
            "puzzle_emb_ndim": m["puzzle_emb_ndim"], "puzzle_emb_len": m["puzzle_emb_len"],
            "pos_encodings": m["pos_encodings"], "seq_len": m["seq_len"]}
    (tmp_path / "arch.json").write_text(json.dumps({"arch": arch}))
    config, kind = ke.checkpoint_model_config(ref, tmp_path / "arch.json")
    expected = {**m, "num_puzzle_identifiers": 1}
    assert kind == "reference" and asdict(config) == expected
    with pytest.raises(ValueError, match="model config"):
        ke.checkpoint_model_config(ref)

    monkeypatch.setattr(build_bundle, "build_project_wheel", lambda wheels: _fake_wheel(wheels, "trm_arc-0.1.0"))
    build_bundle.build_bundle(tmp_path / "b", ref, arch_config=tmp_path / "arch.json", dependency_wheels=False)
    settings = _settings(tmp_path, bundle=tmp_path / "b")
    checkpoint, arch_path = find_pretrained(settings)
    assert ke.checkpoint_model_config(checkpoint, arch_path) == (config, "reference")
    with open(checkpoint, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="sha256"):
        find_pretrained(settings)
