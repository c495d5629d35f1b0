"""Puzzle rows that line up with a published checkpoint: a dataset built from the reference's identifiers.json has
its rows, its variants and its encoded grids; a checkpoint whose rows are known (ours, in the reference's format,
under a permuted identifier order) predicts on such a dataset exactly what it predicted on its own."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from augment.dataset import build_dataset
from augment.identifiers import BLANK, identifiers_of, parse_identifiers, read_identifiers, write_identifiers
from badinput import SMALL
from pipeline.model.loading import PUZZLE_TABLE, load_weights
from pipeline.model.reference import to_reference_state_dict
from pipeline.training.checkpoint import latest_checkpoint
from pipeline.data.tasks import load_tasks
from pipeline.core.errors import InputFileError
from pipeline.inference.predictions import Predictions
from pipeline.run import cli

REF = Path(__file__).resolve().parent / "golden" / "reference_dataset"  # vendored from shared/reference_dataset


def _reference_dataset():
    inputs = REF / "input"
    training = load_tasks(str(inputs / "small_training_challenges.json")).tasks
    evaluation = load_tasks(str(inputs / "small_evaluation_challenges.json")).tasks
    rows = read_identifiers(REF / "identifiers.json")
    return build_dataset(training + evaluation, {t.id for t in evaluation}, num_aug=0, seed=0, canvas=30,
                         progress=False, rows=rows)


def _crop(tokens: np.ndarray) -> np.ndarray:
    """A grid from a canvas of tokens wherever it was drawn (the reference translates training examples)."""
    canvas = tokens.reshape(30, 30).astype(np.int64)
    rows, cols = np.flatnonzero((canvas >= 2).any(1)), np.flatnonzero((canvas >= 2).any(0))
    return canvas[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] - 2


def test_a_dataset_built_from_the_references_identifiers_has_its_rows_and_grids():
    ours = _reference_dataset()
    names = json.loads((REF / "identifiers.json").read_text())
    assert identifiers_of(ours) == names and ours.num_puzzle_identifiers == len(names)
    assert ours.manifest["identifiers"]["rows"] == len(names)
    ref = np.load(REF / "arrays.npz")
    # held-out test inputs (untranslated): row by row, with the same puzzle row, and their answers
    rows = ours.test_rows()
    order = np.lexsort((rows["test_index"], rows["variant"]))
    ref_ids = np.repeat(ref["test_puzzle_identifiers"], np.diff(ref["test_puzzle_indices"]))
    assert np.array_equal(rows["variant"][order] + 1, ref_ids)
    assert np.array_equal(ours.encode_grids(rows["grid"][order], rows["variant"][order]), ref["test_inputs"])
    outputs = [ours.puzzles[p]["test_outputs"][t] for p, t in zip(rows["puzzle_index"][order], rows["test_index"][order])]
    assert np.array_equal(ours.encode_grids(np.asarray(outputs), rows["variant"][order]), ref["test_labels"])
    # training examples (the reference translates them): per puzzle row, the same augmented pairs
    starts = ref["train_puzzle_indices"]
    for row, pid in enumerate(ref["train_puzzle_identifiers"]):
        theirs = sorted((_crop(ref["train_inputs"][k]).tobytes(), _crop(ref["train_labels"][k]).tobytes())
                        for k in range(starts[row], starts[row + 1]))
        first, count = ours.variant_examples(np.array([pid - 1]))
        pairs = [ours.train_example(int(k)) for k in range(int(first[0]), int(first[0] + count[0]))]
        assert all(p[2] == pid for p in pairs)
        assert sorted((i.astype(np.int64).tobytes(), o.astype(np.int64).tobytes()) for i, o, _ in pairs) == theirs


def test_identifiers_that_cannot_be_rows_are_named(tmp_path):
    good = ["<blank>", "a", "a|||t1|||0123456789", "b"]
    assert parse_identifiers(good, "ids.json").num_rows == 4
    cases = [
        (["a"], "starting with '<blank>'"),
        ([BLANK, "a|||t1|||0123456789"], "row 1: task 'a' starts with a variant"),
        ([BLANK, "a", "b", "a|||t1|||0123456789"], "row 3: task 'a''s rows are not together"),
        ([BLANK, "a", "a|||t9|||0123456789"], "row 2"),
        ([BLANK, "a", "a|||t1|||1023456789"], "row 2: colours must be a permutation"),
        ([BLANK, "a", "a|||t1|||0123456789", "a|||t1|||0123456789"], "row 3: 'a|||t1|||0123456789' appears twice"),
        ([BLANK, 7], "row 1: 7 is not a string"),
    ]
    for names, needle in cases:
        with pytest.raises(InputFileError) as caught:
            parse_identifiers(names, "ids.json")
        assert needle in str(caught.value) and "ids.json" in str(caught.value), (names, str(caught.value))
    tasks = load_tasks(str(REF / "input" / "small_training_challenges.json")).tasks
    with pytest.raises(InputFileError, match="2 task\\(s\\) it names are not among the tasks loaded"):
        read_identifiers(REF / "identifiers.json").order(tasks)


def _reference_checkpoint(checkpoint: Path, rows_of: dict[str, int], names: list[str], folder: Path) -> None:
    """Our checkpoint as the reference writes one (all_config.yaml + step_N), its puzzle rows moved to `names`'
    order: what a published checkpoint trained on the dataset `names` describes looks like."""
    weights = load_weights(checkpoint)
    tensors = dict(weights.tensors)
    table = tensors[PUZZLE_TABLE]
    tensors[PUZZLE_TABLE] = table[[0] + [rows_of[name] for name in names[1:]]]
    folder.mkdir()
    torch.save(to_reference_state_dict(tensors, prefix="_orig_mod.model.inner."), folder / "step_4")
    m = weights.model_config
    arch = {"hidden_size": m.hidden_size, "num_heads": m.num_heads, "expansion": m.expansion, "L_layers": m.num_layers,
            "H_cycles": m.H_cycles, "L_cycles": m.L_cycles, "halt_max_steps": m.halt_max_steps,
            "halt_exploration_prob": m.halt_exploration_prob, "puzzle_emb_len": m.puzzle_emb_len,
            "puzzle_emb_ndim": m.puzzle_emb_ndim, "pos_encodings": m.pos_encodings, "rope_theta": m.rope_theta,
            "rms_norm_eps": m.rms_norm_eps, "seq_len": m.seq_len}
    (folder / "all_config.yaml").write_text(yaml.safe_dump({"arch": arch}))


def _answers(path: Path, names: list[str]) -> dict[tuple, tuple]:
    """(task, test index, variant's name) -> (candidate grid, q) of a predictions file."""
    p = Predictions.load(path)
    out = {}
    for i in range(len(p)):
        grid = p.grid(i)
        out[(p.task_ids[p.task[i]], int(p.test_index[i]), names[int(p.variant[i]) + 1])] = (
            None if grid is None else grid.tobytes(), float(p.q[i]))
    return out


def test_a_published_checkpoint_predicts_with_its_own_rows_on_a_dataset_built_from_its_identifiers(
        base_run: Path, tmp_path: Path):
    ours = tmp_path / "ours"
    shutil.copytree(base_run, ours)
    assert cli(["--stage", "predict", "--out", str(ours), "--quiet", "--max-variants", "0"]) == 0
    from augment.dataset import AugmentedDataset

    names = identifiers_of(AugmentedDataset.load(ours / "dataset"))
    # the published dataset: the same variants, tasks and variants in another order
    rng = np.random.default_rng(0)
    by_task: dict[str, list[str]] = {}
    for name in names[1:]:
        by_task.setdefault(name.split("|||")[0], []).append(name)
    permuted = [BLANK]
    for task in rng.permutation(list(by_task)):
        first, *variants = by_task[task]
        permuted += [first, *rng.permutation(variants).tolist()]
    assert permuted != names
    (tmp_path / "identifiers.json").write_text(json.dumps(permuted))
    _reference_checkpoint(latest_checkpoint(ours / "checkpoints"), {n: r for r, n in enumerate(names)}, permuted,
                          tmp_path / "published")

    theirs = tmp_path / "theirs"
    assert cli(["--stage", "augment", "--preset", "demo", "--out", str(theirs), *SMALL,
                "--identifiers", str(tmp_path / "identifiers.json")]) == 0
    write_identifiers(AugmentedDataset.load(theirs / "dataset"), tmp_path / "written.json")
    assert json.loads((tmp_path / "written.json").read_text()) == permuted
    assert cli(["--stage", "predict", "--out", str(theirs), "--quiet", "--max-variants", "0",
                "--checkpoint", str(tmp_path / "published")]) == 0
    a, b = _answers(ours / "predictions.npz", names), _answers(theirs / "predictions.npz", permuted)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(a[k][0] == b[k][0] and abs(a[k][1] - b[k][1]) < 1e-5 for k in a)  # (at mean rows: not so)
