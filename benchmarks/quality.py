"""The CPU quality benchmark: arms of the `mini` chain, dev-split accuracy, one table in docs/QUALITY.md.

Each arm is a set of `--set` overrides on the `mini` preset; each (arm, seed) runs the whole chain through the
command line into its own folder, runs/quality/ARM_sSEED, exactly as a user would run it, so the figures are what
`--stage all --preset mini` gives. A finished folder is not re-run (delete it to redo it). From each run's
predictions, without retraining, it also scores prediction with 4 / 8 / all views and every selector.

    python benchmarks/quality.py --arms groups+reference,examples+per_draw --seeds 0,1   # run, then write the table
    python benchmarks/quality.py --report-only                                          # re-collect finished runs
    python benchmarks/quality.py --arm 'wide:model.hidden_size=128,model.num_heads=4' --seeds 0

Figures per run (dev split = the held-out test outputs of the mini preset's dev tasks):
  pass@2 per task (paper convention), pass@2 over test outputs (Kaggle), pass@1 over test outputs, the oracle (the
  right grid among any candidate), training exact accuracy (mean of the last 3 logged training rows), wall time of
  the whole chain, and the cost of the likelihood re-scoring pass against the prediction pass.
The generated part of docs/QUALITY.md sits between two marker lines; the prose around it is kept.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from augment.dataset import AugmentedDataset  # noqa: E402
from pipeline.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from pipeline.inference.predictions import OPTIONAL_COLUMNS, Predictions  # noqa: E402
from pipeline.inference.vote import SELECTORS, vote  # noqa: E402
from submissions.score import compare_selectors, score_submission  # noqa: E402
from submissions.write import build_submission  # noqa: E402
from time_to_accuracy import markdown as issue17_tables  # noqa: E402

@dataclass(frozen=True)
class Arm:
    """A preset and --set overrides on it."""

    overrides: tuple[str, ...] = ()
    preset: str = "mini"


# Named arms. Both data settings are spelled out in the issue-10 arms so an arm means the same thing whatever the
# preset's defaults are.
ARMS: dict[str, Arm] = {
    "groups+reference": Arm(("data.sampling=groups", "data.translation=reference")),
    "examples+reference": Arm(("data.sampling=examples", "data.translation=reference")),
    "groups+per_draw": Arm(("data.sampling=groups", "data.translation=per_draw")),
    "examples+per_draw": Arm(("data.sampling=examples", "data.translation=per_draw")),
    "mini": Arm(),  # the preset exactly as it stands: the baseline of the issue-17 arms
    "mini-fast": Arm(preset="mini-fast"),  # the fast recipe, at mini's FLOPs
}
BASELINE = "mini"  # the arm whose mean final ce_true and FLOPs the others are measured against


def mini_flops() -> float:
    """Model FLOPs of a whole `mini` training run (its 2000 steps of 64 rows on the 10x10 canvas)."""
    from pipeline.training.compute import run_flops
    from pipeline.config import preset

    cfg = preset("mini")
    cfg.model.seq_len = cfg.data.canvas**2
    return run_flops(cfg, cfg.max_steps)


def at_flops(fraction: float, *overrides: str, evals: int = 4, preset: str = "mini") -> Arm:
    """An arm trained for `fraction` of mini's FLOPs (flops_budget), evaluated `evals` times evenly."""
    from pipeline.training.compute import steps_for_flops
    from pipeline.config import apply_overrides
    from pipeline.config import preset as make_preset

    budget = f"flops_budget={fraction * mini_flops():.6g}"
    cfg = apply_overrides(make_preset(preset), [budget, *overrides])
    cfg.model.seq_len = cfg.data.canvas**2
    steps = steps_for_flops(cfg, cfg.flops_budget)
    return Arm((budget, *overrides, f"eval_every={-(-steps // evals)}"), preset)


# The screens: one setting each, a quarter of mini's FLOPs (the first quarter of mini's own run is the
# baseline they are read against: its step-500 evaluation, every seed).
SCREEN = 0.25
ARMS.update({
    "muon@25": at_flops(SCREEN, "optimizer=muon"),
    "curriculum@25": at_flops(SCREEN, "depth_curriculum=0.6"),
    "b256-lr3e-3@25": at_flops(SCREEN, "global_batch_size=256", "lr=3e-3", "lr_warmup_steps=25"),
    "b128-lr2e-3@25": at_flops(SCREEN, "global_batch_size=128", "lr=2e-3", "lr_warmup_steps=50"),
    "lr3e-3@25": at_flops(SCREEN, "lr=3e-3"),  # the batch × lr line's third point: 1× batch, 3× lr
    "aug7@25": at_flops(SCREEN, "data.num_aug=7"),
    "aug31@25": at_flops(SCREEN, "data.num_aug=31"),
    "conv3@25": at_flops(SCREEN, "model.mlp_conv=3"),
    "nsup8@25": at_flops(SCREEN, "model.halt_max_steps=8"),  # trained for more ACT steps: the ACT study's model
    # padding-free canvas buckets (docs/BUCKETS.md) on mini's 10x10 canvas; flops_budget counts the buckets' FLOPs
    "buckets@25": at_flops(SCREEN, "data.canvas_buckets=4,7,10"),
})
VIEWS = (4, 8, 0)  # 0 = all (mini has 16 views: the original + 15 augmentations; 32 only with --set data.num_aug >= 32)
BEGIN, END = "<!-- quality:begin (generated by benchmarks/quality.py) -->", "<!-- quality:end -->"


def chain_command(folder: Path, seed: int, arm: Arm) -> list[str]:
    cmd = ["python3", "-m", "pipeline.run", "--stage", "all", "--preset", arm.preset, "--out", str(folder),
           "--seed", str(seed), "--quiet"]
    for item in arm.overrides:
        cmd += ["--set", item]
    return cmd


def run_arm(name: str, arm: Arm, seed: int, root: Path) -> Path:
    """Run the chain for one (arm, seed) unless its folder already holds a score; record the wall time."""
    folder = root / f"{name}_s{seed}"
    if (folder / "score.json").exists():
        print(f"{folder}: done, skipping")
        return folder
    if folder.exists() and not (folder / "wall.json").exists() and (folder / "checkpoints").exists():
        print(f"{folder}: an earlier attempt stopped midway; the chain resumes it (its wall time will be partial)")
    root.mkdir(parents=True, exist_ok=True)  # the run folder itself is the CLI's to create (it refuses foreign ones)
    log_path = root / f"{name}_s{seed}.log"
    cmd = chain_command(folder, seed, arm)
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} seed {seed}: the chain failed (exit {result.returncode}); see {log_path}")
    atomic_write_json(folder / "wall.json", {"seconds": wall, "command": shlex.join(cmd), "arm": name,
                                             "seed": seed, "overrides": list(arm.overrides), "preset": arm.preset})
    print(f"{folder}: {wall / 60:.1f} min", flush=True)
    return folder


# ---------------------------------------------------------------------------------------------- figures
def subset(predictions: Predictions, keep: np.ndarray) -> Predictions:
    """The rows where `keep` is true (offsets stay valid: they index the shared cell buffer)."""
    return Predictions(
        task_ids=predictions.task_ids, cells=predictions.cells,
        **{name: None if getattr(predictions, name) is None else getattr(predictions, name)[keep]
           for name in OPTIONAL_COLUMNS},
        **{name: column[keep] for name, column in predictions.columns().items()},
    )


def figures(report) -> dict:
    return {"pass2_task": report.task_score, "pass2": report.kaggle_score, "pass1": report.pass1_score,
            "oracle": report.oracle_score, "oracle_task": report.oracle_task_score}


def train_exact_accuracy(metrics_path: Path) -> tuple[float | None, list[dict]]:
    """Mean exact accuracy of the last 3 training rows, and the evaluation rows (the learning curve). A resumed run
    logs again the steps between its last checkpoint and the kill: the later row of a step wins."""
    train_rows: dict[int, dict] = {}
    eval_rows: dict[int, dict] = {}
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == "eval":
                eval_rows[row["step"]] = row
            elif "exact_accuracy" in row:
                train_rows[row["step"]] = row
    train_rows, eval_rows = [train_rows[s] for s in sorted(train_rows)], [eval_rows[s] for s in sorted(eval_rows)]
    last = [r["exact_accuracy"] for r in train_rows[-3:]]
    return (float(np.mean(last)) if last else None), eval_rows


def time_passes(folder: Path) -> dict:
    """Seconds of the prediction pass (every view) and of the likelihood re-scoring pass, re-run on the final
    checkpoint: what the likelihood selectors cost."""
    from pipeline.model.loading import load_model_for_inference
    from pipeline.training.checkpoint import latest_checkpoint
    from pipeline.config import from_dict
    from pipeline.inference.predict import predict
    from pipeline.inference.rescore import rescore

    cfg = from_dict(json.loads((folder / "config.json").read_text())).predict
    dataset = AugmentedDataset.load(folder / "dataset")
    model = load_model_for_inference(latest_checkpoint(folder / "checkpoints"), use_ema=cfg.use_ema)
    start = time.perf_counter()
    predictions = predict(model, dataset, cfg, progress=False)
    predict_s = time.perf_counter() - start
    start = time.perf_counter()
    rescore(model, dataset, predictions, top_k=cfg.rescore_top_k, views=cfg.rescore_views,
            batch_size=cfg.batch_size, progress=False)
    inputs = len(set(zip(predictions.task.tolist(), predictions.test_index.tolist())))
    return {"predict_s": predict_s, "rescore_s": time.perf_counter() - start, "views": len(predictions) // max(inputs, 1),
            "rescore_views": cfg.rescore_views, "rescore_top_k": cfg.rescore_top_k}


CURVE_KEYS = ("step", "epoch", "flops", "wall_s", "task_pass2", "pass2", "oracle", "ce_true", "cell_acc_true")
COLLECT_VERSION = 2  # bump when collect() gathers something new: cached figures of an older version are redone


def act_steps_of(folder: Path) -> list[dict]:
    from act_steps import act_study
    from pipeline.model.loading import load_model_for_inference
    from pipeline.training.checkpoint import latest_checkpoint

    model = load_model_for_inference(latest_checkpoint(folder / "checkpoints"))
    return act_study(model, AugmentedDataset.load(folder / "dataset"))


def collect(folder: Path) -> dict:
    """Every figure of one finished run folder (cached in quality.json beside it)."""
    cache = folder / "quality.json"
    if cache.exists() and cache.stat().st_mtime >= (folder / "score.json").stat().st_mtime:
        cached = json.loads(cache.read_text())
        if set(cached.get("selectors", {})) == set(SELECTORS) and cached.get("version") == COLLECT_VERSION:
            return cached
    dataset = AugmentedDataset.load(folder / "dataset")
    tasks = dataset.eval_tasks()
    solutions = {t.id: t.test_outputs for t in tasks}
    predictions = Predictions.load(folder / "predictions.npz")
    wall = json.loads((folder / "wall.json").read_text()) if (folder / "wall.json").exists() else {}
    submission = json.loads((folder / "submission.json").read_text())
    main = score_submission(submission, solutions, predictions)
    out = {"version": COLLECT_VERSION, "folder": str(folder), **wall, **figures(main), "num_tasks": main.num_tasks,
           "num_outputs": main.num_test_outputs,
           "solved_tasks": sorted(r.task_id for r in main.rows if r.solved)}
    out["train_exact"], eval_rows = train_exact_accuracy(folder / "metrics.jsonl")
    out["curve"] = [{k: r.get(k) for k in CURVE_KEYS} for r in eval_rows]
    last = eval_rows[-1] if eval_rows else {}
    out.update({k: last.get(k) for k in ("ce_true", "cell_acc_true", "flops", "wall_s")})
    out["selectors"] = {name: figures(r) for name, r in compare_selectors(predictions, tasks, solutions).items()}
    view_of = predictions.variant - dataset.puzzle_first_variant[dataset.variant_puzzle[predictions.variant]]
    out["views"] = {}
    for views in VIEWS:
        part = subset(predictions, view_of < views) if views else predictions
        sub, _ = build_submission(tasks, vote(part, top_k=2))
        out["views"][str(views or "all")] = {**figures(score_submission(sub, solutions, part)),
                                             "count": int(views or view_of.max() + 1)}
    out["timing"] = time_passes(folder)
    config = json.loads((folder / "config.json").read_text())
    out["halt_max_steps"] = config["model"]["halt_max_steps"]
    if (out.get("flops") or 0) >= 0.99 * mini_flops() or out["halt_max_steps"] > 2:  # ACT steps at prediction
        out["act"] = act_steps_of(folder)
    atomic_write_json(cache, out)
    return out


# ---------------------------------------------------------------------------------------------- the table
def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(results: list[dict]) -> str:
    lines = issue17_tables(results, BASELINE)
    for section in (arms_table, selectors_table, views_table, rescoring_cost_table, curves_and_solved, commands):
        lines += section(results)
    return "\n".join(lines)


def arms_table(results: list[dict]) -> list[str]:
    """Every run's figures, then the mean over seeds of each arm run more than once."""
    sizes = sorted({(r["num_tasks"], r["num_outputs"]) for r in results})
    split = "; ".join(f"{t} tasks, {o} test outputs" for t, o in sizes)
    lines = ["", f"### Arms (dev split: {split}; figures in %)", "",
             "| arm | seed | pass@2 per task | pass@2 outputs | pass@1 | oracle | train exact | wall (min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        wall = f"{r['seconds'] / 60:.1f}" if "seconds" in r else "–"
        lines.append(f"| {r.get('arm', '?')} | {r.get('seed', '?')} | {pct(r['pass2_task'])} | {pct(r['pass2'])} | "
                     f"{pct(r['pass1'])} | {pct(r['oracle'])} | {pct(r['train_exact'])} | {wall} |")
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r.get("arm", "?"), []).append(r)
    if any(len(v) > 1 for v in by_arm.values()):
        lines += ["", "Mean over seeds (min–max):", "", "| arm | seeds | pass@2 per task | oracle |", "|---|---|---|---|"]
        for arm, rs in by_arm.items():
            p = [r["pass2_task"] for r in rs]
            o = [r["oracle"] for r in rs]
            lines.append(f"| {arm} | {len(rs)} | {pct(np.mean(p))} ({pct(min(p))}–{pct(max(p))}) | "
                         f"{pct(np.mean(o))} ({pct(min(o))}–{pct(max(o))}) |")
    return lines


def selectors_table(results: list[dict]) -> list[str]:
    names = list(SELECTORS)
    lines = ["", "### Selectors on each run's own candidates (pass@2 per task / over outputs, %)", "",
             "| arm | seed | " + " | ".join(names) + " | oracle |", "|---|---|" + "---|" * (len(names) + 1)]
    for r in results:
        cells = [f"{pct(r['selectors'][n]['pass2_task'])} / {pct(r['selectors'][n]['pass2'])}" if n in r["selectors"]
                 else "–" for n in names]
        lines.append(f"| {r.get('arm')} | {r.get('seed')} | " + " | ".join(cells) + f" | {pct(r['oracle_task'])} / "
                     f"{pct(r['oracle'])} |")
    return lines


def views_table(results: list[dict]) -> list[str]:
    lines = ["", "### Views at prediction, from the same predictions (vote; pass@2 per task / oracle per task, %)", "",
             "| arm | seed | " + " | ".join(f"{v or 'all'} views" for v in VIEWS) + " |", "|---|---|" + "---|" * len(VIEWS)]
    for r in results:
        cells = []
        for v in VIEWS:
            f = r["views"][str(v or "all")]
            cells.append(f"{pct(f['pass2_task'])} / {pct(f['oracle_task'])}" + ("" if v else f" ({f['count']})"))
        lines.append(f"| {r.get('arm')} | {r.get('seed')} | " + " | ".join(cells) + " |")
    return lines


def rescoring_cost_table(results: list[dict]) -> list[str]:
    lines = ["", "### Cost of the likelihood re-scoring (re-run on each final checkpoint, 1 thread)", "",
             "| arm | seed | prediction pass | views | re-scoring pass | views × top-K |", "|---|---|---|---|---|---|"]
    for r in results:
        t = r["timing"]
        lines.append(f"| {r.get('arm')} | {r.get('seed')} | {t['predict_s']:.1f} s | {t['views']} | {t['rescore_s']:.1f} s"
                     f" | {t['rescore_views']} × {t['rescore_top_k']} |")
    return lines


def curves_and_solved(results: list[dict]) -> list[str]:
    lines = []
    curves = [r for r in results if r.get("curve")]
    if curves:
        lines += ["", "### Learning curves (dev pass@2 per task during training, %)", "",
                  "Step: figure, from the evaluation rows of metrics.jsonl (`eval_views` views per test input, 8 in "
                  "`mini`; the final figures above use every view). Also plotted in each run's report.html, with "
                  "training exact accuracy.", ""]
        for r in curves:
            points = ", ".join(f"{c['step']}: {pct(c['task_pass2'])}" for c in r["curve"])
            lines.append(f"- {r.get('arm')} seed {r.get('seed')}: {points}")
    lines += ["", "### Solved dev tasks", ""]
    for r in results:
        lines.append(f"- {r.get('arm')} seed {r.get('seed')}: {', '.join(r['solved_tasks']) or 'none'}")
    return lines


def commands(results: list[dict]) -> list[str]:
    lines = ["", "### Commands (from the repository root)", "", "```"]
    for r in results:
        if "command" in r:
            lines.append(r["command"].replace(" --quiet", ""))
    return lines + ["```"]


def write_doc(doc: Path, body: str) -> None:
    text = doc.read_text() if doc.exists() else f"# Quality\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(doc, f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="", help=f"comma-separated named arms: {', '.join(ARMS)}")
    p.add_argument("--arm", action="append", default=[], help="an ad-hoc arm NAME:key=value,key=value (repeatable)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--root", default="runs/quality", help="folder of the run folders")
    p.add_argument("--doc", default=str(ROOT / "docs" / "QUALITY.md"))
    p.add_argument("--report-only", action="store_true", help="only collect the finished runs under --root")
    p.add_argument("--no-report", action="store_true", help="only run the chains (a queue of them: collect later)")
    args = p.parse_args()
    root = Path(args.root)
    arms = {name: ARMS[name] for name in filter(None, args.arms.split(","))}
    for spec in args.arm:
        name, _, settings = spec.partition(":")
        arms[name] = Arm(tuple(s for s in settings.split(",") if s))
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, arm in arms.items():
                run_arm(name, arm, seed, root)
                if not args.no_report:
                    report(root, Path(args.doc))  # the table grows as rows finish
    if not args.no_report:
        report(root, Path(args.doc))


def report(root: Path, doc: Path) -> None:
    folders = sorted(f.parent for f in root.glob("*/score.json"))
    results = [collect(f) for f in folders]
    atomic_write_json(root / "results.json", results)
    write_doc(doc, markdown(results))
    print(f"{len(results)} runs -> {doc}")


if __name__ == "__main__":
    main()
