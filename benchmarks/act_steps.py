"""ACT steps at prediction, from one run's weights: dev accuracy against prediction cost, without retraining.

For every view of every held-out test input the model runs `max(STEPS)` ACT steps once (past halt_max_steps the
recursion continues, as `predict.act_steps` does), and the candidates after 1, 2, 4, 8, 16 steps are voted and
scored as stage predict would have made them with `--set predict.act_steps=K`; the per-cell cross-entropy of the
true answer (`ce_true`) is taken at the same steps. Halting as `predict.early_stop` does it (a row's answer is the
one of its first step with q_halt > 0; within halt_max_steps, and within 16) is scored from the same pass, with
the mean number of steps a row needed: the cost when halted rows leave the batch (a batch that waits for its
slowest row costs more).

    python benchmarks/act_steps.py runs/quality/mini_s0        # prints the table (quality.py collects it too)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from augment.dataset import AugmentedDataset  # noqa: E402
from pipeline.data.encoding import IGNORE_LABEL, decode_grids  # noqa: E402
from pipeline.model.trm import TRM  # noqa: E402
from pipeline.training.loss import log_stablemax  # noqa: E402
from pipeline.inference.predict import eval_task_ids  # noqa: E402
from pipeline.inference.predictions import Predictions, PredictionsWriter  # noqa: E402
from pipeline.inference.vote import vote  # noqa: E402
from submissions.score import score_submission  # noqa: E402
from submissions.write import build_submission  # noqa: E402

STEPS = (1, 2, 4, 8, 16)


@torch.inference_mode()
def step_outputs(model: TRM, dataset: AugmentedDataset, steps: int, batch_size: int = 256) -> dict[str, np.ndarray]:
    """For every held-out row (dataset.test_rows order): preds int64 (n, steps, L) and q_halt logits (n, steps)
    after each ACT step, and the true answer's per-cell cross-entropy and accuracy (n, steps; NaN if unknown)."""
    model.eval()
    rows = dataset.test_rows()
    n, L = len(rows["variant"]), dataset.canvas**2
    preds = np.zeros((n, steps, L), np.int64)
    q = np.zeros((n, steps), np.float32)
    ce = np.full((n, steps), np.nan)
    acc = np.full((n, steps), np.nan)
    answers = [dataset.puzzles[int(p)]["test_outputs"] for p in rows["puzzle_index"]]
    answer = np.array([-1 if a is None else int(a[int(t)]) for a, t in zip(answers, rows["test_index"])], np.int64)
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        inputs = dataset.encode_grids(rows["grid"][sl], rows["variant"][sl])
        batch = {"inputs": torch.from_numpy(inputs),
                 "labels": torch.full(inputs.shape, IGNORE_LABEL, dtype=torch.int32),
                 "puzzle_identifiers": torch.from_numpy((rows["variant"][sl] + 1).astype(np.int32))}
        known = answer[sl] >= 0
        labels = torch.from_numpy(dataset.encode_grids(np.where(known, answer[sl], 0), rows["variant"][sl], labels=True))
        mask = labels != IGNORE_LABEL
        cells = mask.sum(-1).clamp_min(1)
        carry = model.initial_carry(batch)
        for k in range(steps):
            carry, outputs = model(carry, batch)
            carry.halted = torch.zeros_like(carry.halted)  # as predict.act_steps: continue past halt_max_steps
            preds[sl, k] = outputs["preds"].numpy()
            q[sl, k] = outputs["q_halt_logits"].float().numpy()
            logp = log_stablemax(outputs["logits"].float())
            picked = logp.gather(-1, torch.where(mask, labels, 0).long()[..., None])[..., 0]
            row_ce = (-torch.where(mask, picked, 0).sum(-1) / cells).double().numpy()
            row_acc = ((mask & (outputs["preds"] == labels)).sum(-1) / cells).double().numpy()
            ce[sl, k] = np.where(known, row_ce, np.nan)
            acc[sl, k] = np.where(known, row_acc, np.nan)
    return {"preds": preds, "q": q, "ce": ce, "acc": acc, **rows}


def halting_steps(q: np.ndarray, cap: int) -> np.ndarray:
    """int (n,): each row's answer step under `predict.early_stop` within `cap` steps (1-based): its first step
    with q_halt > 0, else the last."""
    halts = q[:, :cap] > 0
    return np.where(halts.any(axis=1), halts.argmax(axis=1) + 1, cap)


def candidates(dataset: AugmentedDataset, out: dict[str, np.ndarray], step_of_row: np.ndarray) -> Predictions:
    """The Predictions stage predict makes when row i answers with its step `step_of_row[i]` (1-based)."""
    n = len(step_of_row)
    preds = out["preds"][np.arange(n), step_of_row - 1]
    q = 1 / (1 + np.exp(-out["q"][np.arange(n), step_of_row - 1]))
    grids = decode_grids(preds, dataset.canvas)
    answers = [None if g is None else dataset.augmentation(int(v)).invert(g) for g, v in zip(grids, out["variant"])]
    writer = PredictionsWriter(eval_task_ids(dataset))
    writer.add([dataset.puzzles[int(p)]["task_id"] for p in out["puzzle_index"]], out["test_index"], out["variant"],
               q, answers)
    return writer.finish()


def act_study(model: TRM, dataset: AugmentedDataset, steps: tuple[int, ...] = STEPS) -> list[dict]:
    """One row per way of predicting: ACT steps K (or halting), dev pass@2 per task and over outputs, the oracle,
    ce_true / cell_acc_true (mean over test outputs of the mean over views), mean steps per row."""
    out = step_outputs(model, dataset, max(steps))
    tasks = [t for t in dataset.eval_tasks() if t.test_outputs is not None]
    solutions = {t.id: t.test_outputs for t in tasks}
    key = out["puzzle_index"] * 1_000_000 + out["test_index"]  # one per held-out test input
    n = len(key)

    def row(name: str, step_of_row: np.ndarray) -> dict:
        predictions = candidates(dataset, out, step_of_row)
        submission, _ = build_submission(tasks, vote(predictions, top_k=2))
        report = score_submission(submission, solutions, predictions)
        ce = out["ce"][np.arange(n), step_of_row - 1]
        acc = out["acc"][np.arange(n), step_of_row - 1]
        per_output = [(np.nanmean(ce[key == k]), np.nanmean(acc[key == k])) for k in np.unique(key)
                      if not np.isnan(ce[key == k]).all()]
        return {"name": name, "mean_steps": float(step_of_row.mean()), "max_steps": int(step_of_row.max()),
                "pass2_task": report.task_score, "pass2": report.kaggle_score, "oracle_task": report.oracle_task_score,
                "ce_true": float(np.mean([c for c, _ in per_output])) if per_output else None,
                "cell_acc_true": float(np.mean([a for _, a in per_output])) if per_output else None}

    table = [row(f"{k} steps", np.full(n, k)) for k in steps]
    trained = model.config.halt_max_steps
    table.append(row(f"halt (≤ {trained})", halting_steps(out["q"], trained)))
    if max(steps) > trained:
        table.append(row(f"halt (≤ {max(steps)})", halting_steps(out["q"], max(steps))))
    return table


def main() -> None:
    from pipeline.model.loading import load_model_for_inference
    from pipeline.training.checkpoint import latest_checkpoint

    folder = Path(sys.argv[1])
    model = load_model_for_inference(latest_checkpoint(folder / "checkpoints"))
    for r in act_study(model, AugmentedDataset.load(folder / "dataset")):
        print(f"{r['name']:>14}: pass@2 per task {100 * r['pass2_task']:5.1f}%  ce_true {r['ce_true']:.4f}  "
              f"mean steps {r['mean_steps']:.2f}")


if __name__ == "__main__":
    main()
