import json
from pathlib import Path

import numpy as np
import pytest

from augment.dataset import (
    RETRIES_FACTOR,
    AugmentedDataset,
    _draw_candidates,
    _draw_variants,
    build_dataset,
)
from augment.transforms import Augmentation
from pipeline.data.tasks import Task, load_tasks
from pipeline.data.encoding import encode_pair
from pipeline.core.errors import InputFileError

G = lambda rows: np.array(rows, dtype=np.uint8)  # noqa: E731


@pytest.fixture(scope="module")
def arc_tasks() -> list[Task]:
    tasks = load_tasks("arc-agi-1/training").tasks
    # the first few, plus three whose training pairs are augmentations of one another
    return tasks[:6] + [t for t in tasks if t.id in ("0d3d703e", "a9f96cdd", "dc433765")]


def symmetric_tasks() -> list[Task]:
    """Puzzles where many colour maps and transforms coincide, so deduplication really matters."""
    return [
        # one colour, 1x1: only the image of colour 3 matters -> 8 augmented variants exist
        Task("one_colour", [(G([[3]]), G([[3]]))], [G([[3]])], [G([[3]])], "synthetic"),
        # [[1,2]] flipped left-right is [[2,1]], i.e. the 1<->2 swap: (t4, swap) equals the original
        Task("flip_is_swap", [(G([[1, 2]]), G([[2, 1]]))], [G([[1, 2]])], [G([[2, 1]])], "synthetic"),
        # fully symmetric, two colours, background 0 present
        Task("cross", [(G([[0, 5, 0], [5, 7, 5], [0, 5, 0]]), G([[7]]))], [G([[5]])], None, "synthetic"),
        # the second pair is the first with colours 1 and 2 swapped: swapping them only reorders the pairs
        Task("pair_swap", [(G([[1, 2]]), G([[1]])), (G([[2, 1]]), G([[2]]))], [G([[1, 2]])], None, "synthetic"),
        # only the background colour
        Task("blank", [(G([[0, 0], [0, 0]]), G([[0]]))], [G([[0, 0]])], [G([[0]])], "synthetic"),
    ]


def _seen_by_model(task: Task, is_eval: bool) -> tuple[list, list]:
    """(training pairs, held-out test inputs): what deduplication compares."""
    pairs = list(task.train)
    if not is_eval and task.test_outputs is not None:
        pairs += list(zip(task.test_inputs, task.test_outputs))
    return pairs, (list(task.test_inputs) if is_eval else [])


def _content(pairs: list, held_out: list, aug: Augmentation) -> tuple:
    def b(g):
        a = aug.apply(g)
        return bytes(a.shape) + a.tobytes()

    return tuple(sorted(b(i) + b(o) for i, o in pairs)), tuple(b(g) for g in held_out)


def _brute_force(pairs: list, held_out: list, num_aug: int, seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """The reference's procedure, literally: materialise each draw, keep it if no kept puzzle has the same
    set of training pairs (and the same held-out inputs)."""
    tids, colours = _draw_candidates(RETRIES_FACTOR * num_aug, np.random.default_rng(seed))
    seen = {_content(pairs, held_out, Augmentation.identity())}
    kept = []
    for t, c in zip(tids, colours):
        aug = Augmentation(int(t), tuple(c.tolist()))
        key = _content(pairs, held_out, aug)
        if key not in seen:
            seen.add(key)
            kept.append((aug.dihedral, aug.colours))
        if len(kept) == num_aug:
            break
    return kept


@pytest.mark.parametrize("num_aug", [3, 20, 60])
def test_dedup_matches_brute_force(arc_tasks, num_aug):
    for task in arc_tasks + symmetric_tasks():
        for is_eval in (False, True):
            pairs, held_out = _seen_by_model(task, is_eval)
            tids, colours = _draw_variants(pairs, held_out, num_aug, np.random.default_rng(7))
            got = [(int(t), tuple(c.tolist())) for t, c in zip(tids, colours)]
            assert got == _brute_force(pairs, held_out, num_aug, 7), task.id


def test_symmetric_puzzles_fall_short_exactly():
    ds = build_dataset(symmetric_tasks(), eval_task_ids={"cross"}, num_aug=100, seed=0, canvas=5, progress=False)
    short = {s["task_id"]: s["got"] for s in ds.manifest["short_puzzles"]}
    assert short["one_colour"] == 8  # colour 3 -> any of 1..9, minus the original
    assert short["blank"] == 1  # no colours to map; only the 1x2 test grid's transpose differs (2x1)
    assert short["cross"] <= 71  # D4-invariant grids in colours {5, 7}: only the 72 colour maps matter
    assert "flip_is_swap" not in short  # 143 exist (see below), 100 asked
    # every kept variant of every puzzle is a different puzzle, and the first is the original
    for p in range(ds.num_puzzles):
        task = ds.task(p)
        variants = np.flatnonzero(ds.variant_puzzle == p)
        assert len(variants) == 1 + short.get(task.id, 100)
        seen = set()
        for v in variants:
            key = _content(*_seen_by_model(task, task.id == "cross"), ds.augmentation(int(v)))
            assert key not in seen
            seen.add(key)
        assert ds.augmentation(int(variants[0])).is_identity


def test_reordered_pairs_count_as_equal():
    pairs, held_out = _seen_by_model(symmetric_tasks()[2], is_eval=False)
    tids, colours = _draw_variants(pairs, held_out, 400, np.random.default_rng(0))
    kept = {(int(t), tuple(c.tolist())) for t, c in zip(tids, colours)}
    swap = (0, 2, 1, 3, 4, 5, 6, 7, 8, 9)
    assert len(kept) > 0 and (0, swap) not in kept
    # by hand: row images (t in 0,2,4,5) of {([[a,b]],[[a]]), ([[b,a]],[[b]])} are fixed by the unordered {a, b}
    # (36 sets), likewise columns: 72 distinct puzzles, 71 besides the original
    assert len(kept) == 71


def test_flip_is_swap_count_by_hand():
    # Colours {1, 2}; a candidate is (t, s(1), s(2)): 8 * 72. A 1-row grid under t in {0, 2, 4, 5} stays a row,
    # either as is or reversed, and reversing [[1,2]] is the same as swapping the colours; likewise columns under
    # {1, 3, 6, 7}. So the distinct puzzles are 72 rows + 72 columns = 144, i.e. 143 besides the original.
    tids, _ = _draw_variants(*_seen_by_model(symmetric_tasks()[1], is_eval=False), 400, np.random.default_rng(0))
    assert len(tids) == 143


def test_build_layout_and_splits(arc_tasks):
    tasks = arc_tasks + symmetric_tasks()
    eval_ids = {arc_tasks[0].id, "cross"}
    ds = build_dataset(tasks, eval_ids, num_aug=10, seed=3, canvas=30, progress=False, sources="unit-test")
    m = ds.manifest
    assert m["num_puzzles"] == len(tasks) and m["sources"] == ["unit-test"]
    assert m["num_variants"] == ds.num_variants == len(ds.variant_puzzle)
    assert ds.num_puzzle_identifiers == ds.num_variants + 1
    # per puzzle: identity first, then up to num_aug more, contiguous
    for p, task in enumerate(tasks):
        vs = np.flatnonzero(ds.variant_puzzle == p)
        assert vs.tolist() == list(range(vs[0], vs[0] + len(vs)))
        assert ds.augmentation(int(vs[0])).is_identity and 1 <= len(vs) <= 11
    # training examples: train pairs always, test pairs only for non-eval puzzles with known outputs
    expected = []
    for v in range(ds.num_variants):
        task = tasks[ds.variant_puzzle[v]]
        pairs = list(task.train)
        if task.id not in eval_ids and task.test_outputs is not None:
            pairs += list(zip(task.test_inputs, task.test_outputs))
        expected += [(v, i, o) for i, o in pairs]
    assert ds.num_train_examples == len(expected) == m["num_train_examples"]
    for k in range(0, len(expected), 7):
        v, i, o = expected[k]
        aug = ds.augmentation(v)
        inp, out, pid = ds.train_example(k)
        assert pid == v + 1
        np.testing.assert_array_equal(inp, aug.apply(i))
        np.testing.assert_array_equal(out, aug.apply(o))
    with pytest.raises(IndexError):
        ds.train_refs(np.array([ds.num_train_examples]))
    # held-out test inputs: eval puzzles only, ordered (puzzle, test, variant)
    rows = [ds.test_input(k) for k in range(ds.num_test_inputs)]
    assert {r.task_id for r in rows} == eval_ids
    expect_rows = [
        (p, t, v)
        for p, task in enumerate(tasks)
        if task.id in eval_ids
        for t in range(len(task.test_inputs))
        for v in np.flatnonzero(ds.variant_puzzle == p)
    ]
    assert [(r.puzzle_index, r.test_index, r.variant) for r in rows] == expect_rows
    for r in rows[::5]:
        np.testing.assert_array_equal(r.grid, ds.augmentation(r.variant).apply(tasks[r.puzzle_index].test_inputs[r.test_index]))
    assert [t.id for t in ds.eval_tasks()] == [t.id for t in tasks if t.id in eval_ids]


def test_vectorised_examples_match_single(arc_tasks):
    ds = build_dataset(arc_tasks, set(), num_aug=8, seed=1, canvas=30, progress=False)
    rng = np.random.default_rng(0)
    ks = rng.integers(0, ds.num_train_examples, 50)
    extent = ds.train_extent(ks)
    offsets = np.stack([rng.integers(0, 31 - extent[:, 0]), rng.integers(0, 31 - extent[:, 1])], axis=1)
    batch = ds.encode_train_examples(ks, offsets)
    for n, k in enumerate(ks):
        inp, out, pid = ds.train_example(int(k))
        assert extent[n].tolist() == [max(inp.shape[0], out.shape[0]), max(inp.shape[1], out.shape[1])]
        enc_in, enc_out = encode_pair(inp, out, 30, tuple(offsets[n]))
        np.testing.assert_array_equal(batch["inputs"][n], enc_in)
        np.testing.assert_array_equal(batch["labels"][n], enc_out)
        assert batch["puzzle_identifiers"][n] == pid


def test_deterministic_and_independent_per_puzzle(arc_tasks):
    a = build_dataset(arc_tasks, set(), num_aug=12, seed=5, canvas=30, progress=False)
    b = build_dataset(arc_tasks, set(), num_aug=12, seed=5, canvas=30, progress=False)
    c = build_dataset(arc_tasks[:3], set(), num_aug=12, seed=5, canvas=30, progress=False)
    d = build_dataset(arc_tasks, set(), num_aug=12, seed=6, canvas=30, progress=False)
    np.testing.assert_array_equal(a.variant_colours, b.variant_colours)
    np.testing.assert_array_equal(a.variant_dihedral, b.variant_dihedral)
    n = c.num_variants  # the first three puzzles draw the same variants whatever follows them
    np.testing.assert_array_equal(a.variant_colours[:n], c.variant_colours)
    assert not np.array_equal(a.variant_colours, d.variant_colours)


def test_save_load_round_trip(tmp_path: Path, arc_tasks):
    tasks = arc_tasks + symmetric_tasks()
    ds = build_dataset(
        tasks, {"cross", arc_tasks[1].id}, num_aug=9, seed=0, canvas=30, progress=False,
        skipped=[{"file": "x.json", "task_id": "bad", "reason": "broken"}], sources=["a", "b"],
    )
    ds.save(tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "grids.npz", "manifest.json", "puzzles.json", "variants.npz"
    ]
    back = AugmentedDataset.load(tmp_path / "ds")
    assert back.manifest == json.loads(json.dumps(ds.manifest))
    assert back.manifest["skipped"][0]["task_id"] == "bad" and back.manifest["sources"] == ["a", "b"]
    assert back.puzzles == ds.puzzles
    for name in ("pixels", "grid_table", "variant_puzzle", "variant_dihedral", "variant_colours"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
    assert back.num_train_examples == ds.num_train_examples and back.num_test_inputs == ds.num_test_inputs
    ks = np.arange(0, ds.num_train_examples, 3)
    for key, value in ds.encode_train_examples(ks).items():
        np.testing.assert_array_equal(back.encode_train_examples(ks)[key], value)
    # a folder without its manifest is an unfinished build
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(InputFileError, match="manifest.json.*no augmented dataset"):
        AugmentedDataset.load(tmp_path / "ds")


def test_too_big_and_duplicates_and_names():
    small = Task("small", [(G([[1, 2]]), G([[2]]))], [G([[1]])], [G([[2]])], "s")
    big = Task("big", [(np.zeros((5, 2), np.uint8), G([[2]]))], [G([[1]])], [G([[2]])], "s")
    ds = build_dataset([big, small], set(), num_aug=4, seed=0, canvas=4, progress=False)
    assert ds.manifest["too_big"] == [{"task_id": "big", "source": "s", "largest_side": 5}]
    assert [q["task_id"] for q in ds.puzzles] == ["small"]
    assert ds.variant_name(0) == "small"
    aug = ds.augmentation(1)
    assert ds.variant_name(1) == f"small|||t{aug.dihedral}|||" + "".join(map(str, aug.colours))
    with pytest.raises(ValueError, match="appears twice"):
        build_dataset([small, small], set(), num_aug=1, seed=0, canvas=4, progress=False)
