from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from augment.transforms import DIHEDRAL_SWAPS_AXES, dihedral
from pipeline.data.encoding import (
    EOS,
    IGNORE_LABEL,
    PAD,
    crop_sizes,
    decode_grid,
    decode_grids,
    encode_grid,
    encode_labels,
    encode_many,
    encode_pair,
    max_offset,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "trm_parity"  # vendored from shared/golden


def _shifted_to_origin(tokens: np.ndarray, canvas: int, offset: tuple[int, int], background: int) -> np.ndarray:
    """The canvas moved so that `offset` lands on (0, 0): the reference crop only reads from the top-left."""
    r, c = offset
    grid = np.full((canvas, canvas), background, dtype=tokens.dtype)
    grid[: canvas - r, : canvas - c] = tokens.reshape(canvas, canvas)[r:, c:]
    return grid.reshape(-1)


def test_reproduces_reference_fixture_batch():
    import torch

    batch = torch.load(GOLDEN / "batch.pt")
    inputs, labels = batch["inputs"].numpy(), batch["labels"].numpy()
    canvas = 6
    stated = [((3, 4), (3, 4), (0, 1)), ((2, 5), (4, 2), (0, 0)), ((6, 6), (6, 6), (0, 0))]
    for k, (in_shape, out_shape, offset) in enumerate(stated):
        inp = decode_grid(_shifted_to_origin(inputs[k], canvas, offset, PAD), canvas)
        out = decode_grid(_shifted_to_origin(labels[k], canvas, offset, IGNORE_LABEL), canvas)
        assert inp.shape == in_shape and out.shape == out_shape
        enc_in, enc_out = encode_pair(inp, out, canvas, offset)
        np.testing.assert_array_equal(enc_in, inputs[k])
        np.testing.assert_array_equal(enc_out, labels[k])
        # the same through the vectorised path
        pixels = np.concatenate([inp.ravel(), out.ravel()])
        both = encode_many(pixels, [0], [in_shape[0]], [in_shape[1]], canvas, offsets=[offset])
        np.testing.assert_array_equal(both[0], inputs[k])
        lab = encode_many(pixels, [inp.size], [out_shape[0]], [out_shape[1]], canvas, offsets=[offset], labels=True)
        np.testing.assert_array_equal(lab[0], labels[k])
    assert [(labels[k] != IGNORE_LABEL).sum() for k in range(3)] == [19, 14, 36]


def test_layout_by_hand():
    g = np.array([[3, 4]], dtype=np.uint8)
    tokens = encode_grid(g, 4, offset=(1, 1)).reshape(4, 4)
    expected = np.array(
        [
            [0, 0, 0, 0],
            [0, 5, 6, 1],
            [0, 1, 1, 0],  # corner (2, 3) stays PAD
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(tokens, expected)
    labels = encode_labels(g, 4, offset=(1, 1)).reshape(4, 4)
    np.testing.assert_array_equal(labels, np.where(expected == PAD, IGNORE_LABEL, expected))
    # at the far edge the EOS marks fall off the canvas
    tokens = encode_grid(g, 3, offset=(2, 1)).reshape(3, 3)
    np.testing.assert_array_equal(tokens, [[0, 0, 0], [0, 0, 0], [0, 5, 6]])
    assert tokens.dtype == np.int32


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        encode_grid(np.zeros((3, 3), np.uint8), 4, offset=(2, 0))
    with pytest.raises(ValueError, match="colours"):
        encode_grid(np.full((2, 2), 10, np.uint8), 4)
    with pytest.raises(ValueError, match="does not fit"):
        max_offset((5, 2), (2, 7), 6)
    assert max_offset((5, 2), (2, 4), 6) == (1, 2)


@st.composite
def placed_grids(draw):
    canvas = draw(st.integers(1, 30))
    h = draw(st.integers(1, canvas))
    w = draw(st.integers(1, canvas))
    r = draw(st.integers(0, canvas - h))
    c = draw(st.integers(0, canvas - w))
    seed = draw(st.integers(0, 2**32 - 1))
    grid = np.random.default_rng(seed).integers(0, 10, size=(h, w), dtype=np.uint8)
    return grid, canvas, (r, c)


@settings(max_examples=300, deadline=None)
@given(placed_grids())
def test_decode_encode_round_trip(case):
    grid, canvas, offset = case
    np.testing.assert_array_equal(decode_grid(encode_grid(grid, canvas), canvas), grid)
    np.testing.assert_array_equal(decode_grid(encode_labels(grid, canvas), canvas), grid)
    tokens = encode_grid(grid, canvas, offset)
    assert (tokens == EOS).sum() == (offset[0] + grid.shape[0] < canvas) * grid.shape[1] + (
        offset[1] + grid.shape[1] < canvas
    ) * grid.shape[0]
    np.testing.assert_array_equal(decode_grid(_shifted_to_origin(tokens, canvas, offset, PAD), canvas), grid)


def test_decode_crop_rules():
    canvas = 4
    # usable width shrinks row by row; the largest-area rectangle wins
    g = np.array(
        [
            [2, 3, 4, 5],
            [2, 3, 4, 1],
            [2, 3, 0, 0],
            [2, 0, 0, 0],
        ]
    )
    # areas: row1 4, rows1-2 6, rows1-3 6 (tie: first), rows1-4 4
    np.testing.assert_array_equal(decode_grid(g.ravel(), canvas), [[0, 1, 2], [0, 1, 2]])
    assert decode_grid(np.zeros(16, np.int32), canvas) is None
    assert decode_grid(np.array([1] + [2] * 15), canvas) is None  # first cell not a colour
    # a row with width 0 stops the scan even if later rows have colours
    g = np.array([[2, 2, 0, 0], [0, 0, 0, 0], [2, 2, 2, 2], [2, 2, 2, 2]])
    np.testing.assert_array_equal(decode_grid(g.ravel(), canvas), [[0, 0]])
    h, w = crop_sizes(np.stack([g.ravel(), np.zeros(16)]), canvas)
    assert h.tolist() == [1, 0] and w.tolist() == [2, 0]
    assert decode_grids(np.stack([g.ravel(), np.zeros(16)]), canvas)[1] is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 40), st.integers(0, 2**32 - 1), st.booleans())
def test_encode_many_matches_encode_grid(canvas, n, seed, labels):
    rng = np.random.default_rng(seed)
    tids = rng.integers(0, 8, n)
    hs, ws = rng.integers(1, canvas + 1, n), rng.integers(1, canvas + 1, n)
    starts = np.concatenate([[0], np.cumsum(hs * ws)[:-1]]) + 3  # a few unused pixels first
    pixels = rng.integers(0, 10, int(starts[-1] + hs[-1] * ws[-1]), dtype=np.uint8)
    luts = np.stack([np.concatenate([[0], rng.permutation(9) + 1]) for _ in range(n)]).astype(np.uint8)
    th = np.where(np.asarray(DIHEDRAL_SWAPS_AXES)[tids], ws, hs)
    tw = np.where(np.asarray(DIHEDRAL_SWAPS_AXES)[tids], hs, ws)
    offsets = np.stack([rng.integers(0, canvas - th + 1), rng.integers(0, canvas - tw + 1)], axis=1)
    out = encode_many(pixels, starts, hs, ws, canvas, tids, luts, offsets, labels=labels)
    assert out.shape == (n, canvas * canvas) and out.dtype == np.int32
    encode = encode_labels if labels else encode_grid
    for k in range(n):
        grid = pixels[starts[k] : starts[k] + hs[k] * ws[k]].reshape(hs[k], ws[k])
        expected = encode(luts[k][dihedral(grid, int(tids[k]))], canvas, tuple(offsets[k]))
        np.testing.assert_array_equal(out[k], expected)


def test_encode_many_rejects_misplaced_grid():
    with pytest.raises(ValueError, match="does not fit"):
        encode_many(np.zeros(12, np.uint8), [0], [3], [4], 4, dihedrals=[1], offsets=[[1, 0]])
