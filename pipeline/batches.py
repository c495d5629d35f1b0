"""Batches for training (an endless, resumable, shuffled stream) and for prediction (ordered held-out inputs).

Translation augmentation: each training example, every time it is drawn, is placed at a uniformly random
top-left offset among those where both its (augmented) input and output fit the canvas. The offset is a function
of (seed, epoch, position in the epoch), so a resumed run draws exactly what an uninterrupted one would.
The reference instead fixes one random offset per example when it builds the dataset (so an example sits at
the same place every epoch) and leaves one randomly chosen example per puzzle at (0, 0). Test inputs are always
at (0, 0), as in the reference, because the answer is read back from the top-left corner.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from augment.dataset import AugmentedDataset

_OFFSET_STREAM = 1  # separates the offset draws of an epoch from its shuffle


class TrainSampler:
    """Endless stream of training examples, the same on every process (a function of seed and position only).

    Epoch e visits every training example once, in the order np.random.default_rng([seed, e]).permutation(N).
    """

    def __init__(self, dataset: AugmentedDataset, seed: int, translate: bool = True):
        if dataset.num_train_examples == 0:
            raise ValueError("the dataset has no training examples")
        self.dataset = dataset
        self.seed = int(seed)
        self.translate = translate
        self._epoch = 0
        self._position = 0  # examples of the current epoch already handed out
        self._cached_epoch: int | None = None
        self._order = np.zeros(0, dtype=np.int64)
        self._uniform = np.zeros((0, 2), dtype=np.float32)

    @property
    def num_examples(self) -> int:
        return self.dataset.num_train_examples

    @property
    def epoch_index(self) -> int:
        """The epoch the next example comes from."""
        return self._epoch

    @property
    def epoch(self) -> float:
        """Epochs done so far, fractional (e.g. 2.25 = a quarter into the third epoch)."""
        return self._epoch + self._position / self.num_examples

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_examples:
            raise ValueError(f"bad sampler state {state} for {self.num_examples} training examples")
        self._epoch, self._position = epoch, position
        self._roll_over()

    def _roll_over(self) -> None:
        """A finished epoch is stored as the start of the next one, so equal streams have equal states."""
        if self._position == self.num_examples:
            self._epoch, self._position = self._epoch + 1, 0

    def _load_epoch(self, epoch: int) -> None:
        """Shuffle order and offset draws of one epoch (int32 + 2 float32 per example, kept for the epoch)."""
        if self._cached_epoch == epoch:
            return
        n = self.num_examples
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        self._order = order.astype(np.int32) if n < 2**31 else order
        if self.translate:
            self._uniform = np.random.default_rng([self.seed, epoch, _OFFSET_STREAM]).random((n, 2), dtype=np.float32)
        self._cached_epoch = epoch

    def _next_indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices (n,), uniforms (n, 2)) of the next n draws, crossing epoch ends; advances the state."""
        indices, uniforms = [], []
        while n > 0:
            self._load_epoch(self._epoch)
            m = min(n, self.num_examples - self._position)
            indices.append(self._order[self._position : self._position + m])
            if self.translate:
                uniforms.append(self._uniform[self._position : self._position + m])
            self._position += m
            n -= m
            self._roll_over()
        ks = np.concatenate(indices).astype(np.int64) if indices else np.zeros(0, np.int64)
        u = np.concatenate(uniforms) if uniforms else np.zeros((len(ks), 2), np.float32)
        return ks, u

    def take(self, n: int) -> dict[str, np.ndarray]:
        """The next n examples: inputs int32 (n, L), labels int32 (n, L) (-100 = ignore), puzzle_identifiers (n,)."""
        if n < 0:
            raise ValueError(f"cannot take {n} examples")
        ks, u = self._next_indices(n)
        offsets = None
        if self.translate:
            room = self.dataset.canvas - self.dataset.train_extent(ks)  # (n, 2): largest valid offset, >= 0
            # float64 so that u * (room + 1) stays below room + 1 even for u just under 1
            offsets = np.minimum((u.astype(np.float64) * (room + 1)).astype(np.int64), room)
        return self.dataset.encode_train_examples(ks, offsets)


def iter_test_batches(
    dataset: AugmentedDataset, batch_size: int, max_variants: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Ordered batches of held-out test inputs, each under its puzzle's first max_variants variants, at (0, 0).

    Rows are ordered by (puzzle, test index, variant), so all variants of one test input are adjacent. Each batch:
    inputs int32 (b, L), puzzle_identifiers int32 (b,), and int64 (b,) puzzle_index, test_index, variant.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = dataset.test_rows(max_variants)
    for start in range(0, len(rows["variant"]), batch_size):
        part = {key: value[start : start + batch_size] for key, value in rows.items()}
        yield {
            "inputs": dataset.encode_grids(part["grid"], part["variant"]),
            "puzzle_identifiers": (part["variant"] + 1).astype(np.int32),
            "puzzle_index": part["puzzle_index"],
            "test_index": part["test_index"],
            "variant": part["variant"],
        }
