"""Speed and memory of one TRM-Att ACT step on this CPU (float32, 2 threads by default).

For each configuration: a training step (forward + act_loss + backward, no optimizer) and an evaluation step
(forward + act_loss under inference_mode), in seconds per example: median (and minimum) of several runs after
a warm-up, plus the peak RSS of a fresh process that ran them. Each configuration runs in its own subprocess
so that peaks do not mix.

The machine may be shared: the script measures how much CPU other processes took meanwhile. To compare two
versions of the model fairly on a busy machine, `--compare OTHER_MODEL.py` (e.g. an older
`git show COMMIT:pipeline/model/trm.py`) times both in the same process, alternating run by run, on the same
weights and batch.

    python benchmarks/bench_model.py                       # both configurations
    python benchmarks/bench_model.py --only small --repeats 15 --compare /tmp/old_model.py
    python benchmarks/bench_model.py --compile             # torch.compile(model) instead (minutes of compiling)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from pipeline.model import trm as this_model
from pipeline.training.loss import act_loss

CONFIGS = {
    # name: (overrides of the paper preset, batch size, default repeats)
    "small": (dict(hidden_size=128, num_heads=4, num_layers=2, H_cycles=3, L_cycles=4, seq_len=100, puzzle_emb_len=16,
                   puzzle_emb_ndim=128), 16, 7),
    "paper": (dict(), 4, 3),
}
# The published reference code on this machine, same settings: s/example train, s/example eval, peak RSS GB.
REFERENCE = {"small": (0.034, 0.017, None), "paper": (2.59, 1.66, 2.5)}


def make_batch(vocab_size: int, seq_len: int, num_ids: int, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g, dtype=torch.int32)
    labels = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g, dtype=torch.int32)
    labels[labels == 0] = -100
    ids = torch.randint(1, num_ids, (batch_size,), generator=g, dtype=torch.int32)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("compared_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compared_model"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def bench_one(name: str, repeats: int, compile_model: bool, threads: int, compare: str | None) -> dict:
    """Runs in a subprocess: times one configuration (and the compared model, interleaved)."""
    torch.set_num_threads(threads)
    overrides, batch_size, _ = CONFIGS[name]
    modules = {"this": this_model} | ({"compared": load_module(compare)} if compare else {})
    runs = {}
    for label, module in modules.items():
        torch.manual_seed(0)
        model = module.TRM(module.ModelConfig.paper_arc(num_puzzle_identifiers=64, **overrides))
        if "this" in runs:  # same weights for both
            model.load_state_dict(runs["this"][1].state_dict())
        runs[label] = (module, model, torch.compile(model) if compile_model else model)
    cfg = runs["this"][1].config
    batch = make_batch(cfg.vocab_size, cfg.seq_len, cfg.num_puzzle_identifiers, batch_size)

    def train_step(module, model, step):
        model.train()
        model.zero_grad()
        carry, outputs = step(model.initial_carry(batch), batch)
        loss, _ = getattr(module, "act_loss", act_loss)(outputs, carry)  # older model files carried the loss
        loss.backward()

    def eval_step(module, model, step):
        model.eval()
        with torch.inference_mode():
            carry, outputs = step(model.initial_carry(batch), batch)
            getattr(module, "act_loss", act_loss)(outputs, carry)

    times: dict[tuple[str, str], list[float]] = {}
    for warm_or_timed in ["warm"] * (2 if compile_model else 1) + ["timed"] * repeats:
        for label, run in runs.items():
            for kind, fn in (("train", train_step), ("eval", eval_step)):
                t0 = time.perf_counter()
                fn(*run)
                if warm_or_timed == "timed":
                    times.setdefault((label, kind), []).append((time.perf_counter() - t0) / batch_size)
    result = {"config": name, "batch": batch_size, "compiled": compile_model,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    for (label, kind), ts in times.items():
        result[f"{label}_{kind}_median"] = statistics.median(ts)
        result[f"{label}_{kind}_min"] = min(ts)
    return result


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="configuration(s) to run")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default: per configuration)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the reference figures)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model) (minutes of compiling)")
    parser.add_argument("--compare", metavar="MODEL_PY", help="another model.py to time alternately on the same input")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(bench_one(args.child, args.repeats, args.compile, args.threads, args.compare)))
        return

    busy_before, wall_before = busy_cpu_seconds(), time.perf_counter()
    rows = []
    for name in args.only or list(CONFIGS):
        child = [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats or CONFIGS[name][2]),
                 "--threads", str(args.threads)]
        child += ["--compile"] if args.compile else []
        child += ["--compare", args.compare] if args.compare else []
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))

    print(f"seconds per example, median (min) of the timed runs; {args.threads} threads"
          f"{'; torch.compile' if args.compile else ''}")
    print(f"{'config':<8}{'model':<10}{'train':>17}{'ref':>7}{'eval':>17}{'ref':>7}{'vs ref tr/ev':>15}{'peak RSS GB':>13}")
    for r in rows:
        ref_train, ref_eval, ref_rss = REFERENCE[r["config"]]
        for label in ("this", "compared"):
            if f"{label}_train_median" not in r:
                continue
            train, evaluate = r[f"{label}_train_median"], r[f"{label}_eval_median"]
            rss = f"{r['peak_rss_gb']:.2f}" + ("" if ref_rss is None else f" ({ref_rss})") if label == "this" else ""
            print(f"{r['config']:<8}{label:<10}{train:>9.4f} ({r[f'{label}_train_min']:.4f}){ref_train:>7.3f}"
                  f"{evaluate:>9.4f} ({r[f'{label}_eval_min']:.4f}){ref_eval:>7.3f}"
                  f"{ref_train / train:>8.2f}x/{ref_eval / evaluate:.2f}x{rss:>13}")
        if "compared_train_median" in r:
            print(f"{r['config']:<8}this is faster than compared by: train {r['compared_train_median'] / r['this_train_median']:.2f}x "
                  f"(min {r['compared_train_min'] / r['this_train_min']:.2f}x), eval "
                  f"{r['compared_eval_median'] / r['this_eval_median']:.2f}x (min {r['compared_eval_min'] / r['this_eval_min']:.2f}x)")
    busy_after, wall = busy_cpu_seconds(), time.perf_counter() - wall_before
    if busy_before is not None and busy_after is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        others = max(busy_after - busy_before - children.ru_utime - children.ru_stime, 0.0)
        print(f"other processes used {others / wall:.2f} of {os.cpu_count()} CPU cores on average during the "
              f"{wall:.0f} s run; absolute timings are comparable only when this is near 0")


if __name__ == "__main__":
    main()
