"""Benchmark the augmented dataset against the reference builder: `python benchmarks/bench_augment.py [--num-aug N]`.

Builds ARC-AGI-1 training+evaluation (800 tasks, evaluation held out, canvas 30), saves it, loads it back and draws
training batches. The reference builder's figures on the same machine (N=1000) are printed alongside.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path


from augment.dataset import AugmentedDataset, build_dataset
from pipeline.training.batches import TrainSampler
from pipeline.data.tasks import load_tasks

REFERENCE = {"wall_s": 385.0, "disk_mb": 5.4e3, "rss_mb": 12.2e3, "variants": 730_514, "short": 140}
TARGET = {"wall_s": 10.0, "disk_mb": 50.0, "rss_mb": 1024.0}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-aug", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print_table(args, measure(args))


def measure(args: argparse.Namespace) -> dict:
    """Load the tasks, build and save the dataset, reload it and draw batches from it, timing each."""
    t0 = time.perf_counter()
    loaded = load_tasks("arc-agi-1")
    tasks = loaded.tasks
    eval_ids = {t.id for t in tasks if t.source == "arc-agi-1/evaluation"}
    figures = {"tasks": len(tasks), "held_out": len(eval_ids), "load_s": time.perf_counter() - t0}
    out = Path(tempfile.mkdtemp(prefix="bench_augment_"))
    try:
        t0 = time.perf_counter()
        dataset = build_dataset(
            tasks, eval_ids, num_aug=args.num_aug, seed=args.seed, canvas=30, progress=False,
            skipped=loaded.skipped, sources="arc-agi-1",
        )
        figures["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dataset.save(out)
        figures["save_s"] = time.perf_counter() - t0
        figures["rss_build"] = peak_rss_mb()
        figures["disk"] = folder_mb(out)
        t0 = time.perf_counter()
        dataset = AugmentedDataset.load(out)
        figures["reload_s"] = time.perf_counter() - t0
        figures.update(time_batches(dataset, args))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    figures["manifest"] = dataset.manifest
    return figures


def time_batches(dataset: AugmentedDataset, args: argparse.Namespace) -> dict:
    sampler = TrainSampler(dataset, seed=args.seed)
    t0 = time.perf_counter()
    sampler.take(args.batch_size)  # the first call also shuffles the epoch
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        batch = sampler.take(args.batch_size)
    batches_s = time.perf_counter() - t0
    assert batch["inputs"].shape == (args.batch_size, 900)
    return {"first_s": first_s, "batches_s": batches_s}


def print_table(args: argparse.Namespace, figures: dict) -> None:
    m, f = figures["manifest"], figures
    rate = args.batches / f["batches_s"]
    print(f"ARC-AGI-1 training+evaluation: {f['tasks']} tasks ({f['held_out']} held out), num_aug={args.num_aug}")
    print(f"loading tasks {f['load_s']:.2f} s; reload of the saved dataset {f['reload_s']:.2f} s")
    print()
    print(f"| {'measure':<36} | {'ours':>12} | {'ref N=1000':>10} | {'target':>8} |")
    print(f"|{'-' * 38}|{'-' * 14}|{'-' * 12}|{'-' * 10}|")
    rows = [
        ("build + save wall time (s)", f"{f['build_s'] + f['save_s']:.1f}", f"{REFERENCE['wall_s']:.0f}",
         f"<= {TARGET['wall_s']:.0f}"),
        ("  of which build / save (s)", f"{f['build_s']:.1f} / {f['save_s']:.1f}", "", ""),
        ("disk size (MB)", f"{f['disk']:.1f}", f"{REFERENCE['disk_mb']:.0f}", f"<= {TARGET['disk_mb']:.0f}"),
        ("peak RSS after build (MB)", f"{f['rss_build']:.0f}", f"{REFERENCE['rss_mb']:.0f}", f"<= {TARGET['rss_mb']:.0f}"),
        ("puzzle variants (originals incl.)", f"{m['num_variants']:,}", f"{REFERENCE['variants']:,}", ""),
        (f"puzzles short of {args.num_aug}", f"{len(m['short_puzzles'])}", f"{REFERENCE['short']}", ""),
        ("training examples", f"{m['num_train_examples']:,}", "", ""),
        ("held-out test rows (x variants)", f"{m['num_test_inputs']:,}", "", ""),
        (f"batches/s ({args.batch_size} x 900 int32)", f"{rate:.1f}", "", ""),
        ("first batch incl. epoch shuffle (s)", f"{f['first_s']:.2f}", "", ""),
        ("peak RSS at the end (MB)", f"{peak_rss_mb():.0f}", "", ""),
    ]
    for name, ours, ref, target in rows:
        print(f"| {name:<36} | {ours:>12} | {ref:>10} | {target:>8} |")


if __name__ == "__main__":
    main()
