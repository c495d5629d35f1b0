"""Kaggle ARC Prize submission files: build, validate, score, and a visual report."""
from submissions.report import write_report
from submissions.score import ScoreReport, format_score, score_submission, write_score
from submissions.validate import validate_submission, validate_submission_file
from submissions.write import build_submission, fallback_submission, write_submission

__all__ = [
    "ScoreReport", "build_submission", "fallback_submission", "format_score", "score_submission",
    "validate_submission", "validate_submission_file", "write_report", "write_score", "write_submission",
]
