"""One validation path for every file and setting the pipeline reads (issue 19, class 2, and the smaller items of
class 8): a setting of the wrong type or out of range (`--set`, config.json, run.json), a dataset file or a
predictions file of the wrong shape, a command-line usage error. Each is one `error: FILE-or-SETTING: problem`
line, exit 2, the folder unchanged (tests/badinput.py); `plan` refuses what `train` refuses.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import pytest

from badinput import GOOD_TASK, Case, Ws, augment_new, edit_json, refingerprint, run_case, task_folder


def run_json(edit: Callable[[dict], Any], stage: str = "submit") -> Callable[[Ws], list[str]]:
    return lambda ws: (edit_json(ws, "run.json", edit), ws.run_args(stage))[1]


def config_json(edit: Callable[[dict], Any], stage: str = "submit") -> Callable[[Ws], list[str]]:
    return lambda ws: (edit_json(ws, "config.json", edit), ws.run_args(stage))[1]


def dataset_file(name: str, content: bytes | Callable[[Ws], None], stage: str = "report") -> Callable[[Ws], list[str]]:
    """A dataset file replaced (bytes) or edited, with run.json agreeing, then `stage`."""
    def setup(ws: Ws) -> list[str]:
        content(ws) if callable(content) else ws.file(f"run/dataset/{name}", content)
        refingerprint(ws)
        return ws.run_args(stage)
    return setup


def manifest_without(key: str) -> Callable[[Ws], None]:
    def edit(manifest: dict) -> None:
        del manifest[key]
    return lambda ws: edit_json(ws, "dataset/manifest.json", edit)


def grids_with_only_pixels(ws: Ws) -> None:
    with np.load(ws.run / "dataset" / "grids.npz") as z:
        pixels = z["pixels"]
    np.savez(ws.run / "dataset" / "grids.npz", pixels=pixels)


def predictions_with(**arrays: np.ndarray) -> Callable[[Ws], list[str]]:
    def setup(ws: Ws) -> list[str]:
        path = ws.run / "predictions.npz"
        with np.load(path) as z:
            content = dict(z)
        content.update(arrays)
        np.savez(path, **content)
        return ws.run_args("submit")
    return setup


def a_symlink(target: str) -> Callable[[Ws], list[str]]:
    def setup(ws: Ws) -> list[str]:
        folder = task_folder(ws, {"good.json": GOOD_TASK})
        (folder / "link.json").symlink_to(folder / target)
        return augment_new(ws, folder)
    return setup


def check_link_listed(ws: Ws, out: str, err: str) -> None:
    manifest = json.loads((ws.root / "new" / "dataset" / "manifest.json").read_text())
    assert manifest["num_puzzles"] == 1
    assert [s["file"].endswith("link.json") for s in manifest["skipped"]] == [True], manifest["skipped"]
    assert "link.json" in err


def setting(stage: str, item: str) -> Callable[[Ws], list[str]]:
    return lambda ws: ws.run_args(stage, "--set", item)


CASES: list[Case] = [
    # --- --set: a section replaced by a scalar, and values no stage can use
    Case("set-data-section-to-text", setting("submit", "data=x"), ("--set data", "is a section", "data.sources")),
    Case("set-predict-section-to-text", setting("predict", "predict=x"), ("--set predict", "is a section")),
    Case("set-model-section-to-a-number", setting("report", "model=1"), ("--set model", "is a section")),
    Case("set-num-aug-huge", lambda ws: augment_new(ws, "arc-agi-1/training", "--set", "data.num_aug=1e12"),
         ("--set data.num_aug",)),
    Case("set-canvas-over-30", lambda ws: augment_new(ws, task_folder(ws, {"g.json": GOOD_TASK}), "--canvas", "31"),
         ("data.canvas", "at most 30")),
    Case("set-rescore-top-k-0", setting("predict", "predict.rescore_top_k=0"), ("predict.rescore_top_k", "at least 1")),
    Case("set-seed-huge", setting("plan", "seed=1e30"), ("--set seed", "out of range")),
    # --- plan refuses what train refuses (one validation)
    Case("plan-epochs-inf", setting("plan", "epochs=inf"), ("--set epochs", "finite")),
    Case("plan-lr-nan", setting("plan", "lr=nan"), ("--set lr", "finite")),
    Case("plan-grad-accum-does-not-divide", setting("plan", "grad_accum_steps=3"),
         ("global_batch_size", "grad_accum_steps=3")),
    Case("plan-unknown-selector", setting("plan", "predict.selector=best"), ("predict.selector", "best")),
    # --- the trackers' settings, at every stage (whether a tracker is installed: checked where training starts)
    Case("plan-unknown-tracker", setting("plan", "log_with=mlflow"), ("--set log_with", "unknown tracker 'mlflow'")),
    Case("predict-unknown-tracker", setting("predict", "log_with=tensorboard,mlflow"),
         ("--set log_with", "'mlflow'")),
    Case("train-tracker-project-a-path", lambda ws: ws.run_args("train", "--force", "--set", "log_project=../x"),
         ("--set log_project", "not a folder name")),
    Case("config-unknown-tracker", config_json(lambda c: c.update(log_with="mlflow"), "export"),
         ("config.json", "log_with", "'mlflow'")),
    # --- stage export: its arguments and folders
    Case("export-rows-unknown", lambda ws: ws.run_args("export", "--puzzle-rows", "some"), ("--puzzle-rows", "'some'")),
    Case("export-weights-missing", lambda ws: ws.run_args("export", "--checkpoint", str(ws.root / "none.pt")),
         ("none.pt",)),
    Case("export-into-a-file", lambda ws: ws.run_args("export", "--export-dir", str(ws.file("f.txt", "x"))),
         ("--export-dir", "f.txt", "is a file")),
    Case("export-into-a-foreign-folder",
         lambda ws: ws.run_args("export", "--export-dir", str(ws.file("notes/a.txt", "x").parent)),
         ("--export-dir", "notes", "not empty")),
    # --- config.json of the wrong shape
    Case("config-batch-size-text", config_json(lambda c: c["predict"].update(batch_size="8"), "predict"),
         ("config.json", "predict.batch_size", "'8'")),
    Case("config-max-variants-fraction", config_json(lambda c: c["predict"].update(max_variants=1.5), "predict"),
         ("config.json", "predict.max_variants", "1.5")),
    Case("config-selector-a-list", config_json(lambda c: c["predict"].update(selector=["vote"])),
         ("config.json", "predict.selector")),
    Case("config-section-a-scalar", config_json(lambda c: c.update(data="x")), ("config.json", "'data'")),
    Case("config-not-an-object", config_json(lambda c: [1, 2], "report"), ("config.json", "JSON object")),
    Case("config-unknown-setting", config_json(lambda c: c.update(lrr=1)), ("config.json", "'lrr'", "unknown setting")),
    Case("config-lr-nan", config_json(lambda c: c.update(lr=float("nan")), "report"), ("config.json", "lr", "finite")),
    # --- run.json of the wrong shape
    Case("marker-data-a-list", run_json(lambda m: m.update(data=[1])), ("run.json", "'data'")),
    Case("marker-unknown-preset", run_json(lambda m: m.update(preset="huge")), ("run.json", "'huge'", "preset")),
    Case("marker-num-aug-text", run_json(lambda m: m["data"].update(num_aug="2")), ("run.json", "data.num_aug")),
    Case("marker-fingerprint-a-number", run_json(lambda m: m.update(dataset_fingerprint=5)),
         ("run.json", "dataset_fingerprint")),
    # --- dataset files of the wrong shape (run.json agreeing with them, as after a bad copy)
    Case("manifest-without-canvas", dataset_file("manifest.json", manifest_without("canvas"), "predict"),
         ("manifest.json", "missing 'canvas'")),
    Case("manifest-without-num-puzzles", dataset_file("manifest.json", manifest_without("num_puzzles")),
         ("manifest.json", "missing 'num_puzzles'")),
    Case("grids-empty-file", dataset_file("grids.npz", b""), ("grids.npz", "not a readable")),
    Case("grids-without-table", dataset_file("grids.npz", grids_with_only_pixels),
         ("grids.npz", "missing array 'table'")),
    Case("variants-garbage", dataset_file("variants.npz", bytes(range(256)) * 8), ("variants.npz", "not a readable")),
    Case("puzzles-wrong-shape", dataset_file("puzzles.json", b'[{"task_id": 5}]'), ("puzzles.json", "task_id")),
    # --- predictions.npz of the wrong shape
    Case("predictions-version-text", predictions_with(format_version=np.array("one")),
         ("predictions.npz", "format_version")),
    Case("predictions-task-ids-numbers", predictions_with(task_ids=np.array([1, 2, 3])),
         ("predictions.npz", "task_ids")),
    # --- usage errors: one line, exit 2
    Case("usage-unknown-stage", lambda ws: ["--stage", "everything", "--out", str(ws.run)], ("--stage", "everything")),
    Case("usage-num-aug-not-a-number", lambda ws: augment_new(ws, "arc-agi-1/training", "--num-aug", "x"),
         ("--num-aug", "'x'")),
    Case("usage-no-stage", lambda ws: ["--out", str(ws.run)], ("--stage", "required")),
    Case("usage-unknown-flag", lambda ws: ws.run_args("report", "--frobnicate"), ("--frobnicate",)),
    Case("out-empty", lambda ws: ["--stage", "report", "--out", ""], ("--out", "empty")),
    # --- a task folder's broken or looping symlink is listed as skipped, like any unreadable file
    Case("symlink-broken", a_symlink("nowhere.json"), (), rc=0, check=check_link_listed),
    Case("symlink-looping", a_symlink("link.json"), (), rc=0, check=check_link_listed),
]


def test_the_table_covers_the_settings_and_files():
    assert len({c.id for c in CASES}) == len(CASES) >= 35


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_one_validation_path(case: Case, base_run, tmp_path, capsys, monkeypatch):
    run_case(case, base_run, tmp_path, capsys, monkeypatch)
