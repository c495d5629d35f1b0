"""Speed and memory of one TRM-Att ACT step on this CPU (float32, 2 threads).

For each configuration: a training step (forward + act_loss + backward, no optimizer) and an evaluation step
(forward + act_loss under inference_mode), seconds per example as the median of several runs after warm-up,
and the peak RSS of a fresh process that ran them. Each configuration runs in its own subprocess so that
peaks do not mix.

    python benchmarks/bench_model.py                 # both configurations
    python benchmarks/bench_model.py --only small --repeats 10
    python benchmarks/bench_model.py --compile       # also time torch.compile'd steps (slow to warm up)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from pipeline.model import TRM, ModelConfig, act_loss

CONFIGS = {
    # name: (config overrides of the paper preset, batch size, default repeats)
    "small": (dict(hidden_size=128, num_heads=4, num_layers=2, H_cycles=3, L_cycles=4, seq_len=100, puzzle_emb_len=16,
                   puzzle_emb_ndim=128), 16, 7),
    "paper": (dict(), 4, 3),
}
# Reference code on this machine (published TRM, same settings): s/example train, s/example eval, peak RSS GB.
REFERENCE = {"small": (0.034, 0.017, None), "paper": (2.59, 1.66, 2.5)}


def make_batch(config: ModelConfig, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, config.vocab_size, (batch_size, config.seq_len), generator=g, dtype=torch.int32)
    labels = torch.randint(0, config.vocab_size, (batch_size, config.seq_len), generator=g, dtype=torch.int32)
    labels[labels == 0] = -100
    ids = torch.randint(1, config.num_puzzle_identifiers, (batch_size,), generator=g, dtype=torch.int32)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(name: str, repeats: int, compile_model: bool, threads: int) -> dict:
    """Runs in a subprocess: times one configuration, returns seconds per example and peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    overrides, batch_size, _ = CONFIGS[name]
    config = ModelConfig.paper_arc(num_puzzle_identifiers=64, **overrides)
    model = TRM(config)
    batch = make_batch(config, batch_size)
    step = torch.compile(model) if compile_model else model

    def train_step():
        model.train()
        model.zero_grad()
        carry, outputs = step(model.initial_carry(batch), batch)
        loss, _ = act_loss(outputs, carry)
        loss.backward()

    def eval_step():
        model.eval()
        with torch.inference_mode():
            carry, outputs = step(model.initial_carry(batch), batch)
            act_loss(outputs, carry)

    warmup = 2 if compile_model else 1
    train = median_seconds(train_step, repeats, warmup) / batch_size
    evaluate = median_seconds(eval_step, repeats, warmup) / batch_size
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return {"config": name, "batch": batch_size, "train_s_per_example": train, "eval_s_per_example": evaluate,
            "peak_rss_gb": peak_gb, "compiled": compile_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="configuration(s) to run")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default: per configuration)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(model) (minutes of compilation on CPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the reference figures)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, repeats, compiled = args.child.split(":")
        print(json.dumps(bench_one(name, int(repeats), compiled == "1", args.threads)))
        return

    # Other processes on the machine distort timings badly (2 threads on 2 shared cores): say how busy it was.
    print(f"load average before: {os.getloadavg()[0]:.2f} (timings are only comparable on an idle machine)")
    rows = []
    for name in args.only or list(CONFIGS):
        for compiled in ([False, True] if args.compile else [False]):
            repeats = args.repeats or CONFIGS[name][2]
            child = [sys.executable, __file__, "--child", f"{name}:{repeats}:{int(compiled)}", "--threads", str(args.threads)]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"done: {name}{' (compiled)' if compiled else ''}", file=sys.stderr)

    print(f"{'config':<16}{'batch':>6}{'train s/ex':>12}{'(ref)':>8}{'eval s/ex':>12}{'(ref)':>8}"
          f"{'speed-up tr/ev':>16}{'peak RSS GB':>13}{'(ref)':>7}")
    for r in rows:
        ref_train, ref_eval, ref_rss = REFERENCE[r["config"]]
        label = r["config"] + (" compiled" if r["compiled"] else "")
        print(f"{label:<16}{r['batch']:>6}{r['train_s_per_example']:>12.4f}{ref_train:>8.3f}"
              f"{r['eval_s_per_example']:>12.4f}{ref_eval:>8.3f}"
              f"{ref_train / r['train_s_per_example']:>9.2f}x/{ref_eval / r['eval_s_per_example']:.2f}x"
              f"{r['peak_rss_gb']:>13.2f}{'' if ref_rss is None else f'{ref_rss:.1f}':>7}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
