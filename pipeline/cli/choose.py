"""Choosing a checkpoint honestly: `--checkpoint best` (or `best:FIGURE`) picks, among the weights kept at every
evaluation during training (checkpoints/evaluated/step_N.pt), the one with the best held-out figure.

The choice says which figure chose it, on which split, and among how many evaluations; it is written to the run
folder (checkpoint_choice.json) so that the score can say so. A checkpoint chosen on the same held-out answers it
is then scored on has seen them once (through the choice): that is how the paper reports (it evaluates on
ARC-AGI-1 evaluation during training), and the score then says that its split also chose the checkpoint. An honest
figure chooses on a dev split and reports another.

Figures: `ce_true` (default: the per-cell cross-entropy of the true answers, lower is better; smooth, unlike
pass@2, which moves by whole test outputs), `cell_acc_true`, `task_pass2`, `pass2`, `pass1`, `task_pass1`,
`oracle` (higher is better). Ties go to the later step.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.training import checkpoint as ckpt
from pipeline.core.errors import ConfigError, RunFolderError
from pipeline.core.io import atomic_write_json

LOWER_IS_BETTER = {"ce_true"}
FIGURES = ("ce_true", "cell_acc_true", "task_pass2", "pass2", "pass1", "task_pass1", "oracle")
DEFAULT_FIGURE = "ce_true"
CHOICE_FILE = "checkpoint_choice.json"
EVALUATED = Path("checkpoints") / "evaluated"


@dataclass
class Choice:
    path: str
    step: int
    figure: str
    value: float
    split: str  # the held-out set whose figure chose it (the run's data.eval_set)
    evaluations: int  # how many evaluated checkpoints it was chosen among

    def describe(self) -> str:
        return (f"checkpoint {Path(self.path).name} (step {self.step}) chosen by the best {self.figure} "
                f"({self.value:.4f}) among {self.evaluations} evaluations on the held-out split {self.split!r}")


def is_best_spec(spec: str | None) -> bool:
    return spec is not None and (spec == "best" or spec.startswith("best:"))


def choose_checkpoint(out: Path, spec: str, split: str) -> Choice:
    """The evaluated checkpoint of run folder `out` that is best by `spec` ("best" or "best:FIGURE")."""
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
    return Choice(str(path), step, figure, value, split, len(scored))


def record_choice(out: Path, choice: Choice) -> None:
    atomic_write_json(out / CHOICE_FILE, asdict(choice))


def forget_choice(out: Path) -> None:
    """Prediction from another checkpoint: the last choice no longer describes the predictions."""
    (out / CHOICE_FILE).unlink(missing_ok=True)


def choice_note(out: Path, scored_split: str) -> str | None:
    """One line for the score: which checkpoint was chosen how, and whether the scored split also chose it."""
    path = out / CHOICE_FILE
    if not path.exists():
        return None
    choice = Choice(**json.loads(path.read_text()))
    note = choice.describe()
    if scored_split == choice.split:
        note += ("; the same split is scored here, so the checkpoint was chosen on the answers it is scored on "
                 "(the paper's way: an optimistic figure)")
    return note
