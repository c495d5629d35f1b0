import json
import re

import numpy as np

from pipeline.data.tasks import Task
from submissions.report import PALETTE, grid_svg, read_metrics, write_report
from submissions.score import score_submission


def _tasks():
    rng = np.random.default_rng(0)
    return [
        Task(f"task{k:03d}", [], [rng.integers(0, 10, (3, 4), dtype=np.uint8)], [rng.integers(0, 10, (2, 2), dtype=np.uint8)], "x")
        for k in range(5)
    ]


def test_grid_svg_draws_every_colour_run():
    g = np.array([[0, 0, 3], [4, 4, 4]])
    svg = grid_svg(g)
    assert svg.startswith("<svg") and 'viewBox="0 0 3 2"' in svg
    assert PALETTE[3] in svg and PALETTE[4] in svg
    # 4 is the commonest colour: it is the background rect; the other runs are paths.
    assert f'<rect width="3" height="2" fill="{PALETTE[4]}"/>' in svg
    assert f'<path fill="{PALETTE[0]}" d="M0 0h2v1h-2z"/>' in svg and f'<path fill="{PALETTE[3]}" d="M2 0h1v1h-1z"/>' in svg
    assert "M0 1h3v1h-3z" not in svg
    assert "not a grid" in grid_svg([[1, 2], [3]]) and "not a grid" in grid_svg("x")


def test_read_metrics_skips_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1 / (s + 1), "exact_accuracy": s / 10, "tag": "x", "flag": True}) for s in range(10)]
    path.write_text("\n".join(lines) + '\n{"step": 10, "lo')
    series, skipped = read_metrics(path)
    assert set(series) == {"loss", "exact_accuracy"} and len(series["loss"]) == 10 and skipped == 1


def test_read_metrics_separates_evaluation_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": 5, "epoch": 0.5, "loss": 2.0},
            {"kind": "eval", "step": 5, "epoch": 0.5, "pass2": 0.25, "oracle": 0.5},
            {"kind": "train", "step": 10, "epoch": 1.0, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series, skipped = read_metrics(path)
    assert list(series)[:3] == ["eval epoch", "eval pass2", "eval oracle"] and skipped == 0
    assert series["eval pass2"] == [(5.0, 0.25)] and series["epoch"] == [(5.0, 0.5), (10.0, 1.0)]


def test_write_report(tmp_path):
    tasks = _tasks()
    truths = {t.id: t.test_outputs for t in tasks}
    submission = {t.id: [{"attempt_1": t.test_outputs[0].tolist(), "attempt_2": [[0]]}] for t in tasks[:3]}
    submission["task003"] = [{"attempt_1": [[1]], "attempt_2": [[2]]}]  # wrong; task004 missing
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 2.0 - s / 100}) + "\n" for s in range(3000)))
    path = tmp_path / "report.html"
    write_report(path, tasks, submission, truths, score_submission(submission, truths), metrics)
    page = path.read_text()
    for t in tasks:
        assert f'id="t-{t.id}"' in page
    # per task: test input + 2 attempts + truth, except the missing task (input + truth); + grid-line defs + 1 curve
    assert page.count("<svg") == 4 * 4 + 2 + 1 + 1
    assert page.count('<div class="task ok"') == 3 and page.count('<div class="task bad"') == 2
    assert "missing from submission" in page and "0.6000" in page  # 3 of 5 solved
    assert "<polyline" in page and "loss" in page
    points = re.search(r'<polyline[^>]*points="([^"]*)"', page).group(1).split()
    assert len(points) <= 1500


def test_report_without_truth(tmp_path):
    tasks = [Task("hidden", [], [np.zeros((2, 2), np.uint8)], None, "x")]
    path = tmp_path / "r.html"
    write_report(path, tasks, {"hidden": [{"attempt_1": [[1]], "attempt_2": [[1]]}]})
    page = path.read_text()
    assert 'class="task unk"' in page and page.count("<svg") == 1 + 3


def _titles(page: str) -> list[str]:
    return re.findall(r'<svg class="chart"[^>]*><text[^>]*font-weight="bold">([^<]*)</text>', page)


def test_dashboard_puts_the_headline_curves_first_constants_as_text_and_groups_the_rest(tmp_path):
    from submissions.curves import dashboard_html, read_rows

    rows = []
    for step in range(10, 110, 10):
        rows.append({"kind": "train", "step": step, "loss": 3 - step / 100, "lm_loss": 2.9 - step / 100,
                     "exact_accuracy": step / 1000, "lr": 1e-3, "examples_per_s": 100 + step % 7})
    rows += [{"kind": "eval", "step": s, "pass2": s / 400, "task_pass2": s / 300, "oracle": s / 200,
              "views": 8, "tasks": 13, "seconds": 1 + s / 50} for s in (50, 100)]
    page = dashboard_html(rows)
    assert _titles(page)[:3] == ["Training loss", "Training exact accuracy", "Held-out pass@2"]
    assert "cross-entropy" not in page and "FLOPs" not in page  # not logged by this run: not drawn
    assert page.index("Held-out pass@2") < page.index("<details")  # the rest below, grouped by kind
    assert re.search(r"Training \(10 rows\): 1 more curve<.*the same in every row: lr <b>0.001</b>", page)
    assert re.search(r"Held-out evaluations \(2 rows\).*views <b>8</b>, tasks <b>13</b>", page)
    assert set(_titles(page)) == {"Training loss", "Training exact accuracy", "Held-out pass@2", "examples_per_s",
                                  "seconds"}  # constants are text, not charts

    path = tmp_path / "metrics.jsonl"  # columns added later (FLOPs, the truth's cross-entropy) get their charts
    more = [{**r, "flops": r["step"] * 1e12} | ({"ce_true": 2 - r["step"] / 100} if r["kind"] == "eval" else {})
            for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in more))
    page = dashboard_html(read_rows(path)[0])
    assert _titles(page)[:6] == ["Training loss", "Training exact accuracy", "Held-out pass@2",
                                 "Held-out cross-entropy of the truth", "Held-out pass@2 against FLOPs",
                                 "Held-out cross-entropy against FLOPs"]
    assert "FLOPs 100T" in page  # the FLOPs axis, in readable units


def test_a_single_evaluation_still_shows_and_a_rate_axis_starts_at_zero():
    from submissions.curves import chart_svg

    svg = chart_svg("Held-out pass@2", [("test outputs", [(500.0, 0.0)])], x_range=(0, 500), from_zero=True)
    assert svg.count("<circle") == 1  # one point: a marker, not an invisible one-point line
    labels = re.findall(r'text-anchor="end" fill="#555">([^<]*)<', svg)[:-1]  # the y axis (the last: x's end)
    assert labels[0] == "0" and labels[-1] == "1"  # a rate that stayed 0 is drawn on 0..1
    svg = chart_svg("loss", [("loss", [(s, 2.0 - s / 1000) for s in range(3000)])])
    points = re.search(r'points="([^"]*)"', svg).group(1).split()
    assert "<circle" not in svg and len(points) == 1500  # a long curve: no markers, thinned
