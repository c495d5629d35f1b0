"""A tiny augmented dataset and run config that train in seconds on a CPU, shared by the trainer/chain tests."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from augment.dataset import build_dataset
from pipeline.config import RunConfig, apply_overrides, preset
from pipeline.data.tasks import load_tasks, select_tasks

CANVAS = 6


def build_tiny_dataset(out: Path, num_tasks: int = 6, num_aug: int = 3, offset: int = 0) -> Path:
    """ARC-AGI-1 tasks whose grids are all <= 6x6: `num_tasks` training tasks (from `offset` on) plus 2
    evaluation tasks held out."""
    train = select_tasks(load_tasks("arc-agi-1/training").tasks, max_side=CANVAS)[offset:offset + num_tasks]
    evals = select_tasks(load_tasks("arc-agi-1/evaluation").tasks, max_side=CANVAS)[:2]
    dataset = build_dataset(train + evals, {t.id for t in evals}, num_aug=num_aug, seed=0, canvas=CANVAS, progress=False)
    dataset.save(out)
    return out


# The tiny run's settings, as `--set` keys: used both in-process (tiny_config) and on the command line.
TINY_SETTINGS: dict[str, object] = {
    "model.hidden_size": 32, "model.num_heads": 2, "model.puzzle_emb_ndim": 32, "model.puzzle_emb_len": 2,
    "model.H_cycles": 2, "model.L_cycles": 1, "model.halt_max_steps": 3, "model.halt_exploration_prob": 0.5,
    "global_batch_size": 8, "max_steps": 12, "lr": 1e-3, "lr_warmup_steps": 2, "checkpoint_every": 4,
    "log_every": 2, "ema_rate": 0.9,
}


def tiny_config(**overrides: object) -> RunConfig:
    settings = {**TINY_SETTINGS, **overrides}
    return apply_overrides(preset("demo"), [f"{k}={v}" for k, v in settings.items()])


def tiny_overrides(**extra: object) -> list[str]:
    """The same settings as --set arguments, for runs through the command line."""
    out: list[str] = []
    for k, v in {**TINY_SETTINGS, **extra}.items():
        out += ["--set", f"{k}={v}"]
    return out


# The run conftest's `two_process_run` trains as 1 node x 2 processes, which 1 process and 2 nodes must equal.
TWO_PROCESS_SETTINGS = tiny_overrides(max_steps=6, checkpoint_every=3, log_every=3)


def base_run_args(run: Path) -> list[str]:
    """The command that makes the session's `base_run` (conftest.py): `--stage all` on the demo preset's tiny data
    (badinput.SMALL), 4 steps with checkpoints at steps 2 and 4, 2 views per held-out test input."""
    from badinput import SMALL

    return ["--stage", "all", "--preset", "demo", "--out", str(run), *SMALL,
            *tiny_overrides(max_steps=4, checkpoint_every=2), "--set", "predict.max_variants=2"]


# How the tests start torchrun: torch's launcher through tests/torchrun.py (its imports frozen for the collector).
TORCHRUN = [sys.executable, str(Path(__file__).with_name("torchrun.py"))]


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous (a fixed one can collide with another job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
