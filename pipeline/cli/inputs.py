"""What a command's processes read, as facts they compare before they work together (pipeline.core.job.agree).

Under a multi-node launch every node reads its own view of the run folder: the folder may be missing there, its
dataset another one (augmented with other settings), its checkpoints older. Each process reads the same things
the stages will read and reports them; rank 0's are the reference. A fact is a short string: the dataset's
fingerprint, a checkpoint's name and size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from augment.dataset import read_manifest
from pipeline.training.checkpoint import dataset_fingerprint, latest_checkpoint
from pipeline.core.errors import CheckpointError, RunFolderError
from pipeline.cli.runfolder import check_dataset_unchanged
from pipeline.cli.stages import SHARED_STAGES, Request


def dataset_facts(data_dir: Path) -> dict[str, str]:
    """The dataset's fingerprint (sha256 of its four files), after checking that a complete dataset is there."""
    read_manifest(data_dir)
    return {"the dataset's fingerprint": dataset_fingerprint(data_dir)[:16]}


def weights_fact(path: Path, flag: str) -> str:
    """A checkpoint file or weights folder as `NAME, N bytes`: what two nodes compare."""
    if path.is_file():
        return f"{path.name}, {path.stat().st_size} bytes"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return f"{path.name}/ ({len(files)} files, {sum(p.stat().st_size for p in files)} bytes)"
    raise CheckpointError(f"{flag} {path}: no such file or folder")


def read_by(req: Request, marker: dict[str, Any] | None) -> dict[str, str]:
    """The facts of what this process will read for `req` (none for stages only rank 0 runs, nor for `all`, whose
    dataset is compared once augment has run). Raises the error the stage itself would raise when something is
    missing, so that it is said before any process starts working."""
    if req.stage not in SHARED_STAGES:
        return {}
    check_dataset_unchanged(req.out, marker)
    facts = dataset_facts(req.data_dir)
    if req.stage == "train" and req.init is not None:
        facts["--init"] = weights_fact(req.init, "--init")
    if req.stage == "train" and req.resume:
        latest = latest_checkpoint(req.out / "checkpoints")
        if latest is None:
            raise RunFolderError(f"--resume: no checkpoint under {req.out / 'checkpoints'} to continue from; run "
                                 "without --resume to start training")
        facts["the checkpoint resumed"] = weights_fact(latest, "--resume")
    if req.stage == "predict" and req.best is None:
        checkpoint = req.checkpoint or latest_checkpoint(req.out / "checkpoints")
        if checkpoint is None:
            raise RunFolderError(f"no checkpoint under {req.out / 'checkpoints'}: run --stage train first or pass "
                                 "--checkpoint")
        facts["the checkpoint predicting"] = weights_fact(checkpoint, "--checkpoint")
    return facts
