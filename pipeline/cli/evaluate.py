"""Evaluation during training: predict the held-out test inputs whose answers are known, vote, score.

The paper reports held-out accuracy as training goes (the reference evaluates every 10,000 epochs); this is the
same chain as stages predict → submit → score, run in memory on the model being trained, with fewer views by
default (`eval_views`). It lives here, downstream of training, and reaches the trainer as a callable, so that
pipeline.training.train never imports prediction or scoring. With several processes each predicts an interleaved share of
the rows (as stage predict does) and rank 0 votes and scores.

Every figure is in the run's own mode: on the canvas buckets the run predicts on (the row engine), never on a
canvas prediction does not use. Besides pass@k, it reports the model's per-cell cross-entropy and accuracy of the *true* answers under the same
views (`ce_true`, `cell_acc_true`: pipeline.inference.rescore.truth_scores): pass@2 on a small held-out split moves by whole
test outputs (2 points each on mini's 49), the likelihood of the truth moves with every step of learning.
"""
from __future__ import annotations

from typing import Any

from augment.dataset import AugmentedDataset
from pipeline.training.collectives import gather_objects
from pipeline.config import PredictConfig
from pipeline.core.errors import ConfigError
from pipeline.inference.predict import predict
from pipeline.inference.predictions import Predictions
from pipeline.inference.rescore import merge_truth_scores, truth_scores
from pipeline.core.signals import stop_requested
from pipeline.inference.vote import SELECTORS
from pipeline.model.rows import RowEngine
from submissions.score import score_submission
from submissions.write import build_submission


class HeldOutEvaluator:
    """pass@1 / pass@2 (over test outputs and per task) and the oracle on the dataset's held-out tasks."""

    def __init__(self, dataset: AugmentedDataset, views: int, batch_size: int = 256, selector: str = "vote",
                 engine: RowEngine | None = None):
        if selector not in SELECTORS:
            raise ConfigError(f"predict.selector: unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
        self.dataset = dataset
        self.tasks = [t for t in dataset.eval_tasks() if t.test_outputs is not None]
        self.solutions = {t.id: t.test_outputs for t in self.tasks}
        self.cfg = PredictConfig(max_variants=views, batch_size=batch_size, selector=selector)
        self.engine = engine  # the rows' canvas or buckets, as the run predicts (None: the whole canvas)

    @classmethod
    def for_dataset(cls, dataset: AugmentedDataset, views: int, batch_size: int = 256,
                    selector: str = "vote", engine: RowEngine | None = None) -> "HeldOutEvaluator | None":
        """An evaluator, or None when no held-out task has known answers (e.g. Kaggle's hidden tasks)."""
        evaluator = cls(dataset, views, batch_size, selector, engine)
        return evaluator if evaluator.tasks else None

    def __call__(self, model: Any, rt: Any) -> dict[str, Any] | None:
        """The figures (on rank 0; None elsewhere). A stop request (pipeline.core.signals) ends the evaluation at the
        next batch of any process: then None everywhere, and the trainer saves and stops."""
        stats: dict[str, int] = {}
        part = predict(model, self.dataset, self.cfg, device=rt.device, autocast=rt.accelerator.autocast,
                       rank=rt.rank, world=rt.world, progress=False, engine=self.engine, stats=stats,
                       stop=stop_requested)
        truth = {} if stop_requested() is not None else truth_scores(
            model, self.dataset, self.cfg.max_variants, batch_size=self.cfg.batch_size, device=rt.device,
            autocast=rt.accelerator.autocast, rank=rt.rank, world=rt.world, engine=self.engine, stop=stop_requested)
        parts = gather_objects((part, truth, stats.get("rerun_inputs", 0), stop_requested() is not None), rt.world)
        if not rt.is_main or any(stopped for *_, stopped in parts):
            return None
        predictions = Predictions.concatenate([p for p, *_ in parts]) if len(parts) > 1 else parts[0][0]
        return {**self.score(predictions), **(merge_truth_scores([t for _, t, _, _ in parts]) or {}),
                "rerun_inputs": sum(r for _, _, r, _ in parts)}

    def score(self, predictions: Predictions) -> dict[str, Any]:
        selector = SELECTORS[self.cfg.selector]
        submission, _ = build_submission(self.tasks, selector(predictions, top_k=2))
        report = score_submission(submission, self.solutions, predictions, selector=selector)
        return {
            "pass1": report.pass1_score,
            "pass2": report.kaggle_score,
            "task_pass1": report.pass1_task_score,
            "task_pass2": report.task_score,
            "oracle": report.oracle_score,
            "tasks_solved": report.tasks_solved,
            "tasks": report.num_tasks,
            "test_outputs": report.num_test_outputs,
            "views": self.cfg.max_variants,
        }
