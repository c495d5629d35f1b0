"""Rows of mixed canvas buckets in one ACT carry: which rows share a bucket, and moving them in and out.

The trainer keeps each micro-batch's carry at full length (B, P + canvas², D) and every row's data in bucket-local
layout (pipeline.data.canvas): a row on bucket side b uses the first P + b² state slots and the first b² data entries.
Each step it groups the rows by their current bucket (a halted row by the bucket of the example it is about to
take), gathers each group's slots into a carry of its own (n_b, P + b², D), runs the model on it, and scatters the
result back. The sampler's stream, the rows' assignment and the halting are exactly those of the full canvas:
only where each row is computed changes. Without buckets there is one group, the whole micro-batch, and nothing
is gathered (the reference's computation, unchanged).

A step has one model call per bucket present (a handful of sequence lengths, each with a row count that varies
from step to step).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.model.trm import Carry


def bucket_groups(sides: np.ndarray, canvas: int) -> list[tuple[int, np.ndarray | None]]:
    """(side, row indices) of each bucket present in `sides` (int (B,), the rows' bucket sides), ascending by side;
    a single group of whole-canvas rows is (canvas, None): all rows, nothing to gather."""
    sides = np.asarray(sides)
    present = np.unique(sides).tolist()
    if present == [canvas]:
        return [(canvas, None)]
    return [(int(side), np.flatnonzero(sides == side)) for side in present]


def take_rows(carry: Carry, batch: dict[str, Tensor], rows: Tensor | None, side: int,
              puzzle_len: int) -> tuple[Carry, dict[str, Tensor]]:
    """The carry and batch of `rows` (None: all) cut to the first P + side² state slots / side² grid entries."""
    if rows is None:
        return carry, batch
    slots, cells = puzzle_len + side * side, side * side

    def cut(t: Tensor, length: int) -> Tensor:
        return t[rows, :length] if t.ndim > 1 else t[rows]

    part = Carry(cut(carry.z_H, slots), cut(carry.z_L, slots), carry.steps[rows], carry.halted[rows],
                 {k: cut(v, cells) for k, v in carry.current_data.items()})
    return part, {k: cut(v, cells) for k, v in batch.items()}


def put_rows(carry: Carry, rows: Tensor | None, part: Carry) -> Carry:
    """`part` written back into `carry`'s rows (in place; the slots past the part's length keep stale values that
    are never read); with rows None, `part` is the whole new carry."""
    if rows is None:
        return part
    slots, cells = part.z_H.shape[1], part.current_data["inputs"].shape[1]
    with torch.no_grad():
        carry.z_H[rows, :slots] = part.z_H
        carry.z_L[rows, :slots] = part.z_L
        carry.steps[rows] = part.steps
        carry.halted[rows] = part.halted
        for k, v in part.current_data.items():
            if v.ndim > 1:
                carry.current_data[k][rows, :cells] = v
            else:
                carry.current_data[k][rows] = v
    return carry
