"""Which tasks' test inputs are held out: a named evaluation set, or a dev split carved out of the training tasks.

A benchmark that tunes choices on the evaluation set it reports would overfit it, so the `mini` preset holds out
a *dev split* of ARC-AGI-1 training tasks instead and never loads the evaluation set. The rule depends on nothing
but the task ids, so the split cannot drift with results: sort the ids of the selected tasks, and hold out every
k-th one starting with the first (`dev:4` = ids 0, 4, 8, ... of the sorted list, about a quarter). Held-out tasks
are treated exactly as the paper treats ARC-AGI-1 evaluation: their demonstration pairs are trained on, their
test outputs are only used for scoring.

An eval-set spec is either such a `dev:K` rule or a task spec for `load_tasks` (see `pipeline.data.tasks`).
"""
from __future__ import annotations

from typing import Callable, Sequence

from pipeline.data.tasks import Task
from pipeline.core.errors import ConfigError

DEV_PREFIX = "dev:"


def is_dev_split(eval_set: str) -> bool:
    return eval_set.startswith(DEV_PREFIX)


def dev_every(eval_set: str) -> int:
    """K of a `dev:K` spec; a clear error for anything else."""
    text = eval_set[len(DEV_PREFIX):]
    try:
        every = int(text)
    except ValueError:
        every = 0
    if every < 2:
        raise ConfigError(f"data.eval_set {eval_set!r}: a dev split is 'dev:K' with an integer K >= 2 (every K-th task "
                         f"by sorted id is held out)")
    return every


def dev_split_ids(task_ids: Sequence[str], every: int) -> set[str]:
    """Every `every`-th id of the sorted ids, starting with the first."""
    return set(sorted(task_ids)[::every])


def held_out_ids(tasks: Sequence[Task], eval_set: str, load: Callable[[str], Sequence[Task]]) -> set[str]:
    """Ids of the `tasks` whose test inputs are held out for prediction under `eval_set`.

    "" holds out nothing; `dev:K` splits `tasks` themselves; any other spec holds out the tasks that came from it
    (matched by source name, else by task id among the tasks `load(eval_set)` returns)."""
    if not eval_set:
        return set()
    if is_dev_split(eval_set):
        return dev_split_ids([t.id for t in tasks], dev_every(eval_set))
    ids = {t.id for t in tasks if t.source == eval_set}
    if not ids:  # a combined name ("arc-agi-1") or a path spelled differently: match by task id
        ids = {t.id for t in load(eval_set)} & {t.id for t in tasks}
    return ids
