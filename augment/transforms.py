"""The augmentation group of ARC: 8 dihedral transforms times colour permutations that keep colour 0 fixed.

The dihedral ids and their order are fixed: published TRM checkpoints name their puzzle variants by them
(`<task>|||t<id>|||<colour map>`), so a different order would silently pair weights with the wrong variant.

    id  transform                      as numpy
    0   identity                       g
    1   rotate 90° counter-clockwise   np.rot90(g, 1)
    2   rotate 180°                    np.rot90(g, 2)
    3   rotate 270° counter-clockwise  np.rot90(g, 3)
    4   flip left-right                np.fliplr(g)
    5   flip up-down                   np.flipud(g)
    6   transpose                      g.T
    7   anti-transpose                 np.fliplr(np.rot90(g, 1))

Every function here works on the last two axes, so a grid (h, w), a batch of canvases (B, H, W), numpy arrays and
torch tensors all go through the same code. Colour 0 (the background) is never permuted.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.tasks import Task

NUM_DIHEDRAL = 8
NUM_COLOURS = 10
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)
# Transforms 1, 3, 6, 7 swap height and width.
DIHEDRAL_SWAPS_AXES = (False, True, False, True, False, False, True, True)

_TEXT_FORM = re.compile(r"^t([0-7])\|([0-9]{10})$")


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to check: dataset building stays torch-free
    return torch is not None and isinstance(x, torch.Tensor)


def dihedral_view(grid: np.ndarray, tid: int) -> np.ndarray:
    """Dihedral transform `tid` of the last two axes of a numpy array, as a view (no copy, no checks).

    Cheap enough to call thousands of times while building a dataset; do not write into the result."""
    if tid == 0:
        return grid
    if tid in (2, 4, 5):
        return grid[..., ::-1, ::-1] if tid == 2 else grid[..., :, ::-1] if tid == 4 else grid[..., ::-1, :]
    t = np.swapaxes(grid, -1, -2)
    return t[..., ::-1, :] if tid == 1 else t[..., :, ::-1] if tid == 3 else t if tid == 6 else t[..., ::-1, ::-1]


def dihedral(grid: Any, tid: int) -> Any:
    """Dihedral transform `tid` (0–7, order in the module docstring) of the last two axes of `grid`.

    numpy input gives a contiguous copy (never a view that could alias the caller's array); torch gives a tensor.
    """
    if not (isinstance(tid, (int, np.integer)) and 0 <= tid < NUM_DIHEDRAL):
        raise ValueError(f"dihedral id must be 0..7, got {tid!r}")
    if not _is_torch(grid):
        return np.array(dihedral_view(np.asarray(grid), int(tid)), copy=True, order="C")
    if tid == 0:
        return grid.clone()
    if tid in (1, 2, 3):
        return grid.rot90(int(tid), dims=(-2, -1)).contiguous()
    if tid == 4:
        return grid.flip(-1)
    if tid == 5:
        return grid.flip(-2)
    if tid == 6:
        return grid.transpose(-2, -1).contiguous()
    return grid.rot90(1, dims=(-2, -1)).flip(-1)


def transformed_shape(h: int, w: int, tid: int) -> tuple[int, int]:
    """Shape of an (h, w) grid after dihedral `tid`."""
    return (w, h) if DIHEDRAL_SWAPS_AXES[tid] else (h, w)


def _check_colours(colours: tuple[int, ...]) -> None:
    if len(colours) != NUM_COLOURS or sorted(colours) != list(range(NUM_COLOURS)) or colours[0] != 0:
        raise ValueError(f"colours must be a permutation of 0..9 with colours[0] == 0, got {colours!r}")


@dataclass(frozen=True)
class Augmentation:
    """One element of the augmentation group: dihedral transform `dihedral`, then colour c becomes colours[c].

    The two parts commute (one moves cells, the other recolours them), so the order does not matter.
    """

    dihedral: int  # 0..7
    colours: tuple[int, ...]  # length 10, colours[0] == 0; colour c becomes colours[c]

    def __post_init__(self) -> None:
        if not (isinstance(self.dihedral, (int, np.integer)) and 0 <= self.dihedral < NUM_DIHEDRAL):
            raise ValueError(f"dihedral must be an int 0..7, got {self.dihedral!r}")
        object.__setattr__(self, "dihedral", int(self.dihedral))
        object.__setattr__(self, "colours", tuple(int(c) for c in self.colours))
        _check_colours(self.colours)

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def identity(cls) -> Augmentation:
        return cls(0, tuple(range(NUM_COLOURS)))

    @classmethod
    def random(cls, rng: np.random.Generator) -> Augmentation:
        """A uniform dihedral and a uniform permutation of colours 1..9."""
        tid = int(rng.integers(NUM_DIHEDRAL))
        perm = rng.permutation(np.arange(1, NUM_COLOURS))
        return cls(tid, (0, *perm.tolist()))

    @classmethod
    def from_text(cls, text: str) -> Augmentation:
        """Parse the compact form written by `to_text`, e.g. "t3|0432187659"."""
        m = _TEXT_FORM.match(text)
        if m is None:
            raise ValueError(f"not an augmentation text (expected like 't3|0432187659'): {text!r}")
        return cls(int(m.group(1)), tuple(int(ch) for ch in m.group(2)))

    def to_text(self) -> str:
        return f"t{self.dihedral}|" + "".join(str(c) for c in self.colours)

    # --- group structure ----------------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return self.dihedral == 0 and self.colours == tuple(range(NUM_COLOURS))

    def inverse(self) -> Augmentation:
        inv = [0] * NUM_COLOURS
        for c, d in enumerate(self.colours):
            inv[d] = c
        return Augmentation(DIHEDRAL_INVERSE[self.dihedral], tuple(inv))

    def colour_lut(self) -> np.ndarray:
        """uint8 (10,): the colour map as a lookup table, lut[c] = new colour."""
        return np.asarray(self.colours, dtype=np.uint8)

    def token_lut(self) -> np.ndarray:
        """int64 (12,): the colour map on tokens (PAD 0 and EOS 1 stay, colour token c+2 becomes colours[c]+2)."""
        return np.concatenate([[0, 1], np.asarray(self.colours) + 2]).astype(np.int64)

    # --- applying -----------------------------------------------------------------------------------------
    def _recolour(self, x: Any, lut: np.ndarray, tokens: bool) -> Any:
        if _is_torch(x):
            import torch

            table = torch.as_tensor(lut, device=x.device)
            if not tokens:
                return table[x.long()].to(x.dtype)
            # Tokens outside 0..11 (the -100 ignore label) pass through unchanged.
            inside = (x >= 0) & (x < len(lut))
            return torch.where(inside, table[x.clamp(0, len(lut) - 1).long()].to(x.dtype), x)
        x = np.asarray(x)
        if not tokens:
            return lut[x].astype(x.dtype, copy=False)
        inside = (x >= 0) & (x < len(lut))
        return np.where(inside, lut[np.clip(x, 0, len(lut) - 1)].astype(x.dtype), x)

    def apply(self, grid: Any, tokens: bool = False) -> Any:
        """Augment a grid (h, w) or a batch (..., h, w), numpy or torch.

        With tokens=True the values are tokens (PAD/EOS/colour+2; other values such as -100 are left alone) on a
        canvas; note the dihedral moves a top-left grid to another corner, so decode before inverting a prediction.
        """
        lut = self.token_lut() if tokens else self.colour_lut()
        return self._recolour(dihedral(grid, self.dihedral), lut, tokens)

    def invert(self, grid: Any, tokens: bool = False) -> Any:
        """Undo `apply`: invert(apply(g)) == g."""
        return self.inverse().apply(grid, tokens=tokens)

    def apply_task(self, task: Task) -> Task:
        """The same task seen through this augmentation: every grid of every pair transformed alike."""
        outputs = None if task.test_outputs is None else [self.apply(g) for g in task.test_outputs]
        return Task(
            id=task.id,
            train=[(self.apply(i), self.apply(o)) for i, o in task.train],
            test_inputs=[self.apply(g) for g in task.test_inputs],
            test_outputs=outputs,
            source=task.source,
        )

    def invert_task(self, task: Task) -> Task:
        return self.inverse().apply_task(task)

    def reference_name(self, task_id: str) -> str:
        """The reference implementation's puzzle name for this variant: the bare task id for the identity."""
        if self.is_identity:
            return task_id
        return f"{task_id}|||t{self.dihedral}|||" + "".join(str(c) for c in self.colours)
