"""The fine-tuning stage: `pipeline.run --stage train --init PRETRAINED` in a child (torchrun over the GPUs when
there are several), inside its window of the time plan. Out of memory -> again with twice the micro-batches (the
global batch stays), continuing from the checkpoint the failed attempt left (the kaggle preset saves one every
checkpoint_every_s, and on SIGTERM at the timeout)."""
from __future__ import annotations

from dataclasses import asdict, replace

from pipeline.kaggle_driver.budget import StagePlan, plan_finetune, plan_retry, window_end
from pipeline.kaggle_driver.child import ChildResult
from pipeline.kaggle_driver.log import log, plural
from pipeline.kaggle_driver.retry import Attempt, next_grad_accum, run_attempts
from pipeline.kaggle_driver.stages import attempt_record, run_stage_child, set_args
from pipeline.kaggle_driver.state import RunState, StageResult


def finetune(st: RunState) -> StageResult:
    from pipeline.training.checkpoint import checkpoint_step, latest_checkpoint

    if not st.dataset_ready:
        return StageResult.skipped("no dataset")
    s = st.settings
    plan = plan_finetune(s)
    record = st.status["finetune"] = {"planned_s": round(plan.window_s, 1), "attempts": []}
    if not plan.run:
        return StageResult.skipped(plan.reason)
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

    attempts = run_attempts("finetune", st.cfg.grad_accum_steps, describe,
                            plan=lambda: plan_retry(s, stage_end, s.min_train_s), launch=launch,
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
