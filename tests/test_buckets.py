"""Canvas buckets (pipeline.data.canvas): a bucket is the canvas's top-left corner with every cell at its canvas position,
so a model computes on a bucket exactly what it computes on the whole canvas when attention is kept off the cells
outside the bucket; the rules that choose a bucket; encoding on a bucket."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from augment.dataset import build_dataset
from pipeline.data.canvas import output_bound, parse_buckets, side_for, translation_room
from pipeline.config import PredictConfig
from pipeline.data.tasks import Task
from pipeline.data.encoding import IGNORE_LABEL, PAD, encode_many
from pipeline.model.trm import TRM, ModelConfig, act_loss, grid_positions
from pipeline.inference.predict import predict
from pipeline.inference.predictions import Predictions, PredictionsWriter
from pipeline.inference.rescore import rescore

CANVAS, SIDE, P = 6, 4, 2


def model_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=12, seq_len=CANVAS * CANVAS, hidden_size=32, num_heads=2, expansion=4, num_layers=2,
                H_cycles=2, L_cycles=2, halt_max_steps=3, halt_exploration_prob=0.0, puzzle_emb_len=P,
                puzzle_emb_ndim=32, num_puzzle_identifiers=5)
    return ModelConfig(**{**base, **overrides})


def corner_batch(rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-canvas rows whose content lies in the top-left SIDE×SIDE corner (grids of side <= SIDE - 1 with their
    EOS edge), PAD / IGNORE_LABEL elsewhere."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 10, 200, dtype=np.uint8)
    h, w = rng.integers(1, SIDE, rows), rng.integers(1, SIDE, rows)
    starts = rng.integers(0, 100, rows)
    return {
        "inputs": torch.from_numpy(encode_many(pixels, starts, h, w, CANVAS)),
        "labels": torch.from_numpy(encode_many(pixels, starts + 50, w, h, CANVAS, labels=True)),
        "puzzle_identifiers": torch.arange(1, rows + 1, dtype=torch.int32),
    }


def on_bucket(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cells = grid_positions(SIDE, CANVAS)
    return {k: v[:, cells] if v.ndim == 2 else v for k, v in batch.items()}


def keys_only_in_bucket(monkeypatch, side: int = SIDE, canvas: int = CANVAS) -> None:
    """Full-canvas attention with every key outside the bucket masked out (puzzle positions stay visible)."""
    visible = torch.zeros(P + canvas * canvas, dtype=torch.bool)
    visible[:P] = True
    visible[P + grid_positions(side, canvas)] = True
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: real(q, k, v, attn_mask=visible[None, :]))


def run_steps(model: TRM, batch: dict, steps: int, train: bool) -> list[tuple[dict, torch.Tensor, dict]]:
    """(outputs, loss, gradients) of `steps` ACT steps from a fresh carry (no exploration)."""
    model.train(train)
    carry = model.initial_carry(batch)
    rows = batch["inputs"].shape[0]
    explore = (torch.ones(rows), torch.zeros(rows, dtype=torch.int32))
    out = []
    for _ in range(steps):
        model.zero_grad()
        with torch.set_grad_enabled(train):
            carry, outputs = model(carry, batch, exploration=explore if train else None)
            loss, _ = act_loss(outputs, carry)
        if train:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if train:
            grads["puzzle rows"] = model.puzzle_emb.local_weights.grad.clone()
        out.append((outputs, loss.detach(), grads))
    return out


@pytest.mark.parametrize("pos_encodings", ["rope", "learned"])
@pytest.mark.parametrize("train", [False, True])
def test_a_bucket_computes_the_full_canvas_with_attention_kept_off_the_padding(monkeypatch, pos_encodings, train):
    torch.manual_seed(0)
    model = TRM(model_config(pos_encodings=pos_encodings))
    with torch.no_grad():
        model.puzzle_emb.weights.normal_()
    batch = corner_batch()
    cells = grid_positions(SIDE, CANVAS)
    full = run_steps(model, batch, 3, train)
    bucket = run_steps(model, on_bucket(batch), 3, train)
    keys_only_in_bucket(monkeypatch)
    masked = run_steps(model, batch, 3, train)
    for (f_out, f_loss, _), (b_out, b_loss, b_grads), (m_out, m_loss, m_grads) in zip(full, bucket, masked):
        torch.testing.assert_close(b_out["logits"], m_out["logits"][:, cells], atol=2e-5, rtol=0)
        torch.testing.assert_close(b_out["q_halt_logits"], m_out["q_halt_logits"], atol=2e-5, rtol=0)
        torch.testing.assert_close(b_loss, m_loss, atol=1e-5, rtol=0)
        assert b_grads.keys() == m_grads.keys() and (not train or b_grads)
        for name in b_grads:
            torch.testing.assert_close(b_grads[name], m_grads[name], atol=2e-5, rtol=1e-4, msg=name)
        # what differs from the plain full canvas (the reference): its padding cells take part in attention
        assert (b_out["logits"] - f_out["logits"][:, cells]).abs().max() > 1e-3


def test_whole_canvas_positions_are_the_identity_and_buckets_are_checked():
    model = TRM(model_config())
    assert model.positions(CANVAS * CANVAS) is None  # the reference's path, untouched
    assert model.positions(SIDE * SIDE).tolist() == [0, 1] + [P + r * CANVAS + c for r in range(SIDE) for c in range(SIDE)]
    with pytest.raises(ValueError, match="square corner"):
        model.positions(10)
    with pytest.raises(ValueError, match="mlp_t"):
        TRM(model_config(mlp_t=True)).positions(SIDE * SIDE)


def test_parse_buckets():
    assert parse_buckets("", 30) == ()
    assert parse_buckets("12,20", 30) == (12, 20, 30)
    assert parse_buckets(" 12, 16 ,30", 30) == (12, 16, 30)
    for bad in ("12,x", "20,12", "12,12,30", "31", "1,30"):
        with pytest.raises(ValueError, match="data.canvas_buckets"):
            parse_buckets(bad, 30)


def test_side_for_holds_the_eos_edge():
    buckets = (4, 8, 30)
    assert side_for(np.array([1, 3, 4, 7, 8, 29, 30]), buckets, 30).tolist() == [4, 4, 8, 8, 30, 30, 30]
    assert side_for(np.array([3, 30]), (), 30).tolist() == [30, 30]
    assert translation_room(np.array([3, 7]), np.array([4, 8]), 30).tolist() == [0, 0]  # edge just inside
    assert translation_room(np.array([28]), np.array([30]), 30).tolist() == [2]  # on the canvas it may fall off


def test_output_bound_rules():
    same = [((3, 4), (3, 4)), ((5, 2), (5, 2))]
    assert output_bound(same, (7, 6)) == 7
    transposed = [((3, 4), (4, 3)), ((5, 2), (2, 5))]
    assert output_bound(transposed, (7, 6)) == 7
    fixed = [((3, 4), (2, 2)), ((9, 9), (2, 2))]
    assert output_bound(fixed, (20, 20)) == output_bound(fixed, (1, 1)) == 2  # (the bucket holds the input too)
    scaled = [((2, 3), (6, 9)), ((4, 1), (12, 3))]
    assert output_bound(scaled, (5, 2)) == 15
    bordered = [((2, 3), (4, 5)), ((6, 1), (8, 3))]
    assert output_bound(bordered, (10, 4)) == 12
    assert output_bound([((2, 2), (4, 4)), ((3, 3), (9, 9))], (5, 5)) is None  # squared: no rule, whole canvas


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 7), st.integers(0, 9), st.integers(0, 9))
def test_a_grid_on_a_bucket_is_the_corner_of_its_full_canvas(h, w, dihedral, r, c):
    canvas, pixels = 12, np.arange(h * w, dtype=np.uint8) % 10
    th, tw = (w, h) if dihedral in (1, 3, 6, 7) else (h, w)
    side = int(side_for(np.array([max(th, tw)]), (5, 9, canvas), canvas)[0])
    room = translation_room(np.array([th, tw]), side, canvas)
    offset = np.array([[min(r, room[0]), min(c, room[1])]])
    for labels in (False, True):
        kw = dict(dihedrals=np.array([dihedral]), offsets=offset, labels=labels)
        full = encode_many(pixels, np.array([0]), np.array([h]), np.array([w]), canvas, **kw)
        small = encode_many(pixels, np.array([0]), np.array([h]), np.array([w]), side, **kw)
        np.testing.assert_array_equal(small[0], full[0, grid_positions(side, canvas).numpy()])
        outside = np.ones(canvas * canvas, bool)
        outside[grid_positions(side, canvas).numpy()] = False
        assert (full[0, outside] == (IGNORE_LABEL if labels else PAD)).all()  # nothing lost outside the bucket


# -- prediction and re-scoring on buckets ------------------------------------------------------------------------------
PREDICT_CANVAS, SMALL = 8, 4


@pytest.fixture(scope="module")
def mixed_dataset():
    """Four held-out tasks on an 8x8 canvas: three whose outputs have their input's shape (grids <= 3: bucket 4 of
    buckets 4,8) and one whose demonstrations follow no size rule (the whole canvas)."""
    rng = np.random.default_rng(0)
    grid = lambda h, w: rng.integers(0, 10, (h, w), dtype=np.uint8)  # noqa: E731
    tasks = [Task(f"same{n}", [(grid(2, 3), grid(2, 3)), (grid(3, 1), grid(3, 1))], [grid(3, 2)], [grid(3, 2)], "t")
             for n in range(3)]
    tasks.append(Task("odd", [(grid(2, 2), grid(3, 3)), (grid(3, 3), grid(2, 2))], [grid(2, 2)], [grid(3, 3)], "t"))
    return build_dataset(tasks, {t.id for t in tasks}, num_aug=3, seed=0, canvas=PREDICT_CANVAS, progress=False)


def predict_model(dataset) -> TRM:
    torch.manual_seed(1)
    model = TRM(model_config(seq_len=PREDICT_CANVAS ** 2, num_puzzle_identifiers=dataset.num_puzzle_identifiers))
    with torch.no_grad():
        model.puzzle_emb.weights.normal_()
    return model.eval()


def by_view(predictions: Predictions) -> dict[tuple[str, int, int], tuple[float, object, float]]:
    return {(predictions.task_ids[t], int(i), int(v)): (float(q), predictions.grid(k), np.nan if predictions.logp is
             None else float(predictions.logp[k]))
            for k, (t, i, v, q) in enumerate(zip(predictions.task, predictions.test_index, predictions.variant,
                                                 predictions.q))}


def assert_same_views(a: dict, b: dict, task_prefix: str, side: int) -> None:
    """Same q and likelihood; the same decoded grid unless the full canvas's extends to the bucket's edge or past it
    (a bucket's crop stops at its edge: the full canvas's cells beyond it may hold colours)."""
    keys = [k for k in a if k[0].startswith(task_prefix)]
    assert keys and set(keys) == {k for k in b if k[0].startswith(task_prefix)}
    for k in keys:
        assert a[k][0] == pytest.approx(b[k][0], abs=1e-5), k
        assert a[k][2] == pytest.approx(b[k][2], abs=1e-3, nan_ok=True), k
        if b[k][1] is None or max(b[k][1].shape) < side:
            assert (a[k][1] is None) == (b[k][1] is None) and (a[k][1] is None or np.array_equal(a[k][1], b[k][1])), k


def test_held_out_inputs_take_the_bucket_their_demonstrations_predict(mixed_dataset):
    rows = mixed_dataset.test_rows()
    sides = mixed_dataset.held_out_sides(rows["puzzle_index"], rows["test_index"], (SMALL, PREDICT_CANVAS))
    odd = [mixed_dataset.puzzles[p]["task_id"] == "odd" for p in rows["puzzle_index"]]
    assert sides.tolist() == [PREDICT_CANVAS if o else SMALL for o in odd]


def test_prediction_and_rescoring_on_buckets_compute_the_masked_full_canvas(mixed_dataset, monkeypatch):
    """Rows on the small bucket get what the whole canvas gives with attention kept off the cells outside it; rows
    of the task without a size rule are computed on the whole canvas, as without buckets."""
    ds, model = mixed_dataset, predict_model(mixed_dataset)
    cfg = PredictConfig(max_variants=0, batch_size=5)  # batches that mix both buckets
    writer = PredictionsWriter([t.id for t in ds.eval_tasks()])  # candidates to score: the truth and the input
    for task in ds.eval_tasks():
        writer.add(task.id, 0, 0, 0.5, [task.test_outputs[0]])
        writer.add(task.id, 0, 1, 0.5, [task.test_inputs[0]])
    candidates = writer.finish()

    def run(buckets: tuple[int, ...]) -> tuple[dict, dict]:
        predicted = predict(model, ds, cfg, progress=False, buckets=buckets)
        candidates.logp, candidates.logp_cells = rescore(model, ds, candidates, top_k=2, views=3, batch_size=5,
                                                         progress=False, buckets=buckets)
        return by_view(predicted), by_view(candidates)

    bucketed, plain = run((SMALL, PREDICT_CANVAS)), run(())
    keys_only_in_bucket(monkeypatch, SMALL, PREDICT_CANVAS)
    masked = run(())
    for got, full, want in zip(bucketed, plain, masked):
        assert_same_views(got, want, "same", SMALL)
        assert_same_views(got, full, "odd", PREDICT_CANVAS + 1)
    assert not np.isnan([v[2] for v in bucketed[1].values()]).any()  # every candidate fits its bucket


def test_a_candidate_as_large_as_its_bucket_is_scored_without_the_eos_edge_beyond_it(mixed_dataset):
    """A prediction on a bucket can fill it (its crop stops at the edge): its label cells are its colours only."""
    ds = mixed_dataset
    task = next(t for t in ds.eval_tasks() if t.id.startswith("same"))
    writer = PredictionsWriter([t.id for t in ds.eval_tasks()])
    writer.add(task.id, 0, 0, 0.5, [np.zeros((SMALL, SMALL), np.uint8)])
    writer.add(task.id, 0, 1, 0.5, [np.zeros((SMALL + 1, 1), np.uint8)])  # larger than the bucket: not scored
    scores = rescore(predict_model(ds), ds, writer.finish(), top_k=2, views=2, progress=False,
                     buckets=(SMALL, PREDICT_CANVAS))
    assert np.isfinite(scores.logp[0]) and scores.cells[0] == SMALL * SMALL
    assert scores.logp[1] == -np.inf and scores.cells[1] == 0


def test_prediction_and_rescoring_on_buckets_shard_over_two_processes_as_one(mixed_dataset, monkeypatch):
    """Each rank's share of the views (mixing both buckets) joined, and the re-scoring sums of both ranks added
    (the all-reduce played in-process), give what one process gives."""
    import pipeline.inference.rescore as rescore_module

    ds, model, buckets = mixed_dataset, predict_model(mixed_dataset), (SMALL, PREDICT_CANVAS)
    cfg = PredictConfig(max_variants=0, batch_size=3)
    one = predict(model, ds, cfg, progress=False, buckets=buckets)
    two = Predictions.concatenate([predict(model, ds, cfg, progress=False, buckets=buckets, rank=r, world=2)
                                   for r in range(2)])
    assert by_view(one).keys() == by_view(two).keys()
    for key, (q, grid, _) in by_view(one).items():
        assert by_view(two)[key][0] == pytest.approx(q, abs=1e-6)
    sums = {}
    monkeypatch.setattr(rescore_module, "all_reduce_sum", lambda t, world: sums.setdefault("rank1", t.clone()))
    rescore(model, ds, one, top_k=2, views=3, batch_size=3, progress=False, buckets=buckets, rank=1, world=2)
    monkeypatch.setattr(rescore_module, "all_reduce_sum", lambda t, world: t + sums["rank1"])
    sharded = rescore(model, ds, one, top_k=2, views=3, batch_size=3, progress=False, buckets=buckets, rank=0, world=2)
    monkeypatch.undo()
    alone = rescore(model, ds, one, top_k=2, views=3, batch_size=3, progress=False, buckets=buckets)
    np.testing.assert_allclose(sharded.logp, alone.logp, rtol=1e-5)
    np.testing.assert_array_equal(sharded.cells, alone.cells)
    assert np.isfinite(alone.logp).any()


# -- the training stream on buckets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("translation", ["reference", "per_draw"])
def test_the_stream_is_the_same_with_buckets_only_placed_inside_them(mixed_dataset, translation):
    from pipeline.training.batches import TrainSampler

    buckets = (SMALL, 6, PREDICT_CANVAS)
    kw = dict(seed=3, sampling="groups", translation=translation, batch_size=4)
    plain, bucketed = TrainSampler(mixed_dataset, **kw), TrainSampler(mixed_dataset, buckets=buckets, **kw)
    n = 3 * mixed_dataset.num_train_examples
    ks, _ = plain.take_indices(n)
    state = bucketed.state_dict()
    ks_b, offsets = bucketed.take_indices(n)
    np.testing.assert_array_equal(ks, ks_b)  # the same examples in the same order
    extent = mixed_dataset.train_extent(ks)
    sides = bucketed.sides(ks)
    assert sorted(set(sides.tolist())) == [SMALL]  # the demonstrations here are all <= 3: the small bucket
    assert ((offsets >= 0) & (offsets + extent + 1 <= sides[:, None])).all()  # the EOS edge stays inside
    assert len({tuple(o) for o in offsets.tolist()}) > 1  # still translated, over a smaller range

    again = TrainSampler(mixed_dataset, buckets=buckets, **kw)
    again.load_state_dict(state)
    batch = again.take(n)
    np.testing.assert_array_equal(batch["sides"], sides)
    cells = SMALL * SMALL
    for k, (ex, offset) in enumerate(zip(ks.tolist(), offsets.tolist())):
        alone = mixed_dataset.encode_train_examples(np.array([ex]), np.array([offset]))
        for key, fill in (("inputs", PAD), ("labels", IGNORE_LABEL)):  # bucket-local layout
            np.testing.assert_array_equal(batch[key][k, :cells], alone[key][0, grid_positions(SMALL, PREDICT_CANVAS)])
            assert (batch[key][k, cells:] == fill).all()
    with pytest.raises(ValueError, match="canvas buckets"):
        plain.load_state_dict(bucketed.state_dict())
