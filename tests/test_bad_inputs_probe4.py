"""The fourth probe (issue 28): what a fresh probe of the newer surfaces found. Trackers are started before the old
run goes; an export folder is recognised by its own config; `--stage all` on an empty checkpoints/ starts afresh;
the checkpoint choice lives with the predictions it made; an export cleans its own temp files; the tracebacks left
are one `error:` line each; and the smaller items (bounds, names, ignored flags, contradicting exports).

How a row is run and checked: tests/badinput.py (exit status, one `error:` line, nothing changed byte for byte).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from badinput import Case, Ws, fake_disk_full, run_case
from pipeline.run import cli
from tiny import tiny_overrides


def force_train(ws: Ws, *extra: str) -> list[str]:
    return ws.run_args("train", "--force", *tiny_overrides(max_steps=2), *extra)


def tensorboard_blocked(ws: Ws) -> None:
    """The tracker's folder cannot be made: a file sits where RUN/tensorboard must go."""
    ws.file("run/tensorboard", "not a folder")


def no_wandb_login(ws: Ws) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        ws.monkeypatch.delenv(name, raising=False)
    ws.monkeypatch.setenv("HOME", str(ws.root / "home"))  # no ~/.netrc, no wandb settings


def killed_before_first_checkpoint(ws: Ws) -> list[str]:
    """What a kill -9 (or a full disk) before the first checkpoint leaves: checkpoints/ exists, empty."""
    for path in (ws.run / "checkpoints").rglob("step_*.pt"):
        path.unlink()
    for name in ("metrics.jsonl", "predictions.npz", "submission.json", "submission_report.json", "score.json",
                 "score_per_task.csv", "report.html", "config.json"):
        (ws.run / name).unlink(missing_ok=True)
    return ws.run_args("all", *tiny_overrides(max_steps=2))


def trained_afresh(ws: Ws, out: str, err: str) -> None:
    names = sorted(p.name for p in (ws.run / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000002.pt"], names
    assert "resumed" not in out and (ws.run / "score.json").exists()


def chose_best(ws: Ws) -> None:
    assert cli(ws.run_args("predict", "--checkpoint", "best")) == 0


def rebuilt(ws: Ws) -> None:
    from badinput import SMALL

    assert cli(ws.run_args("augment", "--force", *SMALL, "--seed", "1")) == 0


def recorded_choice(ws: Ws) -> dict | None:
    from pipeline.inference.predictions import Predictions

    text = Predictions.load(ws.run / "predictions.npz").checkpoint_choice
    return None if text is None else json.loads(text)


def score_says_choice(ws: Ws, out: str, err: str) -> None:
    report = json.loads((ws.run / "score.json").read_text())
    choice = report["checkpoint_choice"]
    assert choice["figure"] == "ce_true" and choice["step"] == 4 and choice["scored_split"] is True, choice
    assert "chosen on the answers it is scored on" in out


def broken_choice_in_predictions(ws: Ws) -> list[str]:
    from pipeline.inference.predictions import Predictions

    chose_best(ws)
    predictions = Predictions.load(ws.run / "predictions.npz")
    predictions.checkpoint_choice = '{"path": 3, "step": '
    predictions.save(ws.run / "predictions.npz")
    return ws.run_args("score")


def score_warns_unreadable(ws: Ws, out: str, err: str) -> None:
    assert "checkpoint choice" in out and "unreadable" in out
    assert json.loads((ws.run / "score.json").read_text())["checkpoint_choice"] is None


def foreign_export_folder(ws: Ws) -> list[str]:
    """Another project's published model: a model.safetensors and a README, no config of ours."""
    from safetensors.torch import save_file

    folder = ws.root / "their_model"
    folder.mkdir()
    save_file({"encoder.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    (folder / "README.md").write_text("# their model\n")
    return ws.run_args("export", "--export-dir", str(folder))


def export_after_a_killed_first_export(ws: Ws) -> list[str]:
    folder = ws.root / "exp"
    folder.mkdir()
    (folder / ".model.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    return ws.run_args("export", "--export-dir", str(folder))


def export_over_an_earlier_one_with_a_temp_file(ws: Ws) -> list[str]:
    from pipeline.cli.export import export_weights

    export_weights(ws.latest, ws.run / "export", "mean")
    (ws.run / "export" / ".model.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    return ws.run_args("export")


def no_temp_file_left(folder: str) -> Callable[[Ws, str, str], None]:
    def check(ws: Ws, out: str, err: str) -> None:
        root = ws.run / "export" if folder == "export" else ws.root / folder
        assert sorted(p.name for p in root.iterdir()) == ["config.json", "model.safetensors"]
    return check


def export_full_disk_new_folder(ws: Ws) -> list[str]:
    fake_disk_full(ws, 100, names=("model.safetensors",))
    return ws.run_args("export", "--export-dir", str(ws.root / "new_export"))


def resume_with(key: str, value: str, run_value: str | None = None) -> Callable[[Ws], list[str]]:
    """`train --resume --set key=value`; with `run_value`, the run is first made one trained with key=run_value."""
    def setup(ws: Ws) -> list[str]:
        if run_value is not None:
            section, name = key.split(".")
            config = json.loads((ws.run / "config.json").read_text())
            config[section][name] = run_value
            (ws.run / "config.json").write_text(json.dumps(config))
            state = torch.load(ws.latest, weights_only=True)
            state["config"][section][name] = run_value
            torch.save(state, ws.latest)
        return ws.run_args("train", "--resume", "--set", "max_steps=6", "--set", f"{key}={value}")
    return setup


def export_with_config(edit: Callable[[dict], dict]) -> Callable[[Ws], Path]:
    def make(ws: Ws) -> Path:
        from pipeline.cli.export import export_weights

        folder = ws.root / "exported"
        export_weights(ws.latest, folder, "mean")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(edit(config)))
        return folder
    return make


def wider(config: dict) -> dict:
    config["model"]["hidden_size"] = 64
    return config


CONTRADICTING = export_with_config(wider)
EMPTY_CONFIG = export_with_config(lambda config: {})


def config_json_replaced(content: str | None) -> Callable[[Ws], list[str]]:
    def setup(ws: Ws) -> list[str]:
        path = ws.run / "config.json"
        path.unlink()
        if content is None:
            path.mkdir()
        else:
            path.write_text(content)
        return ws.run_args("score")
    return setup


def metrics_a_folder(ws: Ws) -> list[str]:
    (ws.run / "metrics.jsonl").unlink()
    (ws.run / "metrics.jsonl").mkdir()
    return ws.run_args("report")


CASES: list[Case] = [
    # --- 1. nothing is removed or rewritten before the command is accepted (its trackers started)
    Case("force-train-tensorboard-folder-blocked", lambda ws: (tensorboard_blocked(ws), force_train(
        ws, "--set", "log_with=tensorboard"))[1], ("log_with", "did not start")),
    Case("force-train-wandb-without-login", lambda ws: (no_wandb_login(ws), force_train(
        ws, "--set", "log_with=wandb"))[1], ("log_with", "wandb", "did not start")),
    Case("refused-resume-keeps-config-json", lambda ws: (tensorboard_blocked(ws), ws.run_args(
        "train", "--resume", "--set", "max_steps=6", "--set", "log_with=tensorboard"))[1],
         ("log_with", "did not start")),
    # --- 2. an export folder is ours only by its own config
    Case("export-dir-of-another-project", foreign_export_folder, ("their_model", "not an export of this pipeline")),
    # --- 3. --stage all on an empty checkpoints/ starts training afresh
    Case("all-after-a-kill-before-the-first-checkpoint", killed_before_first_checkpoint, (), rc=0,
         check=trained_afresh),
    # --- 4. the checkpoint choice lives with the predictions it made
    Case("refused-predict-keeps-the-choice", lambda ws: (chose_best(ws), ws.run_args(
        "predict", "--checkpoint", str(ws.root / "nonexistent" / "x.pt")))[1], ("nonexistent/x.pt", "no such file")),
    Case("refused-best-records-nothing", lambda ws: (chose_best(ws), rebuilt(ws), ws.run_args(
        "predict", "--checkpoint", "best:task_pass2"))[2], ("evaluated/step_00000004.pt", "another dataset")),
    Case("score-says-the-choice", lambda ws: (chose_best(ws), ws.run_args("score"))[1], (), rc=0,
         check=score_says_choice),
    Case("score-with-an-unreadable-choice", broken_choice_in_predictions, (), rc=0, check=score_warns_unreadable),
    Case("score-with-a-broken-old-choice-file", lambda ws: (ws.file("run/checkpoint_choice.json", "{"),
                                                           ws.run_args("score"))[1], (), rc=0,
         check=lambda ws, out, err: None),
    # --- 5. export folders get the temp-file cleanup the run folder has
    Case("export-after-a-killed-first-export", export_after_a_killed_first_export, (), rc=0,
         check=no_temp_file_left("exp")),
    Case("export-over-an-earlier-one-after-a-kill", export_over_an_earlier_one_with_a_temp_file, (), rc=0,
         check=no_temp_file_left("export")),
    Case("export-full-disk-leaves-no-folder", export_full_disk_new_folder, ("no space left on device",)),
    # --- 6. tracebacks that are one error line now
    Case("out-below-a-file", lambda ws: (ws.file("f.txt", "x"), ["--stage", "augment", "--preset", "demo", "--out",
                                                                  str(ws.root / "f.txt" / "sub")])[1],
         ("f.txt/sub", "not a folder")),
    Case("out-name-too-long", lambda ws: ["--stage", "augment", "--preset", "demo", "--out", str(ws.root / ("x" * 300))],
         ("--out", "name too long")),
    Case("metrics-jsonl-a-folder-at-report", metrics_a_folder, ("metrics.jsonl", "a folder")),
    Case("canvas-buckets-only-commas", lambda ws: force_train(ws, "--set", "data.canvas_buckets=,,,"),
         ("data.canvas_buckets",)),
    Case("resume-with-buckets-added", resume_with("data.canvas_buckets", "3,6"),
         ("data.canvas_buckets", "trained with")),
    Case("resume-with-buckets-dropped", resume_with("data.canvas_buckets", "", run_value="3,6"),
         ("data.canvas_buckets", "trained with")),
    Case("flops-budget-huge-at-plan", lambda ws: ws.run_args("plan", "--set", "flops_budget=1e300"),
         ("--set flops_budget", "at most")),
    # --- 7. smaller
    Case("act-steps-unbounded", lambda ws: ws.run_args("predict", "--set", "predict.act_steps=1000000000"),
         ("--set predict.act_steps", "at most")),
    Case("mlp-conv-even", lambda ws: force_train(ws, "--set", "model.mlp_conv=2"), ("--set model.mlp_conv", "odd")),
    Case("puzzle-rows-at-predict", lambda ws: ws.run_args("predict", "--puzzle-rows", "mean"),
         ("--puzzle-rows", "--stage export")),
    Case("init-from-an-export-contradicting-its-tensors", lambda ws: force_train(ws, "--init", str(CONTRADICTING(ws))),
         ("exported", "do not fit its own model config")),
    Case("export-from-an-export-contradicting-its-tensors", lambda ws: ws.run_args(
        "export", "--checkpoint", str(CONTRADICTING(ws)), "--export-dir", str(ws.root / "again")),
         ("exported", "do not fit its own model config")),
    Case("init-from-an-export-with-an-empty-config", lambda ws: force_train(ws, "--init", str(EMPTY_CONFIG(ws))),
         ("exported/config.json", "not a trm-arc weights config")),
    Case("error-names-the-set-not-the-preset", lambda ws: ws.run_args("train", "--force", "--set", "model.num_heads=3"),
         ("--set model.num_heads", "not divisible")),
    Case("config-json-empty-at-score", config_json_replaced("{}"), ("config.json", "no run settings")),
    Case("config-json-a-folder-at-score", config_json_replaced(None), ("config.json", "a folder")),
    # --- review 5: plan on a new folder names the exact command that makes it one
    Case("plan-on-a-new-folder", lambda ws: ["--stage", "plan", "--preset", "demo", "--out", str(ws.root / "new"),
                                             "--set", "data.num_aug=3"],
         lambda ws: ("first run python -m pipeline.run --stage augment --preset demo --out "
                     f"{ws.root / 'new'} --set data.num_aug=3",)),
]


@pytest.fixture(autouse=True)
def _wandb_forgets_its_settings():
    """W&B keeps the settings of its first start for the whole process (its mode, its login); a row that starts
    it without a login must not leave those to a later test's offline run."""
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def test_the_table_covers_the_probe():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_probe_four(case: Case, base_run: Path, tmp_path: Path, capsys, monkeypatch):
    run_case(case, base_run, tmp_path, capsys, monkeypatch)
