"""Write a fake Kaggle input tree for rehearsing the notebook outside Kaggle (kaggle/README.md, "CPU rehearsal").

  INPUT/arc-prize-2025/arc-agi_test_challenges.json        the tasks' train pairs and test inputs (no outputs)
  INPUT/arc-prize-2025/arc-agi_evaluation_challenges.json  the same tasks (as while editing on Kaggle, where the
                                                            test file is a placeholder holding public tasks)
  INPUT/arc-prize-2025/arc-agi_evaluation_solutions.json   their test outputs, to score the rehearsal against

Because the test tasks are all among the evaluation tasks beside them, the notebook treats the run as a draft
(pipeline.kaggle_driver.detect_scored_run), as it would while editing on Kaggle.

Usage:
  python kaggle/fake_input.py --out /tmp/rehearsal/input                          (the 120 ARC-AGI-2 evaluation tasks)
  python kaggle/fake_input.py --tasks arc-agi-1/evaluation --max-tasks 20 --out ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMPETITION = "arc-prize-2025"


def _pairs(grids_in, grids_out=None) -> list[dict]:
    if grids_out is None:
        return [{"input": g.tolist()} for g in grids_in]
    return [{"input": i.tolist(), "output": o.tolist()} for i, o in zip(grids_in, grids_out)]


def write_fake_input(out: Path, tasks_spec: str = "arc-agi-2/evaluation", max_tasks: int = 0) -> Path:
    """Write the competition folder under `out`; return the test challenges file."""
    from pipeline.data.tasks import load_tasks

    tasks = load_tasks(tasks_spec).tasks
    if max_tasks > 0:
        tasks = tasks[:max_tasks]
    missing = [t.id for t in tasks if t.test_outputs is None]
    if missing:
        raise ValueError(f"{tasks_spec}: no known test outputs for {len(missing)} task(s) (e.g. {missing[0]}); "
                         f"the rehearsal needs them to score")
    challenges = {t.id: {"train": _pairs([i for i, _ in t.train], [o for _, o in t.train]),
                         "test": _pairs(t.test_inputs)} for t in tasks}
    solutions = {t.id: [g.tolist() for g in t.test_outputs] for t in tasks}
    folder = Path(out) / COMPETITION
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("arc-agi_test_challenges.json", challenges),
                          ("arc-agi_evaluation_challenges.json", challenges),
                          ("arc-agi_evaluation_solutions.json", solutions)):
        (folder / name).write_text(json.dumps(content))
    print(f"{len(tasks)} tasks ({sum(len(t.test_inputs) for t in tasks)} test inputs) from {tasks_spec} -> {folder}")
    return folder / "arc-agi_test_challenges.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the fake input root (what /kaggle/input is on Kaggle)")
    p.add_argument("--tasks", default="arc-agi-2/evaluation", help="tasks with known answers (a built-in set, a "
                   "Kaggle challenges file with its solutions beside it, or a task folder)")
    p.add_argument("--max-tasks", type=int, default=0, help="only the first N tasks (0 = all)")
    a = p.parse_args(argv)
    write_fake_input(Path(a.out), a.tasks, a.max_tasks)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))  # run from a checkout without installing: `pipeline` from here
    sys.exit(main())
