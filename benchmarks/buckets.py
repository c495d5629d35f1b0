"""Canvas buckets measured on the paper's data, without a model (docs/BUCKETS.md).

    python benchmarks/buckets.py                       # the tables of docs/BUCKETS.md (a few seconds)
    python benchmarks/buckets.py --buckets 12,16,20,30  # one list in detail

For the `arc1` and `arc2` presets' data (built here with no augmentation: a dihedral view never changes an
example's larger side, so every variant has its original's bucket) it counts, exactly:
  - grid tokens per training example (the bucket's side², plus the 16 puzzle tokens) with and without buckets,
    and the model FLOPs per row-step (pipeline.model.flops.model_flops_per_row_step), for the best list of each length
    (1..6 shapes, by exhaustive search) and for the chosen list;
  - the translation range: offsets an example can take, full canvas against its bucket;
  - held-out test inputs: the bucket chosen from the demonstrations (pipeline.data.canvas.output_bound) and how many
    true test outputs would not fit it (ARC-AGI-1 evaluation, ARC-AGI-2 evaluation, the paper's ARC-AGI-2
    evaluation), and prediction tokens per view.
Training examples are weighted as the reference's group epochs weight them (every puzzle once, all its examples).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from augment.dataset import AugmentedDataset, build_dataset  # noqa: E402
from pipeline.data.canvas import side_for, translation_room  # noqa: E402
from pipeline.model.rows import parse_buckets  # noqa: E402
from pipeline.config import preset  # noqa: E402
from pipeline.data.tasks import load_solutions, load_tasks  # noqa: E402
from pipeline.model.flops import model_flops_per_row_step  # noqa: E402
from pipeline.data.splits import held_out_ids  # noqa: E402

CHOSEN = "12,16,20,24,30"
HELD_OUT = ("arc-agi-1/evaluation", "arc-agi-2/evaluation", "arc-agi-2-paper/evaluation")


def dataset_for(name: str) -> AugmentedDataset:
    """The preset's tasks, no augmentation, its evaluation set held out."""
    d = preset(name).data
    tasks = load_tasks(d.sources, skip_invalid=True).tasks
    eval_ids = held_out_ids(tasks, d.eval_set, lambda spec: load_tasks(spec, skip_invalid=True).tasks)
    return build_dataset(tasks, eval_ids, num_aug=0, seed=0, canvas=d.canvas, progress=False)


def mean_tokens(extent: np.ndarray, buckets: tuple[int, ...], canvas: int, puzzle_len: int) -> float:
    return float(np.mean(side_for(extent, buckets, canvas) ** 2)) + puzzle_len


def best_lists(extents: list[np.ndarray], canvas: int, max_shapes: int) -> dict[int, tuple[int, ...]]:
    """For each number of shapes, the list minimising the summed relative tokens over the datasets."""
    best: dict[int, tuple[int, ...]] = {}
    for k in range(1, max_shapes + 1):
        scored = []
        for smaller in itertools.combinations(range(2, canvas), k - 1):
            buckets = (*smaller, canvas)
            scored.append((sum(np.mean(side_for(e, buckets, canvas) ** 2) for e in extents), buckets))
        best[k] = min(scored)[1]
    return best


def test_fit(eval_set: str, buckets: tuple[int, ...], canvas: int) -> dict:
    """Held-out test inputs of `eval_set`: buckets chosen from demonstrations, true outputs that would not fit."""
    tasks = load_tasks(eval_set, skip_invalid=True).tasks
    ds = build_dataset(tasks, {t.id for t in tasks}, num_aug=0, seed=0, canvas=canvas, progress=False)
    rows = ds.test_rows(1)
    extent = ds.held_out_extent(rows["puzzle_index"], rows["test_index"])
    sides = side_for(extent, buckets, ds.canvas)
    solutions = load_solutions(eval_set)
    truth = np.array([max(solutions[ds.puzzles[int(p)]["task_id"]][int(t)].shape)
                      for p, t in zip(rows["puzzle_index"], rows["test_index"])])
    misses = (truth + 1 > sides) & (sides < ds.canvas)
    input_only = side_for(np.maximum(ds.grid_height[rows["grid"]], ds.grid_width[rows["grid"]]), buckets, ds.canvas)
    return {"inputs": len(sides), "misses": int(misses.sum()),
            "misses_input_side_only": int(((truth + 1 > input_only) & (input_only < ds.canvas)).sum()),
            "tokens": float(np.mean(sides ** 2)), "sides": np.bincount(sides, minlength=ds.canvas + 1)}


def offsets(extent2: np.ndarray, buckets: tuple[int, ...], canvas: int) -> tuple[float, float]:
    """Mean number of distinct offsets per example: full canvas, buckets."""
    full = np.prod(translation_room(extent2, canvas, canvas) + 1, axis=1)
    sides = side_for(extent2.max(axis=1), buckets, canvas)[:, None]
    return float(full.mean()), float(np.prod(translation_room(extent2, sides, canvas) + 1, axis=1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", default=CHOSEN)
    p.add_argument("--max-shapes", type=int, default=6)
    args = p.parse_args()
    model = preset("arc1").model
    P, canvas = model.puzzle_len, preset("arc1").data.canvas
    chosen = parse_buckets(args.buckets, canvas)
    full_flops = model_flops_per_row_step(model, canvas * canvas)

    data = {name: dataset_for(name) for name in ("arc1", "arc2")}
    extent2 = {n: ds.train_extent(np.arange(ds.num_train_examples)) for n, ds in data.items()}
    extent = {n: e.max(axis=1) for n, e in extent2.items()}
    print("training examples: " + ", ".join(f"{n} {len(e):,}" for n, e in extent.items()))

    print(f"\n### Best list per number of shapes (grid tokens per example incl. {P} puzzle tokens; "
          f"full canvas {canvas * canvas + P})\n")
    print("| shapes | sides | arc1 tokens | arc1 vs full | arc2 tokens | arc2 vs full |")
    print("|---|---|---|---|---|---|")
    lists = best_lists(list(extent.values()), canvas, args.max_shapes)
    for k, buckets in [*lists.items(), ("chosen", chosen)]:
        cells = [f"{mean_tokens(extent[n], buckets, canvas, P):.0f} | "
                 f"{mean_tokens(extent[n], buckets, canvas, P) / (canvas * canvas + P):.2f}" for n in extent]
        print(f"| {k} | {','.join(map(str, buckets))} | {' | '.join(cells)} |")

    print(f"\n### The chosen list {','.join(map(str, chosen))}: share of examples, tokens and FLOPs\n")
    print("| data | " + " | ".join(f"side {b}" for b in chosen) + " | tokens/example | FLOPs/row-step (GFLOP) "
          "| vs full | offsets per example (full → bucket) |")
    print("|---|" + "---|" * (len(chosen) + 4))
    for n, e in extent.items():
        sides = side_for(e, chosen, canvas)
        shares = " | ".join(f"{np.mean(sides == b):.1%}" for b in chosen)
        flops = float(np.mean([model_flops_per_row_step(model, int(s) ** 2) for s in sides]))
        full_off, bucket_off = offsets(extent2[n], chosen, canvas)
        print(f"| {n} | {shares} | {mean_tokens(e, chosen, canvas, P):.0f} vs {canvas * canvas + P} | "
              f"{flops / 1e9:.1f} vs {full_flops / 1e9:.1f} | {flops / full_flops:.2f} | "
              f"{full_off:.0f} → {bucket_off:.1f} |")

    print(f"\n### Held-out test inputs on {','.join(map(str, chosen))} (bucket from the demonstrations)\n")
    print("| eval set | test inputs | true outputs not fitting | (input side alone) | grid tokens per view "
          "| inputs per side |")
    print("|---|---|---|---|---|---|")
    for eval_set in HELD_OUT:
        r = test_fit(eval_set, chosen, canvas)
        per_side = ", ".join(f"{b}: {int(r['sides'][b])}" for b in chosen)
        print(f"| {eval_set} | {r['inputs']} | {r['misses']} | {r['misses_input_side_only']} | "
              f"{r['tokens'] + P:.0f} vs {canvas * canvas + P} | {per_side} |")


if __name__ == "__main__":
    main()
