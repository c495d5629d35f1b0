"""Portable weights: `--stage export` writes model.safetensors + config.json; `--checkpoint` and `--init` take such a
folder (and the reference's checkpoint folder) and give exactly what the checkpoint gives; a malformed or foreign
folder is one `error:` line; the Kaggle bundle builder takes an exported folder."""
from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.errors import CheckpointError
from pipeline.model import loading, reference
from pipeline.training import checkpoint as ckpt
from pipeline.cli.export import export_weights
from pipeline.model.trm import TRM, ModelConfig
from pipeline.run import cli, main
from tiny import build_tiny_dataset, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "trm_parity"
PREDICT = ["--quiet", "--max-variants", "3", "--set", "predict.rescore_views=2"]


@pytest.fixture(scope="module")
def run(base_run, tmp_path_factory) -> Path:
    """A copy of the session's tiny run folder (trained 4 steps; conftest.py), to predict and export in."""
    out = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(base_run, out)
    return out


@pytest.fixture(scope="module")
def new_puzzles(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("new") / "dataset", num_tasks=3, num_aug=2, offset=6)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_predicts_exactly_like_its_checkpoint(run):
    checkpoint = ckpt.latest_checkpoint(run / "checkpoints")
    assert main(["--stage", "predict", "--out", str(run), *PREDICT]) == 0
    from_checkpoint = _arrays(run / "predictions.npz")
    assert main(["--stage", "export", "--out", str(run), "--quiet"]) == 0
    config = json.loads((run / "export" / "config.json").read_text())
    state = ckpt.load_training_state(checkpoint)
    assert config["format"] == "trm-arc-weights/1" and config["pipeline_version"]
    assert config["weights"] == "ema" and config["puzzle_rows"] == "all" and config["step"] == 4
    assert config["dataset"]["fingerprint"] == ckpt.dataset_fingerprint(run / "dataset")
    assert config["dataset"]["num_variants"] + 1 == config["model"]["num_puzzle_identifiers"]
    assert config["model"] == state["config"]["model"] and config["run_config"] == state["config"]
    from safetensors.torch import load_file

    _assert_same_tensors(load_file(run / "export" / "model.safetensors"), loading.load_weights(checkpoint).tensors)

    assert main(["--stage", "predict", "--out", str(run), "--checkpoint", str(run / "export"), *PREDICT]) == 0
    from_export = _arrays(run / "predictions.npz")
    assert from_export.keys() == from_checkpoint.keys()
    for name in from_export:
        floats = from_export[name].dtype.kind == "f"  # logp is NaN where a candidate was not rescored
        assert np.array_equal(from_export[name], from_checkpoint[name], equal_nan=floats), name

    live = export_weights(checkpoint, run / "live", use_ema=False)
    assert live["weights"] == "live"
    _assert_same_tensors(load_file(run / "live" / "model.safetensors"), state["model"])


def test_fine_tuning_from_an_export_is_fine_tuning_from_its_checkpoint(run, new_puzzles, tmp_path):
    from augment.dataset import AugmentedDataset
    from pipeline.config import PredictConfig
    from pipeline.inference.predict import predict

    checkpoint = ckpt.latest_checkpoint(run / "checkpoints")
    mean = export_weights(checkpoint, tmp_path / "mean", puzzle_rows="mean", dataset_dir=run / "dataset")
    assert mean["puzzle_rows"] == "mean" and mean["model"]["num_puzzle_identifiers"] == 2
    assert mean["trained_puzzle_rows"] == mean["dataset"]["num_variants"]
    export_weights(checkpoint, tmp_path / "all")
    dataset = AugmentedDataset.load(new_puzzles)
    config = ModelConfig(**{**loading.load_weights(checkpoint).model_config.__dict__,
                            "num_puzzle_identifiers": dataset.num_puzzle_identifiers})
    models = []
    for source in (checkpoint, tmp_path / "all", tmp_path / "mean", tmp_path / "mean" / "model.safetensors"):
        model = TRM(config)
        loading.init_from_checkpoint(model, source, verbose=False)
        models.append(model.eval())
    for model in models[1:]:
        _assert_same_tensors(model.state_dict(), models[0].state_dict())
    cfg = PredictConfig(max_variants=2, batch_size=64, rescore_views=0)
    first, last = (predict(m, dataset, cfg, device=torch.device("cpu"), progress=False) for m in (models[0], models[2]))
    assert np.array_equal(first.cells, last.cells) and np.array_equal(first.q, last.q)

    # the whole fine-tune, from the command line: the same run from either source
    for name, source in (("ft_checkpoint", checkpoint), ("ft_export", tmp_path / "mean")):
        assert main(["--stage", "train", "--preset", "demo", "--data", str(new_puzzles), "--out", str(tmp_path / name),
                     "--init", str(source), "--quiet", *tiny_overrides(max_steps=2, eval_every=0,
                                                                       eval_every_epochs=0)]) == 0
    a, b = (ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path / n / "checkpoints")) for n in
            ("ft_checkpoint", "ft_export"))
    _assert_same_tensors(a["model"], b["model"])

    # exported weights serve canvas buckets too (positions keep their canvas meaning: the same weights)
    assert main(["--stage", "train", "--preset", "demo", "--data", str(new_puzzles), "--out", str(tmp_path / "ft_b"),
                 "--init", str(tmp_path / "mean"), "--quiet", "--set", "data.canvas_buckets=4,6",
                 *tiny_overrides(max_steps=2, log_every=2, eval_every=0, eval_every_epochs=0)]) == 0
    logged = [json.loads(line) for line in (tmp_path / "ft_b" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < logged[-1]["grid_tokens_per_row"] < 36  # some rows on the 4x4 bucket


def _reference_folder(folder: Path) -> tuple[dict, dict]:
    """The golden fixture's reference weights in the reference's own layout: all_config.yaml + step_N files."""
    golden = json.loads((GOLDEN / "config.json").read_text())["model_config"]
    state = torch.load(GOLDEN / "state_dict.pt")
    folder.mkdir()
    saved = {"_orig_mod.model." + k: v for k, v in state.items()}
    torch.save(saved, folder / "step_10")
    torch.save({k: torch.zeros_like(v) for k, v in saved.items()}, folder / "step_9")  # an older one: not taken
    runtime = ("vocab_size", "num_puzzle_identifiers", "batch_size")  # set from the dataset at run time
    arch = {k: v for k, v in golden.items() if k not in runtime}
    (folder / "all_config.yaml").write_text(yaml.safe_dump({"arch": arch, "lr": 1e-4, "epochs": 10}))
    return golden, state


def test_the_references_checkpoint_folder_loads_predicts_and_exports(tmp_path):
    golden, state = _reference_folder(tmp_path / "ref")
    expected = reference.from_reference_state_dict(state)
    for source in (tmp_path / "ref", tmp_path / "ref" / "step_10"):
        model = loading.load_model_for_inference(source)
        assert asdict(model.config) == asdict(reference.config_from_reference(golden))
        _assert_same_tensors(model.state_dict(), expected)
    with pytest.warns(UserWarning, match="not this dataset's"):
        model = loading.load_model_for_inference(tmp_path / "ref", num_puzzle_identifiers=5)
    table = expected["puzzle_emb.weights"]
    assert torch.allclose(model.puzzle_emb.weights, table[1:].mean(0).expand(5, -1))

    written = export_weights(tmp_path / "ref", tmp_path / "exported")
    assert written["dataset"] is None and "reference" in written["puzzle_table"] and written["weights"] == "reference"
    _assert_same_tensors(loading.load_model_for_inference(tmp_path / "exported").state_dict(), expected)
    bare = tmp_path / "bare.pt"
    shutil.copy(tmp_path / "ref" / "step_10", bare)
    with pytest.raises(CheckpointError, match="without its model config"):
        loading.load_model_for_inference(bare)


def _valid_export(run: Path, folder: Path) -> Path:
    if not (folder / "model.safetensors").exists():
        export_weights(ckpt.latest_checkpoint(run / "checkpoints"), folder)
    return folder


def _bad_sources(run: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a malformed or foreign weights source, what its error line must say)."""
    from safetensors.torch import save_file

    good = _valid_export(run, root / "good")
    cases: dict[str, tuple[Path, str]] = {}

    def variant(name: str, config: str | None = None, weights: bytes | None = None) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        if config is not None:
            (folder / "config.json").write_text(config)
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        return folder

    ours = json.loads((good / "config.json").read_text())
    cases["config not JSON"] = (variant("a", config="{not json"), "not valid JSON")
    cases["foreign config"] = (variant("b", config=json.dumps({"model_type": "bert", "architectures": ["BertModel"]})),
                               "not a trm-arc weights config")
    cases["foreign model config"] = (variant("c", config=json.dumps({**ours, "model": {"n_layer": 12}})),
                                     "model config is not this pipeline's")
    data = (good / "model.safetensors").read_bytes()
    cases["truncated weights"] = (variant("d", weights=data[: len(data) // 2]), "not a readable safetensors file")
    cases["not safetensors"] = (variant("e", weights=b"\x89PNG\r\n\x1a\n" + bytes(64)), "not a readable safetensors file")
    foreign = variant("f")
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}, foreign / "model.safetensors")
    cases["foreign tensors"] = (foreign, "fit")  # "do not fit its own model config" / "does not fit this model config"
    (root / "empty").mkdir()
    cases["empty folder"] = (root / "empty", "neither exported weights")
    bad_yaml = root / "ref_yaml"
    bad_yaml.mkdir()
    (bad_yaml / "all_config.yaml").write_text("arch: [unclosed\n")
    (bad_yaml / "step_1").write_bytes(b"")
    cases["reference YAML"] = (bad_yaml, "cannot be read as YAML")
    no_step = root / "ref_nostep"
    no_step.mkdir()
    (no_step / "all_config.yaml").write_text("arch: {hidden_size: 8}\n")
    cases["reference without weights"] = (no_step, "no step_N weights file")
    return cases


def test_malformed_or_foreign_weights_are_one_error_line(run, new_puzzles, tmp_path, capsys):
    for name, (source, says) in _bad_sources(run, tmp_path).items():
        commands = {"predict": ["--stage", "predict", "--out", str(run), "--checkpoint", str(source), *PREDICT],
                    "init": ["--stage", "train", "--preset", "demo", "--data", str(new_puzzles), "--quiet",
                             "--out", str(tmp_path / "ft"), "--init", str(source), *tiny_overrides(max_steps=1)]}
        for what, argv in commands.items():
            code = cli(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (name, what, err)
            assert says in err[0], (name, what, err[0])
            assert not (tmp_path / "ft").exists()
    foreign_target = tmp_path / "notes"
    foreign_target.mkdir()
    (foreign_target / "notes.txt").write_text("mine")
    assert cli(["--stage", "export", "--out", str(run), "--export-dir", str(foreign_target)]) == 2
    assert "not an export of this pipeline" in capsys.readouterr().err


def _build_bundle_module():
    spec = importlib.util.spec_from_file_location("trm_build_bundle_export", ROOT / "kaggle" / "build_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_builder_takes_an_exported_folder(run, tmp_path, monkeypatch):
    build_bundle = _build_bundle_module()

    def fake_wheel(wheels: Path) -> Path:
        path = wheels / "trm_arc-0.1.0-py3-none-any.whl"
        path.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: the wheel is not what is tested here
        return path

    monkeypatch.setattr(build_bundle, "build_project_wheel", fake_wheel)
    checkpoint = ckpt.latest_checkpoint(run / "checkpoints")
    bundled = {}
    for name, source in (("checkpoint", checkpoint), ("all", _valid_export(run, tmp_path / "all")),
                         ("mean", tmp_path / "mean")):
        if name == "mean":
            export_weights(checkpoint, source, puzzle_rows="mean")
        manifest = json.loads(build_bundle.build_bundle(tmp_path / f"b_{name}", source, dependency_wheels=False)
                              .read_text())
        entry = manifest["checkpoint"]
        assert entry["slim"] and entry["format"] == ("ours" if name == "checkpoint" else "export")
        assert entry["step"] == 4 and entry["model"]["num_puzzle_identifiers"] == 2
        bundled[name] = (entry, ckpt.load_training_state(tmp_path / f"b_{name}" / entry["path"]))
    for name in ("all", "mean"):  # the same slim checkpoint, whichever form it came from
        assert bundled[name][0]["trained_puzzle_rows"] == bundled["checkpoint"][0]["trained_puzzle_rows"]
        _assert_same_tensors(bundled[name][1]["model"], bundled["checkpoint"][1]["model"])
