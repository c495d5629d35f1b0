"""The prediction stage: `pipeline.run --stage predict` in a child with the fine-tuned checkpoint (else the
pretrained one made to fit the dataset), in whatever time is left but the submit reserve. Out of memory -> again
with half the batch. The child writes predictions.npz as soon as its prediction pass is done (re-scoring comes
after, and SIGTERM at the timeout keeps what it has); a child that dies before that leaves its candidates so far
(partial files, or the shards of the processes that finished), and the attempt that made the most is used."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from pipeline.kaggle_driver.budget import StagePlan, plan_predict
from pipeline.kaggle_driver.child import ChildResult
from pipeline.kaggle_driver.log import log, plural
from pipeline.kaggle_driver.pretrained import pretrained_for_dataset
from pipeline.kaggle_driver.retry import Attempt, halve, run_attempts
from pipeline.kaggle_driver.stages import attempt_record, run_stage_child, set_args
from pipeline.kaggle_driver.state import Outcome, RunState, StageResult


def collect_partial(run_dir: Path):
    """The candidates a failed prediction child left, joined: each process's partial file, or its finished
    shard (several processes: a rank that got through its share saved it whole); None if none. The files are
    removed (a later attempt starts clean)."""
    from pipeline.inference.predictions import Predictions, PredictionsError

    parts = []
    found = set(run_dir.glob("predictions*.partial.npz")) | set(run_dir.glob("predictions.rank*.npz"))
    for path in sorted(found):
        try:
            parts.append(Predictions.load(path))
        except PredictionsError as e:
            log(f"predict: ignoring {path}: {e}")
        path.unlink(missing_ok=True)
    return Predictions.concatenate(parts) if parts else None


def _checkpoint(st: RunState) -> tuple[str, Path]:
    """(which, path): the fine-tuned checkpoint if there is one, else the pretrained one for this dataset."""
    from pipeline.training.checkpoint import latest_checkpoint

    last = latest_checkpoint(st.run_dir / "checkpoints")
    if last is not None:
        return "fine-tuned", last
    why = st.status.get("finetune", {}).get("state", "not run")
    return f"pretrained (fine-tune {why})", pretrained_for_dataset(st.run_dir, st.cfg, st.checkpoint)


def predict(st: RunState) -> StageResult:
    if not st.dataset_ready:
        return StageResult.skipped("no dataset")
    s = st.settings
    plan = plan_predict(s)
    record = st.status["predict"] = {"planned_s": round(plan.window_s, 1), "attempts": []}
    if not plan.run:
        return StageResult.skipped(plan.reason)
    source, checkpoint = _checkpoint(st)
    record["checkpoint"], record["checkpoint_path"] = source, str(checkpoint)
    out = st.run_dir / "predictions.npz"
    out.unlink(missing_ok=True)
    collect_partial(st.run_dir)  # nothing stale
    best = None

    def launch(batch: int, attempt: StagePlan) -> ChildResult:
        pcfg = replace(st.cfg.predict, time_budget_s=attempt.work_s, batch_size=batch,
                       save_partial_every_s=s.partial_every_s)
        args = ["--stage", "predict", "--preset", "kaggle", "--checkpoint", str(checkpoint), *st.common_args(),
                *set_args(asdict(pcfg), "predict."),
                *set_args({"canvas_buckets": st.cfg.data.canvas_buckets}, "data.")]  # also without a fine-tune
        log(f"predict attempt ({source} checkpoint): {attempt.work_s:.0f} s, batch {batch}, "
            f"child timeout {attempt.timeout_s:.0f} s")
        return run_stage_child(st, "predict", args, attempt)

    def remember(a: Attempt) -> None:
        nonlocal best
        entry = attempt_record(a, "batch_size")
        record["attempts"].append(entry)
        if out.exists():
            return
        partial = collect_partial(st.run_dir)
        entry["partial_candidates"] = len(partial) if partial is not None else 0
        if partial is not None and len(partial) > (len(best) if best is not None else 0):
            best = partial

    attempts = run_attempts("predict", st.cfg.predict.batch_size, lambda b: f"batch {b}",
                            plan=lambda: plan_predict(s), launch=launch, smaller=halve,
                            max_retries=s.max_retries, done=lambda a: out.exists(), after=remember)
    record["retries"] = max(0, len(attempts) - 1)
    if out.exists():
        stopped = " (stopped at its timeout; the candidates so far)" if attempts[-1].result.timed_out else ""
        return StageResult.ok(f"candidates from the {source} checkpoint -> {out}{stopped}")
    if best is not None and len(best):
        best.save(out)
        record["partial_candidates"] = len(best)
        return StageResult(Outcome.PARTIAL, f"prediction failed ({plural(len(attempts), 'attempt')}); submitting "
                                            f"the {len(best)} candidates it made (from the {source} checkpoint) -> {out}")
    raise RuntimeError(f"prediction failed ({plural(len(attempts), 'attempt')}) and left no candidates; see "
                       f"{st.run_dir / 'predict.log'}")
