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


def run(root: Path, arm: str, overrides: tuple[str, ...], seed: int) -> None:
    """One (arm, seed) training run into root/ARM_sSEED, on the shared dataset root/dataset; skipped when done."""
    folder = root / f"{arm}_s{seed}"
    if (folder / "done").is_file():
        return
    cmd = [sys.executable, "-m", "pipeline.run", "--stage", "train", "--preset", "mini", "--out", str(folder),
           "--data", str(root / "dataset"), "--seed", str(seed), "--quiet", "--force", "train"]
    for item in (*COMMON, *overrides):
        cmd += ["--set", item]
    with open(root / f"{arm}_s{seed}.log", "w") as log:
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


def table(root: Path, steps: int, seeds: list[int]) -> str:
    out = ["| arm | seed | step | TFLOP | ce_true | cell_acc_true | pass@2 (outputs) | pass@2 per task | oracle | train wall (min) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ("whole", "buckets"):
        for seed in seeds:
            for row in evals(root / f"{arm}_s{seed}"):
                if arm == "buckets" and row["step"] != steps and row is not evals(root / f"{arm}_s{seed}")[-1]:
                    continue
                out.append(f"| {arm} | {seed} | {row['step']} | {row['flops'] / 1e12:.2f} | {row['ce_true']:.3f} | "
                           f"{row['cell_acc_true']:.3f} | {row['pass2']:.3f} | {row['task_pass2']:.3f} | "
                           f"{row['oracle']:.3f} | {row['wall_s'] / 60:.1f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "padding")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200, help="the whole-canvas arm's steps (N)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
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
    print(table(args.root, args.steps, seeds))


if __name__ == "__main__":
    main()
