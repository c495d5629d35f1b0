"""KaggleRun: the notebook's state, one method per stage, each safe to call whatever happened before it; every
stage catches its own exceptions and logs one line (planned seconds, used seconds, outcome), and the run ends
with a table of the phases, the path taken and a last check of submission.json."""
from __future__ import annotations

import sys
import time
import traceback
from typing import Any, Callable

from pipeline.core.io import atomic_write_json
from pipeline.kaggle_driver import child_stages, stages
from pipeline.kaggle_driver.budget import PlanMode, TimePlan, deadline, plan_time, remaining_s
from pipeline.kaggle_driver.fallback import submission_problems
from pipeline.kaggle_driver.log import log, plural, start_log_file
from pipeline.kaggle_driver.settings import KaggleSettings, probe_devices, resolve_devices
from pipeline.kaggle_driver.state import Outcome, RunState, StageResult
from submissions.write import describe_answers


class KaggleRun:
    def __init__(self, settings: KaggleSettings):
        self.s = settings
        start_log_file(settings.working / "trm_kaggle.log")
        devices = settings.devices or resolve_devices(settings.num_gpus, *probe_devices())
        self.state = RunState(settings, devices)

    @property
    def status(self) -> dict[str, dict[str, Any]]:
        return self.state.status

    @property
    def status_path(self):
        return self.s.run_dir / "kaggle_status.json"

    def _stage(self, name: str, body: Callable[[RunState], StageResult]) -> bool:
        """Run one stage; an exception is logged with its traceback and the stage marked failed. Ends with the
        phase line: planned seconds (what the body put in status[name]["planned_s"]), used seconds, outcome."""
        log(f"{name}: start ({remaining_s(self.s):.0f} s of the budget left)")
        start = time.time()
        try:
            result = body(self.state)
        except Exception as e:  # noqa: BLE001 - every failure must leave the best submission in place
            traceback.print_exc(file=sys.stdout)
            result = StageResult(Outcome.FAILED, f"{type(e).__name__}: {e}")
        used = time.time() - start
        record = self.status[name] = {**self.status.get(name, {}), "state": result.outcome.value,
                                      "detail": result.detail, "seconds": round(used, 2)}
        planned = record.get("planned_s")
        log(f"PHASE {name}: planned {'-' if planned is None else f'{planned:.0f} s'}, used {used:.0f} s, "
            f"outcome {result.outcome.value}: {result.detail}")
        self._save_status()
        return result.outcome.usable

    def _save_status(self) -> None:
        try:
            stages.claim_run_dir(self.state)
            atomic_write_json(self.status_path, {
                "started_at": self.s.started_at, "deadline": deadline(self.s), "written_at": time.time(),
                "time_budget_s": self.s.time_budget_s, "scored": self.s.scored, "run_kind": self.s.run_kind,
                "num_processes": self.state.devices.processes, "devices": self.state.devices.describe(),
                "stages": self.status,
            })
        except (OSError, RuntimeError) as e:
            log(f"cannot write {self.status_path}: {e}")

    # --- stages
    def write_fallback(self) -> bool:
        return self._stage("fallback", stages.write_fallback)

    def plan(self) -> TimePlan:
        """Say at the top of the log what kind of run this is, on which devices, and what the time allows (and,
        if it allows nothing, why and which setting to change)."""
        p = plan_time(self.s)
        budget_name = "time_budget_s" if self.s.scored else "draft_time_budget_s"
        log(f"run kind: {self.s.run_kind}; budget {self.s.time_budget_s:.0f} s ({budget_name}), "
            f"{remaining_s(self.s):.0f} s of it left; devices: {self.state.devices.describe()}")
        if p.mode == PlanMode.FALLBACK_ONLY:
            log(f"TIME PLAN: FALLBACK ONLY (every test input answered with itself) - {p.reason}; raise {budget_name} "
                f"or lower stage_overhead_s / kill_grace_s / submit_reserve_s / min_predict_s")
        elif p.mode == PlanMode.PREDICT_ONLY:
            log(f"TIME PLAN: predict only, with the pretrained checkpoint, about {p.predict_s:.0f} s (as many views "
                f"as fit), no fine-tuning - {p.reason}")
        else:
            log(f"TIME PLAN: fine-tune about {p.finetune_s:.0f} s, then predict about {p.predict_s:.0f} s, "
                f"submit reserve {self.s.submit_reserve_s:.0f} s")
        self.status["plan"] = {"mode": p.mode.value, "finetune_s": round(p.finetune_s, 1),
                               "predict_s": round(p.predict_s, 1), "reason": p.reason, "scored": self.s.scored,
                               "run_kind": self.s.run_kind, "time_budget_s": self.s.time_budget_s}
        self._save_status()
        return p

    def augment(self) -> bool:
        return self._stage("augment", stages.augment)

    def finetune(self) -> bool:
        return self._stage("finetune", child_stages.finetune)

    def predict(self) -> bool:
        return self._stage("predict", child_stages.predict)

    def submit(self) -> bool:
        return self._stage("submit", stages.submit)

    def score(self) -> bool:
        """Editing runs only, when settings.solutions is set."""
        return self.s.solutions is not None and self._stage("score", stages.score)

    def run_all(self) -> dict[str, Any]:
        self.write_fallback()
        self.plan()
        self.augment()
        self.finetune()
        self.predict()
        self.submit()
        self.score()
        return self.summary()

    # --- the end
    def path_taken(self) -> str:
        """One line: which way the run went (for the log's last lines and kaggle_status.json)."""
        st = self.status
        state = {name: st.get(name, {}).get("state", "not run") for name in ("augment", "finetune", "predict", "submit")}
        if state["submit"] != Outcome.OK.value:
            broken = [f"{name} {state[name]}" for name in ("augment", "predict", "submit")
                      if state[name] not in (Outcome.OK.value, Outcome.PARTIAL.value)]
            return f"fallback submission only ({', '.join(broken)}; time plan {st.get('plan', {}).get('mode', '?')})"
        ft = st.get("finetune", {})
        if state["finetune"] == Outcome.OK.value:
            retries = ft.get("retries", 0)
            tune = f"fine-tuned {ft.get('step', 0)} steps" + (
                f" after {plural(retries, 'out-of-memory retry')} (grad_accum_steps {ft.get('grad_accum_steps')})"
                if retries else "")
        elif state["finetune"] == Outcome.SKIPPED.value:
            tune = "no fine-tuning (time plan: predict only)"
        else:
            tune = f"fine-tuning {state['finetune']}"
        pr = st.get("predict", {})
        pred = f"predicted with the {pr.get('checkpoint', '?')} checkpoint" + (
            f", PARTIAL ({pr.get('partial_candidates', 0)} candidates)" if state["predict"] == "partial" else "") + (
            f" after {plural(pr.get('retries', 0), 'out-of-memory retry')}" if pr.get("retries") else "")
        sub = st.get("submit", {})
        inputs = sub.get("test_inputs", {})
        return f"{tune} -> {pred} -> {sum(inputs.values())} test inputs: {describe_answers(inputs)}"

    def summary(self) -> dict[str, Any]:
        """The phase table, the path taken, and a last check of the submission file on disk."""
        problems = submission_problems(self.s.submission, self.state.fallback)
        elapsed = time.time() - self.s.started_at
        log("phase      outcome   planned s   used s  detail")
        for name, st in self.status.items():
            if "state" not in st:
                continue
            planned = st.get("planned_s")
            log(f"  {name:9s} {st['state']:8s} {'-' if planned is None else f'{planned:.0f}':>9s} "
                f"{st.get('seconds', 0):8.1f}  {st.get('detail', '')}")
        path = self.path_taken()
        log(f"PATH: {path}")
        log(f"{elapsed:.0f} s of the {self.s.time_budget_s:.0f} s budget used; submission "
            f"{'valid and complete' if not problems else 'INVALID: ' + '; '.join(problems[:3])}")
        self.status["summary"] = {"elapsed_s": round(elapsed, 2), "submission_problems": problems[:20], "path": path}
        self._save_status()
        return {"elapsed_s": elapsed, "stages": self.status, "submission": str(self.s.submission),
                "problems": problems, "path": path}
