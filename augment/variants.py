"""Which augmentations of a puzzle become its variants: the reference builder's draws, deduplicated exactly.

Two variants count as the same puzzle when the model would get the same from both: the same set of training
pairs (order ignored, as the reference's puzzle hash sorts the pairs) and the same held-out inputs in order. Unlike
the reference, an eval puzzle's test outputs take no part (they are answers the model never sees, and hidden on
Kaggle), so the variants of a puzzle do not depend on whether its answers are known. On ARC-AGI-1 at
num_aug=1000 this gives 730,511 variants (the reference: 730,514; both leave 140 puzzles short).
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

from augment.transforms import DIHEDRAL_SWAPS_AXES, NUM_DIHEDRAL, dihedral_view

RETRIES_FACTOR = 5  # up to RETRIES_FACTOR * num_aug random draws per puzzle, as the reference


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
    rep, rho = _dihedral_classes(grids, present)
    tids, colours = _draw_candidates(RETRIES_FACTOR * num_aug, rng)
    first = _order_distinct_draws(rep, rho, present, tids, colours)
    if _pairs_can_swap(pairs):
        first = _set_distinct_draws(pairs, held_out, tids, colours, first, num_aug)
    first = first[:num_aug]
    return tids[first].astype(np.uint8), colours[first]


def _dihedral_classes(grids: list[np.ndarray], present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rep (8,), rho (8, 10)): for each dihedral transform t, the first transform r with T_t P equal to T_r P up
    to a colour permutation fixing 0, and that recolouring rho_t (T_t P = rho_t(T_r P)); see _draw_variants."""
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
    return rep, rho


def _order_distinct_draws(rep: np.ndarray, rho: np.ndarray, present: np.ndarray, tids: np.ndarray,
                          colours: np.ndarray) -> np.ndarray:
    """The indices of the draws that differ from the original and from every earlier draw with the pairs in the
    same order, in draw order: one key per draw, (rep[t], s(rho_t(c)) for each present colour c), then np.unique."""
    k = len(present)
    where = np.arange(len(tids))[:, None] * 10 + rho[:, present][tids]
    digits = colours.ravel()[where].astype(np.int64)  # (tries, k): s(rho_t(c)) for each present colour c, 1..9
    place = 10 ** np.arange(k, dtype=np.int64)
    keys = rep[tids] * 10**k + digits @ place
    identity_key = int(present @ place)  # rep[0] = 0, rho[0] = identity
    unique_keys, first = np.unique(keys, return_index=True)
    return np.sort(first[unique_keys != identity_key])


def _set_distinct_draws(pairs: list[tuple[np.ndarray, np.ndarray]], held_out: list[np.ndarray], tids: np.ndarray,
                        colours: np.ndarray, candidates: np.ndarray, num_aug: int) -> np.ndarray:
    """Of the order-distinct `candidates`, those whose puzzle also differs as a set of pairs from the original and
    every one kept before (compared one by one), at most num_aug."""
    content_of = _VariantContent(pairs, held_out)
    seen = {content_of.key(0, np.arange(10, dtype=np.uint8))}
    kept = []
    for m in candidates:
        content = content_of.key(int(tids[m]), colours[m])
        if content not in seen:
            seen.add(content)
            kept.append(m)
            if len(kept) == num_aug:
                break
    return np.asarray(kept, dtype=np.int64)
