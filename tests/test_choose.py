"""--checkpoint best: the evaluated checkpoint with the best held-out figure, and what the score says about it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.cli.choose import choose_checkpoint, from_text, output_keys, scored_choice, to_text
from pipeline.core.errors import ConfigError, RunFolderError


def _evaluated(out: Path, rows: dict[int, dict]) -> None:
    folder = out / "checkpoints" / "evaluated"
    folder.mkdir(parents=True)
    for step, row in rows.items():
        torch.save({"step": step, "final": True, "eval": {"step": step, **row}}, folder / f"step_{step:08d}.pt")


def test_best_is_chosen_by_the_figure_asked_for_and_says_so(tmp_path: Path):
    _evaluated(tmp_path, {250: {"ce_true": 1.2, "task_pass2": 0.05}, 500: {"ce_true": 0.9, "task_pass2": 0.02},
                          750: {"ce_true": 1.0, "task_pass2": 0.05}})
    dev = {"a": [0], "b": [0, 1]}
    choice = choose_checkpoint(tmp_path, "best", "dev:4", output_keys(dev))  # ce_true by default: lower is better
    assert (choice.step, choice.figure, choice.value, choice.evaluations) == (500, "ce_true", 0.9, 3)
    assert choice.outputs == ["a/0", "b/0", "b/1"]
    tie = choose_checkpoint(tmp_path, "best:task_pass2", "dev:4")
    assert tie.step == 750  # higher is better; a tie goes to the later step
    assert from_text(to_text(choice)) == choice
    note, entry = scored_choice(to_text(choice), dev)
    assert "step 500" in note and "ce_true" in note and "'dev:4'" in note and "chosen on the answers" in note
    assert entry == {"figure": "ce_true", "value": 0.9, "split": "dev:4", "step": 500, "checkpoint": choice.path,
                     "evaluations": 3, "scored_split": True, "shared_test_outputs": 3}
    # the same test outputs under another name (--solutions PATH) are still the choosing split: decided by ids
    assert scored_choice(to_text(choice), {"b": [0, 1], "a": [0]})[1]["scored_split"] is True
    note, entry = scored_choice(to_text(choice), {"b": [0, 1], "c": [0]})
    assert "2 of the 3 test outputs scored here also chose it" in note and not entry["scored_split"]
    note, entry = scored_choice(to_text(choice), {"c": [0]})
    assert "chosen on" not in note and entry["shared_test_outputs"] == 0 and not entry["scored_split"]
    assert scored_choice(None, dev) == (None, None)


@pytest.mark.parametrize("text", ["{", "[]", "{}", '{"path": 3}', "[" * 10000 + "]" * 10000,
                                  '{"path": "p", "step": "x", "figure": "f", "value": 1, "split": "s", '
                                  '"evaluations": 1, "outputs": []}'])
def test_an_unreadable_choice_is_said_never_fatal(text: str):
    note, entry = scored_choice(text, {"a": [0]})
    assert "unreadable" in note and entry is None


def test_best_without_evaluations_or_with_an_unknown_figure_is_one_clear_error(tmp_path: Path):
    with pytest.raises(RunFolderError, match="no evaluated checkpoint"):
        choose_checkpoint(tmp_path, "best", "dev:4")
    _evaluated(tmp_path, {250: {"pass2": 0.0}})
    with pytest.raises(RunFolderError, match="reports ce_true"):
        choose_checkpoint(tmp_path, "best", "dev:4")
    with pytest.raises(ConfigError, match="unknown figure"):
        choose_checkpoint(tmp_path, "best:loss", "dev:4")
