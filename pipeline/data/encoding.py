"""Grids <-> token sequences, in exactly the reference's layout (so published checkpoints read our inputs).

A grid is drawn on a square canvas of side `canvas` (30 in the paper) and flattened row-major to canvas*canvas
tokens: PAD 0 everywhere, colour c as token c+2, and EOS 1 marking the grid's edge: the row under the grid (row r+h,
columns c..c+w-1) and the column right of it (column c+w, rows r..r+h-1), each only where it falls inside the canvas.
The corner cell (r+h, c+w) stays PAD. Labels use the same layout for the output grid with PAD -> -100 (ignored by
the loss); EOS stays 1 and is a real target, so the model learns where the output ends.

An input/output pair shares one top-left offset (r, c), chosen so that both grids fit.
"""
from __future__ import annotations

import numpy as np

PAD = 0
EOS = 1
COLOUR_OFFSET = 2
IGNORE_LABEL = -100
VOCAB_SIZE = 12
NUM_COLOURS = 10

# Dihedral transform t as a linear map from a cell (i, j) of the transformed grid to the cell (si, sj) of the
# original (h, w) grid it comes from:  si = a*i + b*j + c*(h-1),  sj = d*i + e*j + f*(w-1)
# (in _source_pixels: a, b, c = row_row, row_col, row_flip; d, e, f = col_row, col_col, col_flip).
# Rows follow the id order of augment.transforms (checked against np.rot90/flip there by the tests).
_DIHEDRAL_SOURCE = np.array(
    [
        # a   b  c   d   e  f
        [1, 0, 0, 0, 1, 0],  # 0 identity
        [0, 1, 0, -1, 0, 1],  # 1 rot90 ccw:   g[j, w-1-i]
        [-1, 0, 1, 0, -1, 1],  # 2 rot180:      g[h-1-i, w-1-j]
        [0, -1, 1, 1, 0, 0],  # 3 rot270 ccw:  g[h-1-j, i]
        [1, 0, 0, 0, -1, 1],  # 4 flip lr:     g[i, w-1-j]
        [-1, 0, 1, 0, 1, 0],  # 5 flip ud:     g[h-1-i, j]
        [0, 1, 0, 1, 0, 0],  # 6 transpose:   g[j, i]
        [0, -1, 1, -1, 0, 1],  # 7 anti-transp: g[h-1-j, w-1-i]
    ],
    dtype=np.int64,
)
_SWAPS_AXES = np.array([False, True, False, True, False, False, True, True])


def max_offset(in_shape: tuple[int, int], out_shape: tuple[int, int], canvas: int) -> tuple[int, int]:
    """Largest top-left offset (r, c) at which both grids of a pair fit on the canvas."""
    r = canvas - max(in_shape[0], out_shape[0])
    c = canvas - max(in_shape[1], out_shape[1])
    if r < 0 or c < 0:
        raise ValueError(f"pair {in_shape} -> {out_shape} does not fit a {canvas}x{canvas} canvas")
    return r, c


def _draw(grid: np.ndarray, canvas: int, offset: tuple[int, int], background: int) -> np.ndarray:
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"expected a non-empty 2-D grid, got shape {grid.shape}")
    h, w = grid.shape
    r, c = offset
    if r < 0 or c < 0 or r + h > canvas or c + w > canvas:
        raise ValueError(f"grid {h}x{w} at offset {offset} does not fit a {canvas}x{canvas} canvas")
    if grid.min() < 0 or grid.max() >= NUM_COLOURS:
        raise ValueError(f"grid colours must be 0..9, got {int(grid.min())}..{int(grid.max())}")
    out = np.full((canvas, canvas), background, dtype=np.int32)
    out[r : r + h, c : c + w] = grid.astype(np.int32) + COLOUR_OFFSET
    if r + h < canvas:
        out[r + h, c : c + w] = EOS
    if c + w < canvas:
        out[r : r + h, c + w] = EOS
    return out.reshape(-1)


def label_cells(height: np.ndarray, width: np.ndarray, canvas: int) -> np.ndarray:
    """int64: how many label cells an (h, w) grid drawn at offset (0, 0) has: its h*w colours, the EOS row under
    it (w cells) unless it is `canvas` high, the EOS column right of it (h cells) unless it is `canvas` wide.
    The same for every dihedral transform of the grid (a transpose swaps both terms)."""
    h, w = np.asarray(height, np.int64), np.asarray(width, np.int64)
    return h * w + np.where(h < canvas, w, 0) + np.where(w < canvas, h, 0)


def encode_grid(grid: np.ndarray, canvas: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """int32 (canvas*canvas,): the grid's tokens with its top-left corner at `offset`."""
    return _draw(grid, canvas, offset, PAD)


def encode_labels(grid: np.ndarray, canvas: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """int32 (canvas*canvas,): like encode_grid, with PAD cells set to IGNORE_LABEL (-100)."""
    return _draw(grid, canvas, offset, IGNORE_LABEL)


def encode_pair(
    inp: np.ndarray, out: np.ndarray, canvas: int, offset: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one example, both grids at the same offset."""
    return encode_grid(inp, canvas, offset), encode_labels(out, canvas, offset)


def encode_many(
    pixels: np.ndarray,
    starts: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    canvas: int,
    dihedrals: np.ndarray | None = None,
    colour_luts: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
    labels: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encode n grids at once, each augmented on the fly, without materialising any augmented grid.

    pixels: flat uint8 buffer holding the original grids row-major; grid k is pixels[starts[k]:][:h*w] with
    shape (heights[k], widths[k]). Grid k is transformed by dihedral dihedrals[k] (default 0), recoloured by
    colour_luts[k] (uint8 (n, 10), default identity), and drawn at offsets[k] = (r, c) (int (n, 2), default 0).
    Returns int32 (n, canvas*canvas) tokens (labels=True: PAD -> -100), written into `out` if given.

    Every cell's source pixel is a linear function of its canvas row and column (see _DIHEDRAL_SOURCE), so the
    whole batch is a handful of broadcast ops and two gathers.
    """
    n = len(starts)
    starts = np.asarray(starts, dtype=np.int64)
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    dihedrals = np.zeros(n, dtype=np.int64) if dihedrals is None else np.asarray(dihedrals, dtype=np.int64)
    top, left = (np.zeros(n, np.int64),) * 2 if offsets is None else np.asarray(offsets, dtype=np.int64).T
    swap = _SWAPS_AXES[dihedrals]
    drawn_h, drawn_w = np.where(swap, widths, heights), np.where(swap, heights, widths)  # the transformed shape
    if n and (top.min() < 0 or left.min() < 0 or (top + drawn_h).max() > canvas or (left + drawn_w).max() > canvas):
        raise ValueError(f"some grid does not fit the {canvas}x{canvas} canvas at its offset")
    pix = _source_pixels(pixels, starts, heights, widths, dihedrals, top, left, canvas)
    inside, eos = _grid_and_edge(top, left, drawn_h, drawn_w, canvas)
    table = _token_tables(n, colour_luts, labels)
    # value = pix inside the grid, else 10 on the EOS edge, else 11; uint8 arithmetic is far cheaper than np.where
    value = pix * inside + (np.uint8(11) - eos) * (np.uint8(1) - inside)
    index = (np.arange(n, dtype=np.int64) * 12)[:, None, None] + value
    if out is None:
        out = np.empty((n, canvas * canvas), dtype=np.int32)
    np.take(table.reshape(-1), index.reshape(n, canvas * canvas), out=out)
    return out


def _source_pixels(pixels: np.ndarray, starts: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                   dihedrals: np.ndarray, top: np.ndarray, left: np.ndarray, canvas: int) -> np.ndarray:
    """uint8 (n, canvas, canvas): each canvas cell's original pixel (cells off the grid read some pixel: masked
    out by the caller). The flat source index is linear in the cell's canvas row and column (_DIHEDRAL_SOURCE)."""
    row_row, row_col, row_flip, col_row, col_col, col_flip = _DIHEDRAL_SOURCE[dihedrals].T
    row_step = row_row * widths + col_row  # change of the flat source index per canvas row
    col_step = row_col * widths + col_col  # ... per canvas column
    base = starts + row_flip * (heights - 1) * widths + col_flip * (widths - 1) - row_step * top - col_step * left
    axis = np.arange(canvas, dtype=np.int64)
    source = (base[:, None, None] + (row_step[:, None] * axis)[:, :, None]) + (col_step[:, None] * axis)[:, None, :]
    return np.take(pixels, source, mode="clip")


def _grid_and_edge(top: np.ndarray, left: np.ndarray, drawn_h: np.ndarray, drawn_w: np.ndarray, canvas: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, canvas, canvas) masks: the cells of the drawn grid, and those of its EOS edge (the row under it
    and the column right of it, not the corner)."""
    axis = np.arange(canvas, dtype=np.int64)
    rel_row = axis[None, :] - top[:, None]  # (n, canvas): canvas row relative to the grid's top
    rel_col = axis[None, :] - left[:, None]
    row_in = ((rel_row >= 0) & (rel_row < drawn_h[:, None]))[:, :, None]
    col_in = ((rel_col >= 0) & (rel_col < drawn_w[:, None]))[:, None, :]
    row_eos = (rel_row == drawn_h[:, None])[:, :, None]
    col_eos = (rel_col == drawn_w[:, None])[:, None, :]
    inside = (row_in & col_in).view(np.uint8)
    eos = ((row_eos & col_in) | (row_in & col_eos)).view(np.uint8)
    return inside, eos


def _token_tables(n: int, colour_luts: np.ndarray | None, labels: bool) -> np.ndarray:
    """int32 (n, 12), one per grid: entries 0..9 are colour tokens after recolouring, 10 is EOS, 11 the background."""
    table = np.empty((n, 12), dtype=np.int32)
    lut = np.arange(NUM_COLOURS) if colour_luts is None else np.asarray(colour_luts)
    table[:, :NUM_COLOURS] = lut + COLOUR_OFFSET
    table[:, 10] = EOS
    table[:, 11] = IGNORE_LABEL if labels else PAD
    return table


def crop_sizes(tokens: np.ndarray, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's crop for many sequences at once: int64 (n,) heights and widths (0, 0 when nothing valid).

    tokens: (n, canvas*canvas). Scanning rows from the top, the usable width is the number of leading colour
    tokens (2..11) in the first row, shrinking to the leading run of each later row; the crop is the
    (rows, usable width) rectangle of largest area (first one on ties).
    """
    grid = np.asarray(tokens).reshape(-1, canvas, canvas)
    is_colour = (grid >= COLOUR_OFFSET) & (grid < COLOUR_OFFSET + NUM_COLOURS)
    leading = np.cumprod(is_colour, axis=2, dtype=np.int8).sum(axis=2, dtype=np.int64)  # (n, canvas)
    width = np.minimum.accumulate(leading, axis=1)
    area = width * np.arange(1, canvas + 1)
    best = area.argmax(axis=1)
    rows = np.arange(len(grid))
    valid = area[rows, best] > 0
    return np.where(valid, best + 1, 0), np.where(valid, width[rows, best], 0)


def decode_grid(tokens: np.ndarray, canvas: int) -> np.ndarray | None:
    """uint8 grid read back from one sequence (canvas*canvas,) by the reference's crop; None when empty."""
    tokens = np.asarray(tokens).reshape(canvas, canvas)
    h, w = crop_sizes(tokens[None], canvas)
    if h[0] == 0:
        return None
    return (tokens[: h[0], : w[0]] - COLOUR_OFFSET).astype(np.uint8)


def decode_grids(tokens: np.ndarray, canvas: int) -> list[np.ndarray | None]:
    """decode_grid for each row of (n, canvas*canvas) tokens."""
    grids = np.asarray(tokens).reshape(-1, canvas, canvas)
    heights, widths = crop_sizes(grids, canvas)
    return [
        (g[:h, :w] - COLOUR_OFFSET).astype(np.uint8) if h else None for g, h, w in zip(grids, heights, widths)
    ]
