import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from augment.transforms import (
    DIHEDRAL_INVERSE,
    Augmentation,
    dihedral,
    transformed_shape,
)
from pipeline.data.tasks import Task


@st.composite
def grids(draw, max_side=30):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 10, size=(h, w), dtype=np.uint8)


@st.composite
def augmentations(draw):
    tid = draw(st.integers(0, 7))
    perm = draw(st.permutations(list(range(1, 10))))
    return Augmentation(tid, (0, *perm))


@st.composite
def tasks(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def grid():
        return rng.integers(0, 10, size=tuple(rng.integers(1, 31, size=2)), dtype=np.uint8)

    n_train = draw(st.integers(1, 4))
    n_test = draw(st.integers(1, 2))
    with_outputs = draw(st.booleans())
    return Task(
        id="t",
        train=[(grid(), grid()) for _ in range(n_train)],
        test_inputs=[grid() for _ in range(n_test)],
        test_outputs=[grid() for _ in range(n_test)] if with_outputs else None,
        source="hypothesis",
    )


def test_dihedral_ids_match_numpy():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    expected = [
        g,
        np.rot90(g, 1),
        np.rot90(g, 2),
        np.rot90(g, 3),
        np.fliplr(g),
        np.flipud(g),
        g.T,
        np.fliplr(np.rot90(g, 1)),
    ]
    for tid, e in enumerate(expected):
        out = dihedral(g, tid)
        np.testing.assert_array_equal(out, e)
        assert out.shape == transformed_shape(3, 4, tid)
    with pytest.raises(ValueError):
        dihedral(g, 8)


def test_dihedral_returns_copy():
    g = np.zeros((2, 3), dtype=np.uint8)
    for tid in range(8):
        dihedral(g, tid)[0, 0] = 5
    assert g.sum() == 0


@settings(max_examples=200, deadline=None)
@given(grids(), st.integers(0, 7))
def test_dihedral_inverse_ids(g, tid):
    np.testing.assert_array_equal(dihedral(dihedral(g, tid), DIHEDRAL_INVERSE[tid]), g)


@settings(max_examples=300, deadline=None)
@given(grids(), augmentations())
def test_invert_apply_round_trip(g, aug):
    out = aug.apply(g)
    assert out.dtype == g.dtype
    assert out.shape == transformed_shape(*g.shape, aug.dihedral)
    np.testing.assert_array_equal(aug.invert(out), g)
    # colour 0 never moves to another colour and nothing else becomes 0
    assert (out == 0).sum() == (g == 0).sum()


@settings(max_examples=100, deadline=None)
@given(tasks(), augmentations())
def test_apply_task_keeps_pairs_aligned(task, aug):
    new = aug.apply_task(task)
    assert new.id == task.id and new.source == task.source
    assert len(new.train) == len(task.train) and len(new.test_inputs) == len(task.test_inputs)
    for (i, o), (ni, no) in zip(task.train, new.train):
        assert ni.shape == transformed_shape(*i.shape, aug.dihedral)
        assert no.shape == transformed_shape(*o.shape, aug.dihedral)
        np.testing.assert_array_equal(aug.invert(ni), i)
        np.testing.assert_array_equal(aug.invert(no), o)
    if task.test_outputs is None:
        assert new.test_outputs is None
    back = aug.invert_task(new)
    for a, b in zip(back.test_inputs + (back.test_outputs or []), task.test_inputs + (task.test_outputs or [])):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=200, deadline=None)
@given(augmentations())
def test_text_round_trip(aug):
    text = aug.to_text()
    assert len(text) == 13
    assert Augmentation.from_text(text) == aug


def test_text_form_and_errors():
    aug = Augmentation.from_text("t3|0432187659")
    assert aug.dihedral == 3 and aug.colours == (0, 4, 3, 2, 1, 8, 7, 6, 5, 9)
    assert aug.to_text() == "t3|0432187659"
    for bad in ["t8|0123456789", "t1|1023456789", "t1|0123456788", "t1|012345678", "x1|0123456789"]:
        with pytest.raises(ValueError):
            Augmentation.from_text(bad)
    assert aug.reference_name("abc") == "abc|||t3|||0432187659"
    assert Augmentation.identity().reference_name("abc") == "abc"


def test_random_is_uniform_and_seeded():
    rng = np.random.default_rng(0)
    augs = [Augmentation.random(rng) for _ in range(4000)]
    tids = np.bincount([a.dihedral for a in augs], minlength=8)
    assert tids.min() > 400  # expected 500 each
    where_one_goes = np.bincount([a.colours[1] for a in augs], minlength=10)
    assert where_one_goes[0] == 0 and where_one_goes[1:].min() > 350  # expected 444 each
    again = np.random.default_rng(0)
    assert [Augmentation.random(again) for _ in range(10)] == augs[:10]


def test_batches_numpy_torch_and_tokens():
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 10, size=(5, 7, 7), dtype=np.uint8)
    for aug in [Augmentation.random(rng) for _ in range(16)]:
        out = aug.apply(batch)
        for b in range(5):
            np.testing.assert_array_equal(out[b], aug.apply(batch[b]))
        np.testing.assert_array_equal(aug.invert(out), batch)
        t_out = aug.apply(torch.from_numpy(batch))
        assert isinstance(t_out, torch.Tensor)
        np.testing.assert_array_equal(t_out.numpy(), out)
        np.testing.assert_array_equal(aug.invert(t_out).numpy(), batch)
        # tokens: PAD 0, EOS 1 and the ignore label -100 stay, colour tokens c+2 become colours[c]+2
        tokens = rng.choice(np.array([-100, 0, 1, *range(2, 12)], dtype=np.int32), size=(5, 7, 7))
        token_map = {-100: -100, 0: 0, 1: 1, **{c + 2: aug.colours[c] + 2 for c in range(10)}}
        expect = np.vectorize(token_map.get)(tokens).astype(np.int32)
        t = aug.apply(tokens, tokens=True)
        assert t.dtype == np.int32
        np.testing.assert_array_equal(t, dihedral(expect, aug.dihedral))
        np.testing.assert_array_equal(aug.invert(t, tokens=True), tokens)
        t_torch = aug.apply(torch.from_numpy(tokens), tokens=True)
        np.testing.assert_array_equal(t_torch.numpy(), t)


def test_bad_augmentation_rejected():
    with pytest.raises(ValueError):
        Augmentation(8, tuple(range(10)))
    with pytest.raises(ValueError):
        Augmentation(0, (1, 0, 2, 3, 4, 5, 6, 7, 8, 9))
