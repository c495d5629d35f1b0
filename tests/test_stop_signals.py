"""Nothing done is lost to a timeout: SIGTERM during fine-tuning leaves a checkpoint to resume from that prediction
uses (one process, and two under torchrun with the paper model's shapes, within the driver's kill grace); SIGTERM
during an evaluation ends it and saves; SIGTERM during prediction or during re-scoring
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
from pipeline.kaggle_driver.child import is_running
from pipeline.model.trm import TRM
from pipeline.inference.predict import predict_to_file
from pipeline.inference.predictions import Predictions
from pipeline.core.signals import Stopped
from pipeline.training.train import train
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
    state = ckpt.check_training_state(ckpt.load_training_state(last), last)
    assert not state["final"] and state["stopped"] and state["step"] >= 3
    assert state["carry"] is None  # saved without the carry (to fit the kill grace): the rows in flight restart
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


def test_sigterm_during_an_evaluation_ends_it_at_the_next_batch_and_saves(data, tmp_path, monkeypatch):
    """A stop request during evaluation (minutes at the paper's size) ends it after the batch in progress: no
    evaluation row or evaluated weights from a partial evaluation, a checkpoint to resume from, then Stopped."""
    import pipeline.inference.predict as predict_module
    from augment.dataset import AugmentedDataset
    from pipeline.cli.evaluate import HeldOutEvaluator

    real = HeldOutEvaluator.for_dataset(AugmentedDataset.load(data), views=4, batch_size=2)
    batches = _sigterm_at_call(monkeypatch, predict_module, "_predict_batch", 1)
    truth = _sigterm_at_call(monkeypatch, rescore_module, "view_logprobs", 10**9)  # counts only
    run = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        train(tiny_config(max_steps=4, eval_every=2, checkpoint_every=100), data, run, progress=False, evaluator=real)
    assert "during the evaluation at step 2" in str(stopped.value)
    assert batches[0] == 1 and truth[0] == 0  # of the rows' batches and the truth's views, one batch ran
    state = ckpt.load_training_state(ckpt.latest_checkpoint(run / "checkpoints"))
    assert state["step"] == 2 and state["stopped"] and not state["final"]
    assert not list((run / "checkpoints" / "evaluated").glob("*.pt"))
    assert all('"eval"' not in line for line in (run / "metrics.jsonl").read_text().splitlines())


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


@pytest.fixture(scope="module")
def paper_canvas_data(tmp_path_factory) -> Path:
    """Two ARC-AGI-1 tasks on the paper's 30x30 canvas (one held out), one augmentation each."""
    from augment.dataset import build_dataset
    from pipeline.data.tasks import load_tasks

    tasks = load_tasks("arc-agi-1/training").tasks[:1] + load_tasks("arc-agi-1/evaluation").tasks[:1]
    out = tmp_path_factory.mktemp("paper") / "data"
    build_dataset(tasks, {tasks[1].id}, num_aug=1, seed=0, canvas=30, progress=False).save(out)
    return out


# The paper model's shapes (pipeline.model.trm.ModelConfig.paper_arc: width 512, 8 heads, 2 layers, 16 puzzle-embedding
# positions of 512, the 30x30 canvas), which are what a checkpoint holds, at its recursion's least depth (the same
# tensors, 1 cycle each), the rows on a 12x12 canvas bucket (these tasks fit it; docs/BUCKETS.md) so that a step
# is a fraction of a second on a CPU, and the smallest global batch over 2 processes.
PAPER_SHAPES = ["--set", "model.H_cycles=1", "--set", "model.L_cycles=1", "--set", "data.canvas_buckets=12,30",
                "--set", "global_batch_size=2",
                "--set", "max_steps=1000000", "--set", "checkpoint_every=1000000", "--set", "log_every=1",
                "--set", "eval_every=0", "--set", "eval_every_epochs=0"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process tree is read from /proc")
def test_a_stopped_two_process_paper_shape_fine_tune_saves_within_the_drivers_grace(paper_canvas_data, tmp_path):
    """The driver's stop under torchrun, with the paper model's shapes: both workers get SIGTERM, agree on the
    next step (the stop flag is summed every step), save one checkpoint without the carry and exit, all before the
    kill grace the driver derives from that checkpoint's size and this disk (SIGKILL would lose it); nothing is
    left running."""
    from pipeline.config import preset
    from pipeline.kaggle_driver.budget import stop_grace_s
    from pipeline.kaggle_driver.settings import KaggleSettings
    from pipeline.kaggle_driver.stages import write_rate

    run = tmp_path / "run"
    args = ["--stage", "train", "--preset", "arc1", "--data", str(paper_canvas_data), "--out", str(run), "--quiet",
            *PAPER_SHAPES]
    from augment.dataset import AugmentedDataset

    model = preset("arc1").model
    model.num_puzzle_identifiers = AugmentedDataset.load(paper_canvas_data).num_puzzle_identifiers
    grace = stop_grace_s(KaggleSettings(tmp_path, tmp_path, tmp_path), ckpt.stop_checkpoint_bytes(model),
                         write_rate(tmp_path))
    workers: list[int] = []
    interrupted: list[float] = []

    def interrupt_once_training():
        metrics = run / "metrics.jsonl"
        end = time.monotonic() + 300
        while (not metrics.exists() or not metrics.read_text().splitlines()) and time.monotonic() < end:
            time.sleep(0.1)
        workers.extend(int(p) for p in subprocess.run(["pgrep", "-f", str(run)], capture_output=True,
                                                       text=True).stdout.split())
        interrupted.append(time.monotonic())
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_training, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_child(launch_command(2, args), 600.0, cwd=tmp_path, grace_s=grace, join_s=2.0, launcher=True,
                  env={**os.environ, "OMP_NUM_THREADS": "1"}, log_path=tmp_path / "child.log")
    stopped_s = time.monotonic() - interrupted[0]
    log = (tmp_path / "child.log").read_text()
    assert "train: stopped by a signal at step" in log, log[-3000:]
    last = ckpt.latest_checkpoint(run / "checkpoints")
    state = ckpt.check_training_state(ckpt.load_training_state(last), last)
    assert state["stopped"] and not state["final"] and state["world"] == 2 and state["carry"] is None
    assert state["config"]["model"]["hidden_size"] == 512 and state["model"]["puzzle_emb.weights"].shape == (model.num_puzzle_identifiers, 512)
    assert last.stat().st_size <= ckpt.stop_checkpoint_bytes(model)  # the estimate the grace is derived from holds
    # no other checkpoint was due, so this stop checkpoint, written whole (atomically) before the SIGKILL that ends
    # the grace, is the proof that the save fit the grace: what the test asserts, not the seconds it took
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [last.name]
    print(f"SIGTERM to the end of the job: {stopped_s:.1f} s; the derived kill grace: {grace:.1f} s")
    assert len(workers) >= 3 and not any(is_running(pid) for pid in workers)  # torchrun and its 2 workers
