"""Training throughput: examples/s of full training steps (optimizers, EMA, data included) and the share of the
time spent outside forward/backward, for the `demo` preset and the small config of the model benchmark; on a
GPU also the `arc1` preset with its model-FLOP utilisation.

    python benchmarks/bench_train.py                 # CPU: demo + small
    python benchmarks/bench_train.py --arc1 --steps 50 --peak-tflops 989   # GPU: the paper config, MFU

"examples/s" counts rows × ACT steps (one optimizer step processes every row of the global batch once).
The forward/backward-only time is measured by running the same model on the same batches without the rest of
the loop; the difference is the share spent on data, optimizers, EMA and logging.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from augment.dataset import build_dataset
from pipeline.config import RunConfig, preset
from pipeline.data import load_tasks, select_tasks
from pipeline.model import TRM, act_loss, swiglu_width
from pipeline.train import train


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


def model_flops_per_row_step(cfg: RunConfig) -> float:
    """Matmul FLOPs of one ACT step of one row, forward + backward (backward = 2 × forward of the grad cycle)."""
    m = cfg.model
    D, S = m.hidden_size, m.seq_len + m.puzzle_emb_len
    inter = swiglu_width(D, m.expansion)
    per_block = 2 * S * (3 * D * D + D * D + 2 * D * inter + inter * D) + 4 * S * S * D
    forward_blocks = m.H_cycles * (m.L_cycles + 1) * m.num_layers
    grad_blocks = (m.L_cycles + 1) * m.num_layers
    heads = 2 * m.seq_len * D * m.vocab_size
    return (forward_blocks + 2 * grad_blocks) * per_block + 3 * heads


def time_model_only(cfg: RunConfig, data: Path, steps: int, device: str) -> float:
    """Seconds per step of forward + loss + backward alone, on batches from the same sampler."""
    from augment.dataset import AugmentedDataset
    from pipeline.batches import TrainSampler

    ds = AugmentedDataset.load(data)
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = ds.canvas**2, ds.num_puzzle_identifiers
    model = TRM(cfg.model).to(device)
    sampler = TrainSampler(ds, seed=0)
    batch = {k: torch.from_numpy(v).to(device) for k, v in sampler.take(cfg.global_batch_size).items()}
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


def bench(name: str, cfg: RunConfig, data: Path, steps: int, device: str, peak_tflops: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    cfg.max_steps, cfg.log_every, cfg.checkpoint_every = steps, max(1, steps // 2), 10**9
    cfg.lr_warmup_steps = 1
    try:
        train(cfg, data, out, progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    full = rows[-1]["examples_per_s"]  # the second half of the run: warm
    per_step_full = cfg.global_batch_size / full
    per_step_model = time_model_only(cfg, data, max(5, steps // 4), device)
    result = {
        "name": name, "global_batch": cfg.global_batch_size, "seq_len": cfg.model.seq_len,
        "hidden": cfg.model.hidden_size, "examples_per_s": full, "s_per_step": per_step_full,
        "fwd_bwd_s_per_step": per_step_model, "outside_fwd_bwd": max(0.0, 1 - per_step_model / per_step_full),
    }
    if peak_tflops:
        result["mfu"] = model_flops_per_row_step(cfg) * full / (peak_tflops * 1e12)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--arc1", action="store_true", help="also the paper config (meant for a GPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (bf16 dense) for MFU; 0 = skip")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_data_"))
    results = []
    try:
        demo = preset("demo")
        results.append(bench("demo", demo, make_dataset(tmp / "demo", demo.data.canvas, demo.data.num_aug), args.steps,
                             device, args.peak_tflops))
        results.append(bench("small (h128, seq100, b16)", small_config(), make_dataset(tmp / "small", 10, 8),
                             args.steps, device, args.peak_tflops))
        if args.arc1:
            results.append(bench("arc1 (paper)", preset("arc1"), make_dataset(tmp / "arc1", 30, 8), args.steps,
                                 device, args.peak_tflops))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndevice {device}, torch threads {torch.get_num_threads()}")
    print(f"{'config':28}{'batch':>6}{'ex/s':>10}{'s/step':>9}{'fwd+bwd':>9}{'outside':>9}{'MFU':>7}")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(f"{r['name']:28}{r['global_batch']:>6}{r['examples_per_s']:>10.1f}{r['s_per_step']:>9.3f}"
              f"{r['fwd_bwd_s_per_step']:>9.3f}{r['outside_fwd_bwd']:>9.1%}{mfu:>7}")


if __name__ == "__main__":
    main()
