"""Canvas buckets: on which square side each example is computed (`data.canvas_buckets`).

The reference computes every example on the whole canvas (30×30: 900 grid tokens), whatever its size. With buckets
(a short ascending list of sides, the canvas always the last), an example is computed on the smallest side b that
holds it: the top-left b×b corner of the canvas. Its cells keep their canvas positions (cell (r, c) is canvas
position r·canvas + c in every bucket, pipeline.model.trm.grid_positions), so one set of weights serves every bucket,
and on a bucket b an example's tokens are exactly the top-left corner of its full-canvas tokens. For that the
bucket must hold the grid's EOS edge too: a grid of extent e (its larger side, offset included) needs e + 1 ≤ b,
or b = canvas (where, as in the reference, an edge that falls off the canvas is not drawn).

What differs from the full canvas is only attention: on the full canvas every row also attends to the PAD cells
outside the bucket (they take part in attention in the reference), on a bucket those cells do not exist.

Rows on a bucket are stored in "bucket-local layout" wherever rows of several buckets share one array (the
trainer's carry, a refill): a row of side b holds its b×b canvas row-major in its first b² entries, the rest is
PAD (labels: IGNORE_LABEL) and never read.

Training examples are placed (translated) inside their bucket: the offset ranges over 0..b-1-e instead of
0..canvas-e, so small grids move over a smaller range (docs/BUCKETS.md measures it). Test inputs sit at (0, 0); their
bucket must also hold the unknown output, whose size is bounded from the task's demonstration pairs
(`output_bound`).
"""
from __future__ import annotations

import numpy as np


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
    if any(b < 2 or b > canvas for b in sides):
        raise ValueError(f"data.canvas_buckets: every side must be 2..data.canvas ({canvas}), got {text!r}")
    if sides != sorted(set(sides)):
        raise ValueError(f"data.canvas_buckets: sides must be strictly ascending, got {text!r}")
    if sides[-1] != canvas:
        sides.append(canvas)  # whatever fits no smaller bucket is computed on the whole canvas
    return tuple(sides)


def side_for(extent: np.ndarray, buckets: tuple[int, ...], canvas: int) -> np.ndarray:
    """int64 (n,): the smallest bucket side holding grids of larger side `extent` (n,) with their EOS edge;
    the canvas when there are no buckets or none smaller holds them."""
    extent = np.asarray(extent, dtype=np.int64)
    if not buckets:
        return np.full(extent.shape, canvas, dtype=np.int64)
    sides = np.asarray(buckets, dtype=np.int64)
    index = np.searchsorted(sides, extent + 1)  # first side >= extent + 1
    return sides[np.minimum(index, len(sides) - 1)]


def translation_room(extent: np.ndarray, side: np.ndarray, canvas: int) -> np.ndarray:
    """int64, extent's shape: the largest offset at which a grid of `extent` (per axis) keeps its EOS edge on its
    bucket `side` (broadcast against extent); on the canvas itself the edge may fall off, as in the reference."""
    extent = np.asarray(extent, dtype=np.int64)
    side = np.asarray(side, dtype=np.int64)
    return side - extent - (side < canvas)


def output_bound(demos: list[tuple[tuple[int, int], tuple[int, int]]], test_shape: tuple[int, int]) -> int | None:
    """The larger side of a test output, predicted from the task's demonstration pairs' shapes
    ((in_h, in_w), (out_h, out_w)) and the test input's shape; None when no rule below explains every
    demonstration (the caller then uses the whole canvas). Rules, each tried on all demonstrations at once:
    the output has the input's shape (or its transpose), one fixed shape, the input's shape times a fixed ratio
    per axis, or plus a fixed difference per axis. When several explain them, the largest prediction counts.
    docs/BUCKETS.md counts the test outputs of ARC-AGI-1 and ARC-AGI-2 evaluation that this misses (none)."""
    (th, tw) = test_shape
    ins = np.array([d[0] for d in demos], dtype=np.int64).reshape(-1, 2)
    outs = np.array([d[1] for d in demos], dtype=np.int64).reshape(-1, 2)
    if not len(ins):
        return None
    predictions = []
    if (outs == ins).all() or (outs == ins[:, ::-1]).all():
        predictions.append(max(th, tw))
    if (outs == outs[0]).all():
        predictions.append(int(outs[0].max()))
    # out = in * num / den per axis, with one ratio for every demonstration (cross-multiplied: exact integers)
    if ((outs * ins[0]) == (outs[0] * ins)).all():
        predictions.append(max(-(-th * outs[0, 0] // ins[0, 0]), -(-tw * outs[0, 1] // ins[0, 1])))
    if ((outs - ins) == (outs[0] - ins[0])).all():
        predictions.append(int(max(th + outs[0, 0] - ins[0, 0], tw + outs[0, 1] - ins[0, 1])))
    return max(predictions) if predictions else None
