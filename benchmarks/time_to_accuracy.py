"""The time-to-accuracy tables for benchmarks/quality.py: every arm against `mini` at equal model FLOPs, the `fast` recipe's
targets, and ACT steps at prediction.

A run's curve is its evaluation rows (metrics.jsonl): held-out `ce_true` (per-cell cross-entropy of the true
answers, lower is better), `cell_acc_true` and dev pass@2 per task (8 views) against the training FLOPs computed so
far. The baseline at a FLOPs figure is each `mini` seed's curve read there (linear between its evaluations); an
arm differs *beyond the seed spread* only when it is better (or worse) than every baseline seed.
"""
from __future__ import annotations

import numpy as np

TFLOP = 1e12


def read(run: dict, flops: float, key: str = "ce_true") -> float | None:
    """The run's `key` at `flops` (linear between evaluations); None outside its curve."""
    points = [(c["flops"], c[key]) for c in run.get("curve", []) if c.get("flops") is not None and c.get(key) is not None]
    # a run read at another's final FLOPs: steps of different cost end within a step of each other (0.5%)
    if not points or not points[0][0] <= flops * (1 + 1e-9) or flops > points[-1][0] * (1 + 5e-3):
        return None
    xs, ys = zip(*points)
    return float(np.interp(flops, xs, ys))


def flops_to_reach(run: dict, target: float) -> float | None:
    """The first FLOPs figure at which the run's ce_true is at or below `target` (linear between evaluations)."""
    points = [(c["flops"], c["ce_true"]) for c in run.get("curve", []) if c.get("ce_true") is not None]
    for (f0, c0), (f1, c1) in zip([(0.0, float("inf"))] + points, points):
        if c1 <= target:
            return f1 if not np.isfinite(c0) or c0 == c1 else f0 + (f1 - f0) * (c0 - target) / (c0 - c1)
    return None


def spread(values: list[float | None], digits: int = 4) -> str:
    """mean (min–max) of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def verdict(value: float | None, baseline: list[float], lower_is_better: bool = True) -> str:
    baseline = [b for b in baseline if b is not None]
    if value is None or not baseline:
        return "–"
    better = value < min(baseline) if lower_is_better else value > max(baseline)
    worse = value > max(baseline) if lower_is_better else value < min(baseline)
    return "**better than every seed**" if better else "worse than every seed" if worse else "within the seed spread"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def last_eval(run: dict) -> dict:
    return run["curve"][-1] if run.get("curve") else {}


def markdown(results: list[dict], baseline: str) -> list[str]:
    base = [r for r in results if r.get("arm") == baseline and r.get("curve")]
    runs = [r for r in results if r.get("curve") and last_eval(r).get("ce_true") is not None]
    if not runs:
        return []
    lines = ["### Every arm against `mini` at equal FLOPs (issue 17)", "",
             f"Final evaluation of each run (8 views per test input; dev pass@2 per task from the same evaluation), "
             f"and `{baseline}`'s {len(base)} seeds read at the same training FLOPs. Lower `ce_true` is better.", "",
             "| arm | seed | steps | TFLOP | ce_true | cell acc | pass@2 per task | wall (min) | "
             f"{baseline} ce_true at these FLOPs | {baseline} pass@2 per task there | ce_true verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e = last_eval(r)
        at = [read(b, e["flops"]) for b in base]
        pass_at = [read(b, e["flops"], "task_pass2") for b in base]
        wall = f"{r['seconds'] / 60:.1f}" if "seconds" in r else "–"
        lines.append(f"| {r.get('arm')} | {r.get('seed')} | {e['step']} | {e['flops'] / TFLOP:.1f} | {e['ce_true']:.4f} | "
                     f"{pct(e.get('cell_acc_true'))} | {pct(e.get('task_pass2'))} | {wall} | {spread(at)} | "
                     f"{spread([None if p is None else 100 * p for p in pass_at], 1)} | "
                     f"{'(baseline)' if r.get('arm') == baseline else verdict(e['ce_true'], at)} |")
    lines += seed_summary(runs, base)
    lines += targets(results, base)
    lines += act_table(results)
    lines += ["", "#### Held-out ce_true against training FLOPs (TFLOP: ce_true)", ""]
    for r in runs:
        points = ", ".join(f"{c['flops'] / TFLOP:.1f}: {c['ce_true']:.3f}" for c in r["curve"] if c.get("ce_true") is not None)
        lines.append(f"- {r.get('arm')} seed {r.get('seed')}: {points}")
    return lines


def seed_summary(runs: list[dict], base: list[dict]) -> list[str]:
    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(r.get("arm", "?"), []).append(r)
    lines = ["", "#### Mean over seeds (min–max), at each arm's final FLOPs", "",
             "| arm | seeds | ce_true | baseline ce_true at these FLOPs | beyond the seed spread? | pass@2 per task (final, all views) |",
             "|---|---|---|---|---|---|"]
    for arm, rs in by_arm.items():
        ce = [last_eval(r)["ce_true"] for r in rs]
        at = [read(b, last_eval(rs[0])["flops"]) for b in base]
        at = [a for a in at if a is not None]
        if arm == (base[0].get("arm") if base else None):
            beyond = "(baseline)"
        elif not at:
            beyond = "–"
        elif max(ce) < min(at):
            beyond = "yes: every seed better than every baseline seed"
        elif min(ce) > max(at):
            beyond = "yes: every seed worse"
        else:
            beyond = "no"
        p2 = [100 * r["pass2_task"] for r in rs]
        lines.append(f"| {arm} | {len(rs)} | {spread(ce)} | {spread(at)} | {beyond} | {spread(p2, 1)} |")
    return lines


def targets(results: list[dict], base: list[dict], fast: str = "mini-fast") -> list[str]:
    if not base:
        return []
    full = float(np.mean([last_eval(b)["flops"] for b in base]))
    target = float(np.mean([last_eval(b)["ce_true"] for b in base]))
    lines = ["", f"#### Targets (`{fast}` against `{base[0].get('arm')}`: final ce_true {target:.4f}, mean of "
             f"{len(base)} seeds, at {full / TFLOP:.1f} TFLOP)", "",
             "| arm | seed | FLOPs to reach mini's final ce_true (fraction of mini's) | pass@2 per task at mini's FLOPs (all views) |",
             "|---|---|---|---|"]
    for r in results:
        if r.get("arm") not in (fast, base[0].get("arm")) or not r.get("curve"):
            continue
        reach = flops_to_reach(r, target)
        at_full = last_eval(r)["flops"] >= 0.99 * full
        lines.append(f"| {r.get('arm')} | {r.get('seed')} | {'not reached' if reach is None else f'{reach / full:.2f}'} | "
                     f"{pct(r['pass2_task']) if at_full else '– (not run to mini FLOPs)'} |")
    return lines


def act_table(results: list[dict]) -> list[str]:
    studied = [r for r in results if r.get("act")]
    if not studied:
        return []
    names = list(dict.fromkeys(row["name"] for r in studied for row in r["act"]))
    lines = ["", "#### ACT steps at prediction, from each run's final weights (all views; pass@2 per task % / "
             "ce_true / mean steps per row)", "",
             "| arm | seed | N_sup trained | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in studied:
        cells = {row["name"]: f"{pct(row['pass2_task'])} / {row['ce_true']:.3f} / {row['mean_steps']:.2f}"
                 for row in r["act"]}
        lines.append(f"| {r.get('arm')} | {r.get('seed')} | {r.get('halt_max_steps', '?')} | "
                     + " | ".join(cells.get(n, "–") for n in names) + " |")
    return lines
