"""Hands fresh examples to the rows that halted, the same on every process, without stalling the device.

Unlike the reference (which pulls a whole new batch every step and uses only the halted rows of it), the sampler
hands out exactly as many examples as rows halted, so no drawn example is wasted; the assignment is computed on the
*global* batch, so P processes × B/P rows train exactly like 1 process × B rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.training.batches import TrainSampler
from pipeline.training.collectives import all_gather_rows
from pipeline.training.runtime import Runtime, to_device


class Refill:
    """Hands fresh examples to halted rows, consistently across processes, without stalling the device.

    Row r of the global batch belongs to process r // local_batch. Halted rows, in global row order, take the
    next examples of the stream, so one process's halted rows take one contiguous slice of them (after the
    halted rows of lower ranks): every process draws the same stream positions (cheap: indices) but encodes only
    its own slice. The stream does not depend on which rows halt, only on how many.

    `watch(i, halted)` is called right after the forward pass of micro-batch i: it gathers the global halted mask
    on the device and starts its copy to pinned host memory. `refill(i, halted)` at the next step waits for that
    copy alone, which on a GPU finishes with the forward pass while the backward pass is still running, so the
    host encodes the refill while the device is busy (the one host-device synchronisation of a steady step).
    Without a pending copy (the first step, after a resume) it gathers and copies on the spot.

    `sides` (G,) is every global row's bucket side (pipeline.model.rows) (process-major, then micro-batch, as a checkpoint's carry);
    every process keeps all of it up to date (the sides of the examples drawn, cheap: no encoding), so the
    computed token count is known everywhere without a collective. Fresh rows come in bucket-local layout.
    """

    def __init__(self, sampler: TrainSampler, rt: Runtime, local_batch: int, seq_len: int,
                 sides: np.ndarray | None = None):
        self.sampler, self.rt, self.local_batch, self.seq_len = sampler, rt, local_batch, seq_len
        if sides is None:  # one micro-batch, every row on the whole canvas
            sides = np.full(rt.world * local_batch, sampler.dataset.canvas, dtype=np.int64)
        self.sides = sides
        self.micro_batches = len(sides) // (rt.world * local_batch)
        self._pending: dict[int, tuple[torch.Tensor, Any]] = {}

    def _global_rows(self, index: int) -> np.ndarray:
        """Positions in `sides` of micro-batch `index`'s rows on every process, in the gathered mask's order."""
        per_process = self.micro_batches * self.local_batch
        starts = np.arange(self.rt.world) * per_process + index * self.local_batch
        return (starts[:, None] + np.arange(self.local_batch)[None, :]).reshape(-1)

    def local_sides(self, index: int) -> np.ndarray:
        """int64 (local_batch,): this process's rows of micro-batch `index`, their bucket sides."""
        first = self.rt.rank * self.micro_batches * self.local_batch + index * self.local_batch
        return self.sides[first:first + self.local_batch]

    def watch(self, index: int, halted_local: torch.Tensor) -> None:
        """Start fetching micro-batch `index`'s global halted mask (a collective: every process calls it)."""
        halted = all_gather_rows(halted_local.to(self.rt.device), self.rt.world)
        if halted.device.type == "cuda":
            host = torch.empty(halted.shape, dtype=halted.dtype, pin_memory=True)
            host.copy_(halted, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending[index] = (host, event)
        else:
            self._pending[index] = (halted.cpu(), None)

    def __call__(self, index: int, halted_local: torch.Tensor) -> dict[str, torch.Tensor]:
        if index not in self._pending:
            self.watch(index, halted_local)
        host, event = self._pending.pop(index)
        if event is not None:
            event.synchronize()
        halted_rows = np.flatnonzero(host.numpy())  # global row numbers, ascending
        examples, offsets = self.sampler.take_indices(len(halted_rows))
        sides = self.sampler.sides(examples)
        self.sides[self._global_rows(index)[halted_rows]] = sides
        first_local = self.rt.rank * self.local_batch
        local = (halted_rows >= first_local) & (halted_rows < first_local + self.local_batch)
        local_offsets = None if offsets is None else offsets[local]
        encode = self.sampler.dataset.encode_train_examples
        if self.sampler.buckets:
            encoded = encode(examples[local], local_offsets, sides[local])
        else:
            encoded = encode(examples[local], local_offsets)
        batch = {
            "inputs": np.zeros((self.local_batch, self.seq_len), np.int32),
            "labels": np.full((self.local_batch, self.seq_len), -100, np.int32),
            "puzzle_identifiers": np.zeros(self.local_batch, np.int32),
        }
        for key in batch:
            batch[key][halted_rows[local] - first_local] = encoded[key]
        return {k: to_device(torch.from_numpy(v), self.rt.device) for k, v in batch.items()}
