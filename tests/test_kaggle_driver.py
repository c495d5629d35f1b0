"""The Kaggle driver's rooms on their own: the time plan (a property test over budgets from 60 s to 12 h), the
devices (more GPUs asked than present, none at all), the child process tree stopped at its timeout and on an
interrupt (torchrun with 2 workers, checked in the process table), and a rehearsal with relative paths."""
from __future__ import annotations

import _thread
import json
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import kaggle_driver as kd
from pipeline.kaggle_driver import child as child_module
from pipeline.kaggle_driver import child_stages
from pipeline.kaggle_driver import stages
from pipeline.kaggle_driver.budget import window_end
from pipeline.kaggle_driver.child import is_running
from pipeline.kaggle_driver.pretrained import pretrained_for_dataset
from pipeline.kaggle_driver.state import Outcome, RunState
from pipeline.config import preset
from pipeline.inference.predictions import Predictions
from pipeline.training.train import train
from tiny import CANVAS, TORCHRUN, build_tiny_dataset, tiny_config

WORKER = Path(__file__).parent / "stubborn_worker.py"
HOUR = 3600.0


def _settings(**kw) -> kd.KaggleSettings:
    return kd.KaggleSettings(challenges=Path("/in/c.json"), working=Path("/out"), run_dir=Path("/out/run"),
                             started_at=1000.0, **kw)


# ------------------------------------------------------------------------------------------ the time plan
@settings(max_examples=300, deadline=None)
@given(budget=st.floats(60, 12 * HOUR), spent=st.floats(0, 1), fraction=st.floats(0, 1),
       reserve=st.floats(0, 600), overhead=st.floats(0, 300), grace=st.floats(0, 60),
       min_train=st.floats(0, 600), min_predict=st.floats(0, 300))
def test_the_windows_and_the_reserve_add_up_to_the_budget(budget, spent, fraction, reserve, overhead, grace,
                                                          min_train, min_predict):
    """Whatever the budget and the settings: the plan of each stage is its window (start-up + work + kill grace
    + the reader's join), fine-tuning's window followed by prediction's plus the submit reserve ends exactly at
    the deadline, no stage is planned below its minimum, and nothing is planned at negative time."""
    s = _settings(time_budget_s=budget, train_fraction=fraction, submit_reserve_s=reserve, stage_overhead_s=overhead,
                  kill_grace_s=grace, min_train_s=min_train, min_predict_s=min_predict)
    start = s.started_at + spent * budget  # time already spent (installs, augment)
    plan = kd.plan_time(s, now=start)
    tune, predict = kd.plan_finetune(s, now=start), kd.plan_predict(s, now=start)
    for stage in (tune, predict):
        assert min(stage.work_s, stage.timeout_s, stage.grace_s, stage.join_s) >= 0
        if stage.run:
            assert stage.timeout_s == pytest.approx(overhead + stage.work_s)
            assert stage.window_s == pytest.approx(overhead + stage.work_s + grace + kd.READER_JOIN_S)
    if plan.mode == kd.PlanMode.FALLBACK_ONLY:
        assert not tune.run and not predict.run
        return
    assert predict.run and predict.work_s >= min_predict
    if plan.mode == kd.PlanMode.PREDICT_ONLY:
        assert not tune.run and start + predict.window_s + reserve == pytest.approx(kd.deadline(s))
        return
    assert tune.run and tune.work_s >= min_train and tune.window_s == pytest.approx(plan.finetune_s)
    again = kd.plan_retry(s, window_end(tune, now=start), min_train, now=start)  # what the stage runs
    assert again.run and (again.work_s, again.timeout_s) == pytest.approx((tune.work_s, tune.timeout_s), abs=1e-6)
    after = kd.plan_predict(s, now=start + tune.window_s)  # the stage that follows a fine-tune using its window
    assert after.run and after.work_s >= min_predict and after.window_s == pytest.approx(plan.predict_s)
    assert start + tune.window_s + after.window_s + reserve == pytest.approx(kd.deadline(s))


@pytest.mark.parametrize("budget, mode, finetune_s, predict_s", [
    (60, "fallback-only", 0, 0),  # -60 s left after the 120 s submit reserve
    (300, "predict-only", 0, 180),  # 180 s: prediction (>= 125 + 30) but not fine-tuning as well (>= 340)
    (600, "finetune+predict", 325, 155),  # 480 s: 0.7 would leave prediction under its 155 s minimum
    (40_500, "finetune+predict", 28_266, 12_114),
])
def test_time_plan_degrades_step_by_step_with_the_kaggle_defaults(budget, mode, finetune_s, predict_s):
    """The table in kaggle/README.md (defaults: reserve 120 s, overhead 90 s, grace 30 s, join 5 s)."""
    plan = kd.plan_time(_settings(time_budget_s=budget), now=1000.0)
    assert (plan.mode.value, round(plan.finetune_s), round(plan.predict_s)) == (mode, finetune_s, predict_s)
    assert (plan.reason != "") == (mode != "finetune+predict")


# ------------------------------------------------------------------------------------------ devices
def test_more_gpus_asked_than_present_are_clamped_and_none_means_a_cpu_plan(tmp_path):
    env = {"TRM_KAGGLE_INPUT": str(tmp_path), "TRM_KAGGLE_WORKING": str(tmp_path / "w"), "TRM_NUM_GPUS": "4"}
    two = kd.settings_from_env(env=env, probe=lambda: (2, True))
    assert (two.devices.gpus, two.devices.processes, two.devices.mixed_precision) == (2, 2, "bf16")
    assert "4 GPU(s) asked, 2 present: using 2" in two.devices.describe() and two.train_fraction == 0.7
    t4 = kd.settings_from_env(env={**env, "TRM_NUM_GPUS": ""}, probe=lambda: (2, False))  # bf16 only emulated
    assert (t4.devices.gpus, t4.devices.mixed_precision) == (2, "no")
    cpu = kd.settings_from_env(env=env, probe=lambda: (0, False))
    assert (cpu.devices.gpus, cpu.devices.processes, cpu.train_fraction) == (0, 1, 0.0)
    plan = kd.plan_time(cpu)
    assert plan.mode == kd.PlanMode.PREDICT_ONLY and "without a GPU" in plan.reason
    told = kd.settings_from_env(env={**env, "TRM_TRAIN_FRACTION": "0.5"}, probe=lambda: (0, False))
    assert told.train_fraction == 0.5  # said explicitly: fine-tunes on the CPU too
    with pytest.raises(ValueError, match="num_gpus"):
        kd.resolve_devices(-1, 2, True)


def test_the_fine_tune_child_runs_on_the_gpus_present(tmp_path, monkeypatch):
    """4 GPUs asked, 2 present: torchrun with 2 processes, bf16 as the devices allow, the global batch a multiple."""
    settings = kd.settings_from_env(env={"TRM_KAGGLE_INPUT": str(tmp_path), "TRM_KAGGLE_WORKING": str(tmp_path),
                                         "TRM_NUM_GPUS": "4", "TRM_MIN_TRAIN_S": "1"}, probe=lambda: (2, True))
    run = RunState(settings, settings.devices, cfg=tiny_config(), checkpoint=tmp_path / "pre.pt")
    run.cfg.mixed_precision = run.devices.mixed_precision
    run.status["augment"] = {"state": Outcome.OK.value}
    launched = []

    def fake_child(cmd, timeout_s, **kw):
        launched.append((cmd, timeout_s, kw))
        return kd.ChildResult(0, False, 1.0)

    monkeypatch.setattr(child_stages, "run_child", fake_child)
    with pytest.raises(RuntimeError, match="fine-tuning failed for good"):  # the fake child wrote no checkpoint
        child_stages.finetune(run)
    (cmd, timeout_s, kw), = launched
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in cmd
    assert kw["launcher"] and "mixed_precision=bf16" in cmd
    assert cmd[cmd.index("--out") + 1] == str(settings.run_dir) and Path(cmd[cmd.index("--init") + 1]).is_absolute()
    plan = run.status["finetune"]["attempts"][0]
    assert timeout_s == pytest.approx(settings.stage_overhead_s + plan["budget_s"], abs=1)


def test_prediction_runs_the_pretrained_weights_on_their_own_canvas_and_fine_tuned_ones_on_the_runs_buckets(
        tmp_path, monkeypatch, pretrained):
    """TRM_OVERRIDES gives the run canvas buckets: the fine-tune trains on them and prediction then runs on them;
    without a fine-tuned checkpoint the whole-canvas pretrained weights predict on the whole canvas (on buckets they
    would run in a mode they were never trained in)."""
    settings = kd.settings_from_env(env={"TRM_KAGGLE_INPUT": str(tmp_path), "TRM_KAGGLE_WORKING": str(tmp_path),
                                         "TRM_NUM_GPUS": "0"})
    cfg = tiny_config()
    cfg.data.canvas_buckets = "4,6"
    run = RunState(settings, settings.devices, cfg=cfg, checkpoint=pretrained)
    build_tiny_dataset(settings.run_dir / "dataset", num_tasks=3, num_aug=1)
    run.status["augment"] = {"state": Outcome.OK.value}
    launched = []
    monkeypatch.setattr(child_stages, "run_child", lambda cmd, timeout_s, **kw: (launched.append(cmd),
                                                                                 kd.ChildResult(1, False, 1.0))[1])

    def predicted_on() -> str:
        with pytest.raises(RuntimeError, match="left no candidates"):  # the fake child predicted nothing
            child_stages.predict(run)
        cmd = launched[-1]
        return next(a.split("=", 1)[1] for a in cmd if a.startswith("data.canvas_buckets="))

    assert predicted_on() == "" and run.status["predict"]["canvas_buckets"] == ""
    assert run.status["predict"]["checkpoint"].startswith("pretrained")
    (settings.run_dir / "checkpoints").mkdir()
    (settings.run_dir / "checkpoints" / "step_00000002.pt").write_bytes(pretrained.read_bytes())
    assert predicted_on() == "4,6" and run.status["predict"]["checkpoint"] == "fine-tuned"


def test_the_truth_figures_score_the_weights_on_the_canvas_prediction_ran_them_on(tmp_path, monkeypatch):
    """The score stage's ce_true is of the weights prediction used, on the canvas mode it ran them in (the
    pretrained whole-canvas weights on the whole canvas), not the run's buckets."""
    (tmp_path / "solutions.json").write_text(json.dumps({"t1": [[[1]]]}))
    settings = kd.settings_from_env(env={"TRM_KAGGLE_INPUT": str(tmp_path), "TRM_KAGGLE_WORKING": str(tmp_path),
                                         "TRM_NUM_GPUS": "0", "TRM_SOLUTIONS": str(tmp_path / "solutions.json")})
    settings.submission.write_text(json.dumps({"t1": [{"attempt_1": [[1]], "attempt_2": [[0]]}]}))
    cfg = tiny_config()
    cfg.data.canvas_buckets = "4,6"
    run = RunState(settings, settings.devices, cfg=cfg)
    (settings.run_dir / "dataset").mkdir(parents=True)
    run.status["predict"] = {"checkpoint_path": str(tmp_path / "pretrained_for_predict.pt"), "canvas_buckets": ""}
    seen = []
    monkeypatch.setattr("pipeline.data.tasks.load_solutions", lambda path: {"t1": [[[1]]]})
    monkeypatch.setattr(stages, "answered_dataset", lambda *a: None)
    monkeypatch.setattr(stages, "truth_figures", lambda weights, dataset, canvas_buckets: seen.append(canvas_buckets)
                        or {"ce_true": 1.0, "cell_acc_true": 0.5})
    assert "ce_true 1.0000" in stages.score(run).detail
    assert seen == [""]


# ------------------------------------------------------------------------------------------ the process tree
def _tree_alive(tmp_path: Path) -> list[int]:
    """The workers' and their grandchildren's pids still running (zombies count as ended)."""
    pids = []
    for path in tmp_path.glob("pid.*"):
        pids += [int(p) for p in path.read_text().split()]
    return [p for p in pids if is_running(p)]


def _stubborn_cmd(tmp_path: Path, mode: str) -> list[str]:
    """torchrun with 2 workers running the stubborn worker script."""
    return [*TORCHRUN, "--standalone", "--nproc-per-node=2", str(WORKER),
            str(tmp_path), mode]


def _wait_for_workers(tmp_path: Path, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while len(list(tmp_path.glob("pid.*"))) < 2 and time.monotonic() < end:
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process table is read from /proc")
def test_a_torchrun_child_at_its_timeout_leaves_no_process_behind(tmp_path, monkeypatch):
    """Rank 0 ignores SIGTERM (and has a grandchild that does too): killed after the grace. Rank 1 saves on
    SIGTERM and exits: it gets to, since torchrun itself is not signalled (its own shutdown would not wait). The
    timeout falls as soon as both workers run, not after a fixed number of seconds that must cover torchrun's start
    on a busy machine (the clock's part of a timeout: test_kaggle.py::test_child_timeout_stops_a_hung_stage)."""
    real_wait, waits = child_module._wait, []

    def timeout_once_the_workers_run(proc, tree, seconds):
        if waits:  # the grace after SIGTERM
            return real_wait(proc, tree, seconds)
        waits.append(seconds)  # the wait for the timeout: over once the workers run
        _wait_for_workers(tmp_path)
        return real_wait(proc, tree, 0.0)  # the process tree looked up once more; False: still running

    monkeypatch.setattr(child_module, "_wait", timeout_once_the_workers_run)
    result = kd.run_child(_stubborn_cmd(tmp_path, "mixed"), 300.0, cwd=tmp_path, grace_s=1.0, join_s=2.0,
                          launcher=True, log_path=tmp_path / "child.log")
    assert result.timed_out and len(list(tmp_path.glob("pid.*"))) == 2, (tmp_path / "child.log").read_text()
    assert _tree_alive(tmp_path) == []
    assert [p.name for p in tmp_path.glob("saved.*")] == ["saved.1"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process table is read from /proc")
def test_an_interrupted_torchrun_child_leaves_no_process_behind(tmp_path):
    def interrupt_when_started():
        _wait_for_workers(tmp_path)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):  # raised again once the tree is gone, not at the timeout of 300 s
        kd.run_child(_stubborn_cmd(tmp_path, "ignore"), 300.0, cwd=tmp_path, grace_s=1.0, join_s=2.0, launcher=True)
    assert len(list(tmp_path.glob("pid.*"))) == 2 and _tree_alive(tmp_path) == []


# ------------------------------------------------------------------------------------------ relative paths
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    build_tiny_dataset(root / "dataset", num_tasks=3, num_aug=1)
    return train(tiny_config(max_steps=2), root / "dataset", root / "run", progress=False)


def test_a_rehearsal_with_relative_paths(tmp_path, monkeypatch, pretrained):
    """Every path given relative to the notebook's folder, while the children run inside the run folder: the
    settings make them absolute, so fine-tuning (--init) and prediction find their files."""
    from pipeline.data.tasks import load_tasks, select_tasks

    monkeypatch.chdir(tmp_path)
    tasks = select_tasks(load_tasks("arc-agi-1/evaluation").tasks, max_side=CANVAS)[:2]
    Path("input").mkdir()
    Path("input/test_challenges.json").write_text(json.dumps({t.id: {
        "train": [{"input": i.tolist(), "output": o.tolist()} for i, o in t.train],
        "test": [{"input": g.tolist()} for g in t.test_inputs]} for t in tasks}))
    Path("pre.pt").write_bytes(pretrained.read_bytes())
    env = {"TRM_KAGGLE_INPUT": "input", "TRM_KAGGLE_WORKING": "working", "TRM_CHALLENGES": "input/test_challenges.json",
           "TRM_CHECKPOINT": "pre.pt", "TRM_RUN_DIR": "working/run", "TRM_NUM_GPUS": "0", "TRM_PROGRESS": "0",
           "TRM_TRAIN_FRACTION": "0.5", "TRM_DRAFT_TIME_BUDGET_S": "600", "TRM_STAGE_OVERHEAD_S": "20",
           "TRM_KILL_GRACE_S": "2", "TRM_SUBMIT_RESERVE_S": "1", "TRM_MIN_TRAIN_S": "1", "TRM_MIN_PREDICT_S": "1",
           "TRM_OVERRIDES": "global_batch_size=4 data.num_aug=1 max_steps=1 predict.max_variants=2 predict.rescore_views=1"}
    run = kd.KaggleRun(kd.settings_from_env(env=env))
    assert run.s.run_dir == tmp_path / "working" / "run" and run.s.checkpoint == tmp_path / "pre.pt"
    for stage in (run.write_fallback, run.augment, run.finetune, run.predict, run.submit):
        assert stage(), run.status
    assert run.status["finetune"]["step"] == 1 and run.status["predict"]["checkpoint"] == "fine-tuned"
    assert len(Predictions.load(tmp_path / "working" / "run" / "predictions.npz")) > 0
    assert run.summary()["problems"] == []


# ------------------------------------------------------------------------------------------ what each input got
def test_the_report_counts_what_every_test_input_got_in_one_vocabulary(tmp_path, capsys, pretrained):
    """A run where some test inputs get no valid candidate: one input with two candidates, one with a single
    candidate (attempt_2 is then its fallback grid), one whose every candidate is invalid, and a task the model
    never saw (too big). The PHASE line, the phase table, the PATH line and kaggle_status.json all count test
    inputs in the same words, and none of them calls a task whose inputs fell back "from the model". With known
    answers the score stage also reports ce_true of the weights prediction used."""
    import numpy as np

    from augment.dataset import build_dataset
    from pipeline.data.tasks import Task
    from pipeline.inference.predictions import PredictionsWriter

    def grid(*rows):
        return np.array(rows, np.uint8)

    pair = (grid([1, 2]), grid([2, 1]))
    tasks = [Task("aaaa0000", [pair], [grid([3, 4]), grid([5, 6])], None, "test"),
             Task("bbbb0000", [pair], [grid([7, 8])], None, "test")]
    run_dir = tmp_path / "working" / "trm_run"
    challenges = {t.id: {"train": [{"input": pair[0].tolist(), "output": pair[1].tolist()}],
                         "test": [{"input": g.tolist()} for g in t.test_inputs]} for t in tasks}
    challenges["big00000"] = {"train": [{"input": [[1] * 9] * 9, "output": [[2] * 9] * 9}],
                              "test": [{"input": [[7] * 9] * 9}]}
    (tmp_path / "c.json").write_text(json.dumps(challenges))
    (tmp_path / "test_solutions.json").write_text(json.dumps({"aaaa0000": [[[4, 3]], [[6, 5]]], "bbbb0000": [[[8, 7]]],
                                                 "big00000": [[[1] * 9] * 9]}))
    run = kd.KaggleRun(kd.KaggleSettings(challenges=tmp_path / "c.json", working=tmp_path / "working",
                                         run_dir=run_dir, devices=kd.Devices(0, False), time_budget_s=HOUR,
                                         solutions=tmp_path / "test_solutions.json"))
    assert run.write_fallback()
    build_dataset(tasks, {t.id for t in tasks}, num_aug=1, seed=0, canvas=CANVAS, progress=False).save(run_dir / "dataset")
    writer = PredictionsWriter()
    writer.add("aaaa0000", 0, [0, 1, 0], 0.5, [grid([4, 3]), grid([9]), grid([4, 3])])  # two distinct candidates
    writer.add("aaaa0000", 1, [0, 1], 0.5, [None, None])  # nothing valid
    writer.add("bbbb0000", 0, [0, 1], 0.5, [grid([8, 7]), None])  # one candidate
    writer.finish().save(run_dir / "predictions.npz")
    run.state.cfg = preset("kaggle")
    run.state.cfg.model = kd.checkpoint_model_config(pretrained)[0]
    weights = pretrained_for_dataset(run_dir, run.state.cfg, pretrained)
    run.status["predict"] = {"state": "ok", "checkpoint": "fine-tuned", "checkpoint_path": str(weights)}
    assert run.submit() and run.score()
    summary = run.summary()

    words = {"two model candidates": 1, "one model candidate + fallback": 1, "fallback only": 2}
    record = json.loads((run_dir / "kaggle_status.json").read_text())["stages"]["submit"]
    assert record["test_inputs"] == words
    assert record["tasks"] == {"model candidates for every test input": 1, "some test inputs fallback only": 1,
                               "fallback only": 1}
    assert record["fallback_only_tasks"] == ["big00000"]
    assert record["fallback_only_inputs"] == ["aaaa0000 test 1", "big00000 test 0"]
    said = "4 test inputs in 3 tasks: 1 two model candidates, 1 one model candidate + fallback, 2 fallback only"
    printed = capsys.readouterr().out
    assert re.search(rf"PHASE submit: .*outcome ok: {re.escape(said)}", printed)
    assert re.search(rf"\]\s+submit\s+ok\s.*{re.escape(said)}", printed)  # the phase table
    assert "-> 4 test inputs: 1 two model candidates, 1 one model candidate + fallback, 2 fallback only" in summary["path"]
    assert "tasks from the model" not in printed
    submission = json.loads((tmp_path / "working" / "submission.json").read_text())
    assert submission["aaaa0000"][0] == {"attempt_1": [[4, 3]], "attempt_2": [[9]]}
    assert submission["aaaa0000"][1] == {"attempt_1": [[5, 6]], "attempt_2": [[5, 6]]}  # fallback only
    assert submission["bbbb0000"][0] == {"attempt_1": [[8, 7]], "attempt_2": [[7, 8]]}  # candidate + fallback
    scored = json.loads((run_dir / "kaggle_status.json").read_text())["stages"]["score"]
    assert (scored["pass2"], scored["tasks_solved"], scored["test_outputs"]) == (0.5, 1, 4)  # 4,3 and 8,7 right
    assert 0 < scored["ce_true"] < 10 and 0 <= scored["cell_acc_true"] <= 1
    assert re.search(r"PHASE score: .*outcome ok: pass@2 50.0% of 4 test outputs \(1 of 3 tasks solved\), ce_true "
                     r"\d+\.\d{4}", printed)


# ------------------------------------------------------------------------------------------ in-process windows
def test_augment_and_submit_in_the_drivers_process_end_within_their_windows(tmp_path, monkeypatch):
    """Augment and submit run in the driver's process; a pathological input (here: a body that never ends) is
    stopped at the end of its window, and the stage fails with the fallback submission in place."""
    from augment.dataset import AugmentedDataset
    from pipeline.kaggle_driver import budget
    from pipeline.kaggle_driver.stages import WindowExceeded, time_window

    s = _settings(time_budget_s=1000.0, submit_reserve_s=100.0)
    assert budget.augment_window_s(s, now=1000.0) == pytest.approx(budget.AUGMENT_SHARE * 900)
    assert budget.submit_window_s(s, now=1000.0 + 800) == pytest.approx(200.0)  # the rest of the budget
    assert budget.submit_window_s(s, now=1000.0 + 990) == 100.0  # never less than its reserve
    with pytest.raises(WindowExceeded, match="augment: no end within"):  # raised inside the sleep: it never ended
        with time_window(0.5, "augment"):
            time.sleep(30)

    settings = kd.settings_from_env(env={"TRM_KAGGLE_INPUT": str(tmp_path), "TRM_KAGGLE_WORKING": str(tmp_path),
                                         "TRM_SUBMIT_RESERVE_S": "1"}, probe=lambda: (0, False))
    settings.started_at = time.time() - settings.time_budget_s  # at the deadline: submit gets its reserve, 1 s
    run = RunState(settings, settings.devices, fallback={"t": [{"attempt_1": [[0]], "attempt_2": [[0]]}]})
    run.status["predict"] = {"state": Outcome.OK.value}
    settings.run_dir.mkdir(parents=True)
    (settings.run_dir / "predictions.npz").write_bytes(b"")
    monkeypatch.setattr(AugmentedDataset, "load", lambda *a, **k: time.sleep(30))
    with pytest.raises(WindowExceeded, match="submit: no end within its window of 1 s"):
        stages.submit(run)


def test_overrides_that_a_planned_fine_tune_replaces_are_named():
    """TRM_OVERRIDES setting lr or train_variants under the kaggle preset's fine-tune plan would have no effect:
    the driver names them in a warning, unless the overrides also say finetune_plan (either way)."""
    assert stages.planned_overrides(["lr=1e-3", "data.num_aug=7", " train_variants=4", "ema_rate=0.99"]) == \
        ["lr", "train_variants"]
    assert stages.planned_overrides(["lr=1e-3", "finetune_plan=false"]) == []
    assert stages.planned_overrides(["global_batch_size=64"]) == []
