"""The Kaggle ARC Prize entry: fine-tune a pretrained TRM-Att on the hidden test tasks and submit, inside a time
limit, offline, never leaving the notebook without a valid submission, and using the time it has when something
fails on the day. (A package named `kaggle` would shadow Kaggle's own module, hence `kaggle_driver`.)

The notebook `kaggle/trm_arc_kaggle.ipynb` writes the fallback submission itself (standard library only, before
the bundle is looked up or installed), then drives `KaggleRun`, whose stages run in this order:

  fallback   the same fallback from the raw challenges JSON, validated (each test input answered with itself, or
             [[0]] where even the input is not a valid grid);
  plan       the run kind (scored rerun or draft), the devices and the time plan, printed first: fine-tune +
             predict, predict only (with the pretrained checkpoint), or the fallback only;
  augment    the augmented dataset of the test tasks (their train pairs are the training data, their test inputs
             are held out), through `pipeline.run --stage augment`, in this process;
  finetune   `pipeline.run --stage train --init CHECKPOINT` in a child process (torchrun over the GPUs when there
             are several), inside its window of the time plan; out of memory -> again with half the micro-batch;
  predict    `pipeline.run --stage predict` in a child process with the fine-tuned checkpoint, else the pretrained
             one; out of memory -> again with half the batch; a child that dies part-way leaves its candidates;
  submit     vote, then merge: the tasks the model answered + the fallback entry of every other task, validated
             against the raw challenge ids and test counts before the atomic replace of submission.json; every
             test input counted by what it got (two model candidates / one model candidate + fallback /
             fallback only);
  score      drafts with known answers only: pass@2, and ce_true of the weights prediction used.

The rooms: settings (what this run is: absolute paths, devices checked) · budget (the time plan, the only time
arithmetic) · fallback (the always-valid submission) · child (a stage in a child process, the whole process tree
stopped at its timeout or on an interrupt) · faults (the testing hook TRM_FAULTS) · pretrained (the checkpoint to
start from) · stages (the in-process stages: fallback, augment, submit, score with ce_true, each within its window)
· child_stages (fine-tuning and prediction, with their out-of-memory retry loop) · state (what the stages share,
and StageResult) · log (the driver's lines) · driver (KaggleRun).
"""
from pipeline.kaggle_driver.budget import (READER_JOIN_S, PlanMode, StagePlan, TimePlan, deadline, plan_finetune,
                                           plan_predict, plan_retry, plan_time, plan_window, remaining_s, stage_cost,
                                           window_end)
from pipeline.kaggle_driver.child import ChildResult, launch_command, run_child
from pipeline.kaggle_driver.driver import KaggleRun
from pipeline.kaggle_driver.fallback import (expected_tasks, fallback_from_raw, merge_submission,
                                             read_raw_challenges, write_validated)
from pipeline.kaggle_driver.pretrained import checkpoint_model_config, sha256_of
from pipeline.kaggle_driver.settings import (BUNDLE_KIND, ENV, Devices, KaggleSettings, detect_scored_run,
                                             find_bundle, resolve_devices, settings_from_env)
from pipeline.kaggle_driver.state import Outcome, StageResult

__all__ = [
    "BUNDLE_KIND", "ENV", "READER_JOIN_S", "ChildResult", "Devices", "KaggleRun", "KaggleSettings", "Outcome",
    "PlanMode", "StagePlan", "StageResult", "TimePlan", "checkpoint_model_config", "deadline", "detect_scored_run",
    "expected_tasks", "fallback_from_raw", "find_bundle", "launch_command", "merge_submission", "plan_finetune",
    "plan_predict", "plan_retry", "plan_time", "plan_window", "read_raw_challenges", "remaining_s", "resolve_devices", "run_child",
    "settings_from_env", "sha256_of", "stage_cost", "window_end", "write_validated",
]
