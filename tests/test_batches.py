from collections import Counter

import numpy as np
import pytest

from augment.dataset import build_dataset
from pipeline.batches import TrainSampler, iter_test_batches
from pipeline.data import Task
from pipeline.encoding import IGNORE_LABEL, PAD, decode_grid

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
    sampler = TrainSampler(dataset, seed=11, translate=False)
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
