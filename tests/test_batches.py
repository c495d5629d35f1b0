from collections import Counter

import numpy as np
import pytest

from augment.dataset import build_dataset
from pipeline.training.batches import TrainSampler, iter_test_batches
from pipeline.data.tasks import Task
from pipeline.data.encoding import IGNORE_LABEL, PAD, decode_grid

CANVAS = 8


def _grid(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 10, size=(h, w), dtype=np.uint8)


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    tasks = []
    for n in range(4):
        train = [(_grid(rng, 2 + n, 3), _grid(rng, 3, 1 + n)) for _ in range(2)]
        tasks.append(Task(f"task{n}", train, [_grid(rng, 4, 2)], [_grid(rng, 2, 5)], "synthetic"))
    return build_dataset(tasks, {"task3"}, num_aug=3, seed=0, canvas=CANVAS, progress=False)


def _locate(tokens: np.ndarray, background: int) -> tuple[int, int]:
    """Top-left offset of the grid drawn on a canvas (first row and column that are not background)."""
    canvas = tokens.reshape(CANVAS, CANVAS)
    rows, cols = np.nonzero(canvas != background)
    return int(rows.min()), int(cols.min())


def _crop_at(tokens: np.ndarray, offset: tuple[int, int], background: int) -> np.ndarray:
    r, c = offset
    moved = np.full((CANVAS, CANVAS), background, dtype=tokens.dtype)
    moved[: CANVAS - r, : CANVAS - c] = tokens.reshape(CANVAS, CANVAS)[r:, c:]
    return decode_grid(moved.ravel(), CANVAS)


def test_epoch_order_and_untranslated_content(dataset):
    n = dataset.num_train_examples
    sampler = TrainSampler(dataset, seed=11, translation="none")
    for epoch in range(2):
        batch = sampler.take(n)
        order = np.random.default_rng([11, epoch]).permutation(n)
        expected = dataset.encode_train_examples(order)
        for key in ("inputs", "labels", "puzzle_identifiers"):
            np.testing.assert_array_equal(batch[key], expected[key])
    assert sampler.epoch == 2.0 and sampler.epoch_index == 2
    assert batch["inputs"].dtype == np.int32 and batch["labels"].dtype == np.int32
    assert batch["puzzle_identifiers"].dtype == np.int32


def test_determinism_and_resume(dataset):
    n = dataset.num_train_examples
    fresh = TrainSampler(dataset, seed=3).take(2 * n + 12)
    again = TrainSampler(dataset, seed=3).take(2 * n + 12)
    other = TrainSampler(dataset, seed=4).take(2 * n + 12)
    for key in fresh:
        np.testing.assert_array_equal(fresh[key], again[key])
    assert not np.array_equal(fresh["inputs"], other["inputs"])

    a = TrainSampler(dataset, seed=3)
    first = a.take(5)
    state = a.state_dict()
    b = TrainSampler(dataset, seed=3)
    b.load_state_dict(state)
    second = b.take(7)
    for key in fresh:
        np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), fresh[key][:12])

    # resume across an epoch boundary, piece by piece
    c = TrainSampler(dataset, seed=3)
    parts, taken = [], 0
    for size in (n - 2, 0, 4, n + 1, 3, 2):
        d = TrainSampler(dataset, seed=3)
        d.load_state_dict(c.state_dict())
        parts.append(d.take(size))
        c.load_state_dict(d.state_dict())
        taken += size
    assert c.epoch == pytest.approx(taken / n)
    for key in fresh:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), fresh[key][:taken])
    with pytest.raises(ValueError, match="seed"):
        TrainSampler(dataset, seed=5).load_state_dict(state)


def test_every_example_once_per_epoch_with_translation(dataset):
    n = dataset.num_train_examples
    sampler = TrainSampler(dataset, seed=1)
    expected = Counter()
    for k in range(n):
        inp, out, pid = dataset.train_example(k)
        expected[(pid, inp.tobytes(), inp.shape, out.tobytes(), out.shape)] += 1
    for _ in range(2):
        batch = sampler.take(n)
        got = Counter()
        for inputs, labels, pid in zip(batch["inputs"], batch["labels"], batch["puzzle_identifiers"]):
            assert 1 <= pid <= dataset.num_variants
            offset = _locate(inputs, PAD)
            # input and output share one offset; the label grid may be smaller, so compare where it starts
            label_offset = _locate(labels, IGNORE_LABEL)
            assert label_offset == offset
            inp = _crop_at(inputs, offset, PAD)
            out = _crop_at(labels, offset, IGNORE_LABEL)
            got[(int(pid), inp.tobytes(), inp.shape, out.tobytes(), out.shape)] += 1
        assert got == expected


def test_offsets_uniform_over_the_valid_range(dataset):
    n = dataset.num_train_examples
    epochs = 150
    sampler = TrainSampler(dataset, seed=2)
    room = CANVAS - dataset.train_extent(np.arange(n))  # (n, 2) largest valid offset per example
    counts = [Counter() for _ in range(n)]
    for epoch in range(epochs):
        batch = sampler.take(n)
        order = np.random.default_rng([2, epoch]).permutation(n)
        for k, inputs in zip(order, batch["inputs"]):
            counts[k][_locate(inputs, PAD)] += 1
    for k in range(n):
        cells = (room[k, 0] + 1) * (room[k, 1] + 1)
        assert all(0 <= r <= room[k, 0] and 0 <= c <= room[k, 1] for r, c in counts[k])
        if cells <= 30:  # every valid offset shows up, none far more often than the others
            assert len(counts[k]) == cells
            assert max(counts[k].values()) < 4 * epochs / cells + 5


def test_test_batches_cover_everything_once(dataset):
    for max_variants in (None, 2):
        rows = []
        for batch in iter_test_batches(dataset, batch_size=3, max_variants=max_variants):
            assert len(batch["inputs"]) <= 3
            np.testing.assert_array_equal(batch["puzzle_identifiers"], batch["variant"] + 1)
            for inputs, p, t, v in zip(batch["inputs"], batch["puzzle_index"], batch["test_index"], batch["variant"]):
                assert dataset.variant_puzzle[v] == p
                expected = dataset.augmentation(int(v)).apply(dataset.task(int(p)).test_inputs[int(t)])
                np.testing.assert_array_equal(decode_grid(inputs, CANVAS), expected)  # at offset (0, 0)
                rows.append((int(p), int(t), int(v)))
        eval_p = [p for p, q in enumerate(dataset.puzzles) if q["is_eval"]]
        expected_rows = [
            (p, t, int(v))
            for p in eval_p
            for t in range(len(dataset.puzzles[p]["test_inputs"]))
            for v in np.flatnonzero(dataset.variant_puzzle == p)[:max_variants]
        ]
        assert rows == expected_rows
    assert len(list(iter_test_batches(dataset, 1000))) == 1


# --- the reference's group epochs and fixed translation ----------------------------------------------------------
def _variant_of(dataset, ks):
    return dataset.train_refs(np.asarray(ks))[0]


def test_group_epoch_visits_every_group_once_with_one_whole_variant(dataset):
    big = 1000  # larger than an epoch: no batch boundary cuts a variant (the epoch is then one short batch)
    sampler = TrainSampler(dataset, seed=7, sampling="groups", translation="none", batch_size=big)
    for epoch in range(3):
        n = sampler.epoch_length(epoch)
        ks, _ = sampler.take_indices(n)
        variants = _variant_of(dataset, ks)
        # the stream is a run of variants, each contiguous, each holding all of its examples exactly once
        cuts = np.flatnonzero(np.diff(variants)) + 1
        runs = np.split(ks, cuts)
        run_variants = [int(_variant_of(dataset, r[:1])[0]) for r in runs]
        puzzles = [int(dataset.variant_puzzle[v]) for v in run_variants]
        assert sorted(puzzles) == list(range(dataset.num_puzzles))  # every group once
        for r, v in zip(runs, run_variants):
            first, count = dataset.variant_examples(np.array([v]))
            assert sorted(r.tolist()) == list(range(int(first[0]), int(first[0] + count[0])))
    assert sampler.epoch == 3.0


def test_group_epoch_is_cut_into_batches_like_the_reference(dataset):
    batch = 5  # variants here have 3 examples (2 train pairs + 1 test pair), or 2 for the eval puzzle
    sampler = TrainSampler(dataset, seed=3, sampling="groups", translation="none", batch_size=batch)
    rng = np.random.default_rng([3, 0])  # replay the reference's rule from the same draws
    order = rng.permutation(dataset.num_puzzles)
    pick = (rng.random(len(order)) * dataset.puzzle_num_variants[order]).astype(int)
    sizes = dataset.puzzle_num_examples[order]
    expected, filled = [], 0
    for p, k, s in zip(order, pick, sizes):
        take = min(int(s), batch - filled)
        expected.append((int(dataset.puzzle_first_variant[p] + k), take))
        filled = (filled + take) % batch
    total = sum(t for _, t in expected)
    n = sampler.epoch_length(0)
    assert n == total - total % batch and n % batch == 0  # the last incomplete batch is dropped
    ks, _ = sampler.take_indices(n)
    got = _variant_of(dataset, ks).tolist()
    want = [v for v, t in expected for _ in range(t)][:n]
    assert got == want
    assert len(set(ks.tolist())) == n  # a truncated variant gives distinct examples


def test_group_sampler_resumes_exactly_mid_epoch(dataset):
    kw = dict(sampling="groups", translation="reference", batch_size=4)
    fresh = TrainSampler(dataset, seed=9, **kw).take(40)
    a = TrainSampler(dataset, seed=9, **kw)
    parts = [a.take(3)]
    for size in (5, 0, 11, 21):
        b = TrainSampler(dataset, seed=9, **kw)
        b.load_state_dict(a.state_dict())
        parts.append(b.take(size))
        a = b
    for key in fresh:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), fresh[key])
    with pytest.raises(ValueError, match="sampling"):
        TrainSampler(dataset, seed=9, sampling="examples").load_state_dict(a.state_dict())


def test_reference_translation_is_fixed_per_example_with_one_untranslated_per_variant(dataset):
    n = dataset.num_train_examples
    sampler = TrainSampler(dataset, seed=4, sampling="examples", translation="reference")
    seen: dict[int, tuple[int, int]] = {}
    for epoch in range(3):
        ks, offsets = sampler.take_indices(n)
        for k, off in zip(ks.tolist(), map(tuple, offsets.tolist())):
            assert seen.setdefault(k, off) == off  # the same place every epoch
    room = CANVAS - dataset.train_extent(np.arange(n))
    assert all(0 <= seen[k][0] <= room[k, 0] and 0 <= seen[k][1] <= room[k, 1] for k in range(n))
    _, untranslated = sampler._fixed_offsets()
    variants = _variant_of(dataset, np.arange(n))
    assert np.bincount(variants[untranslated], minlength=dataset.num_variants).tolist() == [1] * dataset.num_variants
    assert all(seen[k] == (0, 0) for k in np.flatnonzero(untranslated))
    moved = sum(seen[k] != (0, 0) for k in range(n))
    assert moved > n // 3  # the others mostly sit elsewhere
