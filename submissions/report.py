"""A self-contained HTML page to look at a run: scores, training curves, and every task's attempts as grids.

One file, no external assets or scripts beyond a few lines of inline JS for filtering, so it can be copied off a
Kaggle or cluster machine and opened anywhere. Grids are inline SVG with one <path> per colour made of horizontal
runs (a few hundred bytes for a typical grid), so 400 tasks stay a few MB.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.data.tasks import Task
from pipeline.core.io import atomic_write_text
from submissions.curves import dashboard_html, read_metrics, read_rows  # noqa: F401 - read_metrics re-exported
from submissions.score import ScoreReport, _as_grid, score_submission

# The standard ARC palette, colour 0..9.
PALETTE = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25")

CSS = """
body{font:13px system-ui,sans-serif;margin:12px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 8px}h2{font-size:15px;margin:16px 0 6px}
table.s{border-collapse:collapse}table.s td,table.s th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:right}
table.s td:first-child,table.s th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}.chart{background:#fff;border:1px solid #ddd}
details{margin:8px 0}summary{font-weight:bold;cursor:pointer}.constants{color:#444;margin:4px 0}
.index a{display:inline-block;padding:0 3px;margin:1px;font:11px monospace;text-decoration:none;color:#222;border-radius:2px}
.ok{background:#c8efc8}.bad{background:#f6cccc}.unk{background:#e4e4e4}
.tasks{display:flex;flex-wrap:wrap;gap:6px}
.task{background:#fff;border:1px solid #ccc;border-radius:3px;padding:4px}
.task h3{font:bold 12px monospace;margin:0 0 3px;padding:1px 4px}
.pair{display:flex;gap:6px;align-items:flex-end;margin-top:3px}
.cell{display:flex;flex-direction:column;align-items:center;font-size:10px;color:#555}
.cell svg{border:2px solid transparent}.cell.right svg{border-color:#2ECC40}.cell.wrong svg{border-color:#FF4136}
.note{color:#a00;font-size:11px}
body.only-bad .task.ok,body.only-bad .task.unk{display:none}body.only-ok .task.bad,body.only-ok .task.unk{display:none}
"""
SCRIPT = "function show(m){document.body.className=m}"
# Thin grid lines: one pattern in unit cells, shared by every grid on the page.
GRID_LINES = (
    '<svg width="0" height="0" style="position:absolute"><defs><pattern id="gl" width="1" height="1" '
    'patternUnits="userSpaceOnUse"><path d="M1 0V1H0" fill="none" stroke="#666" stroke-width="0.05"/></pattern>'
    "</defs></svg>"
)


def grid_svg(grid: Any, max_px: int = 96) -> str:
    """Inline SVG of a grid in the ARC palette; a value that is not a grid becomes a short note instead."""
    try:
        g = np.asarray(grid)
        ok = g.ndim == 2 and g.size > 0 and g.dtype.kind in "iu" and g.min() >= 0 and g.max() <= 9
    except (ValueError, TypeError):
        ok = False
    if not ok:
        return '<span class="note">not a grid</span>'
    g = g.astype(np.int64)
    h, w = g.shape
    cell = max(2, min(12, max_px // max(h, w)))
    background = int(np.bincount(g.ravel(), minlength=10).argmax())
    # Horizontal runs of one colour: a run starts where the colour changes or at a row's first cell.
    starts = np.ones_like(g, dtype=bool)
    starts[:, 1:] = g[:, 1:] != g[:, :-1]
    rows, cols = np.nonzero(starts)
    flat_starts = rows * w + cols
    lengths = np.diff(np.append(flat_starts, h * w))  # every row's first cell starts a run, so runs stay in their row
    paths: dict[int, list[str]] = {}
    for r, c, n in zip(rows.tolist(), cols.tolist(), lengths.tolist()):
        colour = int(g[r, c])
        if colour != background:
            paths.setdefault(colour, []).append(f"M{c} {r}h{n}v1h-{n}z")
    body = "".join(f'<path fill="{PALETTE[colour]}" d="{"".join(d)}"/>' for colour, d in sorted(paths.items()))
    return (
        f'<svg width="{w * cell}" height="{h * cell}" viewBox="0 0 {w} {h}" shape-rendering="crispEdges">'
        f'<rect width="{w}" height="{h}" fill="{PALETTE[background]}"/>{body}'
        f'<rect width="{w}" height="{h}" fill="url(#gl)"/></svg>'
    )


def _scores_html(score: ScoreReport) -> str:
    rows = [
        ("pass@2 (submission)", score.kaggle_score, score.task_score),
        ("pass@1 (attempt_1)", score.pass1_score, score.pass1_task_score),
    ]
    if score.oracle_score is not None:
        rows.append(("oracle (any candidate)", score.oracle_score, score.oracle_task_score))
    body = "".join(f"<tr><td>{name}</td><td>{a:.4f}</td><td>{b:.4f}</td></tr>" for name, a, b in rows)
    notes = f"<p>{score.num_tasks} tasks, {score.num_test_outputs} test outputs, {score.tasks_solved} tasks fully solved"
    if score.missing_tasks:
        notes += f"; {len(score.missing_tasks)} missing from the submission (scored wrong)"
    notes += "</p>"
    return f'<table class="s"><tr><th></th><th>test outputs</th><th>per task</th></tr>{body}</table>{notes}'


def _same(attempt: Any, truth: np.ndarray) -> bool:
    """Right only if the attempt is a valid grid (the scorer's and validator's rule) equal to the truth."""
    a = _as_grid(attempt)
    return a is not None and a.shape == truth.shape and bool(np.array_equal(a, truth))


def _cell(label: str, grid: Any, state: str = "") -> str:
    return f'<div class="cell {state}">{grid_svg(grid)}<span>{html.escape(label)}</span></div>'


def _task_html(task: Task, entries: Any, truths: Sequence[np.ndarray] | None) -> tuple[str, str]:
    """The task's card and its status class: ok (every test output right), bad, or unk (truth unknown)."""
    missing = not isinstance(entries, list)
    parts = []
    solved_all = truths is not None
    for i, test_input in enumerate(task.test_inputs):
        entry = entries[i] if not missing and i < len(entries) and isinstance(entries[i], dict) else None
        truth = np.asarray(truths[i]) if truths is not None and i < len(truths) else None
        cells = [_cell(f"test {i}", test_input)]
        right_any = False
        if entry is None:
            cells.append('<span class="note">no attempts</span>')
        else:
            for k in (1, 2):
                attempt = entry.get(f"attempt_{k}")
                state = "" if truth is None else ("right" if _same(attempt, truth) else "wrong")
                right_any |= state == "right"
                cells.append(_cell(f"attempt {k}", attempt, state))
        if truth is not None:
            cells.append(_cell("truth", truth))
        solved_all &= right_any
        parts.append(f'<div class="pair">{"".join(cells)}</div>')
    status = "unk" if truths is None else ("ok" if solved_all else "bad")
    mark = {"ok": "&#10003;", "bad": "&#10007;", "unk": "?"}[status]
    tid = html.escape(task.id)
    note = ' <span class="note">missing from submission</span>' if missing else ""
    card = f'<div class="task {status}" id="t-{tid}"><h3 class="{status}">{mark} {tid}{note}</h3>{"".join(parts)}</div>'
    return card, status


def render_report(
    tasks: Sequence[Task],
    submission: Mapping[str, Any],
    solutions: Mapping[str, Sequence[np.ndarray]] | None = None,
    score: ScoreReport | None = None,
    metrics_path: str | os.PathLike | None = None,
    title: str = "TRM ARC run report",
    notes: Sequence[str] = (),
) -> str:
    """The whole page as a string. Truth comes from `solutions`, else from each task's own test outputs."""
    if solutions is None:
        known = {t.id: t.test_outputs for t in tasks if t.test_outputs is not None}
        solutions = known or None
    scored = {t.id: solutions[t.id] for t in tasks if t.id in solutions} if solutions is not None else {}
    if score is None and scored:
        score = score_submission(submission, scored)
    sections = [f"<h1>{html.escape(title)}</h1>", *(f'<p class="note">{html.escape(n)}</p>' for n in notes)]
    if score is not None:
        sections.append(_scores_html(score))
    if metrics_path is not None:
        rows, skipped = read_rows(metrics_path)
        note = f'<p class="note">{skipped} unreadable lines in {html.escape(str(metrics_path))} skipped</p>' if skipped else ""
        sections.append(f"<h2>Training curves</h2>{note}{dashboard_html(rows)}")
    cards, links = [], []
    for task in tasks:
        truths = solutions.get(task.id) if solutions is not None else None
        card, status = _task_html(task, submission.get(task.id), truths)
        cards.append(card)
        tid = html.escape(task.id)
        links.append(f'<a class="{status}" href="#t-{tid}">{tid}</a>')
    buttons = "".join(
        f"<button onclick=\"show('{mode}')\">{label}</button> "
        for mode, label in (("", "all"), ("only-bad", "unsolved"), ("only-ok", "solved"))
    )
    sections.append(f'<h2>Tasks ({len(tasks)})</h2><div class="index">{"".join(links)}</div><p>show: {buttons}</p>')
    sections.append(f'<div class="tasks">{"".join(cards)}</div>')
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>{GRID_LINES}{''.join(sections)}</body></html>\n"
    )


def write_report(
    path: str | os.PathLike,
    tasks: Sequence[Task],
    submission: Mapping[str, Any],
    solutions: Mapping[str, Sequence[np.ndarray]] | None = None,
    score: ScoreReport | None = None,
    metrics_path: str | os.PathLike | None = None,
    title: str = "TRM ARC run report",
    notes: Sequence[str] = (),
) -> None:
    """Write the page atomically (see render_report); `notes`: lines shown under the title (e.g. how the
    checkpoint was chosen)."""
    atomic_write_text(Path(path), render_report(tasks, submission, solutions, score, metrics_path, title, notes))
