"""The trainer: it runs and logs, resumes exactly after SIGKILL, splits over 2 processes without changing the
result, fine-tunes from a checkpoint on new puzzles, and stops cleanly on a non-finite loss."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.kaggle_driver import faults
from pipeline.model import loading
from pipeline.training import checkpoint as ckpt
from pipeline.model.trm import TRM
from tiny import TORCHRUN, TWO_PROCESS_SETTINGS, build_tiny_dataset, free_port, tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "trm_parity"  # vendored from shared/golden


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "dataset")


def _run_cli(args: list[str], env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", "--stage", "train", "--preset", "demo", "--data", str(data),
            "--out", str(out), "--quiet", *extra]


def _train_here(args: list[str]) -> None:
    """The command of `_train_args` in this process on one thread, as its child processes compute (a reference
    run without a second Python and torch start-up)."""
    from pipeline.run import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(args[3:]) == 0
    finally:
        torch.set_num_threads(threads)


def _final_state(out: Path) -> dict:
    return ckpt.load_training_state(ckpt.latest_checkpoint(out / "checkpoints"))


def _assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a["step"] == b["step"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=atol, rtol=0, msg=f"model {key}")
    for key in a["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][key], b["ema"]["shadow"][key], atol=atol, rtol=0)
    assert (a["carry"] is None) == (b["carry"] is None)
    for key in ("z_H", "z_L", "steps", "halted", "data.inputs", "data.puzzle_identifiers", "sides") if a["carry"] else ():
        torch.testing.assert_close(a["carry"][key], b["carry"][key], atol=atol, rtol=0, msg=f"carry {key}")
    assert a["sampler"] == b["sampler"]


def test_train_runs_logs_and_keeps_checkpoints(tiny_data: Path, tmp_path: Path):
    from pipeline.training.train import train

    last = train(tiny_config(), tiny_data, tmp_path, progress=False)
    assert last == tmp_path / "checkpoints" / "step_00000012.pt"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000008.pt", "step_00000012.pt"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "lm_loss", "q_halt_loss", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lr",
                "examples_per_s"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    state = ckpt.load_training_state(last)
    assert state["final"] and state["step"] == 12 and state["carry"] is None  # the final one needs no carry
    state = ckpt.load_training_state(tmp_path / "checkpoints" / "step_00000008.pt")
    assert state["carry"]["z_H"].shape[0] == 8  # the whole global batch's carry
    assert json.loads((tmp_path / "config.json").read_text())["model"]["seq_len"] == 36


BUCKETS = ["", "4,6"]  # the whole canvas, and canvas buckets (2/3 of the tiny examples fit the 4x4 one)


@pytest.mark.parametrize("buckets", BUCKETS)
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_data: Path, tmp_path: Path, buckets: str, capsys):
    """The victim kills itself with SIGKILL at its 11th forward pass (the TRM_FAULTS hook), so that the kill lands
    at the same step in every run: in step 11 on the whole canvas, earlier on buckets (a step on two buckets is two
    forward passes)."""
    steps = tiny_overrides(max_steps=16, checkpoint_every=4, keep_checkpoints=0, **{"data.canvas_buckets": buckets})
    _train_here(_train_args(tiny_data, tmp_path / "whole", *steps))
    out = tmp_path / "killed"
    victim = _run_cli([sys.executable, "-m", faults.CHILD_MODULE, *_train_args(tiny_data, out, *steps)[3:]],
                      {"TRM_FAULTS": "train:kill_after_calls=10"})
    log = victim.communicate(timeout=180)[0]
    assert victim.returncode == -signal.SIGKILL and "TRM_FAULTS: SIGKILL at forward pass 11" in log, log
    killed_at = ckpt.checkpoint_step(ckpt.latest_checkpoint(out / "checkpoints"))
    assert killed_at == (8 if not buckets else 4)
    _train_here(_train_args(tiny_data, out, "--resume", *steps))  # a fresh start: what it has is on disk
    assert f"at step {killed_at}" in capsys.readouterr().out
    _assert_same_state(_final_state(tmp_path / "whole"), _final_state(out), atol=1e-6)
    name = "step_00000012.pt"  # the last one with a carry
    _assert_same_state(ckpt.load_training_state(tmp_path / "whole" / "checkpoints" / name),
                       ckpt.load_training_state(out / "checkpoints" / name), atol=1e-6)


@pytest.mark.parametrize("buckets", BUCKETS)
def test_two_processes_equal_one(tiny_data: Path, tmp_path: Path, buckets: str, request):
    """On the whole canvas the 2 processes' run is the session's (conftest.py: two_process_run), which the
    multi-node test compares 2 nodes with; on canvas buckets one of its own."""
    steps = [*TWO_PROCESS_SETTINGS, "--set", f"data.canvas_buckets={buckets}"]
    if buckets:
        data, two_run = tiny_data, tmp_path / "two"
        two = _run_cli([*TORCHRUN, "--nproc-per-node", "2", "--master-port",
                        str(free_port()), *_train_args(data, two_run, *steps)[1:]])
        log_two = two.communicate(timeout=240)[0]
        assert two.returncode == 0, log_two
    else:
        two_run = request.getfixturevalue("two_process_run")
        data, log_two = two_run / "dataset", (two_run / "train.log").read_text()
    assert "on 2 process(es)" in log_two
    _train_here(_train_args(data, tmp_path / "one", *steps))
    a, b = _final_state(tmp_path / "one"), _final_state(two_run)
    assert b["world"] == 2
    for key in a["model"]:  # dense weights and the puzzle-embedding table
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=0, msg=key)
    a3, b3 = (ckpt.load_training_state(run / "checkpoints" / "step_00000003.pt") for run in (tmp_path / "one", two_run))
    for key in ("halted", "steps", "data.puzzle_identifiers", "sides"):  # the same rows halted, took the same examples
        torch.testing.assert_close(a3["carry"][key], b3["carry"][key])
    torch.testing.assert_close(a3["carry"]["z_H"], b3["carry"]["z_H"], atol=1e-5, rtol=0)
    # only rank 0 writes: one metrics line per logging step, not two
    rows = [json.loads(line) for line in (two_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "train", "eval"]  # the final evaluation, sharded over both
    # every process counts the grid tokens of every row: 36 per row on the 6x6 canvas, 16 on the 4x4 bucket
    tokens = [r["grid_tokens_per_row"] for r in rows if r["kind"] == "train"]
    assert all(16 < t < 36 for t in tokens) if buckets else tokens == [36, 36]
    evaluated = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {k: evaluated[k] for k in ("pass2", "oracle", "views", "test_outputs")} == {
        k: rows[-1][k] for k in ("pass2", "oracle", "views", "test_outputs")}


def test_finetune_on_new_puzzles_starts_from_mean_rows(tiny_data: Path, tmp_path: Path):
    from augment.dataset import AugmentedDataset
    from pipeline.training.train import train

    base = train(tiny_config(max_steps=4), tiny_data, tmp_path / "base", progress=False)
    other = build_tiny_dataset(tmp_path / "other", num_tasks=3, num_aug=2, offset=6)
    ds = AugmentedDataset.load(other)
    cfg = tiny_config(max_steps=2, freeze_weights_steps=2)
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = 36, ds.num_puzzle_identifiers
    model = TRM(cfg.model)
    loading.init_from_checkpoint(model, base, verbose=False)
    saved = ckpt.load_training_state(base)
    old_rows = saved["model"]["puzzle_emb.weights"][1:]
    expected = old_rows.mean(0).expand(ds.num_puzzle_identifiers, -1)
    torch.testing.assert_close(model.puzzle_emb.weights, expected)
    for name, w in saved["ema"]["shadow"].items():  # fine-tuning starts from the EMA weights
        torch.testing.assert_close(dict(model.named_parameters())[name], w)

    last = train(cfg, other, tmp_path / "ft", init_checkpoint=base, progress=False)
    state = ckpt.load_training_state(last)
    for name, w in saved["ema"]["shadow"].items():  # frozen for the first 2 steps: dense weights unchanged
        torch.testing.assert_close(state["model"][name], w)
    assert not torch.allclose(state["model"]["puzzle_emb.weights"], expected)  # the rows did train


def test_reference_checkpoint_initialises_a_finetune(tmp_path: Path):
    from pipeline.model.reference import config_from_reference

    cfg = config_from_reference(json.loads((GOLDEN / "config.json").read_text())["model_config"])
    cfg.num_puzzle_identifiers = 25  # a new dataset with other puzzles than the checkpoint's 10 rows
    sd = torch.load(GOLDEN / "state_dict.pt")
    path = tmp_path / "ref.pt"
    torch.save({"_orig_mod.model." + k: v for k, v in sd.items()}, path)
    model = TRM(cfg)
    loading.init_from_checkpoint(model, path, verbose=False)
    torch.testing.assert_close(model.puzzle_emb.weights, sd["inner.puzzle_emb.weights"][1:].mean(0).expand(25, -1))
    torch.testing.assert_close(model.lm_head.weight, sd["inner.lm_head.weight"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data: Path, tmp_path: Path, monkeypatch):
    import pipeline.training.train as train_mod

    import pipeline.training.step as step_mod
    real = step_mod.act_loss
    calls = {"n": 0}

    def poisoned(outputs, carry):
        loss, metrics = real(outputs, carry)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 5 else loss), metrics

    monkeypatch.setattr(step_mod, "act_loss", poisoned)
    with pytest.raises(train_mod.NonFiniteLossError, match="last good checkpoint is .*step_00000004.pt"):
        train_mod.train(tiny_config(checkpoint_every=2, log_every=1, max_steps=10), tiny_data, tmp_path, progress=False)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.checkpoint_step(last) == 4
    state = ckpt.load_training_state(last)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_gradient_accumulation_matches_one_pass(tiny_data: Path, tmp_path: Path):
    """Two micro-batches of 4 rows = one pass of 8 rows (while every row halts at the same step, the refill
    order is the same too)."""
    from pipeline.training.train import train

    a = ckpt.load_training_state(train(tiny_config(max_steps=4), tiny_data, tmp_path / "one", progress=False))
    b = ckpt.load_training_state(
        train(tiny_config(max_steps=4, grad_accum_steps=2), tiny_data, tmp_path / "two", progress=False))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=0, msg=key)


def test_evaluation_during_training_logs_and_keeps_weights(tiny_data: Path, tmp_path: Path):
    from augment.dataset import AugmentedDataset
    from pipeline.cli.evaluate import HeldOutEvaluator
    from pipeline.training.train import train

    cfg = tiny_config(eval_every=4, eval_views=2, keep_checkpoints=1)
    evaluator = HeldOutEvaluator.for_dataset(AugmentedDataset.load(tiny_data), cfg.eval_views)
    train(cfg, tiny_data, tmp_path, progress=False, evaluator=evaluator)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    for r in evals:
        assert r["views"] == 2 and r["tasks"] == 2 and 0 <= r["pass1"] <= r["pass2"] <= r["oracle"] <= 1
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / "evaluated").iterdir())
    assert kept == ["step_00000004.pt", "step_00000008.pt", "step_00000012.pt"]  # none cleaned up
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 1
    model = loading.load_model_for_inference(tmp_path / "checkpoints" / "evaluated" / "step_00000008.pt")
    assert isinstance(model, TRM)
    # the evaluation uses the EMA weights and gives training back its own: the run equals one without evaluation
    plain = tmp_path / "plain"
    train(tiny_config(keep_checkpoints=1), tiny_data, plain, progress=False)
    _assert_same_state(_final_state(tmp_path), _final_state(plain))
    assert HeldOutEvaluator.for_dataset(AugmentedDataset.load(tiny_data), 2) is not None
