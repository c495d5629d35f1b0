"""Draft runs with known answers only (settings.solutions): how likely the weights prediction used make the true
answers, `ce_true` (per-cell cross-entropy of each test output's answer under its first views, the model's last ACT
step; mean over views, then over test outputs) and `cell_acc_true`, as evaluation during training computes them
(pipeline.inference.rescore.truth_scores). pass@2 moves by whole test outputs; this moves with every step of a fine-tune.

The run's dataset holds no answers (hidden tasks), so the same tasks are built again with them: the same order,
seed and augmentations give the same variants (they are drawn from the demonstrations and test inputs only), which
is checked, so every answer is scored under the puzzle row the run trained for it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

TRUTH_VIEWS = 8  # views per test output (mini's evaluations use 8)


def answered_dataset(run_dataset: Path, solutions: Mapping[str, Sequence[Any]]):
    """The dataset at `run_dataset` rebuilt with the answers of its held-out tasks that `solutions` has (tasks
    without them keep none and are not scored); an error if the variants came out different."""
    import numpy as np

    from augment.dataset import AugmentedDataset, build_dataset

    run = AugmentedDataset.load(run_dataset)
    manifest = json.loads((Path(run_dataset) / "manifest.json").read_text())
    tasks = []
    for task in run.eval_tasks():
        answers = solutions.get(task.id)
        if answers is not None and len(answers) == len(task.test_inputs):
            task.test_outputs = [np.asarray(g, np.uint8) for g in answers]
        tasks.append(task)
    answered = build_dataset(tasks, {t.id for t in tasks}, num_aug=manifest["num_aug"], seed=manifest["seed"],
                             canvas=run.canvas, progress=False)
    for name in ("variant_puzzle", "variant_dihedral", "variant_colours"):
        if not np.array_equal(getattr(answered, name), getattr(run, name)):
            raise RuntimeError(f"rebuilding {run_dataset} with the answers gave other variants ({name})")
    return answered


def truth_figures(checkpoint: Path, dataset: Any, views: int = TRUTH_VIEWS, canvas_buckets: str = "") -> dict[str, float]:
    """{"ce_true", "cell_acc_true"} of the weights prediction loads from `checkpoint` (EMA when saved), on the canvas
    buckets prediction ran on (`data.canvas_buckets`; "" = the whole canvas); {} when no answer is known."""
    import torch

    from pipeline.inference.rescore import merge_truth_scores, truth_scores
    from pipeline.model.rows import RowEngine
    from pipeline.model.loading import load_model_for_inference

    model = load_model_for_inference(checkpoint, use_ema=True, num_puzzle_identifiers=dataset.num_puzzle_identifiers)
    model.eval()
    engine = RowEngine.build(canvas_buckets, dataset.canvas, model.config)
    with torch.no_grad():
        return merge_truth_scores([truth_scores(model, dataset, views, engine=engine)]) or {}
