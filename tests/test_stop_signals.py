"""Nothing done is lost to a timeout: SIGTERM during fine-tuning leaves a resumable checkpoint that prediction
uses (one process, and two under torchrun stopped by the driver); SIGTERM during prediction or during re-scoring
keeps the candidates made so far; the periodic time-based checkpoint survives a crash; re-scoring sharded over 2
processes scores what one process scores."""
from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.inference.rescore as rescore_module
from pipeline.training import checkpoint as ckpt
from pipeline.config import PredictConfig
from pipeline.kaggle_driver import launch_command, run_child
from pipeline.kaggle_driver.processes import is_running
from pipeline.model.trm import TRM
from pipeline.inference.predict import predict_to_file
from pipeline.inference.predictions import Predictions
from pipeline.core.signals import Stopped
from pipeline.training.train import BUDGET_CHECK_EVERY, train
from tiny import build_tiny_dataset, free_port, tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
PREDICT = PredictConfig(max_variants=4, batch_size=2, rescore_views=3, rescore_top_k=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("stop") / "data", num_tasks=3, num_aug=3)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    return train(tiny_config(max_steps=2), data, tmp_path_factory.mktemp("stop") / "run", progress=False)


def _rows(data: Path) -> int:
    from augment.dataset import AugmentedDataset

    return len(AugmentedDataset.load(data).test_rows(PREDICT.max_variants)["variant"])


def test_sigterm_during_fine_tuning_leaves_a_resumable_checkpoint_that_prediction_uses(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.run", "--stage", "train", "--preset", "demo", "--data", str(data),
           "--out", str(run), "--quiet", *tiny_overrides(max_steps=10**6, checkpoint_every=10**6, log_every=1)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    end = time.monotonic() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and child.poll() is None:
        assert time.monotonic() < end, "training did not start"
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    output = child.communicate(timeout=60)[0].decode()
    assert child.returncode == 128 + signal.SIGTERM, output
    assert "train: stopped by a signal at step" in output
    last = ckpt.latest_checkpoint(run / "checkpoints")
    state = ckpt.load_training_state(last)
    assert not state["final"] and state["carry"] is not None and state["step"] >= 3  # resumable exactly
    predictions = Predictions.load(predict_to_file(data, last, tmp_path / "p.npz", PREDICT, progress=False))
    assert len(predictions) == _rows(data)
    again = train(tiny_config(max_steps=state["step"] + 2), data, run, resume=True, progress=False)
    assert ckpt.checkpoint_step(again) == state["step"] + 2  # an out-of-memory retry continues from it


def _sigterm_at_call(monkeypatch, target, name: str, call: int) -> list[int]:
    """Wrap target.name so that its `call`-th call sends this process SIGTERM first; returns the call counter."""
    original = getattr(target, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)
    return calls


def test_sigterm_during_prediction_writes_the_candidates_so_far(data, trained, tmp_path, monkeypatch):
    _sigterm_at_call(monkeypatch, TRM, "forward", 4)  # 3 ACT steps a batch: in the second batch of 2 rows
    out = tmp_path / "p.npz"
    with pytest.raises(Stopped) as stopped:
        predict_to_file(data, trained, out, PREDICT, progress=False)
    assert stopped.value.code == 128 + signal.SIGTERM
    predictions = Predictions.load(out)
    assert len(predictions) == 4 < _rows(data) and predictions.logp is None  # no re-scoring after a stop
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is the caller's again


def test_sigterm_during_rescoring_keeps_the_candidates_and_the_views_scored(data, trained, tmp_path, monkeypatch):
    calls = _sigterm_at_call(monkeypatch, rescore_module, "view_logprobs", 1)
    out = tmp_path / "p.npz"
    with pytest.raises(Stopped):
        predict_to_file(data, trained, out, PREDICT, progress=False)
    assert calls[0] == 1  # stopped after the first batch of (test input, view) rows
    predictions = Predictions.load(out)
    assert len(predictions) == _rows(data)  # every candidate of the finished prediction pass
    scored = np.isfinite(predictions.logp) & predictions.valid
    assert scored.any() and (predictions.logp_cells[scored] > 0).all()


def test_the_periodic_checkpoint_survives_a_crash_and_resumes(data, tmp_path, monkeypatch):
    """checkpoint_every_s (the kaggle preset: 900 s) saves between the step-based checkpoints; here every step."""
    original, calls = TRM.forward, [0]

    def crash_at_step_4(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise MemoryError("simulated out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TRM, "forward", crash_at_step_4)
    cfg = dict(max_steps=6, checkpoint_every=1000, checkpoint_every_s=1e-9)
    with pytest.raises(MemoryError):
        train(tiny_config(**cfg), data, tmp_path / "run", progress=False)
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.checkpoint_step(last) == 3 and not ckpt.load_training_state(last)["final"]
    monkeypatch.setattr(TRM, "forward", original)
    assert ckpt.checkpoint_step(train(tiny_config(**cfg), data, tmp_path / "run", resume=True, progress=False)) == 6


def test_rescoring_sharded_over_two_processes_scores_as_one_process(data, trained, tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "two.npz"
    workers = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist_predict_worker.py"), str(data),
                                 str(trained), str(out)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        outputs = [w.communicate(timeout=120)[0].decode() for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert all("world 2" in out for out in outputs), outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.npz"]  # shards and partial files cleaned up
    two = Predictions.load(out)
    one = Predictions.load(predict_to_file(data, trained, tmp_path / "one.npz", PREDICT, progress=False))

    def by_view(p: Predictions) -> dict:
        return {(p.task_ids[p.task[i]], int(p.test_index[i]), int(p.variant[i])): (float(p.logp[i]), int(p.logp_cells[i]))
                for i in range(len(p))}

    a, b = by_view(one), by_view(two)
    assert a.keys() == b.keys() and len(a) == _rows(data)
    for key, (logp, cells) in a.items():
        assert b[key][1] == cells and (np.isnan(logp) == np.isnan(b[key][0]))
        assert np.isnan(logp) or b[key][0] == pytest.approx(logp, rel=1e-5)
    assert np.isfinite(two.logp).any()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process tree is read from /proc")
def test_an_interrupted_two_process_fine_tune_saves_a_checkpoint_and_leaves_nothing_running(data, tmp_path):
    """The driver's stop under torchrun: both workers get SIGTERM, agree on a step (a collective every
    BUDGET_CHECK_EVERY steps), save one resumable checkpoint of the whole global batch, and exit; nothing is left."""
    run = tmp_path / "run"
    args = ["--stage", "train", "--preset", "demo", "--data", str(data), "--out", str(run), "--quiet",
            *tiny_overrides(max_steps=10**6, checkpoint_every=10**6, log_every=1)]
    workers: list[int] = []

    def interrupt_once_training():
        metrics = run / "metrics.jsonl"
        end = time.monotonic() + 120
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.monotonic() < end:
            time.sleep(0.1)
        workers.extend(int(p) for p in subprocess.run(["pgrep", "-f", str(run)], capture_output=True,
                                                       text=True).stdout.split())
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_training, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_child(launch_command(2, args), 300.0, cwd=tmp_path, grace_s=60.0, join_s=2.0, launcher=True,
                  env={**os.environ, "OMP_NUM_THREADS": "1"}, log_path=tmp_path / "child.log")
    log = (tmp_path / "child.log").read_text()
    assert "train: stopped by a signal at step" in log, log[-3000:]
    state = ckpt.load_training_state(ckpt.latest_checkpoint(run / "checkpoints"))
    assert not state["final"] and state["step"] % BUDGET_CHECK_EVERY == 0 and state["world"] == 2
    assert state["carry"]["halted"].shape[0] == 8  # the whole global batch, gathered from both processes
    assert len(workers) >= 3 and not any(is_running(pid) for pid in workers)  # torchrun and its 2 workers
