"""The compact augmented dataset: every original grid once, plus a tiny table of augmentations.

The reference materialises every augmented puzzle on disk (ARC-AGI-1 at 1000 augmentations: 5.4 GB, 6 minutes).
Here a variant is just (puzzle index, dihedral id, colour map): 15 bytes. Grids are augmented on the fly when a
batch is encoded (pipeline.data.encoding.encode_many), so nothing augmented is ever stored.

Folder layout (see `save`):
    grids.npz      pixels uint8 (N,): every original grid row-major, back to back;
                   table int64 (G, 3): (offset into pixels, height, width) of grid g
    puzzles.json   one entry per puzzle: task_id, source, is_eval and the grid indices of its train_inputs,
                   train_outputs, test_inputs, test_outputs (null when unknown)
    variants.npz   puzzle_index int32 (V,), dihedral uint8 (V,), colours uint8 (V, 10); each puzzle's variants
                   are contiguous and its first one is the identity (the original)
    manifest.json  build settings and counts; written last, so its presence means the folder is complete

Variant v has puzzle identifier v + 1 (identifier 0 is the blank/padding row).

Splits (as in the paper): the train pairs of every puzzle, and the test pairs of puzzles not in the eval set, are
training examples, for every variant. The test inputs of eval puzzles are held out for prediction; their outputs
(when known) are kept only for scoring.

Two variants count as the same puzzle when the model would get the same from both: the same set of training
pairs (order ignored, as the reference's puzzle hash sorts the pairs) and the same held-out inputs in order. Unlike
the reference, an eval puzzle's test outputs take no part (they are answers the model never sees, and hidden on
Kaggle), so the variants of a puzzle do not depend on whether its answers are known. On ARC-AGI-1 at
num_aug=1000 this gives 730,511 variants (the reference: 730,514; both leave 140 puzzles short).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from augment.transforms import DIHEDRAL_SWAPS_AXES, NUM_DIHEDRAL, Augmentation, dihedral_view
from pipeline.data.canvas import output_bound, side_for
from pipeline.data.tasks import Task, TaskError
from pipeline.data.encoding import IGNORE_LABEL, PAD, encode_many
from pipeline.core.errors import ConfigError, InputFileError
from pipeline.core.io import atomic_write_json, atomic_write_with, check_fields, read_json

FORMAT = "trm-arc-augmented-dataset/1"
RETRIES_FACTOR = 5  # up to RETRIES_FACTOR * num_aug random draws per puzzle, as the reference
_SWAPS = np.asarray(DIHEDRAL_SWAPS_AXES)


@dataclass
class TestInput:
    puzzle_index: int
    task_id: str
    test_index: int
    variant: int  # global variant index (puzzle identifier - 1)
    grid: np.ndarray  # the test input seen through the variant's augmentation, uint8 (h, w)


@functools.cache
def _all_colour_maps() -> np.ndarray:
    """uint8 (9!, 10): every colour map fixing 0 (column 0 is 0, columns 1..9 a permutation of 1..9).

    A uniform row index is a uniform permutation; drawing thousands per puzzle as one integer each plus a
    table lookup is ~50x faster than shuffling rows."""
    flat = itertools.chain.from_iterable((0, *p) for p in itertools.permutations(range(1, 10)))
    return np.fromiter(flat, dtype=np.uint8, count=10 * 362880).reshape(-1, 10)


def _canonical_recolouring(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """uint8 (10,) map sending 0 to 0 and the other present colours to 1, 2, ... in order of first appearance.

    Two colourings are equal up to a colour permutation fixing 0 iff their canonical recolourings are equal."""
    first = np.array([np.argmax(values == c) for c in present], dtype=np.int64)
    canon = np.zeros(10, dtype=np.uint8)
    canon[present[np.argsort(first)]] = np.arange(1, len(present) + 1)
    return canon


def _draw_candidates(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random augmentations in draw order: dihedral ids int64 (n,), colour maps uint8 (n, 10)."""
    tids = rng.integers(0, NUM_DIHEDRAL, size=n)
    table = _all_colour_maps()
    return tids, np.take(table, rng.integers(0, len(table), size=n), axis=0)


def _pair_invariant(inp: np.ndarray, out: np.ndarray) -> tuple:
    """Cheap property of a pair that every augmentation preserves: sides up to transposition, colour counts."""
    def of(g: np.ndarray) -> tuple:
        counts = np.bincount(g.ravel(), minlength=10)
        return tuple(sorted(g.shape)), int(counts[0]), tuple(sorted(counts[1:].tolist()))

    return of(inp), of(out)


def _pair_canonical_form(inp: np.ndarray, out: np.ndarray) -> bytes:
    """Equal for two pairs iff one is an augmentation of the other (the smallest signature over the 8 transforms)."""
    forms = []
    for t in range(NUM_DIHEDRAL):
        a, b = dihedral_view(inp, t), dihedral_view(out, t)
        values = np.concatenate([a.ravel(), b.ravel()])
        canon = _canonical_recolouring(values, np.flatnonzero(np.bincount(values, minlength=10)[1:]) + 1)
        forms.append(bytes(a.shape) + bytes(b.shape) + canon[values].tobytes())
    return min(forms)


def _pairs_can_swap(pairs: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Whether two training pairs are augmentations of each other, so that a variant can equal another one as a
    set of pairs while differing in their order. Rare (22 of the 800 ARC-AGI-1 tasks)."""
    groups: dict[tuple, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(_pair_invariant(*pair), []).append(i)
    for members in groups.values():
        if len(members) == 1:
            continue
        forms = [_pair_canonical_form(*pairs[i]) for i in members]
        if len(set(forms)) < len(forms):
            return True
    return False


class _VariantContent:
    """What the model gets from a variant: the multiset of its training pairs and its held-out inputs in order,
    as a hashable key. Per dihedral transform the pixels are laid out once; a draw is then one colour lookup."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], held_out: list[np.ndarray]):
        self.grids = [g for pair in pairs for g in pair] + list(held_out)
        self.num_pair_grids = 2 * len(pairs)
        self._layout: dict[int, tuple[np.ndarray, list[tuple[int, int, bytes]]]] = {}

    def _laid_out(self, tid: int) -> tuple[np.ndarray, list[tuple[int, int, bytes]]]:
        if tid not in self._layout:
            views = [dihedral_view(g, tid) for g in self.grids]
            ends = np.cumsum([v.size for v in views]).tolist()
            # shapes go before the pixels, so the byte strings of different grids can never be confused
            spans = [(end - v.size, end, bytes(v.shape)) for v, end in zip(views, ends)]
            self._layout[tid] = (np.concatenate([v.ravel() for v in views]), spans)
        return self._layout[tid]

    def key(self, tid: int, colours: np.ndarray) -> tuple:
        pixels, spans = self._laid_out(tid)
        data = colours[pixels].tobytes()
        grids = [shape + data[a:b] for a, b, shape in spans]
        n = self.num_pair_grids
        pairs = sorted(grids[i] + grids[i + 1] for i in range(0, n, 2))
        return tuple(pairs), tuple(grids[n:])


def _draw_variants(
    pairs: list[tuple[np.ndarray, np.ndarray]], held_out: list[np.ndarray], num_aug: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to num_aug distinct non-identity variants of a puzzle: (dihedral uint8 (k,), colours uint8 (k, 10)).

    pairs: the puzzle's training pairs (their order does not matter to the model); held_out: test inputs held
    out for prediction (their order does). Semantics of the reference builder: draw RETRIES_FACTOR * num_aug
    random augmentations in order, keep each whose augmented puzzle differs (exactly, as a set of pairs) from the
    original and from all kept so far, and stop at num_aug. Instead of materialising and hashing each draw we
    compute an exact key for "equal with the pairs in the same order":

    Let P be the puzzle and T_t its dihedral transforms. Group the 8 transforms by "T_t P equals T_r P up to a
    colour permutation fixing 0" (canonical recolouring + shapes); in each group pick the first r and the
    recolouring rho_t with T_t P = rho_t(T_r P). Then variant (t, s) = s(T_t P) = (s . rho_t)(T_r P), and two
    variants are equal iff they share r and s . rho_t agrees on the colours present in P. So the key is
    (r, [s(rho_t(c)) for c in present colours]) and deduplication is one np.unique over the draws.

    Equal as sets but in another order needs two training pairs that are augmentations of each other; only
    for such puzzles are the (already order-distinct) draws compared as sets, one by one.
    """
    grids = [g for pair in pairs for g in pair] + list(held_out)
    flat_original = np.concatenate([g.ravel() for g in grids])
    present = np.flatnonzero(np.bincount(flat_original, minlength=10)[1:]) + 1  # non-zero colours used
    signatures: dict[bytes, int] = {}
    rep = np.zeros(NUM_DIHEDRAL, dtype=np.int64)
    rho = np.tile(np.arange(10, dtype=np.int64), (NUM_DIHEDRAL, 1))
    canon_of_rep: dict[int, np.ndarray] = {}
    for t in range(NUM_DIHEDRAL):
        values = np.concatenate([dihedral_view(g, t).ravel() for g in grids])
        canon = _canonical_recolouring(values, present)
        shapes = np.array([g.shape[::-1] if DIHEDRAL_SWAPS_AXES[t] else g.shape for g in grids], dtype=np.int64)
        signature = shapes.tobytes() + canon[values].tobytes()
        r = signatures.setdefault(signature, t)
        rep[t] = r
        if r == t:
            canon_of_rep[t] = canon
        else:  # T_t P = canon_t^-1(canon_r(T_r P))
            inverse_canon = np.zeros(10, dtype=np.int64)
            inverse_canon[canon[present]] = present
            rho[t, present] = inverse_canon[canon_of_rep[r][present]]

    tids, colours = _draw_candidates(RETRIES_FACTOR * num_aug, rng)
    tries = len(tids)

    k = len(present)
    where = np.arange(tries)[:, None] * 10 + rho[:, present][tids]
    digits = colours.ravel()[where].astype(np.int64)  # (tries, k): s(rho_t(c)) for each present colour c, 1..9
    place = 10 ** np.arange(k, dtype=np.int64)
    keys = rep[tids] * 10**k + digits @ place
    identity_key = int(present @ place)  # rep[0] = 0, rho[0] = identity
    unique_keys, first = np.unique(keys, return_index=True)
    first = np.sort(first[unique_keys != identity_key])  # order-distinct draws, in draw order

    if _pairs_can_swap(pairs):
        content_of = _VariantContent(pairs, held_out)
        seen = {content_of.key(0, np.arange(10, dtype=np.uint8))}
        kept = []
        for m in first:
            content = content_of.key(int(tids[m]), colours[m])
            if content not in seen:
                seen.add(content)
                kept.append(m)
                if len(kept) == num_aug:
                    break
        first = np.asarray(kept, dtype=np.int64)
    first = first[:num_aug]
    return tids[first].astype(np.uint8), colours[first]


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

    # --- persistence --------------------------------------------------------------------------------------
    def save(self, root: str | Path) -> None:
        """Write the folder; manifest.json goes last so a crash never leaves a folder that looks complete."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "manifest.json").unlink(missing_ok=True)
        atomic_write_with(root / "grids.npz", lambda f: np.savez(f, pixels=self.pixels, table=self.grid_table))
        atomic_write_json(root / "puzzles.json", self.puzzles, indent=None)
        atomic_write_with(
            root / "variants.npz",
            lambda f: np.savez_compressed(
                f, puzzle_index=self.variant_puzzle, dihedral=self.variant_dihedral, colours=self.variant_colours
            ),
        )
        atomic_write_json(root / "manifest.json", self.manifest)

    @classmethod
    def load(cls, root: str | Path) -> AugmentedDataset:
        """The dataset folder, every file checked (shapes, types, ranges, counts against the manifest): a file that
        is missing, truncated or of something else raises InputFileError naming it, never a numpy error later."""
        root = Path(root)
        manifest = read_manifest(root)
        pixels, table = _read_arrays(root / "grids.npz", {"pixels": 1, "table": 2}).values()
        vp, vd, vc = _read_arrays(root / "variants.npz", {"puzzle_index": 1, "dihedral": 1, "colours": 2}).values()
        puzzles = read_json(root / "puzzles.json", "dataset file")
        _check_grids(root / "grids.npz", pixels, table, manifest["canvas"])
        _check_puzzles(root / "puzzles.json", puzzles, len(table))
        _check_variants(root / "variants.npz", vp, vd, vc, len(puzzles))
        if len(puzzles) != manifest["num_puzzles"] or len(vp) != manifest["num_variants"]:
            raise InputFileError(root / "manifest.json", f"says {manifest['num_puzzles']} puzzles / "
                                 f"{manifest['num_variants']} variants, but puzzles.json / variants.npz hold "
                                 f"{len(puzzles)} / {len(vp)}", "dataset manifest")
        return cls(pixels, table, puzzles, vp, vd, vc, manifest)


MANIFEST_FIELDS = {"format": str, "canvas": int, "num_puzzles": int, "num_variants": int}


def read_manifest(root: str | Path) -> dict[str, Any]:
    """A dataset folder's manifest.json, checked; its absence means no complete dataset is there."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise InputFileError(path, "no augmented dataset here (missing or unfinished build; run --stage augment)",
                             "dataset manifest")
    manifest = check_fields(read_json(path, "dataset manifest"), MANIFEST_FIELDS, path, "dataset manifest")
    if manifest["format"] != FORMAT:
        raise InputFileError(path, f"format {manifest['format']!r}, expected {FORMAT!r}", "dataset manifest")
    if not 1 <= manifest["canvas"] <= 30 or manifest["num_puzzles"] < 0 or manifest["num_variants"] < 0:
        raise InputFileError(path, "canvas must be 1..30 and the counts non-negative", "dataset manifest")
    return manifest


def _read_arrays(path: Path, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """The named integer arrays of an .npz file, with their number of dimensions checked."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in dims if name in z.files}
    except FileNotFoundError:
        raise InputFileError(path, "no such file", "dataset file") from None
    except Exception as e:  # noqa: BLE001 - numpy raises many types for a file that is not an .npz; all mean that
        raise InputFileError(path, f"not a readable .npz file ({type(e).__name__})", "dataset file") from None
    for name, ndim in dims.items():
        if name not in arrays:
            raise InputFileError(path, f"missing array {name!r}", "dataset file")
        if arrays[name].ndim != ndim or arrays[name].dtype.kind not in "iu":
            raise InputFileError(path, f"array {name!r} should be {ndim}-D integers, got {arrays[name].dtype} "
                                 f"{arrays[name].shape}", "dataset file")
    return arrays


def _check_grids(path: Path, pixels: np.ndarray, table: np.ndarray, canvas: int) -> None:
    if table.shape[1:] != (3,):
        raise InputFileError(path, f"table should be (grids, 3), got {table.shape}", "dataset file")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 9):
        raise InputFileError(path, "pixels hold a value outside the colours 0-9", "dataset file")
    start, h, w = table.T.astype(np.int64)
    if table.size and (start.min() < 0 or h.min() < 1 or w.min() < 1 or max(h.max(), w.max()) > canvas
                       or (start + h * w).max() > len(pixels)):
        raise InputFileError(path, f"the grid table points outside the pixels or holds a side outside 1..{canvas}",
                             "dataset file")


_PUZZLE_FIELDS = {"task_id": str, "source": str, "is_eval": bool, "train_inputs": list, "train_outputs": list,
                  "test_inputs": list, "test_outputs": (list, type(None))}


def _check_puzzles(path: Path, puzzles: Any, num_grids: int) -> None:
    if not isinstance(puzzles, list):
        raise InputFileError(path, f"not a JSON list of puzzles (got {type(puzzles).__name__})", "dataset file")
    for p, puzzle in enumerate(puzzles):
        check_fields(puzzle, _PUZZLE_FIELDS, f"{path} (puzzle {p})", "dataset file")
        lists = [puzzle[k] for k in ("train_inputs", "train_outputs", "test_inputs")] + [puzzle["test_outputs"] or []]
        if not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < num_grids for ids in lists
                   for g in ids):
            raise InputFileError(path, f"puzzle {p}: a grid index outside 0..{num_grids - 1}", "dataset file")
        if len(lists[0]) != len(lists[1]) or (puzzle["test_outputs"] is not None and len(lists[3]) != len(lists[2])):
            raise InputFileError(path, f"puzzle {p}: inputs and outputs differ in number", "dataset file")


def _check_variants(path: Path, vp: np.ndarray, vd: np.ndarray, vc: np.ndarray, num_puzzles: int) -> None:
    n = len(vp)
    if vd.shape != (n,) or vc.shape != (n, 10):
        raise InputFileError(path, f"arrays of different lengths ({vp.shape}, {vd.shape}, {vc.shape})", "dataset file")
    if n and (vp.min() < 0 or np.any(np.diff(vp) < 0) or vp.max() >= num_puzzles):
        raise InputFileError(path, f"puzzle_index must be sorted and within 0..{num_puzzles - 1}", "dataset file")
    if n and (vd.min() < 0 or vd.max() >= NUM_DIHEDRAL or vc.min() < 0 or vc.max() > 9):
        raise InputFileError(path, "a dihedral id outside 0..7 or a colour outside 0..9", "dataset file")


def _as_record(item: Any) -> Any:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return item if isinstance(item, (dict, str, int, float)) else str(item)


def build_dataset(
    tasks: Sequence[Task],
    eval_task_ids: Iterable[str],
    num_aug: int,
    seed: int,
    canvas: int,
    progress: bool = True,
    skipped: Sequence[Any] = (),
    sources: str | Sequence[str] = (),
) -> AugmentedDataset:
    """Draw up to num_aug distinct augmentations per puzzle and lay out the compact dataset.

    Puzzle p's draws come from np.random.default_rng([seed, p]) alone (p = index among the kept puzzles), so
    they do not depend on other puzzles. Tasks with a grid side above `canvas` are left out and listed as
    too_big; `skipped` (the loader's skipped tasks) and `sources` are only recorded in the manifest.
    """
    if num_aug < 0:
        raise ConfigError(f"data.num_aug must be at least 0, got {num_aug}")
    eval_ids = set(eval_task_ids)
    seen: dict[str, str] = {}
    pieces: list[np.ndarray] = []
    table: list[tuple[int, int, int]] = []
    offset = 0

    def add(grid: np.ndarray) -> int:
        nonlocal offset
        pieces.append(np.ascontiguousarray(grid, dtype=np.uint8).ravel())
        table.append((offset, grid.shape[0], grid.shape[1]))
        offset += grid.size
        return len(table) - 1

    puzzles: list[dict[str, Any]] = []
    too_big: list[dict[str, Any]] = []
    short: list[dict[str, Any]] = []
    v_puzzle: list[np.ndarray] = []
    v_dihedral: list[np.ndarray] = []
    v_colours: list[np.ndarray] = []
    identity = np.arange(10, dtype=np.uint8)[None]

    for task in tqdm(tasks, desc="augment", unit="task", disable=not progress):
        if task.id in seen:
            raise TaskError(task.source, task.id, None, f"task id appears twice (in {seen[task.id]!r} and "
                            f"{task.source!r})")
        seen[task.id] = task.source
        is_eval = task.id in eval_ids
        all_grids = [g for pair in task.train for g in pair] + list(task.test_inputs) + list(task.test_outputs or [])
        largest = max(max(g.shape) for g in all_grids)
        if largest > canvas:
            too_big.append({"task_id": task.id, "source": task.source, "largest_side": int(largest)})
            continue
        for g in all_grids:
            if g.ndim != 2 or g.size == 0 or g.max() > 9:
                raise TaskError(task.source, task.id, None, f"a grid of shape {g.shape} is not a valid grid")

        p = len(puzzles)
        outputs = None if task.test_outputs is None else [add(g) for g in task.test_outputs]
        puzzles.append(
            {
                "task_id": task.id,
                "source": task.source,
                "is_eval": is_eval,
                "train_inputs": [add(i) for i, _ in task.train],
                "train_outputs": [add(o) for _, o in task.train],
                "test_inputs": [add(g) for g in task.test_inputs],
                "test_outputs": outputs,
            }
        )
        # Deduplicate on what the model sees: its training pairs, and for an eval puzzle its held-out test
        # inputs (the test outputs are answers, never shown).
        pairs = [(np.asarray(i, np.uint8), np.asarray(o, np.uint8)) for i, o in task.train]
        held_out = [np.asarray(g, np.uint8) for g in task.test_inputs] if is_eval else []
        if not is_eval and task.test_outputs is not None:
            pairs += [(np.asarray(i, np.uint8), np.asarray(o, np.uint8)) for i, o in zip(task.test_inputs, task.test_outputs)]
        tids, colours = _draw_variants(pairs, held_out, num_aug, np.random.default_rng([seed, p]))
        if len(tids) < num_aug:
            short.append({"task_id": task.id, "got": int(len(tids))})
        v_puzzle.append(np.full(len(tids) + 1, p, dtype=np.int32))
        v_dihedral.append(np.concatenate([[0], tids]).astype(np.uint8))
        v_colours.append(np.concatenate([identity, colours]))

    pixels = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    grid_table = np.asarray(table, dtype=np.int64).reshape(-1, 3)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "sources": [sources] if isinstance(sources, str) else list(sources),
        "seed": seed,
        "num_aug": num_aug,
        "canvas": canvas,
        "num_puzzles": len(puzzles),
        "num_eval_puzzles": sum(q["is_eval"] for q in puzzles),
        "num_variants": 0,
        "num_train_examples": 0,
        "num_test_inputs": 0,
        "short_puzzles": short,
        "too_big": too_big,
        "skipped": [_as_record(s) for s in skipped],
    }
    dataset = AugmentedDataset(
        pixels,
        grid_table,
        puzzles,
        np.concatenate(v_puzzle) if v_puzzle else np.zeros(0, np.int32),
        np.concatenate(v_dihedral) if v_dihedral else np.zeros(0, np.uint8),
        np.concatenate(v_colours) if v_colours else np.zeros((0, 10), np.uint8),
        manifest,
    )
    manifest["num_variants"] = dataset.num_variants
    manifest["num_train_examples"] = dataset.num_train_examples
    manifest["num_test_inputs"] = dataset.num_test_inputs
    return dataset
