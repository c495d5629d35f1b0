"""Training step time of this tree against a git revision, in one run: rounds alternate between the two trees on
the same dataset, so a machine whose load drifts slows both alike.

    python benchmarks/bench_train_against.py --against daaabc3            # small config, 5 rounds, 40 steps
    python benchmarks/bench_train_against.py --against HEAD~3 --config demo --rounds 3

Each round of each tree is one `python -m pipeline.run --stage train` process of that tree (the CLI is the
interface both trees share), on a copy of a run folder that tree augmented once (the same tasks, seed and settings;
a run folder written by one tree need not load in another). The figure is the step time:
the growth of `wall_s` (time inside training steps: refill, forward, backward, optimizers, EMA) between the
first and the last `metrics.jsonl` row, over the steps between them; the first interval (start-up, first-call
allocations) is left out. The medians of the rounds are compared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench_train.py's configs as command-line settings (both trees accept these keys)
CONFIGS = {
    "small": ("--preset", "demo", "--canvas", "10", "--num-aug", "8", "--set", "data.max_side=10",
              "--set", "model.hidden_size=128", "--set", "model.num_heads=4", "--set", "model.num_layers=2",
              "--set", "model.H_cycles=3", "--set", "model.L_cycles=4", "--set", "model.puzzle_emb_len=16",
              "--set", "model.puzzle_emb_ndim=128", "--set", "model.halt_max_steps=16",
              "--set", "global_batch_size=16"),
    "demo": ("--preset", "demo"),
}


def step_seconds(metrics: Path) -> float:
    """Seconds per training step between the first and the last `kind: train` row of a metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == "train"]
    if len(rows) < 2:
        raise SystemExit(f"{metrics}: fewer than two training rows; raise --steps")
    first, last = rows[0], rows[-1]
    return (last["wall_s"] - first["wall_s"]) / (last["step"] - first["step"])


def run_cli(tree: Path, args: list[str], threads: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "pipeline.run", *args, "--quiet"], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def train_once(tree: Path, prepared: Path, work: Path, steps: int, threads: int) -> float:
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(prepared, run)
    log_every = max(1, steps // 4)
    run_cli(tree, ["--stage", "train", "--out", str(run), "--set", f"max_steps={steps}",
                   "--set", f"log_every={log_every}", "--set", "checkpoint_every=1000000", "--set", "eval_every=0",
                   "--set", "lr_warmup_steps=1"], threads)
    return step_seconds(run / "metrics.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True, help="a git revision of this repository (the 'before')")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still removes its worktree
    work = Path(tempfile.mkdtemp(prefix="bench_against_"))
    before = work / "before"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.against],
                       check=True)
        trees = {"before": before, "after": ROOT}
        for name, tree in trees.items():
            run_cli(tree, ["--stage", "augment", "--out", str(work / f"prepared_{name}"), *CONFIGS[args.config]],
                    args.threads)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.rounds):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                times[name].append(train_once(trees[name], work / f"prepared_{name}", work, args.steps, args.threads))
            print(f"round {i + 1}: before {times['before'][-1]:.4f} s/step, after {times['after'][-1]:.4f} s/step",
                  flush=True)
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"\n{args.config}, {args.steps} steps, {args.rounds} rounds, {args.threads} threads: median s/step "
              f"before ({args.against}) {b:.4f}, after (this tree) {a:.4f}: after/before {a / b:.3f}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
