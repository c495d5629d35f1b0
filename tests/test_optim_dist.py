"""SignSGD over two gloo processes: both tables end identical and equal to the one-process update."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.training.optim import SignSGD
from tiny import free_port

sys.path.insert(0, str(Path(__file__).parent))
from dist_signsgd_worker import make_problem  # noqa: E402

WORKER = Path(__file__).parent / "dist_signsgd_worker.py"


def test_sign_sgd_two_processes_match_one(tmp_path: Path) -> None:
    # the environment torchrun gives its workers, without torchrun's agent process (saves seconds)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env=dict(env, RANK=str(r)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for rank, (w, out) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"SignSGD worker rank {rank} failed:\n{out[-3000:]}"

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    table, ids, grads = make_problem()
    original = table.clone()
    touched = SignSGD(table, lr=0.01, weight_decay=0.1).step(ids, grads)

    assert torch.equal(rank0, rank1)
    assert torch.equal(rank0, table)
    # the two halves share ids 3 and 7, so the gathered sum matters; rows outside the batch stay put
    assert touched.unique().tolist() == [0, 1, 3, 7, 9]
    untouched = [r for r in range(table.shape[0]) if r not in touched.tolist()]
    assert torch.equal(rank0[untouched], original[untouched])
    # a rank that updated only with its own half would differ on a shared row
    half_only = original.clone()
    SignSGD(half_only, lr=0.01, weight_decay=0.1).step(ids[:4], grads[:4])
    assert not torch.equal(half_only, rank0)
