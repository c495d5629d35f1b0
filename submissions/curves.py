"""The training dashboard of report.html: metrics.jsonl as inline SVG charts.

The curves a person looks for first are drawn large (training loss and exact accuracy; held-out pass@2 and the
truth's cross-entropy against step, and against FLOPs where the rows carry them); a column that never changes is
written as text; every other numeric column is a small chart in its kind's group (training, held-out). Columns
are read generically, so one added to the rows later appears in its group with no change here; a headline chart
whose columns a run did not log is left out.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

MAX_CURVE_POINTS = 1500
COLOURS = ("#0074D9", "#FF851B", "#2ECC40", "#B10DC9", "#FF4136")
KIND_TITLES = {"train": "Training", "eval": "Held-out evaluations"}


@dataclass(frozen=True)
class Chart:
    """A headline chart: `columns` of rows of `kind` against `x`, drawn together (the first one bold)."""

    title: str
    kind: str
    columns: tuple[str, ...]
    labels: tuple[str, ...]
    x: str = "step"
    from_zero: bool = False  # rates: the axis starts at 0, so a small rate looks small


HEADLINE = (
    Chart("Training loss", "train", ("loss", "lm_loss"), ("loss", "LM loss")),
    Chart("Training exact accuracy", "train", ("exact_accuracy",), ("whole grid right",), from_zero=True),
    Chart("Held-out pass@2", "eval", ("pass2", "task_pass2", "oracle"), ("test outputs", "per task", "oracle"),
          from_zero=True),
    Chart("Held-out cross-entropy of the truth", "eval", ("ce_true",), ("per cell",)),
    Chart("Held-out pass@2 against FLOPs", "eval", ("pass2", "task_pass2"), ("test outputs", "per task"),
          x="flops", from_zero=True),
    Chart("Held-out cross-entropy against FLOPs", "eval", ("ce_true",), ("per cell",), x="flops"),
)


# ---------------------------------------------------------------------------------------------- reading
def read_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The rows of a metrics.jsonl file (a JSON object with a numeric "step" each), and how many lines could not be
    used: a run killed mid-write leaves a broken last line, which is skipped and counted rather than fatal."""
    rows, skipped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                float(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                skipped += 1
                continue
            rows.append(record)
    return rows, skipped


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series_of(rows: Sequence[dict[str, Any]], kind: str, column: str, x: str = "step") -> list[tuple[float, float]]:
    """(x, value) of `column` over the rows of `kind` (rows without a kind are training rows) that have both."""
    points = []
    for row in rows:
        if row.get("kind", "train") != kind:
            continue
        a, b = _number(row.get(x)), _number(row.get(column))
        if a is not None and b is not None:
            points.append((a, b))
    return points


def read_metrics(path: str | os.PathLike) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """Series per metric name against step ("eval NAME" for held-out rows, listed first), and the skipped lines."""
    rows, skipped = read_rows(path)
    series: dict[str, list[tuple[float, float]]] = {}
    for kind in ("eval", "train"):
        prefix = "eval " if kind == "eval" else ""
        for column in _columns(rows, kind):
            series[prefix + column] = series_of(rows, kind, column)
    return {k: v for k, v in series.items() if v}, skipped


def _columns(rows: Sequence[dict[str, Any]], kind: str) -> list[str]:
    """The numeric columns of the rows of `kind`, in first-seen order (the step, the x axis, left out)."""
    seen: dict[str, None] = {}
    for row in rows:
        if row.get("kind", "train") == kind:
            seen.update((k, None) for k, v in row.items() if k != "step" and _number(v) is not None)
    return list(seen)


# ---------------------------------------------------------------------------------------------- drawing
def _short(v: float) -> str:
    """Axis numbers that fit a narrow margin: 1692 -> 1.69k, 3.2e15 -> 3.2P."""
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most MAX_CURVE_POINTS, evenly, always keeping the last."""
    if len(points) <= MAX_CURVE_POINTS:
        return points
    keep = np.unique(np.append(np.linspace(0, len(points) - 1, MAX_CURVE_POINTS).astype(int), len(points) - 1))
    return [points[k] for k in keep]


def _y_ticks(values: list[float], from_zero: bool) -> list[float]:
    """3 to 6 round values (steps of 1, 2 or 5 × 10^k) spanning `values`; the axis runs from the first to the last."""
    lo, hi = min(values), max(values)
    if from_zero:
        lo = min(lo, 0.0)
    if hi == lo:  # one value: a band around it (a rate that stayed 0 gets 0..1)
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = (lo, lo + pad) if from_zero else (lo - pad, hi + pad)
    raw = (hi - lo) / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def _value(v: float) -> str:
    return _short(v) if abs(v) >= 1e5 else f"{v:.4g}"


def chart_svg(title: str, lines: Sequence[tuple[str, list[tuple[float, float]]]], x_label: str = "step",
              x_range: tuple[float, float] | None = None, width: int = 280, height: int = 140,
              from_zero: bool = False) -> str:
    """Lines (label, [(x, y)]) on one pair of axes, with a legend of their last values. Series of a few points
    (evaluations) get markers, so that a single evaluation still shows."""
    lines = [(label, _thin(sorted(points))) for label, points in lines if points]
    xs = [x for _, points in lines for x, _ in points]
    ticks = _y_ticks([y for _, points in lines for _, y in points], from_zero)
    y0, y1 = ticks[0], ticks[-1]
    x0, x1 = x_range if x_range is not None else (min(xs), max(xs))
    x1 = x1 if x1 > x0 else x0 + 1
    big = width >= 400
    size = 12 if big else 10
    labels = [_short(t) for t in ticks]
    left = 8 + round(0.62 * size * max(len(t) for t in labels))  # room for the longest tick label
    right, top, bottom = 8, 20 + (size + 2) * len(lines) * (len(lines) > 1), 18
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [f'<svg class="chart" width="{width}" height="{height}" font-size="{size}">',
             f'<text x="{left}" y="{size + 2}" font-weight="bold">{html.escape(title)}</text>']
    for y, label in zip(ticks, labels):  # gridlines with their values
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{width - right}" y2="{py(y):.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{left - 3}" y="{py(y) + 4:.1f}" text-anchor="end" fill="#555">{label}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" fill="#555">{_short(x0)}</text>'
                 f'<text x="{width - right}" y="{height - 4}" text-anchor="end" fill="#555">'
                 f'{html.escape(x_label)} {_short(x1)}</text>')
    for i, (label, points) in reversed(list(enumerate(lines))):  # the first (bold) line drawn last, on top
        colour = COLOURS[i % len(COLOURS)]
        coords = [(px(x), py(y)) for x, y in points]
        stroke = 2.0 if i == 0 else 1.2
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{stroke}" points="'
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in coords) + '"/>')
        if len(points) <= 60:
            parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{2.5 if big else 2}" fill="{colour}"/>' for a, b in coords)
        last = f"{html.escape(label)} {_value(points[-1][1])}" if len(lines) > 1 else f"last {_value(points[-1][1])}"
        if len(lines) > 1:
            parts.append(f'<text x="{left + 4}" y="{size + 2 + (size + 2) * (i + 1)}" fill="{colour}">&#9632; {last}</text>')
        else:
            parts.append(f'<text x="{width - right}" y="{size + 2}" text-anchor="end">{last}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _constant(points: list[tuple[float, float]]) -> bool:
    return len({y for _, y in points}) == 1


def dashboard_html(rows: Sequence[dict[str, Any]]) -> str:
    """The headline charts, then each kind's other columns: constants as text, the rest as small charts."""
    if not rows:
        return "<p>no metrics</p>"
    extent = {x: (0.0, max((v for r in rows if (v := _number(r.get(x))) is not None), default=1.0))
              for x in ("step", "flops")}
    headline, drawn = [], set()
    for chart in HEADLINE:
        lines = [(label, series_of(rows, chart.kind, column, chart.x))
                 for column, label in zip(chart.columns, chart.labels)]
        lines = [(label, points) for label, points in lines if points]
        if not lines:
            continue
        headline.append(chart_svg(chart.title, lines, "FLOPs" if chart.x == "flops" else "step", extent[chart.x],
                                  width=560, height=240, from_zero=chart.from_zero))
        drawn.update((chart.kind, c) for c in chart.columns)
    parts = [f'<div class="charts">{"".join(headline)}</div>'] if headline else []
    present = {str(r.get("kind", "train")) for r in rows}
    kinds = [k for k in KIND_TITLES if k in present] + sorted(present - set(KIND_TITLES))
    for kind in kinds:
        series = {c: series_of(rows, kind, c) for c in _columns(rows, kind) if (kind, c) not in drawn}
        constants = [f"{html.escape(c)} <b>{points[0][1]:.6g}</b>" for c, points in series.items() if _constant(points)]
        small = [chart_svg(c, [(c, points)], x_range=extent["step"]) for c, points in series.items()
                 if not _constant(points)]
        count = sum(r.get("kind", "train") == kind for r in rows)
        title = html.escape(KIND_TITLES.get(kind, f"{kind} rows"))
        body = f'<p class="constants">the same in every row: {", ".join(constants)}</p>' if constants else ""
        body += f'<div class="charts">{"".join(small)}</div>' if small else ""
        summary = f"{title} ({_plural(count, 'row')}): {_plural(len(small), 'more curve')}"
        if body:
            parts.append(f"<details open><summary>{summary}</summary>{body}</details>")
    return "".join(parts)
