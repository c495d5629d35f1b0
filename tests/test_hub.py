"""`--checkpoint` / `--init hf:ORG/NAME[@REVISION][/SUBFOLDER]`: resolved with huggingface_hub into its cache (here
one prepared by the test, read offline: HF_HUB_OFFLINE=1, no network) and loaded like the local folder."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.core.errors import CheckpointError
from pipeline.model.hub import HubSpec, parse_hub_spec
from pipeline.inference.predictions import Predictions
from pipeline.run import cli
from tiny import tiny_overrides

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_specs_are_parsed_and_bad_ones_named():
    assert parse_hub_spec("hf:org/trm") == HubSpec("org/trm", None, "")
    assert parse_hub_spec("hf:org/trm-arc.1@v2/checkpoints/step_9") == HubSpec("org/trm-arc.1", "v2", "checkpoints/step_9")
    for bad in ("hf:trm", "hf:org/trm/../../etc", "hf:", "hf:org/trm@"):
        with pytest.raises(CheckpointError, match="not a Hub spec"):
            parse_hub_spec(bad)


def _cache_with(folder: Path, cache: Path) -> None:
    """A Hub cache holding org/trm at COMMIT (also its main branch) with `folder` as its subfolder `export`."""
    repo = cache / "models--org--trm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT / "export")


def _run(args: list[str], cache: Path, monkeypatch, capsys) -> SimpleNamespace:
    """The command in this process, reading the Hub cache `cache` offline (huggingface_hub reads its settings from
    its `constants` module on every call; the environment variables only set them at import)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    capsys.readouterr()
    returncode = cli(args)
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=returncode, stdout=out, stderr=err)


def test_weights_from_a_hub_cache_offline_predict_and_fine_tune_like_the_local_folder(base_run: Path, tmp_path: Path,
                                                                                      monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    assert cli(["--stage", "export", "--out", str(run), "--export-dir", str(tmp_path / "export")]) == 0
    _cache_with(tmp_path / "export", tmp_path / "hub")
    assert cli(["--stage", "predict", "--out", str(run), "--quiet", "--checkpoint", str(tmp_path / "export")]) == 0
    local = Predictions.load(run / "predictions.npz")

    done = _run(["--stage", "predict", "--out", str(run), "--quiet", "--checkpoint", f"hf:org/trm@{COMMIT}/export"],
                tmp_path / "hub", monkeypatch, capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    hub = Predictions.load(run / "predictions.npz")
    assert np.array_equal(local.cells, hub.cells) and np.array_equal(local.q, hub.q)

    done = _run(["--stage", "train", "--out", str(tmp_path / "ft"), "--preset", "demo", "--data",
                 str(run / "dataset"), "--quiet", "--init", "hf:org/trm/export",
                 *tiny_overrides(max_steps=1, eval_every=0)], tmp_path / "hub", monkeypatch, capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"init from {tmp_path / 'hub' / 'models--org--trm' / 'snapshots' / COMMIT / 'export'}" in done.stdout, \
        done.stdout[-2000:]

    done = _run(["--stage", "predict", "--out", str(run), "--quiet", "--checkpoint", "hf:org/missing"],
                tmp_path / "hub", monkeypatch, capsys)
    assert done.returncode == 2 and done.stderr.count("error:") == 1, done.stderr[-3000:]
    assert "--checkpoint hf:org/missing: cannot be fetched" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    done = _run(["--stage", "predict", "--out", str(run), "--quiet", "--checkpoint", "hf:org/trm/nothing"],
                tmp_path / "hub", monkeypatch, capsys)
    assert done.returncode == 2 and "has no 'nothing'" in done.stderr, done.stderr[-3000:]
