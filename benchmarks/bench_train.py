"""Training throughput: examples/s of full training steps (optimizers, EMA, data included) and the share of the
time spent outside forward/backward, for the `demo` preset and the small config of the model benchmark; on a
GPU also the paper config (`arc1`) at a per-device batch that fits, with its model-FLOP utilisation.

    python benchmarks/bench_train.py                 # CPU: demo + small
    python benchmarks/bench_train.py --arc1 --steps 50 --peak-tflops 989        # one GPU: paper config, 192 rows
    torchrun --nproc-per-node 4 benchmarks/bench_train.py --arc1 --peak-tflops 989   # 4 GPUs x 192 = the paper's 768

"examples/s" counts rows × ACT steps of all processes (one optimizer step processes every row of the global
batch once). `--arc1-rows` is the batch of ONE device (the paper's 768 rows on 4 GPUs is 192 each; 768 on one
device would need ~180 GB of activations); the global batch is that times the number of processes. MFU is per
process: the model FLOPs one device does per second over that device's peak. The forward/backward-only time is
measured on one device's rows, on the same batches, without the rest of the loop; the difference is the share
spent on data, collectives, optimizers, EMA and logging.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from augment.dataset import build_dataset
from pipeline.config import RunConfig, preset
from pipeline.data.tasks import load_tasks, select_tasks
from pipeline.model.trm import TRM, act_loss
from pipeline.model.flops import model_flops_per_row_step
from pipeline.training.train import train


def make_dataset(root: Path, canvas: int, num_aug: int, max_tasks: int = 0) -> Path:
    tasks = select_tasks(load_tasks("arc-agi-1").tasks, max_side=canvas)
    if max_tasks:
        tasks = tasks[:max_tasks]
    eval_ids = {t.id for t in tasks if t.source == "arc-agi-1/evaluation"}
    build_dataset(tasks, eval_ids, num_aug=num_aug, seed=0, canvas=canvas, progress=False).save(root)
    return root


def small_config() -> RunConfig:
    cfg = preset("demo")
    m = cfg.model
    m.hidden_size, m.num_heads, m.num_layers, m.H_cycles, m.L_cycles = 128, 4, 2, 3, 4
    m.puzzle_emb_len, m.puzzle_emb_ndim, m.halt_max_steps = 16, 128, 16
    cfg.global_batch_size = 16
    return cfg


def time_model_only(cfg: RunConfig, data: Path, steps: int, device: str, rows: int) -> float:
    """Seconds per step of forward + loss + backward alone for `rows` rows (one device's share), on batches from
    the same sampler."""
    from augment.dataset import AugmentedDataset
    from pipeline.training.batches import TrainSampler

    ds = AugmentedDataset.load(data)
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = ds.canvas**2, ds.num_puzzle_identifiers
    model = TRM(cfg.model).to(device)
    sampler = TrainSampler(ds, seed=0)
    batch = {k: torch.from_numpy(v).to(device) for k, v in sampler.take(rows).items()}
    carry = model.initial_carry(batch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(steps + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            carry, out = model(carry, batch)
            loss, _ = act_loss(out, carry)
        (loss / cfg.global_batch_size).backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def bench(name: str, cfg: RunConfig, data: Path, steps: int, device: str, peak_tflops: float, world: int = 1) -> dict:
    """Full training steps through `train` (on every process of the job), then forward+backward alone on one
    device's rows. `cfg.global_batch_size` is the global batch."""
    out = Path(tempfile.mkdtemp(prefix=f"bench_{name.split()[0]}_")) if world == 1 else data.parent / f"run_{name.split()[0]}"
    cfg.max_steps, cfg.log_every, cfg.checkpoint_every, cfg.eval_every_epochs = steps, max(1, steps // 2), 10**9, 0
    cfg.lr_warmup_steps = 1
    try:
        train(cfg, data, out, progress=False)
        metrics = out / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    finally:
        if world == 1:
            shutil.rmtree(out, ignore_errors=True)
    local_rows = cfg.global_batch_size // world
    per_step_model = time_model_only(cfg, data, max(5, steps // 4), device, local_rows)
    if not rows:  # not rank 0: only rank 0 logs
        return {}
    full = rows[-1]["examples_per_s"]  # the second half of the run: warm; all processes' rows
    per_step_full = cfg.global_batch_size / full
    result = {
        "name": name, "global_batch": cfg.global_batch_size, "rows_per_device": local_rows, "processes": world,
        "seq_len": cfg.model.seq_len, "hidden": cfg.model.hidden_size, "examples_per_s": full,
        "s_per_step": per_step_full, "fwd_bwd_s_per_step": per_step_model,
        "outside_fwd_bwd": max(0.0, 1 - per_step_model / per_step_full),
    }
    if peak_tflops:  # per process: one device's FLOPs per second over one device's peak
        result["mfu"] = model_flops_per_row_step(cfg.model) * full / world / (peak_tflops * 1e12)
        result["mfu_fwd_bwd"] = model_flops_per_row_step(cfg.model) * local_rows / per_step_model / (peak_tflops * 1e12)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--arc1", action="store_true", help="also the paper config (meant for GPUs)")
    p.add_argument("--arc1-rows", type=int, default=192, help="paper config rows per device (global = x processes)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="one device's peak (bf16 dense) for MFU; 0 = skip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-small", action="store_true", help="only the paper config")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # one shared folder for all processes (rank 0 builds the datasets); a private one with one process
    tmp = Path(os.environ.get("BENCH_TRAIN_DIR", "")) if world > 1 else Path(tempfile.mkdtemp(prefix="bench_train_data_"))
    if world > 1 and not os.environ.get("BENCH_TRAIN_DIR"):
        raise SystemExit("with several processes set BENCH_TRAIN_DIR to an empty folder that every process sees")
    configs = []
    if not args.skip_small:
        demo = preset("demo")
        configs.append(("demo", demo, lambda: make_dataset(tmp / "demo", demo.data.canvas, demo.data.num_aug)))
        small = small_config()
        configs.append(("small (h128, seq100, b16)", small, lambda: make_dataset(tmp / "small", 10, 8)))
    if args.arc1:
        arc1 = preset("arc1")
        arc1.global_batch_size = args.arc1_rows * world
        configs.append((f"arc1 (paper, {args.arc1_rows}/device)", arc1, lambda: make_dataset(tmp / "arc1", 30, 8)))
    results = []
    try:
        for name, cfg, build in configs:
            if cfg.global_batch_size % world:
                cfg.global_batch_size -= cfg.global_batch_size % world
            if rank == 0:
                data = build()
                (data / "READY").touch()
            data = tmp / name.split()[0]
            while not (data / "READY").exists():
                time.sleep(0.5)
            results.append(bench(name, cfg, data, args.steps, device, args.peak_tflops, world))
    finally:
        if world == 1:
            shutil.rmtree(tmp, ignore_errors=True)
    if rank != 0:
        return
    print(f"\ndevice {device}, {world} process(es), torch threads {torch.get_num_threads()}")
    print(f"{'config':30}{'rows/dev':>9}{'global':>7}{'ex/s':>10}{'s/step':>9}{'fwd+bwd':>9}{'outside':>9}"
          f"{'MFU':>7}{'MFU f+b':>8}")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        mfu_fb = f"{r['mfu_fwd_bwd']:.1%}" if "mfu_fwd_bwd" in r else "-"
        print(f"{r['name']:30}{r['rows_per_device']:>9}{r['global_batch']:>7}{r['examples_per_s']:>10.1f}"
              f"{r['s_per_step']:>9.3f}{r['fwd_bwd_s_per_step']:>9.3f}{r['outside_fwd_bwd']:>9.1%}{mfu:>7}{mfu_fb:>8}")


if __name__ == "__main__":
    main()
