"""One process of the 2-process SignSGD check (started twice by tests/test_optim_dist.py with the
environment torchrun would set: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE; `torchrun --nproc-per-node 2
tests/dist_signsgd_worker.py OUT_DIR` runs it too).

Every rank builds the same table and the same whole batch from a fixed seed, keeps its own contiguous
share of the batch rows, applies one SignSGD step over gloo and saves its table as OUT_DIR/rank{r}.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.core.io import atomic_write_with
from pipeline.training.optim import SignSGD


def make_problem(batch_size: int = 8, rows: int = 10, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table (rows, dim), ids (batch_size,) int32 with repeats across the two halves, grads (batch_size, dim))."""
    gen = torch.Generator().manual_seed(1234)
    table = torch.randn(rows, dim, generator=gen)
    ids = torch.tensor([3, 7, 3, 0, 7, 1, 3, 9], dtype=torch.int32)[:batch_size]
    grads = torch.randn(batch_size, dim, generator=gen)
    return table, ids, grads


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    table, ids, grads = make_problem()
    share = ids.shape[0] // world_size
    mine = slice(rank * share, (rank + 1) * share)
    SignSGD(table, lr=0.01, weight_decay=0.1).step(ids[mine], grads[mine])
    atomic_write_with(Path(out_dir) / f"rank{rank}.pt", lambda f: torch.save(table, f))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
