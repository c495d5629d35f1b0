"""The trainer's host side: each process encodes only its own refill rows, a steady step reads nothing back
from the device, the time budget is checked with a collective only every few steps, and the gradient gate runs
before a mixed-precision run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.training.refill as refill_module
import pipeline.training.runtime as runtime_module
import pipeline.training.train as train_module
from augment.dataset import AugmentedDataset
from pipeline.training import checkpoint as ckpt
from pipeline.training.batches import TrainSampler
from pipeline.training.loss import METRIC_KEYS
from pipeline.training.refill import Refill
from pipeline.training.runtime import Runtime, make_runtime
from pipeline.training.state import blank_carries, build_state
from pipeline.training.step import train_step
from pipeline.training.train import LoopChecks, train
from tiny import build_tiny_dataset, tiny_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "dataset")


def test_each_process_encodes_only_its_rows_and_gets_what_one_process_would(tiny_data: Path, monkeypatch):
    dataset = AugmentedDataset.load(tiny_data)
    local, seq_len = 4, dataset.canvas**2
    halted = np.array([1, 0, 1, 1, 0, 1, 1, 0], dtype=bool)  # global mask of 2 processes x 4 rows
    monkeypatch.setattr(refill_module, "all_gather_rows", lambda t, world: torch.from_numpy(halted))
    encoded = []
    real_encode = dataset.encode_train_examples
    monkeypatch.setattr(dataset, "encode_train_examples", lambda ks, offsets: encoded.append(len(ks)) or real_encode(ks, offsets))

    for rank, rows in ((0, [0, 2, 3]), (1, [5, 6])):
        sampler = TrainSampler(dataset, seed=3, sampling="groups", translation="reference", batch_size=8)
        rt = Runtime(accelerator=None, rank=rank, world=2, device=torch.device("cpu"))
        encoded.clear()
        batch = Refill(sampler, rt, local, seq_len)(0, torch.from_numpy(halted[rank * local:(rank + 1) * local]))
        assert encoded == [len(rows)]  # its own halted rows, not the whole global refill
        whole = TrainSampler(dataset, seed=3, sampling="groups", translation="reference", batch_size=8).take(5)
        fresh = [list(np.flatnonzero(halted)).index(r) for r in rows]
        local_rows = [r - rank * local for r in rows]
        for key in ("inputs", "labels", "puzzle_identifiers"):
            assert np.array_equal(batch[key][local_rows].numpy(), whole[key][fresh])
        idle = [r for r in range(local) if r not in local_rows]
        assert (batch["puzzle_identifiers"][idle] == 0).all() and (batch["labels"][idle] == -100).all()
        assert sampler.state_dict() == TrainSampler(dataset, seed=3, sampling="groups", translation="reference",
                                                    batch_size=8).state_dict() | {"position": 5}


def test_loop_checks_reach_every_process_within_one_step_without_waiting_each_step(monkeypatch):
    """With several processes each step starts a sum of the flags and acts on the one started a step before."""
    started, waited = [], []

    def start(t, world):
        started.append(t.tolist())
        return lambda: waited.append(len(started)) or t * world

    monkeypatch.setattr(train_module, "all_reduce_sum_async", start)
    several = Runtime(accelerator=None, rank=0, world=2, device=torch.device("cpu"))
    checks = LoopChecks(tiny_config(time_budget_s=5.0), several)
    seen = [checks(elapsed_s=9.0 if step >= 3 else 1.0, since_save_s=0.0).out_of_time for step in range(1, 6)]
    assert seen == [False, False, False, True, True]  # out of time after step 3: every process acts at step 4
    assert len(started) == 5 and waited == [2, 3, 4, 5]  # one sum per step, each waited for a step later
    checks.settle()
    assert waited[-1] == 5
    periodic = LoopChecks(tiny_config(checkpoint_every_s=60.0), several)
    assert not periodic(9.0, since_save_s=61.0).save_due and periodic(9.0, since_save_s=61.0).save_due
    periodic.saved()  # a checkpoint written now: the sum in flight predates it
    assert not periodic(9.0, since_save_s=0.0).save_due
    one = Runtime(accelerator=None, rank=0, world=1, device=torch.device("cpu"))
    assert LoopChecks(tiny_config(time_budget_s=5.0), one)(9.0, 0.0).out_of_time
    assert not LoopChecks(tiny_config(time_budget_s=5.0), one)(1.0, 0.0).out_of_time
    assert LoopChecks(tiny_config(checkpoint_every_s=60.0), one)(9.0, since_save_s=61.0).save_due
    assert len(started) == 8  # none with one process


def test_time_budget_stops_with_a_final_checkpoint(tiny_data: Path, tmp_path: Path):
    path = train(tiny_config(time_budget_s=1e-9), tiny_data, tmp_path / "run", progress=False)
    state = ckpt.load_training_state(path)
    assert state["step"] == 1 and state["final"] and state["carry"] is None


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("buckets", ["", "4,6"])
def test_a_steady_training_step_reads_no_value_back_from_the_device(tiny_data: Path, buckets: str):
    """Every torch op of a training step after the first, recorded: none reads a tensor's value on the host
    (item / bool / int: `_local_scalar_dense`) or has an output size that depends on values (nonzero, unique,
    masked_select), which on a GPU would make the host wait for the device. The halted mask reaches the host by
    the refill's copy (documented in Refill), the loss check and logging wait for log and checkpoint steps. With
    canvas buckets the rows are grouped on the host, from the sides it already knows."""
    cfg = tiny_config(**{"data.canvas_buckets": buckets})
    dataset = AugmentedDataset.load(tiny_data)
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = dataset.canvas**2, dataset.num_puzzle_identifiers
    rt = make_runtime(cfg)
    state = build_state(cfg, dataset, rt)
    state.carries = blank_carries(state.model, cfg, cfg.global_batch_size, rt.device)
    refill = Refill(state.sampler, rt, cfg.global_batch_size, cfg.model.seq_len)
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
    bad = torch.zeros((), dtype=torch.bool)
    train_step(state, cfg, rt, refill, sums, bad, 10)
    with RecordOps() as recorder:
        train_step(state, cfg, rt, refill, sums, bad, 10)
    assert len(set(refill.sides.tolist())) == (2 if buckets else 1)  # both buckets present in the step
    syncing = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
               "unique_dim", "masked_select"}
    assert "addmm" in recorder.ops or "mm" in recorder.ops  # the recorder saw the step's work
    assert not set(recorder.ops) & syncing, sorted(set(recorder.ops) & syncing)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one mixed-precision setting per process: start and leave each run with a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield lambda: AcceleratorState._reset_state(reset_partial_state=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_gradient_gate_runs_before_a_mixed_precision_run_and_stops_a_broken_one(tiny_data: Path, tmp_path: Path,
                                                                                 capsys, monkeypatch,
                                                                                 fresh_accelerate_state):
    train(tiny_config(mixed_precision="bf16", max_steps=1), tiny_data, tmp_path / "bf16", progress=False)
    assert "gradient gate: all" in capsys.readouterr().out
    monkeypatch.setattr(runtime_module, "dense_params_without_gradient", lambda *a, **k: ["blocks.0.mlp.down.weight"])
    with pytest.raises(RuntimeError, match=r"gradient gate: .*blocks\.0\.mlp\.down\.weight"):
        train(tiny_config(mixed_precision="bf16", max_steps=1), tiny_data, tmp_path / "broken", progress=False)
    fresh_accelerate_state()
    train(tiny_config(max_steps=1), tiny_data, tmp_path / "fp32", progress=False)  # float32: no gate needed
    assert "gradient gate" not in capsys.readouterr().out
