"""Stage `submit`: rank each held-out test input's candidates (pipeline.inference.vote) and write a complete, validated
Kaggle submission (submissions/), with a report of every test input that fell back to its input grid."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pipeline.data.tasks import Task
from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_write_json
from pipeline.inference.predictions import Predictions
from pipeline.inference.vote import SELECTORS
from submissions.validate import validate_submission
from submissions.write import SubmissionReport, build_submission, write_submission


def submit(
    tasks: Sequence[Task], predictions: Predictions, out_path: str | Path, selector: str = "vote"
) -> SubmissionReport:
    """Vote, build, validate and atomically write `out_path`; a report of fallbacks goes beside it."""
    if selector not in SELECTORS:
        raise ConfigError(f"predict.selector: unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
    ranked = SELECTORS[selector](predictions, top_k=2)
    submission, report = build_submission(tasks, ranked)
    problems = validate_submission(submission, tasks)
    if problems:  # a bug, not bad input: never write an invalid file
        raise RuntimeError("built an invalid submission:\n" + "\n".join(problems[:20]))
    out_path = Path(out_path)
    write_submission(out_path, submission)
    atomic_write_json(out_path.with_name(out_path.stem + "_report.json"), {"selector": selector, **asdict(report)})
    return report
