"""The Kaggle path, measured on a CPU (docs/KAGGLE_BENCHMARK.md): test-time fine-tuning of a pretrained model on
tasks it has never seen, through the code the notebook runs.

  prepare   split `mini`'s 178 tasks: the 133 outside its dev split (`dev:4`) are the pretraining tasks, the 45 dev
            tasks are the hidden test tasks of a fake Kaggle input tree (kaggle/fake_input.py: train pairs and test
            inputs only; their answers beside it, for scoring); print the pretraining and joint-training commands
  bundle    the pretrained checkpoint as a Kaggle bundle (kaggle/build_bundle.py: the project wheel, the slimmed
            checkpoint with its [blank, mean] puzzle table) inside the fake input tree
  arm       one run of the Kaggle driver (pipeline.kaggle_driver.KaggleRun, what the notebook drives) on that tree,
            with run-config overrides (TRM_OVERRIDES) and driver settings; then its submission scored against the
            dev answers (pass@2), and ce_true of the weights it predicted with and of every fine-tune checkpoint
            (the curve against fine-tune FLOPs) on the dev test outputs
  joint     the baseline trained with the dev demonstrations from the start (`mini-fast` with its dev split):
            ce_true and pass@2 of each of its checkpoints
  table     every result as markdown (every arm and seed that ran)

ce_true is the driver's own figure for a draft with known answers (pipeline.kaggle_driver.stages.truth_figures:
per-cell cross-entropy of the true answer, the model's last ACT step, over the first 8 views of each dev test output, as
`mini`'s evaluations compute it).

  python benchmarks/kaggle_mini.py prepare --root runs/kaggle_mini
  python benchmarks/kaggle_mini.py bundle --root runs/kaggle_mini --checkpoint runs/kaggle_mini/pretrain_s0/checkpoints/step_N.pt
  python benchmarks/kaggle_mini.py arm --root runs/kaggle_mini --name default --seed 0 --ft-fraction 0.25
  python benchmarks/kaggle_mini.py arm --root runs/kaggle_mini --name no-finetune --seed 0 --no-finetune
  python benchmarks/kaggle_mini.py joint --root runs/kaggle_mini --run runs/kaggle_mini/joint_s0
  python benchmarks/kaggle_mini.py table --root runs/kaggle_mini
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# What every arm runs with on the CPU besides its own settings: mini's batch (the kaggle preset's 768 rows are the
# paper's GPU batch), mini-fast's 7 augmentations per task (8 prediction views), checkpoints for the curve.
BASE_OVERRIDES = ("global_batch_size=64", "data.num_aug=7", "predict.batch_size=256", "log_every=10",
                  "keep_checkpoints=20")
CURVE_POINTS = 3  # checkpoints along each fine-tune (the curve of ce_true against its FLOPs)
ROWS_BUNDLE = "bundle_rows/trm-arc-bundle"  # the bundle that keeps every trained puzzle row (new_rows=nearest)


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------- prepare
def prepare(root: Path) -> None:
    """The split, as two Kaggle-style task files with solutions beside them, and the fake input tree."""
    from pipeline.config import preset
    from pipeline.data.tasks import load_tasks, select_tasks
    from pipeline.data.splits import dev_every, dev_split_ids

    d = preset("mini").data
    tasks = select_tasks(load_tasks(d.sources, skip_invalid=True).tasks, max_side=d.max_side)
    dev = dev_split_ids([t.id for t in tasks], dev_every(d.eval_set))
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("pretrain", [t for t in tasks if t.id not in dev]), ("dev", [t for t in tasks if t.id in dev])):
        challenges = {t.id: {"train": [{"input": i.tolist(), "output": o.tolist()} for i, o in t.train],
                             "test": [{"input": g.tolist()} for g in t.test_inputs]} for t in part}
        (folder / f"{prefix}_challenges.json").write_text(json.dumps(challenges))
        (folder / f"{prefix}_solutions.json").write_text(json.dumps({t.id: [g.tolist() for g in t.test_outputs]
                                                                    for t in part}))
    fake = _module(ROOT / "kaggle" / "fake_input.py", "trm_fake_input")
    fake.write_fake_input(root / "input", str(folder / "dev_challenges.json"))
    print(f"{len(tasks) - len(dev)} pretraining tasks, {len(dev)} dev tasks (hidden test tasks) -> {root}")
    print("pretraining (mini-fast on the pretraining tasks only, planned for half of mini's FLOPs; docs/KAGGLE_BENCHMARK.md "
          "measures its checkpoint at step 500, then: bundle --checkpoint .../checkpoints/step_00000500.pt):")
    print(f"  python -m pipeline.run --stage augment --preset mini-fast --data {folder}/pretrain_challenges.json "
          f"--eval-set '' --seed 0 --out {root}/pretrain_s0")
    print(f"  python -m pipeline.run --stage train --preset mini-fast --out {root}/pretrain_s0 --seed 0 "
          "--set flops_budget=2.52e13 --set eval_every=0 --set eval_every_epochs=0")
    print("joint training (mini-fast with its dev split, to 1.25x the pretraining FLOPs, a checkpoint every 59 steps):")
    print(f"  python -m pipeline.run --stage augment --preset mini-fast --seed 0 --out {root}/joint_s0")
    print(f"  python -m pipeline.run --stage train --preset mini-fast --out {root}/joint_s0 --seed 0 "
          "--set flops_budget=3.15e13 --set eval_every=0 --set eval_every_epochs=0 --set checkpoint_every=59 "
          "--set keep_checkpoints=30")


def bundle(root: Path, checkpoint: Path, keep_puzzle_rows: bool = False) -> None:
    """The bundle in the fake input tree; with keep_puzzle_rows, a second one beside it (ROWS_BUNDLE, outside the
    input tree: an arm uses it with --param bundle=...) that keeps every trained puzzle row (new_rows=nearest)."""
    from pipeline.training.checkpoint import load_training_state

    builder = _module(ROOT / "kaggle" / "build_bundle.py", "trm_build_bundle")
    out = root / ROWS_BUNDLE if keep_puzzle_rows else root / "input" / "trm-arc-bundle"
    builder.build_bundle(out, checkpoint, dependency_wheels=False, keep_puzzle_rows=keep_puzzle_rows)
    state = load_training_state(checkpoint)
    (root / "pretrained.json").write_text(json.dumps({"checkpoint": str(checkpoint), "step": state["step"],
                                                      "flops": float(state.get("flops") or 0.0)}))


def pretrained_flops(root: Path) -> float:
    info = json.loads((root / "pretrained.json").read_text())
    if not info["flops"]:
        raise ValueError(f"{root / 'pretrained.json'}: the pretrained checkpoint does not record its FLOPs")
    return info["flops"]


# ------------------------------------------------------------------------------------------------- an arm
def run_arm(root: Path, name: str, seed: int, settings: list[str], ft_fraction: float, no_finetune: bool,
            budget_s: float, params: dict[str, str], time_bounded: bool = False) -> dict[str, Any]:
    """One Kaggle driver run (as the notebook runs it: settings from the environment, KaggleRun.run_all) on the
    fake input tree; its fine-tune is bounded by FLOPs (ft_fraction of the pretraining's), not by the clock, unless
    `time_bounded` (the notebook's own mode: the draft budget `budget_s` and train_fraction split the clock)."""
    import os

    from pipeline.kaggle_driver import KaggleRun, settings_from_env

    pre = pretrained_flops(root)
    ft_flops = ft_fraction * pre
    out = root / "arms" / f"{name}_s{seed}"
    working = out / "working"
    overrides = [*BASE_OVERRIDES, f"seed={seed}", f"data.seed={seed}", *settings]
    if not no_finetune and not time_bounded:
        overrides.append(f"flops_budget={ft_flops:.6g}")
        if not any(s.startswith("checkpoint_every=") for s in settings):
            step_flops = 64 * _row_step_flops(root)
            overrides.append(f"checkpoint_every={max(1, round(ft_flops / step_flops / CURVE_POINTS))}")
    shown_params = dict(params)
    env = {"TRM_KAGGLE_INPUT": str(root / "input"), "TRM_KAGGLE_WORKING": str(working), "TRM_NUM_GPUS": "0",
           "TRM_PROGRESS": "0", "TRM_DRAFT_TIME_BUDGET_S": str(budget_s), "TRM_STAGE_OVERHEAD_S": "60",
           "TRM_KILL_GRACE_S": "20", "TRM_SUBMIT_RESERVE_S": "60", "TRM_MIN_TRAIN_S": "10",
           "TRM_TRAIN_FRACTION": "0" if no_finetune else params.pop("train_fraction", "0.85"),
           "TRM_SOLUTIONS": str(root / "input" / "arc-prize-2025" / "arc-agi_evaluation_solutions.json"),
           "TRM_OVERRIDES": " ".join(overrides), **{f"TRM_{k.upper()}": v for k, v in params.items()}}
    load_before = os.getloadavg()[0]
    start = time.time()
    run = KaggleRun(settings_from_env(env=env))
    run.run_all()
    wall = time.time() - start
    status = run.status
    run_dir = run.s.run_dir
    scored = status.get("score", {})
    result: dict[str, Any] = {
        "name": name, "seed": seed, "settings": settings, "no_finetune": no_finetune, "ft_fraction": ft_fraction,
        "pretrain_flops": pre, "overrides": overrides, "wall_s": round(wall, 1), "path": status["summary"]["path"],
        "params": shown_params, "time_bounded": time_bounded, "budget_s": budget_s,
        "load": [round(load_before, 2), round(os.getloadavg()[0], 2)], "new_rows": _new_rows_line(run_dir),
        "answers": status.get("submit", {}).get("test_inputs"),
        **{k: scored.get(k) for k in ("pass2", "task_pass2", "tasks_solved", "ce_true", "cell_acc_true")},
        "command": f"python benchmarks/kaggle_mini.py arm --root {root} --name {name} --seed {seed} "
                   + (" --no-finetune" if no_finetune else f" --time-bounded --budget-s {budget_s:g}" if time_bounded
                      else f" --ft-fraction {ft_fraction:g}")
                   + "".join(f" --set {shlex.quote(s)}" for s in settings)
                   + "".join(f" --param {k}={v}" for k, v in shown_params.items()),
    }
    result["curve"] = curve = _truth_curve(run_dir, json.loads(run.s.solutions.read_text()),
                                           status.get("predict", {}).get("checkpoint_path"), result)
    result["ft_flops"] = curve[-1]["flops"] if curve and not no_finetune else 0.0
    result["steps"] = status.get("finetune", {}).get("step", 0)
    result["plan"] = _plan(run_dir)
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / f"{name}_s{seed}.json").write_text(json.dumps(result, indent=1))
    print(f"{name} seed {seed}: ce_true {result['ce_true']:.4f}, pass@2 {100 * result['pass2']:.1f}% "
          f"({result['steps']} fine-tune steps, {result['ft_flops'] / 1e12:.2f} TFLOP), {wall:.0f} s")
    return result


def _truth_curve(run_dir: Path, solutions: dict, used: str | None, result: dict[str, Any]) -> list[dict[str, Any]]:
    """ce_true of the predict-only start (if any) and of every fine-tune checkpoint: the curve against FLOPs."""
    from pipeline.training.checkpoint import load_training_state
    from pipeline.kaggle_driver.stages import answered_dataset, truth_figures

    dataset = answered_dataset(run_dir / "dataset", solutions)
    curve = [{"step": 0, "flops": 0.0, **truth_figures(run_dir / "pretrained_for_predict.pt", dataset)}] \
        if (run_dir / "pretrained_for_predict.pt").exists() else []
    for path in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        state = load_training_state(path)
        figures = ({k: result[k] for k in ("ce_true", "cell_acc_true")} if str(path) == used
                   else truth_figures(path, dataset))  # the weights prediction used: the score stage has them
        curve.append({"step": state["step"], "flops": float(state.get("flops") or 0.0), **figures})
    return curve


def _plan(run_dir: Path) -> dict[str, Any] | None:
    """A planned fine-tune's plan (finetune_plan: the `kaggle` preset's), as its metrics.jsonl logged it first."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return next((r for r in rows if r.get("kind") == "plan"), None)


def _new_rows_line(run_dir: Path) -> str | None:
    """How the new puzzle rows started, as the fine-tune child (or the predict-only start) logged it."""
    for log in ("finetune.log", "trm_kaggle.log"):
        path = run_dir / log if log == "finetune.log" else run_dir.parent / log
        if path.exists():
            found = [line.split("start: ", 1)[-1].split("init: ", 1)[-1].strip()
                     for line in path.read_text(errors="replace").splitlines() if "puzzle rows" in line
                     and ("init: " in line or "predict-only start: " in line)]
            if found:
                return found[-1]
    return None


def _row_step_flops(root: Path) -> float:
    """Model FLOPs of one training row-step of the pretrained model at full depth (pipeline.training.compute's figure)."""
    from pipeline.training.compute import run_flops
    from pipeline.config import RunConfig
    from pipeline.kaggle_driver.pretrained import checkpoint_model_config

    model_cfg, _ = checkpoint_model_config(root / "input" / "trm-arc-bundle" / "checkpoint" / "model.pt")
    cfg = RunConfig(model=model_cfg, global_batch_size=1)
    return run_flops(cfg, 1)


# ------------------------------------------------------------------------------------------------- joint
def joint(root: Path, run: Path) -> dict[str, Any]:
    """ce_true and pass@2 (8 views, vote) of each checkpoint of the joint-training run from the pretraining's FLOPs
    on, on its own dev split."""
    import torch

    from augment.dataset import AugmentedDataset
    from pipeline.model.loading import load_model_for_inference
    from pipeline.training.checkpoint import load_training_state
    from pipeline.cli.evaluate import HeldOutEvaluator
    from pipeline.kaggle_driver.stages import TRUTH_VIEWS
    from pipeline.inference.rescore import merge_truth_scores, truth_scores

    dataset = AugmentedDataset.load(run / "dataset")
    evaluator = HeldOutEvaluator(dataset, TRUTH_VIEWS)
    from pipeline.inference.predict import predict

    start = 0.95 * pretrained_flops(root)  # the baseline is read at the pretraining's FLOPs and beyond
    curve = []
    for path in sorted((run / "checkpoints").glob("step_*.pt")):
        state = load_training_state(path)
        if float(state.get("flops") or 0.0) < start:
            continue
        model = load_model_for_inference(path, use_ema=True)
        model.eval()
        with torch.no_grad():
            truth = merge_truth_scores([truth_scores(model, dataset, TRUTH_VIEWS)]) or {}
            preds = predict(model, dataset, evaluator.cfg, device="cpu", progress=False)
        curve.append({"step": state["step"], "flops": float(state.get("flops") or 0.0), **truth,
                      **{k: v for k, v in evaluator.score(preds).items() if k in ("pass2", "task_pass2")}})
        print(f"joint {path.name}: {curve[-1]}")
    result = {"run": str(run), "curve": curve}
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / f"joint_{run.name}.json").write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------------- tables
def _interp(curve: list[dict], flops: float, key: str = "ce_true") -> float | None:
    import numpy as np

    points = [(c["flops"], c[key]) for c in curve if c.get(key) is not None]
    if not points or not points[0][0] * (1 - 5e-3) <= flops <= points[-1][0] * (1 + 5e-3):
        return None
    xs, ys = zip(*points)
    return float(np.interp(flops, xs, ys))


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def gap_closed(no_ft: float | None, joint: float | None, tuned: float | None) -> float | None:
    """The share of the ce_true gap between no fine-tuning and joint training that fine-tuning closed."""
    if None in (no_ft, joint, tuned) or no_ft == joint:
        return None
    return (no_ft - tuned) / (no_ft - joint)


def _phase_seconds(root: Path, r: dict) -> str:
    """'fine-tune s / predict s' of the arm's driver run (kaggle_status.json), on this shared CPU."""
    path = root / "arms" / f"{r['name']}_s{r['seed']}" / "working" / "trm_run" / "kaggle_status.json"
    if not path.exists():
        return "–"
    stages = json.loads(path.read_text())["stages"]
    return " / ".join(f"{stages.get(k, {}).get('seconds', 0):.0f}" for k in ("finetune", "predict"))


def start_flops(r: dict) -> float:
    """FLOPs the arm spent starting its new puzzle rows (new_rows=nearest scores candidate rows; as the run logged
    them): counted into its total compute, against which joint training is read."""
    found = re.search(r"([0-9.]+(?:e-?[0-9]+)?) TFLOP", r.get("new_rows") or "")
    return float(found.group(1)) * 1e12 if found else 0.0


def _settings(r: dict) -> str:
    """An arm's run-config overrides, its driver settings (the rows bundle by name) and, time-bounded, its clock."""
    params = [f"{k}={'(rows bundle)' if k == 'bundle' else v}" for k, v in (r.get("params") or {}).items()]
    clock = [f"clock {r['budget_s']:.0f} s"] if r.get("time_bounded") else []
    plan = r.get("plan")
    clocked = plan and 0 < plan.get("steps_by_time", 0) < plan.get("steps_bound", 0)  # the clock bound the steps
    planned = [f"(plan: {plan['train_variants']} variants, lr {plan['lr']:g}, EMA {plan['ema_rate']:.4f}, warm-up "
               f"{plan['lr_warmup_steps']}" + (f", {plan['steps']} steps at {plan['seconds_per_step']:.2f} s a step "
                                               "probed" if clocked else "") + ")"] if plan else []
    return " ".join([*r["settings"], *params, *clock, *planned]) or "(kaggle preset)"


def tables(root: Path) -> str:
    """Every arm and seed that ran (results/*.json), with the two baselines at equal total FLOPs."""
    results = [json.loads(p.read_text()) for p in sorted((root / "results").glob("*.json"))]
    joints = [r for r in results if "run" in r]
    arms = sorted((r for r in results if "name" in r), key=lambda r: (r["name"] != "no-finetune", r["name"], r["seed"]))
    if not arms:
        return "no results yet"
    pre = arms[0]["pretrain_flops"]
    no_ft = _mean([r.get("ce_true") for r in arms if r["name"] == "no-finetune"])  # 8 views, as the arms
    lines = [f"Pretraining: {pre / 1e12:.2f} TFLOP. No fine-tuning (`no-finetune`, mean of its seeds): ce_true "
             f"{_f(no_ft)}; every gap below is closed from there.", "",
             "| arm | seed | settings | fine-tune steps | fine-tune FLOPs (% of pretraining) | ce_true | joint ce_true "
             "at equal FLOPs | gap closed | cell acc | pass@2 outputs | pass@2 per task | test inputs: two / one + "
             "fallback / fallback only | fine-tune s / predict s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in arms:
        start = start_flops(r)
        joint = _mean([_interp(j["curve"], pre + r["ft_flops"] + start) for j in joints])
        closed = None if r["no_finetune"] and not start else gap_closed(no_ft, joint, r.get("ce_true"))
        a = r.get("answers") or {}
        lines.append(
            f"| {r['name']} | {r['seed']} | {_settings(r)} | {r['steps']} | "
            f"{r['ft_flops'] / 1e12:.2f} T ({100 * r['ft_flops'] / pre:.0f}%)"
            + (f" + {start / 1e12:.2f} T start ({100 * start / pre:.0f}%)" if start else "")
            + f" | {_f(r.get('ce_true'))} | {_f(joint)} | "
            f"{'–' if closed is None else f'{100 * closed:.0f}%'} | {_f(r.get('cell_acc_true'))} | "
            f"{100 * r['pass2']:.1f} | {100 * r['task_pass2']:.1f} | "
            f"{' / '.join(str(v) for v in a.values())} | {_phase_seconds(root, r)} | {r['wall_s']:.0f} |")
    lines += ["", "Curves (fine-tune FLOPs as % of pretraining: ce_true; gap closed against joint training at the same "
              "total FLOPs, the new rows' start included):", ""]
    for r in arms:
        if r["no_finetune"]:
            continue
        points = []
        for c in r["curve"]:
            if c["step"] == 0:
                continue
            closed = gap_closed(no_ft, _mean([_interp(j["curve"], pre + c["flops"] + start_flops(r)) for j in joints]),
                                c["ce_true"])
            points.append(f"{100 * c['flops'] / pre:.0f}%: {c['ce_true']:.3f}"
                          + ("" if closed is None else f" ({100 * closed:.0f}%)"))
        lines.append(f"- {r['name']} seed {r['seed']}: " + ", ".join(points))
    for j in joints:
        lines += ["", f"Joint training ({Path(j['run']).name}), ce_true / pass@2 per task by training FLOPs: " + ", ".join(
            f"{c['flops'] / 1e12:.2f} T: {c['ce_true']:.3f} / {100 * c['task_pass2']:.1f}%" for c in j["curve"])]
    shown = root.relative_to(ROOT).as_posix() if root.is_relative_to(ROOT) else str(root)
    lines += ["", "Commands (from the repository root):", "", "```",
              *[" ".join(r["command"].replace(str(root), shown).split()) for r in arms], "```"]
    return "\n".join(lines) + "\n\n" + budget_table(arms, joints, no_ft)


def budget_table(arms: list[dict], joints: list[dict], no_ft: float | None) -> str:
    """What a fine-tune budget buys, per arm with several seeds: at each checkpoint of the fine-tune (as a share of
    the pretraining's FLOPs), ce_true and the gap closed, mean (min–max) over the seeds."""
    by_arm: dict[str, list[dict]] = {}
    for r in arms:
        if not r["no_finetune"]:
            by_arm.setdefault(r["name"], []).append(r)
    pre = arms[0]["pretrain_flops"]
    lines = ["| arm | seeds | fine-tune FLOPs (% of pretraining) | steps | ce_true, mean (min–max) | joint ce_true at "
             "equal FLOPs | gap closed, mean (min–max) |", "|---|---|---|---|---|---|---|"]
    for name, runs in by_arm.items():
        if len(runs) < 2:
            continue
        for k, point in enumerate(runs[0]["curve"]):
            points = [r["curve"][k] for r in runs if len(r["curve"]) > k]
            ces = [c["ce_true"] for c in points]
            joint = _mean([_interp(j["curve"], pre + point["flops"] + _mean([start_flops(r) for r in runs])) for j in joints])
            closed = [gap_closed(no_ft, joint, c) for c in ces]
            closed = [c for c in closed if c is not None]
            lines.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | {100 * point['flops'] / pre:.0f}% | "
                         f"{point['step']} | {_f(_mean(ces))} ({_f(min(ces))}–{_f(max(ces))}) | {_f(joint)} | "
                         + (f"{100 * _mean(closed):.0f}% ({100 * min(closed):.0f}–{100 * max(closed):.0f}%)"
                            if closed else "–") + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("prepare", "bundle", "arm", "joint", "table"))
    p.add_argument("--root", type=Path, default=Path("runs/kaggle_mini"))
    p.add_argument("--checkpoint", type=Path, help="bundle: the pretrained checkpoint")
    p.add_argument("--run", type=Path, help="joint: the joint-training run folder")
    p.add_argument("--name", help="arm: its name (results/NAME_sSEED.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="arm: a run-config override (as TRM_OVERRIDES)")
    p.add_argument("--param", action="append", default=[], help="arm: a driver setting KEY=VALUE (TRM_KEY)")
    p.add_argument("--ft-fraction", type=float, default=0.25, help="arm: fine-tune FLOPs / pretraining FLOPs")
    p.add_argument("--no-finetune", action="store_true", help="arm: the predict-only path (new rows at the mean)")
    p.add_argument("--budget-s", type=float, default=7200.0, help="arm: the draft time budget (binds only with "
                   "--time-bounded)")
    p.add_argument("--time-bounded", action="store_true", help="arm: no FLOPs bound; the clock (--budget-s) and "
                   "train_fraction (--param) split the run, as in the notebook")
    p.add_argument("--keep-puzzle-rows", action="store_true", help=f"bundle: build ROOT/{ROWS_BUNDLE}, which keeps "
                   "every trained puzzle row (for new_rows=nearest: --param bundle=ROOT/" + ROWS_BUNDLE + ")")
    a = p.parse_args(argv)
    root = a.root.absolute()
    if a.command == "prepare":
        prepare(root)
    elif a.command == "bundle":
        bundle(root, a.checkpoint.absolute(), a.keep_puzzle_rows)
    elif a.command == "arm":
        params = dict(item.split("=", 1) for item in a.param)
        run_arm(root, a.name, a.seed, a.set, a.ft_fraction, a.no_finetune, a.budget_s, params, a.time_bounded)
    elif a.command == "joint":
        joint(root, a.run.absolute())
    else:
        print(tables(root))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
