"""Score a submission against known solutions, the way Kaggle and the ARC Prize / TRM paper do.

Two averages, which differ whenever tasks have several test inputs:
- over test outputs (the Kaggle leaderboard figure): right test outputs / all test outputs;
- per task (the ARC Prize / paper convention): each task scores the fraction of its test outputs solved, averaged
  over tasks.
A test output is solved at pass@2 when either attempt equals the truth exactly, at pass@1 when attempt_1 does.
Tasks missing from the submission, and malformed attempts, score as wrong (and are named).

With the candidate store the oracle figure shows what a perfect selector would reach (the right grid is among the
valid candidates), and the rank of the right grid under the default selector: oracle - pass@2 is the cost of voting.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.data.tasks import Task
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.inference.predictions import Predictions
from pipeline.inference.vote import SELECTORS, Selector, vote
from submissions.validate import ATTEMPT_KEYS, grid_problems
from submissions.write import build_submission


@dataclass
class TaskScore:
    task_id: str
    n_test: int
    solved: int  # test outputs right at pass@2
    solved_attempt_1: int  # test outputs right with attempt_1 alone
    oracle: int | None  # test outputs whose truth is among the valid candidates (None: no predictions given)
    truth_rank: list[int | None] | None  # per test output: 1-based rank of the truth under the selector, None if absent
    missing: bool  # the task is absent from the submission
    malformed: int = 0  # entries / attempts of this task the validator rejects (listed in ScoreReport.malformed)

    @property
    def score(self) -> float:
        return self.solved / self.n_test


@dataclass
class ScoreReport:
    num_tasks: int
    num_test_outputs: int
    kaggle_score: float  # pass@2 over test outputs
    task_score: float  # pass@2, per-task average
    pass1_score: float  # attempt_1 only, over test outputs
    pass1_task_score: float  # attempt_1 only, per-task average
    tasks_solved: int  # tasks with every test output right at pass@2
    missing_tasks: list[str] = field(default_factory=list)  # scored as wrong
    extra_tasks: list[str] = field(default_factory=list)  # in the submission but without solutions; not scored
    malformed: list[str] = field(default_factory=list)  # entries/attempts the validator rejects (scored as wrong)
    oracle_score: float | None = None  # truth among candidates, over test outputs
    oracle_task_score: float | None = None  # same, per-task average
    rows: list[TaskScore] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [dict(asdict(r), score=r.score) for r in self.rows]
        return out


def _as_grid(obj: Any) -> np.ndarray | None:
    """A submitted attempt as a grid, or None when the validator would reject it (the same rules: a rectangular
    list of rows of ints 0-9, no booleans, sides 1-30): a malformed attempt never scores, even if it compares
    equal (`true == 1` in Python)."""
    if grid_problems(obj):
        return None
    return np.array(obj, dtype=np.int64)


def _same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.shape == b.shape and bool(np.array_equal(a, b))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _truth_ranks(
    predictions: Predictions, solutions: Mapping[str, Sequence[np.ndarray]], selector: Selector
) -> dict[tuple[str, int], int | None]:
    ranked = selector(predictions)
    ranks: dict[tuple[str, int], int | None] = {}
    for task_id, outputs in solutions.items():
        for i, truth in enumerate(outputs):
            truth = np.asarray(truth)
            ranks[(task_id, i)] = next(
                (k + 1 for k, r in enumerate(ranked.get((task_id, i), ())) if _same(r.grid, truth)), None
            )
    return ranks


def _task_entries(submission: Mapping[str, Any], task_id: str, num_outputs: int, malformed: list[str]) -> list:
    """The task's list of entries (empty when missing or not a list); a wrong shape is named in `malformed`."""
    entries = submission.get(task_id)
    if task_id not in submission:
        return []
    if not isinstance(entries, list):
        malformed.append(f"task {task_id}: is a {type(entries).__name__}, expected a list with one object per "
                         "test input")
        return []
    if len(entries) != num_outputs:
        malformed.append(f"task {task_id}: has {len(entries)} entries for {num_outputs} test outputs")
    return entries


def _attempts(entry: Any, where: str, checked: bool, malformed: list[str]) -> list[np.ndarray | None]:
    """Both attempts of one entry as grids (None where absent or malformed, which is named in `malformed`)."""
    attempts: list[np.ndarray | None] = [None, None]
    if checked and not isinstance(entry, dict):
        what = "no entry" if entry is None else f"a {type(entry).__name__}, not an object"
        malformed.append(f"{where}: {what}")
    elif isinstance(entry, dict):
        for k, key in enumerate(ATTEMPT_KEYS):
            if key not in entry:
                malformed.append(f"{where} {key}: missing")
                continue
            problems = grid_problems(entry[key])
            if problems:
                malformed.append(f"{where} {key}: grid {problems[0]}")
            else:
                attempts[k] = _as_grid(entry[key])
    return attempts


def score_submission(
    submission: Mapping[str, Any],
    solutions: Mapping[str, Sequence[np.ndarray]],
    predictions: Predictions | None = None,
    selector: Selector = vote,
) -> ScoreReport:
    """Score every task of `solutions`; `predictions` (optional) adds the oracle and truth ranks under `selector`.
    Every attempt is checked with the validator's rules; a malformed one scores wrong and is named in
    `malformed`. Nothing to score against is an error, not a score of 0 over 0 tasks."""
    if not solutions:
        raise ValueError("no solutions given: nothing to score")
    ranks = _truth_ranks(predictions, solutions, selector) if predictions is not None else None
    rows: list[TaskScore] = []
    missing: list[str] = []
    malformed: list[str] = []
    for task_id, outputs in solutions.items():
        problems_before = len(malformed)
        is_missing = task_id not in submission
        if is_missing:
            missing.append(task_id)
        entries = _task_entries(submission, task_id, len(outputs), malformed)
        solved = solved_1 = 0
        for i, truth in enumerate(outputs):
            truth = np.asarray(truth)
            entry = entries[i] if i < len(entries) else None
            attempts = _attempts(entry, f"task {task_id} test {i}", bool(entries), malformed)
            right_1 = _same(attempts[0], truth)
            solved_1 += right_1
            solved += right_1 or _same(attempts[1], truth)
        task_ranks = [ranks[(task_id, i)] for i in range(len(outputs))] if ranks is not None else None
        rows.append(TaskScore(task_id=task_id, n_test=len(outputs), solved=solved, solved_attempt_1=solved_1,
                              oracle=sum(r is not None for r in task_ranks) if task_ranks is not None else None,
                              truth_rank=task_ranks, missing=is_missing, malformed=len(malformed) - problems_before))
    return _report(rows, missing, sorted(t for t in submission if t not in solutions), malformed, ranks is not None)


def _report(rows: list[TaskScore], missing: list[str], extra: list[str], malformed: list[str],
            with_oracle: bool) -> ScoreReport:
    """The figures over all test outputs (Kaggle's) and per task (the paper's)."""
    num_outputs = sum(r.n_test for r in rows)
    report = ScoreReport(
        num_tasks=len(rows),
        num_test_outputs=num_outputs,
        kaggle_score=sum(r.solved for r in rows) / num_outputs if num_outputs else 0.0,
        task_score=_mean([r.score for r in rows]),
        pass1_score=sum(r.solved_attempt_1 for r in rows) / num_outputs if num_outputs else 0.0,
        pass1_task_score=_mean([r.solved_attempt_1 / r.n_test for r in rows]),
        tasks_solved=sum(r.solved == r.n_test for r in rows),
        missing_tasks=missing,
        extra_tasks=extra,
        malformed=malformed,
        rows=rows,
    )
    if with_oracle:
        report.oracle_score = sum(r.oracle for r in rows) / num_outputs if num_outputs else 0.0
        report.oracle_task_score = _mean([r.oracle / r.n_test for r in rows])
    return report


def compare_selectors(
    predictions: Predictions,
    tasks: Sequence[Task],
    solutions: Mapping[str, Sequence[np.ndarray]],
    selectors: Mapping[str, Selector] = SELECTORS,
) -> dict[str, ScoreReport]:
    """Score the submission each selector would make from the same candidates (which rule to ship?)."""
    reports = {}
    for name, selector in selectors.items():
        ranked = selector(predictions, top_k=2)
        submission, _ = build_submission(tasks, ranked)
        reports[name] = score_submission(submission, solutions, predictions, selector=selector)
    return reports


SCORE_FILES = ("score.json", "score_per_task.csv")
CSV_COLUMNS = ("task_id", "n_test", "solved", "solved_attempt_1", "score", "oracle", "truth_rank", "missing",
               "malformed")


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet will show as text, never run as a formula: text starting with = + - @ or a tab /
    carriage return gets a leading apostrophe (the usual CSV-injection guard)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def per_task_csv(report: ScoreReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in report.rows:
        rank = "" if r.truth_rank is None else ";".join("-" if k is None else str(k) for k in r.truth_rank)
        oracle = "" if r.oracle is None else r.oracle
        writer.writerow([spreadsheet_safe(r.task_id), r.n_test, r.solved, r.solved_attempt_1, f"{r.score:.4f}", oracle,
                         rank, int(r.missing), r.malformed])
    return buffer.getvalue()


def write_score(report: ScoreReport, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """score.json (everything, plus `extra`'s entries: e.g. how the checkpoint was chosen) and score_per_task.csv
    (one row per task, truth ranks joined by ';')."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / SCORE_FILES[0], {**report.to_json(), **(extra or {})})
    atomic_write_text(out_dir / SCORE_FILES[1], per_task_csv(report))


def format_score(report: ScoreReport) -> str:
    """A short table for the terminal."""
    lines = [
        f"{report.num_tasks} tasks, {report.num_test_outputs} test outputs, {report.tasks_solved} tasks fully solved",
        f"{'':24}{'test outputs':>14}{'per task':>10}   (Kaggle figure: test outputs; paper: per task)",
        f"{'pass@2 (submission)':24}{report.kaggle_score:>14.4f}{report.task_score:>10.4f}",
        f"{'pass@1 (attempt_1)':24}{report.pass1_score:>14.4f}{report.pass1_task_score:>10.4f}",
    ]
    if report.oracle_score is not None:
        lines.append(f"{'oracle (any candidate)':24}{report.oracle_score:>14.4f}{report.oracle_task_score:>10.4f}")
    if report.missing_tasks:
        shown = ", ".join(report.missing_tasks[:8]) + (" ..." if len(report.missing_tasks) > 8 else "")
        lines.append(f"missing tasks (scored wrong): {len(report.missing_tasks)}: {shown}")
    if report.malformed:
        lines.append(f"malformed attempts (scored wrong): {len(report.malformed)}, e.g. {report.malformed[0]}")
    if report.extra_tasks:
        lines.append(f"tasks without solutions (not scored): {len(report.extra_tasks)}")
    return "\n".join(lines)
