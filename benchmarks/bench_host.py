"""Host work per training step outside the model: refilling halted rows (halted-mask gather, stream draw, encoding,
copy to the device) and the time-budget check, per process, with the paper's global batch and 30x30 canvas.

    torchrun --nproc-per-node 2 benchmarks/bench_host.py        # 2 processes (gloo on CPU)
    python benchmarks/bench_host.py                              # 1 process

The model is left out on purpose (on a CPU it would hide everything else): each step marks a random set of rows
halted (every row on the first step, then each row with probability --halt-rate, the same draw on every process)
and times what the trainer does with that mask.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from augment.dataset import AugmentedDataset, build_dataset
from pipeline.training.batches import TrainSampler
from pipeline.training.collectives import gather_objects
from pipeline.config import preset
from pipeline.data.tasks import load_tasks
from pipeline.training.refill import Refill
from pipeline.training.runtime import make_runtime
from pipeline.training.train import LoopChecks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--global-batch", type=int, default=768)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--halt-rate", type=float, default=0.125, help="chance that a row halts at a step (1/mean steps)")
    p.add_argument("--num-aug", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = preset("arc1")
    cfg.time_budget_s = 1e9  # on, never reached: the check itself is what is timed
    rt = make_runtime(cfg)
    local = args.global_batch // rt.world
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / f"data{os.getpid()}"
        tasks = load_tasks("arc-agi-1/training").tasks
        build_dataset(tasks, set(), num_aug=args.num_aug, seed=0, canvas=30, progress=False).save(root)
        ds = AugmentedDataset.load(root)
    sampler = TrainSampler(ds, seed=0, sampling="groups", translation="reference", batch_size=args.global_batch)
    refill = Refill(sampler, rt, local, ds.canvas**2)
    rng = np.random.default_rng(0)
    if rt.world > 1:
        torch.distributed.barrier()  # time the steps, not the processes' different start-up times
    t_begin = time.perf_counter()
    checks = LoopChecks(cfg, rt)
    times: list[tuple[float, float, float]] = []
    for step in range(args.steps):
        halted = np.ones(args.global_batch, bool) if step == 0 else rng.random(args.global_batch) < args.halt_rate
        halted_local = torch.from_numpy(halted[rt.rank * local:(rt.rank + 1) * local].copy())
        t0 = time.perf_counter()
        refill.watch(0, halted_local)  # in the trainer: right after the forward pass (the mask gather)
        t1 = time.perf_counter()
        refill(0, halted_local)  # in the trainer: at the start of the next step (draw, encode, copy)
        t2 = time.perf_counter()
        checks(time.perf_counter() - t_begin, 0.0)
        t3 = time.perf_counter()
        times.append((t1 - t0, t2 - t1, t3 - t2))
    steady = np.array(times[1:]) * 1e3
    mine = {"rank": rt.rank, "first_ms": sum(times[0]) * 1e3, "gather_ms": steady[:, 0].mean(),
            "encode_ms": steady[:, 1].mean(), "budget_ms": steady[:, 2].mean(), "host_ms": steady.sum(1).mean(),
            "host_median_ms": float(np.median(steady.sum(1)))}
    everyone = gather_objects(mine, rt.world)
    if rt.is_main:
        print(f"\n{rt.world} process(es), global batch {args.global_batch}, canvas 30, halt rate {args.halt_rate}, "
              f"{args.steps} steps (means over steps 2..{args.steps}; the first step refills every row)")
        print(f"{'rank':>4}{'1st step':>10}{'gather':>9}{'draw+encode+copy':>18}{'budget':>9}{'host/step':>11}"
              f"{'(median)':>10}   (ms)")
        for r in everyone:
            print(f"{r['rank']:>4}{r['first_ms']:>10.2f}{r['gather_ms']:>9.3f}{r['encode_ms']:>18.3f}"
                  f"{r['budget_ms']:>9.3f}{r['host_ms']:>11.3f}{r['host_median_ms']:>10.3f}")


if __name__ == "__main__":
    main()
