"""Sizes of the ways to hand over a paper-size model: the final training checkpoint, the exported folder (every
puzzle row / only their mean), and the Kaggle bundle's checkpoint. No training: the sizes do not depend on the
values. The dataset is the real one (`--preset arc1` augments in seconds), so the puzzle table has its real row
count; the checkpoint is written by the trainer's own save_state.

Run: `python benchmarks/bench_export.py [--preset arc1] [--keep DIR]` (about 8 GB of disk while it runs).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="arc1")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)

    from augment.dataset import AugmentedDataset
    from pipeline.training import checkpoint as ckpt
    from pipeline.config import preset
    from pipeline.cli.export import export_weights
    from pipeline.run import main as run_main
    from pipeline.training.train import blank_carries, build_state, make_runtime, save_state

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_export_"))
    run = work / "run"
    if not (run / "dataset" / "manifest.json").exists():
        run_main(["--stage", "augment", "--preset", args.preset, "--out", str(run), "--quiet"])
    dataset = AugmentedDataset.load(run / "dataset")
    cfg = preset(args.preset)
    cfg.model.seq_len = dataset.canvas ** 2
    cfg.model.num_puzzle_identifiers = dataset.num_puzzle_identifiers
    rt = make_runtime(cfg)
    state = build_state(cfg, dataset, rt)  # randomly initialised: sizes are what is measured
    state.dataset_fingerprint = ckpt.dataset_fingerprint(run / "dataset")
    state.carries = blank_carries(state.model, cfg, 1, rt.device)
    started = time.perf_counter()
    final = save_state(state, cfg, rt, run / "checkpoints", final=True)
    timings = {"checkpoint": time.perf_counter() - started}
    sizes = {"final training checkpoint": final}
    for rows in ("all", "mean"):
        started = time.perf_counter()
        export_weights(final, work / f"export_{rows}", puzzle_rows=rows, dataset_dir=run / "dataset")
        timings[rows] = time.perf_counter() - started
        sizes[f"exported folder, puzzle rows: {rows}"] = work / f"export_{rows}"
    spec = importlib.util.spec_from_file_location("build_bundle", ROOT / "kaggle" / "build_bundle.py")
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    entry = bundle.bundle_checkpoint(work / "export_all", work / "bundle_checkpoint")
    sizes["bundle checkpoint/ (from the export)"] = work / "bundle_checkpoint"

    print(f"{args.preset}: {dataset.num_puzzle_identifiers:,} puzzle rows × {cfg.model.puzzle_emb_ndim}, "
          f"{sum(p.numel() for p in state.model.parameters()):,} dense parameters")
    for name, path in sizes.items():
        print(f"  {name:42} {_size(path) / 1e6:10.1f} MB")
    print(f"  (write times: checkpoint {timings['checkpoint']:.1f} s, export all {timings['all']:.1f} s, "
          f"export mean {timings['mean']:.1f} s; bundle rows {entry['trained_puzzle_rows']:,} -> 2)")
    if not args.keep:
        import shutil

        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
