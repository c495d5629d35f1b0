"""The few collectives the trainer needs, in one room: row gathers, sums, the gradient all-reduce, carry gathers.

All are no-ops with one process, so single-process code never touches torch.distributed. Every process must call
each of them in the same order (they are collectives).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.core.job import collective, guarded, leave
from pipeline.model.trm import Carry


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch job, or a process on its own: the one that writes run-folder files.
    (Read from the launcher's environment, so it holds before torch.distributed is set up.)"""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@collective("every process to arrive (a barrier)")
def barrier() -> None:
    """Every process waits here until all have arrived (no-op alone, or without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close_process_group() -> None:
    """Leave a launched job together (pipeline.core.job.leave): a process that exits with the process group still up
    can abort in gloo's teardown once its peer has gone."""
    leave(ok=True)


@collective("a row gather (every process's rows)")
def all_gather_rows(local: Tensor, world_size: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate every process's tensor along dim 0, in rank order (same shape required everywhere)."""
    if world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@collective("a row gather to rank 0 (a checkpoint's carry)")
def gather_rows_to_main(local: Tensor, world_size: int) -> Tensor:
    """Every process's tensor concatenated along dim 0 in rank order, on rank 0; an empty (0, ...) tensor on the
    other ranks, which so never hold (nor copy to the host) what only rank 0 writes."""
    if world_size == 1:
        return local
    local = local.contiguous()
    if dist.get_rank() == 0:
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=0)
    dist.gather(local, None, dst=0)
    return local[:0]


@collective("a sum over the processes (metrics, flags)")
def all_reduce_sum(t: Tensor, world_size: int) -> Tensor:
    """Sum over processes, in place; returns `t`."""
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@collective("the start of a sum over the processes (the training loop's flags)")
def all_reduce_sum_async(t: Tensor, world_size: int) -> Callable[[], Tensor]:
    """Start a sum over processes, in place; returns the wait for it, which returns `t` (the sum runs meanwhile,
    e.g. while the next step computes)."""
    if world_size == 1:
        return lambda: t
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)

    def wait() -> Tensor:
        with guarded("a sum over the processes (the training loop's flags)"):
            work.wait()
        return t

    return wait


@collective("the gradient all-reduce")
def all_reduce_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Sum gradients over processes with one collective on a flat buffer (a missing gradient counts as zeros)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param in params:
        size = param.numel()
        param.grad = flat[offset:offset + size].view_as(param)
        offset += size


@collective("an object gather (every process's share of an evaluation)")
def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every process's picklable object, in rank order (e.g. each rank's share of evaluation predictions)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def gather_carries(carries: list[Carry], gather_rows: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """The ACT carry of the whole global batch (rows in global order: process-major, then micro-batch), on CPU."""
    def field(get: Callable[[Carry], Tensor]) -> Tensor:
        return gather_rows(torch.cat([get(c) for c in carries])).cpu()

    out = {name: field(lambda c, n=name: getattr(c, n)) for name in ("z_H", "z_L", "steps", "halted")}
    for key in carries[0].current_data:
        out["data." + key] = field(lambda c, k=key: c.current_data[k])
    return out
