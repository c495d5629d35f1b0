"""The compact augmented dataset in memory: every original grid once, plus a tiny table of augmentations.

The reference materialises every augmented puzzle on disk (ARC-AGI-1 at 1000 augmentations: 5.4 GB, 6 minutes).
Here a variant is just (puzzle index, dihedral id, colour map): 15 bytes. Grids are augmented on the fly when a
batch is encoded (pipeline.data.encoding.encode_many), so nothing augmented is ever stored. The folder's files are
augment.storage's; how a dataset is built, augment.dataset's.

Variant v has puzzle identifier v + 1 (identifier 0 is the blank/padding row).

Splits (as in the paper): the train pairs of every puzzle, and the test pairs of puzzles not in the eval set, are
training examples, for every variant. The test inputs of eval puzzles are held out for prediction; their outputs
(when known) are kept only for scoring.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from augment.storage import load_parts, save_parts
from augment.transforms import DIHEDRAL_SWAPS_AXES, Augmentation
from pipeline.data.canvas import output_bound, side_for
from pipeline.data.tasks import Task
from pipeline.data.encoding import IGNORE_LABEL, PAD, encode_many

_SWAPS = np.asarray(DIHEDRAL_SWAPS_AXES)


@dataclass
class TestInput:
    puzzle_index: int
    task_id: str
    test_index: int
    variant: int  # global variant index (puzzle identifier - 1)
    grid: np.ndarray  # the test input seen through the variant's augmentation, uint8 (h, w)


class AugmentedDataset:
    """Original grids + variants table, with lazy access to augmented training examples and test inputs."""

    def __init__(
        self,
        pixels: np.ndarray,
        grid_table: np.ndarray,
        puzzles: list[dict[str, Any]],
        variant_puzzle: np.ndarray,
        variant_dihedral: np.ndarray,
        variant_colours: np.ndarray,
        manifest: dict[str, Any],
    ):
        self.pixels = np.ascontiguousarray(pixels, dtype=np.uint8)  # (N,) all original grids back to back
        self.grid_table = np.asarray(grid_table, dtype=np.int64)  # (G, 3): offset, height, width
        self.puzzles = puzzles
        self.variant_puzzle = np.asarray(variant_puzzle, dtype=np.int32)  # (V,)
        self.variant_dihedral = np.asarray(variant_dihedral, dtype=np.uint8)  # (V,)
        self.variant_colours = np.asarray(variant_colours, dtype=np.uint8)  # (V, 10)
        self.manifest = manifest
        self.canvas = int(manifest["canvas"])
        self._index()
        self._held_out_extent: np.ndarray | None = None  # held_out_extent's table, built on first use

    # --- derived lookup tables ----------------------------------------------------------------------------
    def _index(self) -> None:
        """Cumulative-count tables that turn a flat example number into (variant, pair) by binary search."""
        P, V = len(self.puzzles), len(self.variant_puzzle)
        if V and (np.any(np.diff(self.variant_puzzle) < 0) or self.variant_puzzle[-1] >= P):
            raise ValueError("variants.npz: puzzle_index must be sorted and < number of puzzles")
        self.grid_start, self.grid_height, self.grid_width = self.grid_table.T
        counts = np.bincount(self.variant_puzzle, minlength=P)
        self.puzzle_num_variants = counts  # (P,)
        self.puzzle_first_variant = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

        ex_in: list[int] = []
        ex_out: list[int] = []
        ex_count = np.zeros(P, dtype=np.int64)
        test_in: list[int] = []
        test_count = np.zeros(P, dtype=np.int64)
        for p, puzzle in enumerate(self.puzzles):
            pairs = list(zip(puzzle["train_inputs"], puzzle["train_outputs"]))
            if not puzzle["is_eval"] and puzzle["test_outputs"] is not None:
                pairs += list(zip(puzzle["test_inputs"], puzzle["test_outputs"]))
            ex_in += [i for i, _ in pairs]
            ex_out += [o for _, o in pairs]
            ex_count[p] = len(pairs)
            if puzzle["is_eval"]:
                test_in += puzzle["test_inputs"]
                test_count[p] = len(puzzle["test_inputs"])
        self.example_input_grid = np.asarray(ex_in, dtype=np.int64)  # (E,) per-puzzle training pairs, flat
        self.example_output_grid = np.asarray(ex_out, dtype=np.int64)
        self.puzzle_num_examples = ex_count
        self.puzzle_first_example = np.concatenate([[0], np.cumsum(ex_count)[:-1]]).astype(np.int64)
        self.test_input_grid = np.asarray(test_in, dtype=np.int64)  # (T,) held-out test inputs, flat
        self.puzzle_num_tests = test_count
        self.puzzle_first_test = np.concatenate([[0], np.cumsum(test_count)[:-1]]).astype(np.int64)

        # training example k lives in variant v = searchsorted(train_end, k, "right")
        self._train_end = np.cumsum(ex_count[self.variant_puzzle])  # (V,)
        # test row k (variants of a puzzle's test input contiguous) lives in puzzle searchsorted(test_end, k)
        self._test_end = np.cumsum(test_count * counts)  # (P,)

    # --- sizes --------------------------------------------------------------------------------------------
    @property
    def num_puzzles(self) -> int:
        return len(self.puzzles)

    @property
    def num_variants(self) -> int:
        return len(self.variant_puzzle)

    @property
    def num_puzzle_identifiers(self) -> int:
        return self.num_variants + 1

    @property
    def num_train_examples(self) -> int:
        return int(self._train_end[-1]) if len(self._train_end) else 0

    @property
    def num_test_inputs(self) -> int:
        """Held-out test inputs times their variants: the rows `test_input(k)` enumerates."""
        return int(self._test_end[-1]) if len(self._test_end) else 0

    # --- single items -------------------------------------------------------------------------------------
    def grid(self, g: int) -> np.ndarray:
        """Original grid g, uint8 (h, w) (a read-only view into the pixel buffer)."""
        start, h, w = self.grid_table[g]
        view = self.pixels[start : start + h * w].reshape(h, w)
        view.flags.writeable = False
        return view

    def augmentation(self, variant: int) -> Augmentation:
        return Augmentation(int(self.variant_dihedral[variant]), tuple(self.variant_colours[variant].tolist()))

    def variant_name(self, variant: int) -> str:
        """The reference builder's name for this variant ("<task>|||t<id>|||<colours>", bare id for the original)."""
        task_id = self.puzzles[int(self.variant_puzzle[variant])]["task_id"]
        return self.augmentation(variant).reference_name(task_id)

    def train_example(self, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Training example k: (augmented input, augmented output, puzzle identifier)."""
        variant, input_grid, output_grid = (int(x[0]) for x in self.train_refs(np.array([k])))
        aug = self.augmentation(variant)
        return aug.apply(self.grid(input_grid)), aug.apply(self.grid(output_grid)), variant + 1

    def test_input(self, k: int) -> TestInput:
        """Held-out row k, ordered by (eval puzzle, test index, variant)."""
        if not 0 <= k < self.num_test_inputs:
            raise IndexError(f"test input {k} out of range 0..{self.num_test_inputs - 1}")
        p = int(np.searchsorted(self._test_end, k, side="right"))
        local = k - (int(self._test_end[p]) - int(self.puzzle_num_tests[p] * self.puzzle_num_variants[p]))
        test_index, v_local = divmod(local, int(self.puzzle_num_variants[p]))
        variant = int(self.puzzle_first_variant[p]) + v_local
        grid = self.grid(int(self.test_input_grid[self.puzzle_first_test[p] + test_index]))
        return TestInput(p, self.puzzles[p]["task_id"], test_index, variant, self.augmentation(variant).apply(grid))

    def task(self, p: int) -> Task:
        """The original task of puzzle p."""
        q = self.puzzles[p]
        grids = lambda ids: [self.grid(g).copy() for g in ids]  # noqa: E731
        outs = None if q["test_outputs"] is None else grids(q["test_outputs"])
        return Task(
            q["task_id"],
            list(zip(grids(q["train_inputs"]), grids(q["train_outputs"]))),
            grids(q["test_inputs"]),
            outs,
            q["source"],
        )

    def eval_tasks(self) -> list[Task]:
        """The original tasks whose test inputs are held out."""
        return [self.task(p) for p, q in enumerate(self.puzzles) if q["is_eval"]]

    # --- vectorised paths (the sampler and prediction use these) ------------------------------------------
    def train_refs(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training examples ks (n,) -> (variant, input grid index, output grid index), each int64 (n,)."""
        ks = np.asarray(ks, dtype=np.int64)
        if ks.size and (ks.min() < 0 or ks.max() >= self.num_train_examples):
            raise IndexError(f"training example index out of range 0..{self.num_train_examples - 1}")
        variant = np.searchsorted(self._train_end, ks, side="right")
        pair = ks - (self._train_end[variant] - self.puzzle_num_examples[self.variant_puzzle[variant]])
        example = self.puzzle_first_example[self.variant_puzzle[variant]] + pair
        return variant, self.example_input_grid[example], self.example_output_grid[example]

    def variant_examples(self, variants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first training example, example count), int64 (n,) each, of variants (n,): a variant's examples are
        contiguous, so its group of examples is one range."""
        variants = np.asarray(variants, dtype=np.int64)
        count = self.puzzle_num_examples[self.variant_puzzle[variants]]
        return self._train_end[variants] - count, count

    def augmented_shapes(self, grid_index: np.ndarray, variant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(heights, widths) int64 (n,) of grids after their variant's dihedral transform."""
        swap = _SWAPS[self.variant_dihedral[variant]]
        h, w = self.grid_height[grid_index], self.grid_width[grid_index]
        return np.where(swap, w, h), np.where(swap, h, w)

    def train_extent(self, ks: np.ndarray) -> np.ndarray:
        """int64 (n, 2): the (height, width) an augmented example's input and output need together on the canvas."""
        variant, gin, gout = self.train_refs(ks)
        hi, wi = self.augmented_shapes(gin, variant)
        ho, wo = self.augmented_shapes(gout, variant)
        return np.stack([np.maximum(hi, ho), np.maximum(wi, wo)], axis=1)

    def held_out_extent(self, puzzle_index: np.ndarray, test_index: np.ndarray) -> np.ndarray:
        """int64 (n,): the larger side a held-out test input and its (unknown) output need together, the output's
        predicted from its puzzle's demonstration pairs (pipeline.data.canvas.output_bound; the canvas when no rule
        explains them). The same for every view (a dihedral transform never changes the larger side)."""
        if self._held_out_extent is None:
            shape = lambda g: (int(self.grid_height[g]), int(self.grid_width[g]))  # noqa: E731
            extent = np.zeros(len(self.test_input_grid), dtype=np.int64)
            for p in np.flatnonzero(self.puzzle_num_tests > 0):
                q = self.puzzles[p]
                demos = [(shape(i), shape(o)) for i, o in zip(q["train_inputs"], q["train_outputs"])]
                for t, g in enumerate(q["test_inputs"]):
                    bound = output_bound(demos, shape(g))
                    extent[self.puzzle_first_test[p] + t] = self.canvas if bound is None else max(bound, *shape(g))
            self._held_out_extent = extent
        return self._held_out_extent[self.puzzle_first_test[np.asarray(puzzle_index)] + np.asarray(test_index)]

    def held_out_sides(self, puzzle_index: np.ndarray, test_index: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
        """int64 (n,): the canvas bucket side each held-out row is computed on (the canvas without buckets)."""
        return side_for(self.held_out_extent(puzzle_index, test_index), buckets, self.canvas)

    def encode_grids(
        self,
        grid_index: np.ndarray,
        variant: np.ndarray,
        offsets: np.ndarray | None = None,
        labels: bool = False,
        out: np.ndarray | None = None,
        canvas: int | None = None,
    ) -> np.ndarray:
        """int32 (n, side*side): original grids grid_index (n,) augmented by variants (n,), at offsets (n, 2), on
        the top-left `canvas`×`canvas` corner of the canvas (a bucket; default the whole canvas)."""
        grid_index = np.asarray(grid_index, dtype=np.int64)
        variant = np.asarray(variant, dtype=np.int64)
        return encode_many(
            self.pixels,
            self.grid_start[grid_index],
            self.grid_height[grid_index],
            self.grid_width[grid_index],
            self.canvas if canvas is None else canvas,
            dihedrals=self.variant_dihedral[variant],
            colour_luts=self.variant_colours[variant],
            offsets=offsets,
            labels=labels,
            out=out,
        )

    def encode_train_examples(self, ks: np.ndarray, offsets: np.ndarray | None = None,
                              sides: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Training examples ks (n,) as a batch: inputs/labels int32 (n, canvas*canvas), puzzle_identifiers (n,).
        With `sides` (n,), example i is drawn on the bucket of side sides[i], in bucket-local layout
        (pipeline.data.canvas: its first side² entries; the rest PAD, labels IGNORE_LABEL)."""
        variant, gin, gout = self.train_refs(ks)
        batch = {"puzzle_identifiers": (variant + 1).astype(np.int32)}
        if sides is None or (np.asarray(sides) == self.canvas).all():
            batch["inputs"] = self.encode_grids(gin, variant, offsets)
            batch["labels"] = self.encode_grids(gout, variant, offsets, labels=True)
            return batch
        n, full = len(variant), self.canvas * self.canvas
        batch["inputs"] = np.full((n, full), PAD, np.int32)
        batch["labels"] = np.full((n, full), IGNORE_LABEL, np.int32)
        for side in np.unique(sides).tolist():
            rows = np.flatnonzero(sides == side)
            at = None if offsets is None else offsets[rows]
            batch["inputs"][rows, : side * side] = self.encode_grids(gin[rows], variant[rows], at, canvas=side)
            batch["labels"][rows, : side * side] = self.encode_grids(gout[rows], variant[rows], at, labels=True,
                                                                      canvas=side)
        return batch

    def test_rows(self, max_variants: int | None = None) -> dict[str, np.ndarray]:
        """Every held-out (puzzle, test index, variant), ordered; the first max_variants variants of each puzzle.

        Returns int64 arrays (n,): puzzle_index, test_index, variant, grid (original test input grid index)."""
        counts = self.puzzle_num_variants
        if max_variants is not None:
            counts = np.minimum(counts, max_variants)
        eval_p = np.flatnonzero(self.puzzle_num_tests > 0)
        tests_per = self.puzzle_num_tests[eval_p]
        puzzle = np.repeat(eval_p, tests_per)  # one entry per (puzzle, test)
        test_index = np.arange(len(puzzle)) - np.repeat(np.cumsum(tests_per) - tests_per, tests_per)
        reps = counts[puzzle]
        row_puzzle = np.repeat(puzzle, reps)
        row_test = np.repeat(test_index, reps)
        v_local = np.arange(len(row_puzzle)) - np.repeat(np.cumsum(reps) - reps, reps)
        return {
            "puzzle_index": row_puzzle,
            "test_index": row_test,
            "variant": self.puzzle_first_variant[row_puzzle] + v_local,
            "grid": self.test_input_grid[self.puzzle_first_test[row_puzzle] + row_test],
        }

    # --- persistence (augment.storage) ---------------------------------------------------------------------
    def save(self, root: str | Path) -> None:
        """Write the folder; manifest.json goes last so a crash never leaves a folder that looks complete."""
        save_parts(root, self.pixels, self.grid_table, self.puzzles, self.variant_puzzle, self.variant_dihedral,
                   self.variant_colours, self.manifest)

    @classmethod
    def load(cls, root: str | Path) -> AugmentedDataset:
        """The dataset folder, every file checked (augment.storage.load_parts)."""
        return cls(*load_parts(root))
