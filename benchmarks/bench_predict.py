"""Prediction throughput (examples/s: augmented test-input views, each run for halt_max_steps ACT steps, decoded,
de-augmented and recorded) for the `demo` preset and the paper config, with untrained weights (speed does not
depend on them).

    python benchmarks/bench_predict.py [--rows 512] [--paper-rows 8]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from augment.dataset import AugmentedDataset, build_dataset
from pipeline.config import PredictConfig, RunConfig, preset
from pipeline.data.tasks import load_tasks, select_tasks
from pipeline.model.trm import TRM
from pipeline.inference.predict import predict


def bench(name: str, cfg: RunConfig, root: Path, rows: int, batch_size: int) -> tuple[str, int, float]:
    """Predict about `rows` views: min(rows, 16) tasks' test inputs, as many views each as it takes."""
    tasks = select_tasks(load_tasks("arc-agi-1/evaluation").tasks, max_side=cfg.data.canvas)[: min(rows, 16)]
    build_dataset(tasks, {t.id for t in tasks}, num_aug=cfg.data.num_aug, seed=0, canvas=cfg.data.canvas,
                  progress=False).save(root)
    ds = AugmentedDataset.load(root)
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = ds.canvas**2, ds.num_puzzle_identifiers
    model = TRM(cfg.model)
    pcfg = PredictConfig(max_variants=max(1, rows // max(1, len(ds.test_rows(1)["variant"]))), batch_size=batch_size)
    warm = predict(model, ds, PredictConfig(max_variants=1, batch_size=batch_size, time_budget_s=1e-3), progress=False)
    assert len(warm) > 0
    t = time.perf_counter()
    out = predict(model, ds, pcfg, progress=False)
    seconds = time.perf_counter() - t
    return name, len(out), len(out) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048, help="views to predict with the demo model")
    p.add_argument("--paper-rows", type=int, default=4, help="views to predict with the paper model (slow on CPU)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = preset("demo")
        results.append(bench("demo", demo, Path(tmp) / "demo", args.rows, 256))
        paper = preset("arc1")
        paper.data.num_aug = 8
        results.append(bench("paper (arc1)", paper, Path(tmp) / "paper", args.paper_rows, 8))
    print(f"\ndevice cpu, torch threads {torch.get_num_threads()}")
    print(f"{'config':16}{'views':>8}{'views/s':>10}")
    for name, n, rate in results:
        print(f"{name:16}{n:>8}{rate:>10.2f}")


if __name__ == "__main__":
    main()
