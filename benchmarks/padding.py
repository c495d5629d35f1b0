"""Canvas buckets against the whole canvas on a canvas with the paper's padding (docs/QUALITY.md, issue 25).

`mini`'s tasks (every grid at most 10×10) on a 20×20 canvas, where grids fill about a quarter of the cells as ARC
grids do on the paper's 30×30: the whole canvas with the reference's translation (offsets over the whole canvas)
against canvas buckets (offsets inside the bucket), at equal steps and at equal model FLOPs. Each (arm, seed) is a
`--stage train` run through the command line; its evaluations are in the run's own mode (`ce_true`, pass@2 and
the oracle on the whole canvas or on the buckets, as prediction runs them). With the constant learning rate the
first N steps of the buckets run *are* an N-step buckets run, so one run gives both the equal-steps figure (its
evaluation at step N) and the equal-FLOPs figure (its last evaluation).

    python benchmarks/padding.py --seeds 0,1,2 --steps 200      # runs the seeds in parallel, then the table
    python benchmarks/padding.py --report-only

The fine-tune onto buckets (the `kaggle` preset's question: weights pretrained on the whole canvas, fine-tuned
with buckets): from each whole-canvas run's final checkpoint, `--init` (the EMA weights, a fresh optimizer) and
FT_STEPS more steps on buckets and, as the control, on the whole canvas; each evaluated in its own mode.

    python benchmarks/padding.py --finetune 100 --seeds 0            # ft_buckets_s0 and ft_whole_s0, then the table
    python benchmarks/padding.py --finetune 100 --seeds 0 --equal-flops   # + ft_buckets_eqflops_s0 (a continuation)
    python benchmarks/padding.py --finetune 100 --report-only
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CANVAS, BUCKETS = 20, "4,7,11,20"
COMMON = (f"data.canvas={CANVAS}", "global_batch_size=32", "lr_warmup_steps=50", "eval_views=8",
          "checkpoint_every=100000", "log_every=50")


def whole_flops(steps: int) -> float:
    """Model FLOPs of the whole-canvas arm's `steps` steps."""
    from pipeline.config import apply_overrides, preset
    from pipeline.training.compute import run_flops

    cfg = apply_overrides(preset("mini"), list(COMMON))
    cfg.model.seq_len = CANVAS * CANVAS
    return run_flops(cfg, steps)


def arms(steps: int) -> dict[str, tuple[str, ...]]:
    return {
        "whole": (f"max_steps={steps}", f"eval_every={steps}"),
        "buckets": (f"data.canvas_buckets={BUCKETS}", f"flops_budget={whole_flops(steps):.8g}", f"eval_every={steps}"),
    }


FT_WARMUP = 10  # a fresh optimizer on trained weights: a short warm-up, then the same constant lr


def finetune_arms(root: Path, steps: int, seed: int) -> dict[str, tuple[str, ...]]:
    """The two fine-tunes of one seed, from the whole-canvas run's last checkpoint (--init is passed apart)."""
    common = (f"max_steps={steps}", f"eval_every={max(steps // 2, 1)}", f"lr_warmup_steps={FT_WARMUP}")
    return {"ft_buckets": (*common, f"data.canvas_buckets={BUCKETS}"), "ft_whole": common}


def whole_checkpoint(root: Path, seed: int) -> Path:
    checkpoints = sorted((root / f"whole_s{seed}" / "checkpoints").glob("step_*.pt"))
    if not checkpoints:
        raise SystemExit(f"{root / f'whole_s{seed}'}: no checkpoint to fine-tune from (run the whole arm first)")
    return checkpoints[-1]


def start_on_buckets(root: Path, seed: int) -> dict:
    """The whole-canvas run's last weights evaluated on the buckets without a fine-tune (the fine-tune's start in
    its own mode), as the trainer's evaluation computes it; cached in whole_sSEED/on_buckets.json."""
    import torch
    from types import SimpleNamespace
    from contextlib import nullcontext

    from augment.dataset import AugmentedDataset
    from pipeline.cli.evaluate import HeldOutEvaluator
    from pipeline.model.rows import RowEngine
    from pipeline.model.loading import load_model_for_inference

    cache = root / f"whole_s{seed}" / "on_buckets.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    checkpoint = whole_checkpoint(root, seed)
    dataset = AugmentedDataset.load(root / "dataset")
    model = load_model_for_inference(checkpoint).eval()
    evaluator = HeldOutEvaluator(dataset, views=8, engine=RowEngine.build(BUCKETS, dataset.canvas, model.config))
    rt = SimpleNamespace(device=torch.device("cpu"), accelerator=SimpleNamespace(autocast=nullcontext), rank=0,
                         world=1, is_main=True)
    with torch.no_grad():
        figures = evaluator(model, rt)
    last = eval_at(root / f"whole_s{seed}", None)
    row = {**figures, "step": 0, "flops": 0.0, "wall_s": 0.0, "kind": "eval", "checkpoint": str(checkpoint),
           "whole_step": last["step"] if last else None}
    cache.write_text(json.dumps(row))
    return row


def run(root: Path, arm: str, overrides: tuple[str, ...], seed: int, init: Path | None = None) -> None:
    """One (arm, seed) training run into root/ARM_sSEED, on the shared dataset root/dataset; skipped when done."""
    folder = root / f"{arm}_s{seed}"
    if (folder / "done").is_file():
        return
    cmd = [sys.executable, "-m", "pipeline.run", "--stage", "train", "--preset", "mini", "--out", str(folder),
           "--data", str(root / "dataset"), "--seed", str(seed), "--quiet", "--force", "train"]
    if init is not None:
        cmd += ["--init", str(init)]
    for item in (*COMMON, *overrides):
        cmd += ["--set", item]
    with open(root / f"{arm}_s{seed}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    (folder / "done").write_text("")


def extend_to_equal_flops(root: Path, seed: int) -> None:
    """ft_buckets_sSEED continued (a copy of it, --resume) to the FLOPs of ft_whole_sSEED: with the constant lr
    its first steps are the equal-steps run itself."""
    import shutil

    source, folder = root / f"ft_buckets_s{seed}", root / f"ft_buckets_eqflops_s{seed}"
    whole = eval_at(root / f"ft_whole_s{seed}", None)
    if (folder / "done").is_file() or whole is None or not (source / "done").is_file():
        return
    if not folder.exists():
        shutil.copytree(source, folder)
        (folder / "done").unlink()
    cmd = [sys.executable, "-m", "pipeline.run", "--stage", "train", "--out", str(folder), "--resume", "--quiet",
           "--set", f"flops_budget={whole['flops']:.8g}", "--set", "eval_every=100"]
    with open(root / f"ft_buckets_eqflops_s{seed}.log", "a") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    (folder / "done").write_text("")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def evals(folder: Path) -> list[dict]:
    rows = []
    for line in _lines(folder / "metrics.jsonl"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "eval":
            rows.append(row)
    return rows


FIGURES = ("ce_true", "cell_acc_true", "pass2", "task_pass2", "oracle")


def eval_at(folder: Path, step: int | None) -> dict | None:
    """The evaluation row at `step` (None: the last one); a resumed run's repeated row counts once."""
    rows = {row["step"]: row for row in evals(folder)}
    if not rows:
        return None
    return rows.get(step) if step is not None else rows[max(rows)]


def _row(label: str, seed: int | str, row: dict) -> str:
    return (f"| {label} | {seed} | {row['step']} | {row['flops'] / 1e12:.2f} | {row['ce_true']:.4f} | "
            f"{row['cell_acc_true']:.4f} | {row['pass2']:.3f} | {row['task_pass2']:.3f} | {row['oracle']:.3f} | "
            f"{row['wall_s'] / 60:.1f} | {row.get('rerun_inputs', '–')} |")


def _mean(label: str, rows: list[dict]) -> str:
    cells = []
    for key in FIGURES:
        values = [r[key] for r in rows]
        digits = 4 if key.endswith("true") else 3
        cells.append(f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})")
    flops = sum(r["flops"] for r in rows) / len(rows) / 1e12
    return f"| **{label}, mean (min–max)** | {len(rows)} seeds | | {flops:.2f} | " + " | ".join(cells) + " | | |"


def table(points: list[tuple[str, str, int | None]], root: Path, seeds: list[int]) -> str:
    """One line per (point, seed) and a mean line per point; a point is (label, run prefix, step or None = last)."""
    out = ["| point | seed | step | TFLOP | ce_true | cell_acc_true | pass@2 (outputs) | pass@2 per task | oracle | "
           "train wall (min) | inputs re-run on a bigger bucket |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    means = []
    for label, prefix, step in points:
        found = []
        for seed in seeds:
            if prefix == "on_buckets":  # no run of its own: the whole run's weights, evaluated on the buckets
                row = start_on_buckets(root, seed) if (root / f"whole_s{seed}" / "checkpoints").is_dir() else None
            else:
                row = eval_at(root / f"{prefix}_s{seed}", step)
            if row is None:
                out.append(f"| {label} | {seed} | not run or no evaluation yet | | | | | | | | |")
                continue
            found.append(row)
            out.append(_row(label, seed, row))
        if found:
            means.append(_mean(label, found))
    return "\n".join(out + means)


def padding_points(steps: int) -> list[tuple[str, str, int | None]]:
    return [(f"whole, step {steps}", "whole", steps), (f"buckets, step {steps} (equal steps)", "buckets", steps),
            ("buckets, last (equal FLOPs)", "buckets", None)]


def finetune_points(steps: int) -> list[tuple[str, str, int | None]]:
    half = max(steps // 2, 1)
    return [("start: whole run's weights, whole canvas", "whole", None),
            ("start: whole run's weights, buckets", "on_buckets", None),
            (f"ft whole, +{half}", "ft_whole", half), (f"ft buckets, +{half}", "ft_buckets", half),
            (f"ft whole, +{steps}", "ft_whole", steps), (f"ft buckets, +{steps}", "ft_buckets", steps),
            (f"ft buckets, last (equal FLOPs with ft whole +{steps})", "ft_buckets_eqflops", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "padding")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200, help="the whole-canvas arm's steps (N)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--finetune", type=int, default=0, metavar="FT_STEPS",
                        help="fine-tune each whole-canvas run for FT_STEPS steps on buckets and on the whole canvas")
    parser.add_argument("--equal-flops", action="store_true",
                        help="with --finetune: continue each buckets fine-tune to the whole fine-tune's FLOPs")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.finetune:
        if not args.report_only:
            for seed in seeds:  # one run at a time (each takes one thread; run seeds side by side with --seeds)
                for arm, overrides in finetune_arms(args.root, args.finetune, seed).items():
                    run(args.root, arm, overrides, seed, init=whole_checkpoint(args.root, seed))
                if args.equal_flops:
                    extend_to_equal_flops(args.root, seed)
        print(table(finetune_points(args.finetune), args.root, seeds))
        return
    if not args.report_only:
        args.root.mkdir(parents=True, exist_ok=True)
        if not (args.root / "dataset" / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "pipeline.run", "--stage", "augment", "--preset", "mini", "--out",
                            str(args.root / "data_run"), "--set", f"data.canvas={CANVAS}", "--quiet"], cwd=ROOT,
                           check=True)
            (args.root / "data_run" / "dataset").rename(args.root / "dataset")
        plan = arms(args.steps)

        def one_seed(seed: int) -> None:
            for arm, overrides in plan.items():
                run(args.root, arm, overrides, seed)

        with ThreadPoolExecutor(len(seeds)) as pool:
            list(pool.map(one_seed, seeds))
    print(table(padding_points(args.steps), args.root, seeds))


if __name__ == "__main__":
    main()
