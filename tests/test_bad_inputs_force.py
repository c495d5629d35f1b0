"""Check before you destroy (issue 19, class 1): every row is a `--force` command with one thing wrong, and after
its one `error:` line the folder must be byte-for-byte what it was (tests/badinput.py hashes every file): nothing
a command will need (its settings, --init, the dataset, disk space for a new dataset) may fail after the first
step that removes or replaces something.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from badinput import SMALL, Case, Ws, edit_checkpoint, fake_disk_full, refingerprint, run_case
from tiny import tiny_overrides


def force_train(ws: Ws, *extra: str) -> list[str]:
    """Retrain the run from scratch (a valid command but for `extra`)."""
    return ws.run_args("train", "--force", *tiny_overrides(max_steps=2), *extra)


def setting(key: str, value: str) -> Callable[[Ws], list[str]]:
    return lambda ws: force_train(ws, "--set", f"{key}={value}")


def init_of_another_model(ws: Ws) -> list[str]:
    """A checkpoint of this project whose output head has another width: readable, but it fits no model here."""
    def narrow(state: dict) -> None:
        for weights in (state["model"], state["ema"]["shadow"]):
            weights["lm_head.weight"] = torch.zeros(12, 16)

    return force_train(ws, "--init", str(edit_checkpoint(ws, ws.latest, narrow, out=ws.root / "other.pt")))


def init_of_something_else(ws: Ws) -> list[str]:
    path = ws.root / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    return force_train(ws, "--init", str(path))


def exported(ws: Ws, source, name: str = "exported") -> Path:
    from pipeline.cli.export import export_weights

    export_weights(source, ws.root / name, "mean")
    return ws.root / name


def init_export_of_another_model(ws: Ws) -> list[str]:
    """An exported folder (pipeline.cli.export) whose metadata is sound but whose tensors fit no model here: only
    the tensors tell, so they are checked before the old run goes."""
    def narrow(state: dict) -> None:
        for weights in (state["model"], state["ema"]["shadow"]):
            weights["lm_head.weight"] = torch.zeros(12, 16)

    folder = exported(ws, edit_checkpoint(ws, ws.latest, narrow, out=ws.root / "other.pt"))
    return force_train(ws, "--init", str(folder))


def init_export_truncated(ws: Ws) -> list[str]:
    folder = exported(ws, ws.latest)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return force_train(ws, "--init", str(folder))


def init_export_of_another_width(ws: Ws) -> list[str]:
    """A sound export of this run, given to a command that trains a wider model."""
    return force_train(ws, "--init", str(exported(ws, ws.latest)), "--set", "model.hidden_size=64")


def export_again_on_a_full_disk(ws: Ws) -> list[str]:
    """An earlier export of the run, exported again (every puzzle row, where it had their mean) when the disk
    fills at config.json: the earlier export stays whole, never new weights beside the old config."""
    from pipeline.cli.export import export_weights

    export_weights(ws.latest, ws.run / "export", "mean")
    fake_disk_full(ws, 100, names=("config.json",))
    return ws.run_args("export")


def broken_variants(ws: Ws) -> list[str]:
    """variants.npz replaced by bytes of something else, with run.json agreeing (as after a bad copy)."""
    ws.file("run/dataset/variants.npz", bytes(range(256)) * 8)
    refingerprint(ws)
    return force_train(ws)


def variants_out_of_range(ws: Ws) -> list[str]:
    with np.load(ws.run / "dataset" / "variants.npz") as z:
        arrays = dict(z)
    arrays["dihedral"] = np.full_like(arrays["dihedral"], 9)
    np.savez_compressed(ws.run / "dataset" / "variants.npz", **arrays)
    refingerprint(ws)
    return force_train(ws)


def augment_on_a_full_disk(name: str) -> Callable[[Ws], list[str]]:
    def setup(ws: Ws) -> list[str]:
        fake_disk_full(ws, 100, names=(name,))
        return ws.run_args("augment", "--force", *SMALL, "--num-aug", "3")
    return setup


def augment_with_no_room(ws: Ws) -> list[str]:
    """The disk has 10 bytes free: known before anything is written."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    ws.monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10, 10))
    return ws.run_args("augment", "--force", *SMALL)


CASES: list[Case] = [
    # --- a setting that cannot work, given with --force train: refused before the old run is removed
    Case("width-not-divisible-by-heads", setting("model.hidden_size", "33"), ("model.hidden_size", "not divisible")),
    Case("halt-max-steps-0", setting("model.halt_max_steps", "0"), ("model.halt_max_steps", "at least 1")),
    Case("unknown-sampling", setting("data.sampling", "shuffled"), ("data.sampling", "shuffled", "groups")),
    Case("unknown-translation", setting("data.translation", "random"), ("data.translation", "random", "per_draw")),
    Case("unknown-optimizer", setting("optimizer", "sgd"), ("optimizer", "sgd", "adam_atan2")),
    Case("unknown-schedule", setting("lr_schedule", "linear"), ("lr_schedule", "linear", "cosine")),
    Case("unknown-selector", setting("predict.selector", "best"), ("predict.selector", "best", "likelihood")),
    Case("unknown-precision", setting("mixed_precision", "fp8"), ("mixed_precision", "fp8", "bf16")),
    Case("grad-accum-does-not-divide", setting("grad_accum_steps", "3"), ("global_batch_size", "grad_accum_steps=3")),
    Case("lr-nan", setting("lr", "nan"), ("--set lr", "finite")),
    Case("epochs-inf", setting("epochs", "inf"), ("--set epochs", "finite")),
    Case("negative-seed", setting("seed", "-1"), ("--set seed", "at least 0")),
    Case("all-force-train-bad-width",
         lambda ws: ws.run_args("all", "--force", "train", "--set", "model.hidden_size=33"),
         ("model.hidden_size", "not divisible")),
    Case("all-force-augment-bad-optimizer",
         lambda ws: ws.run_args("all", "--force", "augment", "--set", "optimizer=sgd"), ("optimizer", "sgd")),
    # --- --init that cannot be used: refused before the old run is removed
    Case("init-of-another-model", init_of_another_model, ("other.pt", "does not fit", "lm_head.weight")),
    Case("init-of-something-else", init_of_something_else, ("weights.pt", "neither a checkpoint")),
    Case("init-export-of-another-model", init_export_of_another_model,
         ("exported", "fit", "lm_head.weight")),
    Case("init-export-truncated", init_export_truncated, ("exported/model.safetensors", "not a readable")),
    Case("init-export-of-another-width", init_export_of_another_width, ("exported", "does not fit")),
    Case("init-inside-the-cleared-folder", lambda ws: force_train(ws, "--init", str(ws.latest)),
         ("--init", "--force train removes", "copy it out")),
    # --- a dataset training cannot read: refused before the old run is removed
    Case("dataset-variants-garbage", broken_variants, ("variants.npz", "not a readable")),
    Case("dataset-variants-out-of-range", variants_out_of_range, ("variants.npz", "dihedral id")),
    # --- a dataset rebuilt on a full disk: the old one stays whole (built beside, then swapped in)
    Case("augment-full-disk-at-grids", augment_on_a_full_disk("grids.npz"), ("no space left on device", "grids.npz")),
    Case("augment-full-disk-at-variants", augment_on_a_full_disk("variants.npz"),
         ("no space left on device", "variants.npz")),
    Case("augment-full-disk-at-manifest", augment_on_a_full_disk("manifest.json"),
         ("no space left on device", "manifest.json")),
    Case("export-again-on-a-full-disk", export_again_on_a_full_disk, ("no space left on device", "config.json")),
    Case("augment-no-room-known-before", augment_with_no_room, ("no space left on device", "at least", "MB")),
]


def test_every_row_forces():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_force_checks_first(case: Case, base_run, tmp_path, capsys, monkeypatch):
    run_case(case, base_run, tmp_path, capsys, monkeypatch)


def test_a_kill_in_the_middle_of_a_dataset_swap_keeps_the_dataset_run_json_describes(base_run, tmp_path):
    """The two renames of replace_dataset and the marker update are three steps; after a kill between any two the
    next command (taking the lock) is left with the dataset run.json records."""
    import shutil

    from pipeline.training.checkpoint import dataset_fingerprint
    from pipeline.cli.runfolder import NEW_DATASET, OLD_DATASET, RunLock

    for moment in ("built", "renamed-old", "swapped"):
        run = tmp_path / moment
        shutil.copytree(base_run, run)
        recorded = dataset_fingerprint(run / "dataset")
        shutil.copytree(run / "dataset", run / NEW_DATASET)
        (run / NEW_DATASET / "puzzles.json").write_text("[]")  # "another" dataset
        if moment != "built":
            (run / "dataset").rename(run / OLD_DATASET)
        if moment == "swapped":
            (run / NEW_DATASET).rename(run / "dataset")
        RunLock(run).acquire().release()
        assert dataset_fingerprint(run / "dataset") == recorded, moment
        assert not (run / NEW_DATASET).exists() and not (run / OLD_DATASET).exists(), moment
