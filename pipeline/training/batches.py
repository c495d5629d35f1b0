"""Batches for training (an endless, resumable stream of examples) and for prediction (ordered held-out inputs).

Two ways to fill an epoch (`data.sampling`):
- "groups" (the reference's `puzzle_dataset.py`, the paper presets' default): an epoch visits every puzzle group
  (an original task with all its variants) once, in a shuffled order; for each group it draws one random variant
  and puts all of that variant's training examples, in random order, into the stream together. The stream is cut
  into global batches as the reference cuts it: a variant that does not fit the rows left in the current batch
  contributes only as many (randomly chosen) examples as fit, the rest of it is dropped, and the last incomplete
  batch of the epoch is dropped. A task's weight thus does not grow with its number of distinct variants.
- "examples": an epoch visits every training example of every variant once, in a shuffled order.

Two ways to place an example on the canvas (`data.translation`):
- "reference": one fixed random offset per training example (the same every epoch) with one randomly chosen
  example per variant left at (0, 0), where test inputs always sit, as the reference builds its dataset;
- "per_draw": a fresh uniformly random offset every time an example is drawn;
- "none": every example at (0, 0).
Offsets range over the positions where both the (augmented) input and output fit the canvas.

With canvas buckets (`data.canvas_buckets`, pipeline.data.canvas) each example is computed on the smallest bucket that
holds it with its EOS edge (`TrainSampler.sides`), and is translated inside that bucket: its offsets range over
0..side-1-extent (the whole canvas's range only for examples on the canvas itself). The stream, its epochs and its
resume are the same with or without buckets; only the offsets and the sides differ.

`variants` K > 0 trains on each puzzle's first K variants only (a prefix, as prediction's views are: a fine-tune
whose steps cannot teach every variant's puzzle row teaches these; pipeline.training.compute.planned_finetune); with 0,
every variant, and the stream is what it was before the setting existed.

Everything is a function of (seed, epoch, position in the epoch), so a resumed run draws exactly what an
uninterrupted one would, and every process draws the same stream. The ACT trainer takes as many examples as rows
halted (pipeline.training.refill.Refill), so a stream position is not a step.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from augment.dataset import AugmentedDataset
from pipeline.data.canvas import side_for, translation_room

SAMPLINGS = ("groups", "examples")
TRANSLATIONS = ("reference", "per_draw", "none")
_OFFSET_STREAM = 1  # separates the offset draws of an epoch from its shuffle
_FIXED_STREAM = 2  # the fixed per-example offsets of "reference" translation


def num_groups(dataset: AugmentedDataset) -> int:
    """Puzzle groups that have training examples (every puzzle with at least one variant and one pair)."""
    return int(np.count_nonzero((dataset.puzzle_num_examples > 0) & (dataset.puzzle_num_variants > 0)))


def examples_per_epoch(dataset: AugmentedDataset, sampling: str) -> float:
    """Examples in one epoch as the step formula counts them.

    "groups" follows the reference: groups × mean examples per variant (its `total_groups × mean_puzzle_examples`),
    so steps = epochs × that / global batch. "examples": every training example of every variant."""
    if sampling == "groups":
        return num_groups(dataset) * dataset.num_train_examples / max(dataset.num_variants, 1)
    if sampling == "examples":
        return float(dataset.num_train_examples)
    raise ValueError(f"unknown data.sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


class TrainSampler:
    """Endless stream of training examples, the same on every process (a function of seed and position only).

    `batch_size` is the global batch: the group epoch is cut into batches of that size (see the module docstring).
    `buckets`: the canvas buckets' sides (pipeline.model.rows.RowEngine.buckets; () = the whole canvas).
    """

    def __init__(
        self,
        dataset: AugmentedDataset,
        seed: int,
        sampling: str = "examples",
        translation: str = "per_draw",
        batch_size: int = 1,
        buckets: tuple[int, ...] = (),
        variants: int = 0,
    ):
        if dataset.num_train_examples == 0:
            raise ValueError("the dataset has no training examples")
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown data.sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        if translation not in TRANSLATIONS:
            raise ValueError(f"unknown data.translation {translation!r}; choose one of {', '.join(TRANSLATIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if variants < 0:
            raise ValueError(f"variants must be 0 (all) or positive, got {variants}")
        self.dataset = dataset
        self.seed = int(seed)
        self.sampling = sampling
        self.translation = translation
        self.batch_size = int(batch_size)
        self.buckets = tuple(int(side) for side in buckets)
        self.variants = int(variants)
        self._groups = np.flatnonzero((dataset.puzzle_num_examples > 0) & (dataset.puzzle_num_variants > 0))
        self._epoch = 0
        self._position = 0  # examples of the current epoch already handed out
        self._cached_epoch: int | None = None
        self._order = np.zeros(0, dtype=np.int64)  # the current epoch's example indices, in stream order
        self._uniform = np.zeros((0, 2), dtype=np.float32)  # per-draw offset uniforms of the current epoch
        self._fixed: tuple[np.ndarray, np.ndarray] | None = None  # reference translation: (uniforms, untranslated)

    @property
    def epoch_index(self) -> int:
        """The epoch the next example comes from."""
        return self._epoch

    @property
    def epoch(self) -> float:
        """Passes over the stream done so far, fractional (e.g. 2.25 = a quarter into the third epoch)."""
        self._load_epoch(self._epoch)
        return self._epoch + self._position / len(self._order)

    def epoch_length(self, epoch: int) -> int:
        """Examples in epoch `epoch` of the stream (varies per epoch with "groups": variants differ in size)."""
        self._load_epoch(epoch)
        return len(self._order)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self._epoch, "position": self._position,
                "sampling": self.sampling, "translation": self.translation, "batch_size": self.batch_size,
                "buckets": list(self.buckets), "variants": self.variants}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        if tuple(state.get("buckets", ())) != self.buckets:  # saved before buckets existed: the whole canvas
            raise ValueError(f"sampler state was saved with canvas buckets {tuple(state.get('buckets', ()))}, this "
                             f"sampler has {self.buckets} (data.canvas_buckets): its carry is laid out for those")
        for key in ("sampling", "translation", "batch_size", "variants"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                                 f"{key}={getattr(self, key)!r}")
        if "sampling" not in state and self.sampling != "examples":  # saved before groups existed
            raise ValueError(f"sampler state was saved with sampling='examples', this sampler has {self.sampling!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.epoch_length(epoch):
            raise ValueError(f"bad sampler state {state} for an epoch of {self.epoch_length(max(epoch, 0))} examples")
        self._epoch, self._position = epoch, position
        self._roll_over()

    def _roll_over(self) -> None:
        """A finished epoch is stored as the start of the next one, so equal streams have equal states."""
        if self._position == self.epoch_length(self._epoch):
            self._epoch, self._position = self._epoch + 1, 0

    def _group_epoch(self, rng: np.random.Generator) -> np.ndarray:
        """Example indices of one "groups" epoch, in stream order, cut into whole batches as the reference does."""
        dataset, batch = self.dataset, self.batch_size
        order = self._groups[rng.permutation(len(self._groups))]
        available = dataset.puzzle_num_variants[order]
        if self.variants:
            available = np.minimum(available, self.variants)
        pick = np.minimum((rng.random(len(order)) * available).astype(np.int64), available - 1)
        first, size = dataset.variant_examples(dataset.puzzle_first_variant[order] + pick)
        # how many of each variant's examples go in: all of them, unless the batch being filled runs out of rows
        take = np.empty_like(size)
        filled = 0
        for variant, examples in enumerate(size.tolist()):
            take[variant] = min(examples, batch - filled)
            filled = (filled + take[variant]) % batch
        # each variant's examples in random order (a random subset when truncated), variants in group order
        segment = np.repeat(np.arange(len(order)), size)
        seg_start = np.repeat(np.cumsum(size) - size, size)
        shuffled = np.lexsort((rng.random(len(segment)), segment))  # within-segment permutation, segments in order
        rank = np.arange(len(segment)) - seg_start
        keep = rank < take[segment]
        examples = (first[segment] + shuffled - seg_start)[keep]
        total = len(examples)
        if total >= batch:  # the reference drops the last incomplete batch (unless that would leave nothing)
            examples = examples[: total - total % batch]
        return examples

    def _load_epoch(self, epoch: int) -> None:
        """Order and per-draw offset uniforms of one epoch (kept while the stream is in that epoch)."""
        if self._cached_epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        if self.sampling == "groups":
            self._order = self._group_epoch(rng)
        elif self.variants:
            allowed = self._allowed_examples()
            self._order = allowed[rng.permutation(len(allowed))]
        else:
            self._order = rng.permutation(self.dataset.num_train_examples)
        if self.translation == "per_draw":
            self._uniform = np.random.default_rng([self.seed, epoch, _OFFSET_STREAM]).random(
                (len(self._order), 2), dtype=np.float32)
        self._cached_epoch = epoch

    def _allowed_examples(self) -> np.ndarray:
        """Indices of the training examples of every puzzle's first `variants` variants, ascending."""
        dataset = self.dataset
        counts = np.minimum(dataset.puzzle_num_variants, self.variants)
        variants = np.concatenate([np.arange(f, f + c) for f, c in
                                   zip(dataset.puzzle_first_variant.tolist(), counts.tolist())] or [np.zeros(0, np.int64)])
        first, size = dataset.variant_examples(variants.astype(np.int64))
        return np.concatenate([np.arange(f, f + c) for f, c in zip(first.tolist(), size.tolist())]
                              or [np.zeros(0, np.int64)]).astype(np.int64)

    def _fixed_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference translation: uniforms float32 (N, 2) fixed per example, and bool (N,) marking the one
        example per variant that stays at (0, 0). Drawn once, from the seed alone."""
        if self._fixed is None:
            dataset = self.dataset
            rng = np.random.default_rng([self.seed, _FIXED_STREAM])
            uniform = rng.random((dataset.num_train_examples, 2), dtype=np.float32)
            first, count = dataset.variant_examples(np.arange(dataset.num_variants))
            chosen = first + np.minimum((rng.random(dataset.num_variants) * count).astype(np.int64), count - 1)
            untranslated = np.zeros(dataset.num_train_examples, dtype=bool)
            untranslated[chosen[count > 0]] = True
            self._fixed = (uniform, untranslated)
        return self._fixed

    def _next_indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices (n,), per-draw uniforms (n, 2)) of the next n draws, crossing epoch ends."""
        indices, uniforms = [], []
        while n > 0:
            self._load_epoch(self._epoch)
            count = min(n, len(self._order) - self._position)  # what is left of this epoch, at most
            indices.append(self._order[self._position : self._position + count])
            if self.translation == "per_draw":
                uniforms.append(self._uniform[self._position : self._position + count])
            self._position += count
            n -= count
            self._roll_over()
        examples = np.concatenate(indices).astype(np.int64) if indices else np.zeros(0, np.int64)
        return examples, np.concatenate(uniforms) if uniforms else np.zeros((len(examples), 2), np.float32)

    def take_indices(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The next n draws as (example indices int64 (n,), top-left offsets int64 (n, 2) or None for (0, 0))."""
        if n < 0:
            raise ValueError(f"cannot take {n} examples")
        examples, uniforms = self._next_indices(n)
        if self.translation == "none":
            return examples, None
        if self.translation == "reference":
            fixed_uniforms, untranslated = self._fixed_offsets()
            uniforms = fixed_uniforms[examples]
        extent = self.dataset.train_extent(examples)
        room = translation_room(extent, self._sides_of(extent)[:, None], self.dataset.canvas)  # (n, 2), >= 0
        # float64 so that u * (room + 1) stays below room + 1 even for u just under 1
        offsets = np.minimum((uniforms.astype(np.float64) * (room + 1)).astype(np.int64), room)
        if self.translation == "reference":
            offsets[untranslated[examples]] = 0
        return examples, offsets

    def _sides_of(self, extent: np.ndarray) -> np.ndarray:
        return side_for(extent.max(axis=1), self.buckets, self.dataset.canvas)

    def sides(self, examples: np.ndarray) -> np.ndarray:
        """int64 (n,): the bucket side each training example (n,) is computed on (the canvas without buckets)."""
        return self._sides_of(self.dataset.train_extent(examples))

    def take(self, n: int) -> dict[str, np.ndarray]:
        """The next n examples: inputs int32 (n, L), labels int32 (n, L) (-100 = ignore), puzzle_identifiers (n,),
        with buckets in bucket-local layout (pipeline.data.canvas) and their sides int64 (n,)."""
        examples, offsets = self.take_indices(n)
        if not self.buckets:
            return self.dataset.encode_train_examples(examples, offsets)
        sides = self.sides(examples)
        return {**self.dataset.encode_train_examples(examples, offsets, sides), "sides": sides}


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
