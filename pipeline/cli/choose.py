"""Choosing a checkpoint honestly: `--checkpoint best` (or `best:FIGURE`) picks, among the weights kept at every
evaluation during training (checkpoints/evaluated/step_N.pt), the one with the best held-out figure.

The choice says which figure chose it, on which split (its name and the held-out test outputs themselves: task
id and test index), and among how many evaluations. Prediction stores it inside the predictions file it made
(`Predictions.checkpoint_choice`), so the two are one unit: a refused command changes neither, and predictions
from other weights carry no choice. The score compares the choosing test outputs with the scored ones: a
checkpoint chosen on the same held-out answers it is then scored on has seen them once (through the choice). That
is how the paper reports (it evaluates on ARC-AGI-1 evaluation during training), and score.json, the terminal and
the report then say so. An honest figure chooses on a dev split and reports another.

Figures: `ce_true` (default: the per-cell cross-entropy of the true answers, lower is better; smooth, unlike
pass@2, which moves by whole test outputs), `cell_acc_true`, `task_pass2`, `pass2`, `pass1`, `task_pass1`,
`oracle` (higher is better). Ties go to the later step.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipeline.training import checkpoint as ckpt
from pipeline.core.errors import ConfigError, RunFolderError

LOWER_IS_BETTER = {"ce_true"}
FIGURES = ("ce_true", "cell_acc_true", "task_pass2", "pass2", "pass1", "task_pass1", "oracle")
DEFAULT_FIGURE = "ce_true"
EVALUATED = Path("checkpoints") / "evaluated"


@dataclass
class Choice:
    path: str
    step: int
    figure: str
    value: float
    split: str  # the held-out set whose figure chose it (the run's data.eval_set)
    evaluations: int  # how many evaluated checkpoints it was chosen among
    outputs: list[str] = field(default_factory=list)  # the choosing split's test outputs, "TASK_ID/TEST_INDEX"

    def describe(self) -> str:
        return (f"checkpoint {Path(self.path).name} (step {self.step}) chosen by the best {self.figure} "
                f"({self.value:.4f}) among {self.evaluations} evaluations on the held-out split {self.split!r}")


def is_best_spec(spec: str | None) -> bool:
    return spec is not None and (spec == "best" or spec.startswith("best:"))


def output_keys(solutions: Mapping[str, Sequence[Any]]) -> list[str]:
    """The test outputs of {task id: answers} as sorted "TASK_ID/TEST_INDEX" keys (what a split is, for the
    question whether the scored split chose the checkpoint)."""
    return sorted(f"{task_id}/{i}" for task_id, answers in solutions.items() for i in range(len(answers)))


def choose_checkpoint(out: Path, spec: str, split: str, outputs: Iterable[str] = ()) -> Choice:
    """The evaluated checkpoint of run folder `out` that is best by `spec` ("best" or "best:FIGURE"), on the
    held-out split `split` whose test outputs are `outputs` (output_keys)."""
    figure = spec.partition(":")[2] or DEFAULT_FIGURE
    if figure not in FIGURES:
        raise ConfigError(f"--checkpoint {spec}: unknown figure {figure!r}; choose one of {', '.join(FIGURES)}")
    scored = []
    for path in ckpt.list_checkpoints(out / EVALUATED):
        row = ckpt.load_training_state(path, mmap=True).get("eval") or {}
        if row.get(figure) is not None:
            scored.append((float(row[figure]), ckpt.checkpoint_step(path), path))
    if not scored:
        raise RunFolderError(f"--checkpoint {spec}: no evaluated checkpoint under {out / EVALUATED} reports {figure} "
                             "(train with evaluation during training: eval_every > 0 and a held-out split with answers)")
    sign = 1.0 if figure in LOWER_IS_BETTER else -1.0
    value, step, path = min(scored, key=lambda s: (sign * s[0], -s[1]))
    return Choice(str(path), step, figure, value, split, len(scored), sorted(outputs))


def to_text(choice: Choice) -> str:
    """The choice as the JSON text a predictions file stores."""
    return json.dumps(asdict(choice))


def from_text(text: str) -> Choice:
    """A stored choice; ValueError when it is not one (malformed JSON, missing or mistyped fields)."""
    try:
        fields = json.loads(text)
        choice = Choice(**fields)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split())[:120]}") from None
    types = {"path": str, "step": int, "figure": str, "value": (int, float), "split": str, "evaluations": int,
             "outputs": list}
    wrong = [name for name, kind in types.items() if not isinstance(getattr(choice, name), kind)]
    if wrong or not all(isinstance(k, str) for k in choice.outputs):
        raise ValueError(f"mistyped field(s) {', '.join(wrong) or 'outputs'}")
    return choice


def scored_choice(text: str | None, scored: Mapping[str, Sequence[Any]]) -> tuple[str | None, dict[str, Any] | None]:
    """(one line for the terminal, the entry for score.json) about the checkpoint choice stored with the scored
    predictions: which checkpoint, chosen by which figure on which split, and whether the scored test outputs
    (`scored`: {task id: answers}) are those that chose it. (None, None) without a choice; an unreadable one is
    said, never fatal: the score stands without it."""
    if text is None:
        return None, None
    try:
        choice = from_text(text)
    except ValueError as e:
        return f"the checkpoint choice stored with the predictions is unreadable ({e}); not reported", None
    chose, scored_keys = set(choice.outputs), set(output_keys(scored))
    shared = len(chose & scored_keys)
    same = bool(scored_keys) and chose == scored_keys
    note = choice.describe()
    if same:
        note += ("; the same test outputs are scored here, so the checkpoint was chosen on the answers it is scored "
                 "on (the paper's way: an optimistic figure)")
    elif shared:
        note += f"; {shared} of the {len(scored_keys)} test outputs scored here also chose it (an optimistic figure)"
    entry = {"figure": choice.figure, "value": choice.value, "split": choice.split, "step": choice.step,
             "checkpoint": choice.path, "evaluations": choice.evaluations, "scored_split": same,
             "shared_test_outputs": shared}
    return note, entry
