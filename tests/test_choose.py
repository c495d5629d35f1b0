"""--checkpoint best: the evaluated checkpoint with the best held-out figure, and what the score says about it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.cli.choose import choice_note, choose_checkpoint, forget_choice, record_choice
from pipeline.core.errors import ConfigError, RunFolderError


def _evaluated(out: Path, rows: dict[int, dict]) -> None:
    folder = out / "checkpoints" / "evaluated"
    folder.mkdir(parents=True)
    for step, row in rows.items():
        torch.save({"step": step, "final": True, "eval": {"step": step, **row}}, folder / f"step_{step:08d}.pt")


def test_best_is_chosen_by_the_figure_asked_for_and_says_so(tmp_path: Path):
    _evaluated(tmp_path, {250: {"ce_true": 1.2, "task_pass2": 0.05}, 500: {"ce_true": 0.9, "task_pass2": 0.02},
                          750: {"ce_true": 1.0, "task_pass2": 0.05}})
    choice = choose_checkpoint(tmp_path, "best", "dev:4")  # ce_true by default: lower is better
    assert (choice.step, choice.figure, choice.value, choice.evaluations) == (500, "ce_true", 0.9, 3)
    tie = choose_checkpoint(tmp_path, "best:task_pass2", "dev:4")
    assert tie.step == 750  # higher is better; a tie goes to the later step
    record_choice(tmp_path, choice)
    note = choice_note(tmp_path, "dev:4")
    assert "step 500" in note and "ce_true" in note and "'dev:4'" in note and "chosen on the answers" in note
    assert "chosen on the answers" not in choice_note(tmp_path, "arc-agi-1/evaluation")
    forget_choice(tmp_path)
    assert choice_note(tmp_path, "dev:4") is None


def test_best_without_evaluations_or_with_an_unknown_figure_is_one_clear_error(tmp_path: Path):
    with pytest.raises(RunFolderError, match="no evaluated checkpoint"):
        choose_checkpoint(tmp_path, "best", "dev:4")
    _evaluated(tmp_path, {250: {"pass2": 0.0}})
    with pytest.raises(RunFolderError, match="reports ce_true"):
        choose_checkpoint(tmp_path, "best", "dev:4")
    with pytest.raises(ConfigError, match="unknown figure"):
        choose_checkpoint(tmp_path, "best:loss", "dev:4")
