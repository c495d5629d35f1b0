import numpy as np
import pytest

from pipeline.inference.predictions import Predictions, PredictionsError, PredictionsWriter


def _grid(h, w, seed):
    return np.random.default_rng(seed).integers(0, 10, (h, w), dtype=np.uint8)


def _sample() -> tuple[Predictions, list]:
    writer = PredictionsWriter(["a", "b", "unused"])
    grids_a = [_grid(2, 3, 0), None, _grid(30, 30, 1)]
    writer.add("a", 0, [0, 1, 2], [0.1, 0.2, 0.3], grids_a)
    grids_b = [_grid(1, 1, 2), _grid(5, 4, 3)]
    writer.add(["b", "c"], [1, 0], 7, 0.5, grids_b)
    return writer.finish(), grids_a + grids_b


def test_writer_rows_and_grids():
    p, grids = _sample()
    assert len(p) == 5
    assert p.task_ids == ["a", "b", "unused", "c"]  # declared first, new ids appended in first-seen order
    assert p.task.tolist() == [0, 0, 0, 1, 3]
    assert p.test_index.tolist() == [0, 0, 0, 1, 0]
    assert p.variant.tolist() == [0, 1, 2, 7, 7]
    assert p.valid.tolist() == [True, False, True, True, True]
    assert np.allclose(p.q, [0.1, 0.2, 0.3, 0.5, 0.5])
    for i, g in enumerate(grids):
        if g is None:
            assert p.grid(i) is None
        else:
            assert np.array_equal(p.grid(i), g) and p.grid(i).dtype == np.uint8
    p.check()


def test_save_load_round_trip(tmp_path):
    p, _ = _sample()
    path = tmp_path / "sub" / "predictions.npz"
    p.save(path)
    q = Predictions.load(path)
    assert q.task_ids == p.task_ids
    for name, column in p.columns().items():
        assert np.array_equal(getattr(q, name), column) and getattr(q, name).dtype == column.dtype
    assert np.array_equal(q.cells, p.cells)
    assert [f.name for f in path.parent.iterdir()] == ["predictions.npz"]  # no temp file left


def test_add_padded_matches_add():
    rng = np.random.default_rng(5)
    grids = [_grid(int(h), int(w), k) for k, (h, w) in enumerate(rng.integers(1, 31, (20, 2)))]
    grids[3] = None
    canvas = np.full((20, 30, 30), 9, np.uint8)  # junk outside each grid must not leak in
    height = np.zeros(20, int)
    width = np.zeros(20, int)
    for k, g in enumerate(grids):
        if g is not None:
            canvas[k, : g.shape[0], : g.shape[1]] = g
            height[k], width[k] = g.shape
    a = PredictionsWriter()
    a.add("t", 0, np.arange(20), 0.5, grids)
    b = PredictionsWriter()
    b.add_padded("t", 0, np.arange(20), 0.5, canvas, height, width)
    pa, pb = a.finish(), b.finish()
    for name, column in pa.columns().items():
        assert np.array_equal(getattr(pb, name), column), name
    assert np.array_equal(pa.cells, pb.cells)


def test_concatenate_remaps_tasks():
    p, grids = _sample()
    w = PredictionsWriter(["c", "z"])
    w.add("z", 0, 0, 0.9, [_grid(3, 3, 9)])
    joined = Predictions.concatenate([p, w.finish()])
    assert joined.task_ids == ["a", "b", "unused", "c", "z"]
    assert joined.task_ids[joined.task[-1]] == "z"
    assert np.array_equal(joined.grid(5), _grid(3, 3, 9))
    assert np.array_equal(joined.grid(4), grids[4])
    joined.check()


def test_rejects_bad_grids_and_files(tmp_path):
    w = PredictionsWriter()
    with pytest.raises(PredictionsError, match="colour 10"):
        w.add("t", 0, 0, 0.5, [np.full((2, 2), 10, np.uint8)])
    with pytest.raises(PredictionsError, match="shape"):
        w.add("t", 0, 0, 0.5, [np.zeros((31, 2), np.uint8)])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(PredictionsError, match="bad.npz"):
        Predictions.load(bad)
    p, _ = _sample()
    p.offset[0] = len(p.cells)  # points past the buffer
    with pytest.raises(PredictionsError, match="outside"):
        p.check()


def test_empty_store():
    p = PredictionsWriter(["a"]).finish()
    assert len(p) == 0 and p.task_ids == ["a"]
    p.check()
