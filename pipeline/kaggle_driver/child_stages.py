"""The child stages: fine-tuning and prediction, each `pipeline.run` in a child process (torchrun over the GPUs when
there are several) inside its window of the time plan, and tried again on out of memory with less at once.

Fine-tuning is `--stage train --init PRETRAINED`; out of memory -> twice the micro-batches (the global batch stays),
continuing from the checkpoint the failed attempt left (the kaggle preset saves one every checkpoint_every_s, and
on SIGTERM at the timeout). Prediction is `--stage predict` with the fine-tuned checkpoint (else the pretrained one
made to fit the dataset), in whatever time is left but the submit reserve; out of memory -> half the batch. Its
child writes predictions.npz as soon as its prediction pass is done (re-scoring comes after, and SIGTERM at the
timeout keeps what it has); a child that dies before that leaves its candidates so far (partial files, or the
shards of the processes that finished), and the attempt that made the most is used.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from pipeline.kaggle_driver.budget import StagePlan, plan_finetune, plan_predict, plan_retry, window_end
from pipeline.kaggle_driver.child import ChildResult, launch_command, run_child
from pipeline.kaggle_driver.faults import CHILD_MODULE
from pipeline.kaggle_driver.log import log, plural
from pipeline.kaggle_driver.pretrained import pretrained_for_dataset, trained_canvas_buckets, trained_variants
from pipeline.kaggle_driver.state import Outcome, RunState, StageResult, set_args

# ------------------------------------------------------------------------------------- the out-of-memory retry loop
OOM_PATTERN = re.compile(r"out of memory|OutOfMemoryError|exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)", re.IGNORECASE)


def is_out_of_memory(result: ChildResult) -> bool:
    """Did the child die for memory? SIGKILL (the host's OOM killer: exit -9, 137 through a shell) or a CUDA
    out-of-memory error in its output (torchrun reports a worker's -9 as text). A child we stopped for time is not."""
    if result.timed_out:
        return False
    return result.returncode in (-9, 137) or bool(OOM_PATTERN.search(result.tail))


def next_grad_accum(global_batch: int, num_processes: int, accum: int) -> int | None:
    """The next number of micro-batches for an out-of-memory retry: the smallest >= 2 x accum that splits each
    process's share of the global batch evenly (a micro-batch at most half as big, the same global batch); None
    when the micro-batch is already one row."""
    local = global_batch // max(1, num_processes)
    for candidate in range(2 * accum, local + 1):
        if local % candidate == 0:
            return candidate
    return None


def halve(batch: int) -> int | None:
    """The next prediction batch for an out-of-memory retry; None at one row."""
    return batch // 2 if batch > 1 else None


@dataclass(frozen=True)
class Attempt:
    setting: int  # what the attempt ran with: grad_accum_steps (fine-tuning) or the batch size (prediction)
    plan: StagePlan
    result: ChildResult
    out_of_memory: bool


def run_attempts(name: str, first: int, describe: Callable[[int], str], *, plan: Callable[[], StagePlan],
                 launch: Callable[[int, StagePlan], ChildResult], smaller: Callable[[int], int | None],
                 max_retries: int, done: Callable[[Attempt], bool] = lambda a: a.result.ok,
                 after: Callable[[Attempt], None] = lambda a: None) -> list[Attempt]:
    """Attempts until one is `done`; after a failure for memory, again with `smaller(setting)` (`describe` says a
    setting in the log), while the plan leaves time (plan().run) and retries are left. `after` sees every attempt
    (to record it, to keep its partial output). Returns the attempts made."""
    attempts: list[Attempt] = []
    setting = first
    for number in range(1 + max_retries):
        stage_plan = plan()
        if not stage_plan.run:
            log(f"{name}: {stage_plan.reason}; no {'further ' if attempts else ''}attempt")
            break
        result = launch(setting, stage_plan)
        attempt = Attempt(setting, stage_plan, result, is_out_of_memory(result))
        attempts.append(attempt)
        after(attempt)
        if done(attempt) or not attempt.out_of_memory:
            break
        next_setting = smaller(setting)
        if next_setting is None or number == max_retries:
            log(f"{name}: out of memory at {describe(setting)}; "
                f"{'no retries left (max_retries)' if next_setting is not None else 'it cannot be made smaller'}")
            break
        log(f"{name}: out of memory at {describe(setting)} (exit code {result.returncode}); retrying with "
            f"{describe(next_setting)}")
        setting = next_setting
    return attempts


def run_stage_child(st: RunState, stage: str, args: list[str], attempt: StagePlan) -> ChildResult:
    """`pipeline.run ARGS` (through the testing hook's wrapper when faults are set) in a child, torchrun over the
    GPUs when there are several, inside `attempt`'s window; its output also goes to RUN/STAGE.log."""
    processes = st.devices.processes
    module = CHILD_MODULE if st.settings.faults else "pipeline.run"
    return run_child(launch_command(processes, args, module), attempt.timeout_s, cwd=st.run_dir, env=st.child_env(),
                     log_path=st.run_dir / f"{stage}.log", grace_s=attempt.grace_s, join_s=attempt.join_s,
                     name=stage, launcher=processes > 1)


def attempt_record(a: Attempt, setting: str) -> dict[str, Any]:
    """One attempt of a child stage, for kaggle_status.json."""
    return {"budget_s": round(a.plan.work_s, 1), setting: a.setting, "returncode": a.result.returncode,
            "timed_out": a.result.timed_out, "out_of_memory": a.out_of_memory, "seconds": round(a.result.seconds, 1)}


def open_stage(st: RunState, stage: str, planner: Callable[[Any], StagePlan]) -> tuple[StagePlan, dict[str, Any]]:
    """A child stage's window (`planner`, pipeline.kaggle_driver.budget) and its kaggle_status.json record; a plan
    that does not run says why (no dataset: no record either, or the window is too short)."""
    if not st.dataset_ready:
        return StagePlan(False, 0.0, 0.0, 0.0, 0.0, "no dataset"), {}
    plan = planner(st.settings)
    record = st.status[stage] = {"planned_s": round(plan.window_s, 1), "attempts": []}
    return plan, record


# ------------------------------------------------------------------------------------------------- fine-tuning
def finetune(st: RunState) -> StageResult:
    from pipeline.training.checkpoint import checkpoint_step, latest_checkpoint

    plan, record = open_stage(st, "finetune", plan_finetune)
    if not plan.run:
        return StageResult.skipped(plan.reason)
    s = st.settings
    stage_end = window_end(plan)
    global_batch, processes = st.cfg.global_batch_size, st.devices.processes
    local = global_batch // processes
    ckpt_dir = st.run_dir / "checkpoints"

    def describe(accum: int) -> str:
        return f"grad_accum_steps {accum} (micro-batch {local // accum}, global batch {global_batch} kept)"

    def launch(accum: int, attempt: StagePlan) -> ChildResult:
        cfg = replace(st.cfg, time_budget_s=attempt.work_s, grad_accum_steps=accum)
        resume = latest_checkpoint(ckpt_dir) is not None  # a failed attempt's checkpoint is progress
        args = ["--stage", "train", "--preset", "kaggle", *st.common_args(),
                *(["--resume"] if resume else ["--init", str(st.checkpoint)]), *set_args(asdict(cfg))]
        log(f"finetune attempt: {attempt.work_s:.0f} s of training, {describe(accum)}, "
            f"{'resuming' if resume else 'from the pretrained checkpoint'}; child timeout {attempt.timeout_s:.0f} s")
        return run_stage_child(st, "finetune", args, attempt)

    def remember(a: Attempt) -> None:
        record["attempts"].append({**attempt_record(a, "grad_accum_steps"), "micro_batch": local // a.setting})

    # the first attempt takes the window just planned: planned again a moment later, a window of exactly
    # min_train_s (train_fraction's share below a stage's cost + min_train_s) would no longer hold it
    unused = [plan]
    attempts = run_attempts("finetune", st.cfg.grad_accum_steps, describe,
                            plan=lambda: unused.pop() if unused else plan_retry(s, stage_end, s.min_train_s),
                            launch=launch,
                            smaller=lambda accum: next_grad_accum(global_batch, processes, accum),
                            max_retries=s.max_retries, after=remember)
    last = latest_checkpoint(ckpt_dir)
    result = attempts[-1].result if attempts else None
    retries = max(0, len(attempts) - 1)
    record.update(step=checkpoint_step(last) if last is not None else 0,
                  grad_accum_steps=attempts[-1].setting if attempts else st.cfg.grad_accum_steps, retries=retries,
                  returncode=result.returncode if result else None, timed_out=result.timed_out if result else False)
    if last is None:
        raise RuntimeError(f"fine-tuning failed for good ({plural(len(attempts), 'attempt')}, last exit code "
                           f"{record['returncode']}); prediction uses the pretrained checkpoint; see "
                           f"{st.run_dir / 'finetune.log'}")
    if result is not None and result.timed_out:
        note = " (stopped at its timeout; its checkpoint on SIGTERM)"
    elif result is not None and not result.ok:
        note = f" (last exit code {result.returncode}; using the last checkpoint)"
    else:
        note = ""
    again = f" after {plural(retries, 'out-of-memory retry')} (grad_accum_steps {record['grad_accum_steps']})" \
        if retries else ""
    return StageResult.ok(f"{record['step']} steps{again} -> {last}{note}")


# -------------------------------------------------------------------------------------------------- prediction
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


def _checkpoint(st: RunState) -> tuple[str, Path, str]:
    """(which, path, canvas buckets to predict on): the fine-tuned checkpoint if there is one, on the run's buckets;
    else the pretrained one for this dataset, on the canvas mode it was trained in (not the run's buckets, which
    the fine-tune would have taken)."""
    from pipeline.training.checkpoint import latest_checkpoint

    last = latest_checkpoint(st.run_dir / "checkpoints")
    if last is not None:
        return "fine-tuned", last, st.cfg.data.canvas_buckets
    why = st.status.get("finetune", {}).get("state", "not run")
    buckets = trained_canvas_buckets(st.checkpoint)  # read once: the checkpoint can be large
    return f"pretrained (fine-tune {why})", pretrained_for_dataset(st.run_dir, st.cfg, st.checkpoint, buckets), buckets


def predict(st: RunState) -> StageResult:
    from pipeline.training.compute import capped_views

    plan, record = open_stage(st, "predict", plan_predict)
    if not plan.run:
        return StageResult.skipped(plan.reason)
    s = st.settings
    source, checkpoint, buckets = _checkpoint(st)
    record["checkpoint"], record["checkpoint_path"], record["canvas_buckets"] = source, str(checkpoint), buckets
    # a planned fine-tune trained each puzzle's first K variants: the others' rows are untrained, so K views at most
    views = record["max_variants"] = capped_views(st.cfg.predict.max_variants, trained_variants(checkpoint))
    out = st.run_dir / "predictions.npz"
    out.unlink(missing_ok=True)
    collect_partial(st.run_dir)  # nothing stale
    best = None

    def launch(batch: int, attempt: StagePlan) -> ChildResult:
        pcfg = replace(st.cfg.predict, time_budget_s=attempt.work_s, batch_size=batch,
                       save_partial_every_s=s.partial_every_s, max_variants=views)
        args = ["--stage", "predict", "--preset", "kaggle", "--checkpoint", str(checkpoint), *st.common_args(),
                *set_args(asdict(pcfg), "predict."),
                *set_args({"canvas_buckets": buckets}, "data.")]
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
