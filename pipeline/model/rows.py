"""The row engine: what a row of a batch is when rows may sit on canvas buckets (`data.canvas_buckets`).

One object, built once from the setting and the canvas (`RowEngine.build`), is the only reader of the setting and
the only place that groups rows by side; training, evaluation, prediction, re-scoring, the plan and the Kaggle
children all go through it. It owns:
  - a row's side: the canvas, or the smallest bucket holding the row's grids with their EOS edge
    (pipeline.data.canvas.side_for);
  - positions: a bucket is the canvas's top-left b×b corner with every cell at its canvas position, so one set of
    weights serves every bucket; the model is told those positions (`positions`), it never guesses them from a
    shape;
  - the ACT carry of mixed buckets: a carry kept at full length (B, P + canvas², D) with each row in bucket-local
    layout (its first P + b² slots, its first b² data entries; the rest stale and never read), a group of rows of
    one side gathered out of it (`take`), run (`step`) and scattered back (`put`).
Without buckets there is one group, the whole batch, nothing is gathered, and the model runs the reference's
computation unchanged. On a bucket only attention differs from the whole canvas (the cells outside the bucket do not
exist instead of taking part as PAD); the grid convolution (`model.mlp_conv`) and the token MLP (`model.mlp_t`)
would differ too, so they are refused with buckets before anything runs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.data.canvas import side_for
from pipeline.model.trm import BATCH_KEYS, TRM, Carry, ModelConfig


def parse_buckets(text: str, canvas: int) -> tuple[int, ...]:
    """`data.canvas_buckets` ("" or e.g. "12,20,30") -> ascending sides ending with the canvas; () = no buckets."""
    text = str(text).strip()
    if not text:
        return ()
    try:
        sides = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"data.canvas_buckets: expected comma-separated square sides such as '12,20,30', "
                         f"got {text!r}") from None
    if not sides:
        raise ValueError(f"data.canvas_buckets: expected comma-separated square sides such as '12,20,30', "
                         f"got {text!r}")
    if any(side < 2 or side > canvas for side in sides):
        raise ValueError(f"data.canvas_buckets: every side must be 2..data.canvas ({canvas}), got {text!r}")
    if sides != sorted(set(sides)):
        raise ValueError(f"data.canvas_buckets: sides must be strictly ascending, got {text!r}")
    if sides[-1] != canvas:
        sides.append(canvas)  # whatever fits no smaller bucket is computed on the whole canvas
    return tuple(sides)


def grid_positions(side: int, canvas: int) -> Tensor:
    """int64 (side²,): the canvas position (row-major) of each cell of the top-left side×side corner, itself
    flattened row-major."""
    axis = torch.arange(side)
    return (axis[:, None] * canvas + axis[None, :]).reshape(-1)


class RowEngine:
    """Rows on the whole canvas or on canvas buckets; see the module docstring."""

    def __init__(self, canvas: int, buckets: tuple[int, ...] = (), puzzle_len: int = 0):
        self.canvas, self.buckets, self.puzzle_len = int(canvas), tuple(int(side) for side in buckets), int(puzzle_len)
        self._positions: dict[tuple[int, str], Tensor] = {}

    @classmethod
    def build(cls, canvas_buckets: str, canvas: int, model: ModelConfig | None = None) -> "RowEngine":
        """From the setting `data.canvas_buckets`; ValueError (naming the setting) for a bad one, or for buckets
        with a model that computes something else on a bucket than on the masked whole canvas."""
        buckets = parse_buckets(canvas_buckets, canvas)
        if buckets and model is not None and (model.mlp_t or model.mlp_conv):
            raise ValueError("data.canvas_buckets: buckets need a model whose only cross-cell mixing is attention "
                             f"(model.mlp_t={model.mlp_t}, model.mlp_conv={model.mlp_conv} would compute otherwise "
                             "on a bucket than on the whole canvas); set data.canvas_buckets=''")
        return cls(canvas, buckets, model.puzzle_len if model is not None else 0)

    @property
    def on_buckets(self) -> bool:
        return bool(self.buckets)

    # -- sides -------------------------------------------------------------------------------------------------
    def side_for(self, extent: np.ndarray) -> np.ndarray:
        """int64 (n,): the side rows of grid extent `extent` (n,) run on (EOS edge included)."""
        return side_for(extent, self.buckets, self.canvas)

    def bigger(self, side: int) -> int:
        """The next bucket above `side` (the canvas for the canvas)."""
        return next((bucket for bucket in self.buckets if bucket > side), self.canvas)

    def held_out_sides(self, dataset, puzzle_index: np.ndarray, test_index: np.ndarray) -> np.ndarray:
        """int64 (n,): the side each held-out test row first runs on (an augment.dataset.AugmentedDataset)."""
        return dataset.held_out_sides(puzzle_index, test_index, self.buckets)

    def groups(self, sides: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(side, row indices) of each side present in `sides` (n,), ascending; rows all on the canvas give
        [(canvas, None)]: one group, nothing to gather."""
        present = np.unique(np.asarray(sides)).tolist()
        if present == [self.canvas] or not present:
            return [(self.canvas, None)]
        return [(int(side), np.flatnonzero(np.asarray(sides) == side)) for side in present]

    # -- positions -----------------------------------------------------------------------------------------------
    def positions(self, side: int, device: torch.device | str) -> Tensor | None:
        """int64 (P + side²,): the position of each state slot of a row on `side` (None on the whole canvas)."""
        if side == self.canvas:
            return None
        key = (side, str(device))
        if key not in self._positions:
            grid = self.puzzle_len + grid_positions(side, self.canvas)
            self._positions[key] = torch.cat((torch.arange(self.puzzle_len), grid)).to(device)
        return self._positions[key]

    # -- the carry of mixed buckets ------------------------------------------------------------------------------
    def blank_carry(self, model: TRM, rows: int, device: torch.device | str) -> Carry:
        """A full-length carry whose rows are all halted (the first step fills every row)."""
        cells = self.canvas * self.canvas
        dummy = {
            "inputs": torch.zeros(rows, cells, dtype=torch.int32, device=device),
            "labels": torch.full((rows, cells), -100, dtype=torch.int32, device=device),
            "puzzle_identifiers": torch.zeros(rows, dtype=torch.int32, device=device),
        }
        return model.initial_carry(dummy)

    def take(self, carry: Carry, batch: dict[str, Tensor], rows: Tensor | None,
             side: int) -> tuple[Carry, dict[str, Tensor]]:
        """The carry and batch of `rows` (None: all) cut to the first P + side² slots / side² grid entries."""
        if rows is None:
            return carry, batch
        slots, cells = self.puzzle_len + side * side, side * side

        def cut(tensor: Tensor, length: int) -> Tensor:
            return tensor[rows, :length] if tensor.ndim > 1 else tensor[rows]

        group = Carry(cut(carry.z_H, slots), cut(carry.z_L, slots), carry.steps[rows], carry.halted[rows],
                      {key: cut(value, cells) for key, value in carry.current_data.items()})
        return group, {key: cut(value, cells) for key, value in batch.items() if key in BATCH_KEYS}

    @staticmethod
    def put(carry: Carry, rows: Tensor | None, group: Carry) -> Carry:
        """`group` (the carry of `rows`, from `take`) written back into `carry`'s rows (in place); with rows None,
        `group` is the whole new carry."""
        if rows is None:
            return group
        slots, cells = group.z_H.shape[1], group.current_data["inputs"].shape[1]
        with torch.no_grad():
            carry.z_H[rows, :slots] = group.z_H
            carry.z_L[rows, :slots] = group.z_L
            carry.steps[rows] = group.steps
            carry.halted[rows] = group.halted
            for key, value in group.current_data.items():
                if value.ndim > 1:
                    carry.current_data[key][rows, :cells] = value
                else:
                    carry.current_data[key][rows] = value
        return carry

    def step(self, model: TRM, carry: Carry, batch: dict[str, Tensor], side: int,
             exploration: tuple[Tensor, Tensor] | None = None) -> tuple[Carry, dict[str, Tensor]]:
        """One ACT step of rows that all sit on `side`, told their positions."""
        return model(carry, batch, exploration=exploration, positions=self.positions(side, batch["inputs"].device))

    def fresh_carry(self, model: TRM, batch: dict[str, Tensor]) -> Carry:
        """The start carry of a batch of rows on one side (every row halted, so the first step loads it)."""
        return model.initial_carry(batch)
