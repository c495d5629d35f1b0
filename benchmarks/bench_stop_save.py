"""Seconds from SIGTERM to a complete checkpoint: a fine-tune with the paper model's shapes (pipeline.model.trm
ModelConfig.paper_arc: width 512, 8 heads, 2 layers, 16 puzzle positions, the 30x30 canvas) on 2 processes
(torchrun, gloo on a CPU), stopped as the Kaggle driver stops a child (SIGTERM to every worker), and timed until
the checkpoint file appears (it appears whole: written to a temp file, then renamed) and until the job has ended.

    OMP_NUM_THREADS=1 python benchmarks/bench_stop_save.py --depth paper      # the paper's recursion (3 x 6)
    OMP_NUM_THREADS=1 python benchmarks/bench_stop_save.py --depth 1          # the same tensors, 1 cycle each

The global batch is 2 (one row per process), the smallest with the paper's shapes: a step of the paper model
takes many seconds on a CPU. The checkpoint's carry at the paper's batch of 768 is measured apart: --carry B
gathers and saves the ACT carry of B rows of the paper's shapes over 2 processes (what a stop-save with the carry
cost before; see docs/RELIABILITY.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dataset(folder: Path) -> Path:
    from augment.dataset import build_dataset
    from pipeline.data.tasks import load_tasks

    tasks = load_tasks("arc-agi-1/training").tasks[:1] + load_tasks("arc-agi-1/evaluation").tasks[:1]
    build_dataset(tasks, {tasks[1].id}, num_aug=1, seed=0, canvas=30, progress=False).save(folder)
    return folder


def stop_once_training(work: Path, depth: str, steps_before: int) -> dict:
    from pipeline.kaggle_driver.child import ProcessTree

    data, run = dataset(work / "data"), work / "run"
    cycles = [] if depth == "paper" else ["--set", f"model.H_cycles={depth}", "--set", f"model.L_cycles={depth}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pipeline.run",
           "--stage", "train", "--preset", "arc1", "--data", str(data), "--out", str(run), "--quiet", *cycles,
           "--set", "global_batch_size=2", "--set", "max_steps=1000000", "--set", "checkpoint_every=1000000",
           "--set", "log_every=1", "--set", "eval_every=0", "--set", "eval_every_epochs=0"]
    log = open(work / "train.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    tree = ProcessTree(proc.pid)
    metrics = run / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < steps_before:
        assert proc.poll() is None, (work / "train.log").read_text()[-3000:]
        tree.refresh()
        time.sleep(0.05)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_s = [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:])]
    tree.refresh()
    tree.terminate(launcher=True)  # SIGTERM to the workers, as the driver does
    t0 = time.perf_counter()
    saved_s = None
    while proc.poll() is None or saved_s is None:
        if saved_s is None and list((run / "checkpoints").glob("step_*.pt")):
            saved_s = time.perf_counter() - t0
        if proc.poll() is not None and saved_s is None:
            break
        time.sleep(0.02)
    ended_s = time.perf_counter() - t0
    from pipeline.training import checkpoint as ckpt

    last = ckpt.latest_checkpoint(run / "checkpoints")
    state = ckpt.load_training_state(last, mmap=True) if last else {}
    return {"depth": depth, "step_s": step_s, "signalled_after_step": rows[-1]["step"], "saved_at_step":
            state.get("step"), "sigterm_to_checkpoint_s": saved_s, "sigterm_to_exit_s": ended_s,
            "checkpoint_mb": last.stat().st_size / 1e6 if last else None,
            "carry": state.get("carry") is not None, "returncode": proc.returncode}


def carry_worker(rows: int, out: Path) -> None:
    """(torchrun worker) Gather `rows` rows of the paper's carry to rank 0 and save them, as a stop-save with the
    carry did; prints the seconds."""
    import torch
    import torch.distributed as dist

    from pipeline.training.collectives import gather_rows_to_main

    dist.init_process_group("gloo")
    local = rows // dist.get_world_size()
    z = {name: torch.randn(local, 916, 512) for name in ("z_H", "z_L")}
    dist.barrier()
    t0 = time.perf_counter()
    gathered = {name: gather_rows_to_main(t, dist.get_world_size()) for name, t in z.items()}
    t1 = time.perf_counter()
    if dist.get_rank() == 0:
        torch.save(gathered, out)
        os.sync()
        t2 = time.perf_counter()
        print(json.dumps({"rows": rows, "gather_s": t1 - t0, "save_s": t2 - t1,
                          "mb": out.stat().st_size / 1e6}), flush=True)
        out.unlink()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", default="1", help="'paper' (H 3 x L 6 cycles) or a cycle count for both")
    p.add_argument("--steps-before", type=int, default=3, help="metrics rows to wait for before SIGTERM")
    p.add_argument("--carry", type=int, default=0, help="instead: gather + save this many carry rows")
    p.add_argument("--carry-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.carry_worker:
        carry_worker(args.carry, Path(args.carry_worker))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.carry:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                   "--carry", str(args.carry), "--carry-worker", str(Path(tmp) / "carry.pt")]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                 "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))})
            return
        print(json.dumps(stop_once_training(Path(tmp), args.depth, args.steps_before)))


if __name__ == "__main__":
    main()
