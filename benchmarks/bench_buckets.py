"""Canvas buckets against the whole canvas, measured (docs/BUCKETS.md).

    # training step time at a fixed row count, the two arms interleaved step by step on the same examples
    python benchmarks/bench_buckets.py step --preset arc1 --rows 8 --steps 3
    python benchmarks/bench_buckets.py step --preset mini --set data.canvas=16 --buckets 7,11,16 --rows 64 --steps 8
    # learning at equal optimizer steps: the demo's tasks on a 10x10 canvas, whole canvas against buckets 4,7,10
    python benchmarks/bench_buckets.py learn --seeds 0,1,2          # each chain through /work/bin/cpu if you share
    python benchmarks/bench_buckets.py learn --seeds 0,1,2 --report-only
    # prediction from one run's final weights: views per second and accuracy, both arms interleaved
    python benchmarks/bench_buckets.py predict --run runs/buckets/full_s0 --buckets 4,7,10
    # torch.compile's graphs for the blocks over steps on two buckets with varying row counts
    python benchmarks/bench_buckets.py compile --backend aot_eager

`step` builds the preset's dataset with a few augmentations (a dihedral view never changes an example's bucket)
and two trainers with the same seed, so the same weights and the same stream: one on the whole canvas, one on
`--buckets`. A fresh model halts no row early (q_halt starts at -5), so both compute the same rows for N_sup steps.
It prints seconds per optimizer step (median of the timed steps, after one warm-up step each) and the ratio of
the FLOPs the two actually computed (pipeline.model.flops.model_flops_per_row_step on each row's side).

`predict` runs stage predict's computation (every view, then the likelihood pass) on the run's final checkpoint
with the run's dataset, once on the whole canvas and once on `--buckets`, and scores both on the held-out answers;
it also reports the per-cell cross-entropy of the true answers (the re-scoring machinery applied to the truth,
over the first 8 views).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from augment.dataset import AugmentedDataset, build_dataset  # noqa: E402
from pipeline.model.rows import RowEngine  # noqa: E402
from pipeline.config import apply_overrides, from_dict, preset  # noqa: E402
from pipeline.data.tasks import load_tasks, select_tasks  # noqa: E402
from pipeline.model.flops import model_flops_per_row_step  # noqa: E402
from pipeline.data.splits import held_out_ids  # noqa: E402


# ---------------------------------------------------------------------------------------------- training step
def build(cfg, num_aug: int) -> AugmentedDataset:
    d = cfg.data
    tasks = select_tasks(load_tasks(d.sources, skip_invalid=True).tasks, max_side=d.max_side, max_tasks=d.max_tasks)
    eval_ids = held_out_ids(tasks, d.eval_set, lambda spec: load_tasks(spec, skip_invalid=True).tasks)
    return build_dataset(tasks, eval_ids, num_aug=num_aug, seed=0, canvas=d.canvas, progress=False)


def step_times(args: argparse.Namespace) -> dict:
    from pipeline.training.loss import METRIC_KEYS
    from pipeline.training.refill import Refill
    from pipeline.training.runtime import make_runtime
    from pipeline.training.state import blank_carries, build_state
    from pipeline.training.step import train_step

    base = apply_overrides(preset(args.preset), args.set)
    base.global_batch_size, base.grad_accum_steps = args.rows, 1
    dataset = build(base, args.num_aug)
    base.model.seq_len, base.model.num_puzzle_identifiers = dataset.canvas ** 2, dataset.num_puzzle_identifiers
    rt = make_runtime(base)
    arms = {}
    for name, buckets in (("full canvas", ""), ("buckets", args.buckets)):
        cfg = copy.deepcopy(base)
        cfg.data.canvas_buckets = buckets
        state = build_state(cfg, dataset, rt)
        state.carries = blank_carries(state.model, cfg, args.rows, rt.device)
        state.sides = np.full(args.rows, dataset.canvas, dtype=np.int64)
        refill = Refill(state.sampler, rt, args.rows, cfg.model.seq_len, state.sides)
        arms[name] = dict(cfg=cfg, state=state, refill=refill, times=[], flops=0.0,
                          sums=torch.zeros(len(METRIC_KEYS), dtype=torch.float64), bad=torch.zeros((), dtype=torch.bool))
    for i in range(args.steps + 1):  # step 0 warms up; then the arms alternate
        for arm in arms.values():
            started = time.perf_counter()
            train_step(arm["state"], arm["cfg"], rt, arm["refill"], arm["sums"], arm["bad"], args.steps + 1)
            if i > 0:
                arm["times"].append(time.perf_counter() - started)
                arm["flops"] += sum(model_flops_per_row_step(arm["cfg"].model, int(s) ** 2) for s in arm["state"].sides)
    full, bucketed = arms["full canvas"], arms["buckets"]
    assert (full["state"].carries[0].current_data["puzzle_identifiers"]
            == bucketed["state"].carries[0].current_data["puzzle_identifiers"]).all(), "the arms drew other rows"
    result = {"preset": args.preset, "set": args.set, "bucket_sides": args.buckets, "rows": args.rows,
              "threads": torch.get_num_threads(), "sides": np.bincount(bucketed["state"].sides).nonzero()[0].tolist(),
              "rows_per_side": {int(s): int(c) for s, c in zip(*np.unique(bucketed["state"].sides, return_counts=True))}}
    for name, arm in arms.items():
        result[name] = {"seconds_per_step": statistics.median(arm["times"]), "all": arm["times"]}
    result["time_ratio"] = result["buckets"]["seconds_per_step"] / result["full canvas"]["seconds_per_step"]
    result["flops_ratio"] = bucketed["flops"] / full["flops"]
    return result


# ---------------------------------------------------------------------------------------------- torch.compile
def compile_graphs(args: argparse.Namespace) -> dict:
    """Graphs torch.compile makes for the blocks over training steps on two buckets with varying row counts."""
    from torch._dynamo.utils import counters

    from pipeline.model.trm import TRM, ModelConfig
    from pipeline.training.loss import act_loss

    torch.manual_seed(0)
    model = TRM(ModelConfig(seq_len=36, hidden_size=32, num_heads=2, H_cycles=2, L_cycles=2, halt_max_steps=3,
                            puzzle_emb_len=2, puzzle_emb_ndim=32, num_puzzle_identifiers=5,
                            compile_backend=args.backend)).train()
    graphs = []
    for rows, side in ((5, 4), (7, 4), (3, 4), (9, 6), (4, 6), (11, 4), (2, 6), (6, 4), (8, 6), (13, 4)):
        batch = {"inputs": torch.randint(0, 12, (rows, side * side), dtype=torch.int32),
                 "labels": torch.randint(0, 12, (rows, side * side), dtype=torch.int32),
                 "puzzle_identifiers": torch.randint(1, 5, (rows,), dtype=torch.int32)}
        carry, outputs = model(model.initial_carry(batch), batch)
        act_loss(outputs, carry)[0].backward()
        model.zero_grad()
        graphs.append({"rows": rows, "side": side, "graphs_so_far": counters["stats"]["unique_graphs"]})
    return {"backend": args.backend, "steps": graphs}


# ---------------------------------------------------------------------------------------------- learning
# The learning benchmark: the demo preset's 59 tasks (every grid <= 6, ARC-AGI-1; its 13 evaluation tasks held out)
# on a 10x10 canvas, 32 rows per step for the demo's 1400 steps (about 12 minutes of one core on the whole canvas).
LEARN_SETTINGS = ["--preset", "demo", "--canvas", "10", "--set", "global_batch_size=32"]
LEARN_ARMS = {"full": "", "buckets": "4,7,10"}


def learn(args: argparse.Namespace) -> dict:
    import subprocess

    root = Path(args.root)
    results: dict = {"settings": LEARN_SETTINGS, "arms": LEARN_ARMS, "runs": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm, buckets in LEARN_ARMS.items():
            folder = root / f"{arm}_s{seed}"
            if not args.report_only and not (folder / "score.json").exists():
                cmd = [sys.executable, "-m", "pipeline.run", "--stage", "all", "--out", str(folder), "--seed",
                       str(seed), "--quiet", *LEARN_SETTINGS, "--set", f"data.canvas_buckets={buckets}"]
                started = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, check=True)
                (folder / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
            if (folder / "score.json").exists():
                results["runs"].append({"arm": arm, "seed": seed, **learn_figures(folder, buckets)})
    if results["runs"]:  # the translation range of this data, whole canvas against buckets
        from pipeline.data.canvas import translation_room

        dataset = AugmentedDataset.load(root / f"full_s{args.seeds.split(',')[0]}" / "dataset")
        extent = dataset.train_extent(np.arange(dataset.num_train_examples))
        sides = RowEngine.build(LEARN_ARMS["buckets"], dataset.canvas).side_for(extent.max(axis=1))
        results["offsets_per_example"] = {
            arm: float(np.prod(translation_room(extent, side, dataset.canvas) + 1, axis=1).mean())
            for arm, side in (("full", dataset.canvas), ("buckets", sides[:, None]))}
    return results


def learn_figures(folder: Path, buckets: str) -> dict:
    from pipeline.model.loading import load_model_for_inference
    from pipeline.training.checkpoint import latest_checkpoint
    from pipeline.inference.predictions import Predictions
    from submissions.score import score_submission

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    batch = json.loads((folder / "config.json").read_text())["global_batch_size"]
    dataset = AugmentedDataset.load(folder / "dataset")
    solutions = {t.id: t.test_outputs for t in dataset.eval_tasks()}
    score = score_submission(json.loads((folder / "submission.json").read_text()), solutions,
                             Predictions.load(folder / "predictions.npz"))
    model = load_model_for_inference(latest_checkpoint(folder / "checkpoints"))
    return {
        "train_exact": float(np.mean([r["exact_accuracy"] for r in train[-3:]])),
        "train_accuracy": float(np.mean([r["accuracy"] for r in train[-3:]])),
        "lm_loss": float(np.mean([r["lm_loss"] for r in train[-3:]])),
        "grid_tokens_per_row": float(np.mean([r["grid_tokens_per_row"] for r in train])),
        "pass2_task": score.task_score, "pass2": score.kaggle_score, "oracle": score.oracle_score,
        "ce_true": true_answer_cross_entropy(model, dataset, RowEngine.build(buckets, dataset.canvas, model.config)),
        "eval_pass2": [r["pass2"] for r in rows if r["kind"] == "eval"],
        # training time from the logged throughput (the chain's wall time includes waiting for a CPU slot)
        "train_minutes": sum(batch * (r["step"] - p["step"]) / r["examples_per_s"]
                             for p, r in zip([{"step": 0}] + train, train)) / 60,
    }


LEARN_COLUMNS = (("train_exact", "train exact %", 100), ("train_accuracy", "train token acc %", 100),
                 ("lm_loss", "train lm loss", 1), ("pass2", "held-out pass@2 %", 100), ("oracle", "oracle %", 100),
                 ("ce_true", "held-out CE of truth (nats/cell)", 1), ("train_minutes", "train min", 1))


def learn_table(result: dict) -> str:
    """The learning runs as Markdown: one row per run, then each arm's mean (min–max) over seeds."""
    head = "| arm | seed | " + " | ".join(name for _, name, _ in LEARN_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(LEARN_COLUMNS) + 2)]
    for run in result["runs"]:
        cells = [f"{run[key] * scale:.3g}" for key, _, scale in LEARN_COLUMNS]
        lines.append(f"| {run['arm']} | {run['seed']} | " + " | ".join(cells) + " |")
    for arm in LEARN_ARMS:
        runs = [r for r in result["runs"] if r["arm"] == arm]
        if runs:
            cells = []
            for key, _, scale in LEARN_COLUMNS:
                values = [r[key] * scale for r in runs]
                cells.append(f"{np.mean(values):.3g} ({min(values):.3g}–{max(values):.3g})")
            lines.append(f"| **{arm}**, mean (min–max) | {len(runs)} seeds | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- prediction
def true_answer_cross_entropy(model, dataset: AugmentedDataset, engine: RowEngine, views: int = 8) -> float:
    """Mean over held-out test outputs of the per-cell cross-entropy (nats) of the true answer, averaged over
    the first `views` views (cells: the answer's colours and its EOS edge)."""
    from pipeline.inference.predictions import PredictionsWriter
    from pipeline.inference.rescore import rescore

    writer = PredictionsWriter([t.id for t in dataset.eval_tasks()])
    for task in dataset.eval_tasks():
        for i, out in enumerate(task.test_outputs):
            writer.add(task.id, i, 0, 1.0, [out])
    truth = writer.finish()
    logp, cells = rescore(model, dataset, truth, top_k=1, views=views, progress=False, engine=engine)
    return float(np.mean(-logp / cells))


def predict_arms(args: argparse.Namespace) -> dict:
    from pipeline.model.loading import load_model_for_inference
    from pipeline.training.checkpoint import latest_checkpoint
    from pipeline.config import PredictConfig
    from pipeline.inference.predict import predict
    from pipeline.inference.rescore import rescore
    from pipeline.inference.vote import SELECTORS
    from submissions.score import score_submission
    from submissions.write import build_submission

    run = Path(args.run)
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    dataset = AugmentedDataset.load(args.dataset or run / "dataset")
    model = load_model_for_inference(latest_checkpoint(run / "checkpoints"))
    tasks = [t for t in dataset.eval_tasks() if t.test_outputs is not None]
    solutions = {t.id: t.test_outputs for t in tasks}
    pcfg = PredictConfig(**{**cfg.predict.__dict__, "time_budget_s": 0.0})
    result = {"run": str(run), "trained_on": cfg.data.canvas_buckets or "full canvas"}
    arms = {"full canvas": RowEngine.build("", dataset.canvas, model.config),
            "buckets": RowEngine.build(args.buckets, dataset.canvas, model.config)}
    for repeat in range(args.repeats):
        for name, engine in arms.items():
            started = time.perf_counter()
            predictions = predict(model, dataset, pcfg, progress=False, engine=engine)
            seconds = time.perf_counter() - started
            predictions.logp, predictions.logp_cells = rescore(
                model, dataset, predictions, top_k=pcfg.rescore_top_k, views=pcfg.rescore_views,
                batch_size=pcfg.batch_size, progress=False, engine=engine)
            arm = result.setdefault(name, {"seconds": []})
            arm["seconds"].append(seconds)
            arm["views_per_s"] = len(predictions) / min(arm["seconds"])
            if repeat == 0:
                for selector in ("vote", "likelihood_cell"):
                    submission, _ = build_submission(tasks, SELECTORS[selector](predictions, top_k=2))
                    report = score_submission(submission, solutions, predictions, selector=SELECTORS[selector])
                    arm[selector] = {"pass2_task": report.task_score, "pass2": report.kaggle_score,
                                     "oracle": report.oracle_score}
                arm["ce_true"] = true_answer_cross_entropy(model, dataset, engine)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--preset", default="arc1")
    s.add_argument("--set", action="append", default=[])
    s.add_argument("--buckets", default="12,16,20,24,30")
    s.add_argument("--rows", type=int, default=8)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--num-aug", type=int, default=8)
    q = sub.add_parser("predict")
    q.add_argument("--run", required=True)
    q.add_argument("--buckets", required=True)
    q.add_argument("--repeats", type=int, default=2)
    q.add_argument("--dataset", help="the run's dataset when it trained on one from elsewhere (default RUN/dataset)")
    g = sub.add_parser("learn")
    g.add_argument("--seeds", default="0,1,2")
    g.add_argument("--root", default=str(ROOT / "runs" / "buckets"))
    g.add_argument("--report-only", action="store_true")
    c = sub.add_parser("compile")
    c.add_argument("--backend", default="aot_eager")
    for parser in (s, q, g, c):
        parser.add_argument("--out", help="also write the result here as JSON")
    args = p.parse_args()
    result = {"step": step_times, "predict": predict_arms, "learn": learn, "compile": compile_graphs}[args.what](args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.what == "learn":
        print(learn_table(result))
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
