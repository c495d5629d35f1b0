"""Canvas buckets (pipeline.data.canvas): a bucket is the canvas's top-left corner with every cell at its canvas position,
so a model computes on a bucket exactly what it computes on the whole canvas when attention is kept off the cells
outside the bucket; the rules that choose a bucket; encoding on a bucket."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from augment.dataset import build_dataset
from pipeline.data.canvas import output_bound, side_for, translation_room
from pipeline.config import PredictConfig
from pipeline.data.tasks import Task
from pipeline.data.encoding import IGNORE_LABEL, PAD, encode_many
from pipeline.model.rows import RowEngine, grid_positions, parse_buckets
from pipeline.model.trm import TRM, ModelConfig
from pipeline.training.loss import act_loss
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
    """(outputs, loss, gradients) of `steps` ACT steps from a fresh carry (no exploration), on the bucket the batch's
    length says (the test knows; the model is told)."""
    engine = RowEngine(CANVAS, (SIDE, CANVAS), P)
    side = int(round(batch["inputs"].shape[1] ** 0.5))
    model.train(train)
    carry = model.initial_carry(batch)
    rows = batch["inputs"].shape[0]
    explore = (torch.ones(rows), torch.zeros(rows, dtype=torch.int32))
    out = []
    for _ in range(steps):
        model.zero_grad()
        with torch.set_grad_enabled(train):
            carry, outputs = engine.step(model, carry, batch, side, exploration=explore if train else None)
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


def test_whole_canvas_positions_are_the_identity_and_the_model_is_told_a_buckets():
    engine = RowEngine.build(f"{SIDE}", CANVAS, model_config())
    assert engine.positions(CANVAS, "cpu") is None  # the reference's path, untouched
    assert engine.positions(SIDE, "cpu").tolist() == [0, 1] + [P + r * CANVAS + c for r in range(SIDE) for c in range(SIDE)]
    model, batch = TRM(model_config()), on_bucket(corner_batch())
    with pytest.raises(ValueError, match="positions"):  # a shorter sequence is not guessed to be a corner
        model(model.initial_carry(batch), batch)
    for options in (dict(mlp_t=True), dict(mlp_conv=3)):  # they compute otherwise on a bucket: refused up front
        with pytest.raises(ValueError, match="data.canvas_buckets"):
            RowEngine.build(f"{SIDE}", CANVAS, model_config(**options))
        assert RowEngine.build("", CANVAS, model_config(**options)).buckets == ()


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


def assert_same_views(a: dict, b: dict, task_prefix: str, side: int, skip: set = frozenset()) -> None:
    """Same q and likelihood; the same decoded grid unless the full canvas's extends to the bucket's edge or past it
    (a bucket's crop stops at its edge: the full canvas's cells beyond it may hold colours)."""
    keys = [k for k in a if k[0].startswith(task_prefix)]
    assert keys and set(keys) == {k for k in b if k[0].startswith(task_prefix) and k not in skip}
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
        engine = RowEngine(PREDICT_CANVAS, buckets, P)
        predicted = predict(model, ds, cfg, progress=False, engine=engine)
        candidates.logp, candidates.logp_cells = rescore(model, ds, candidates, top_k=2, views=3, batch_size=5,
                                                         progress=False, engine=engine)
        return by_view(predicted), by_view(candidates)

    bucketed, plain = run((SMALL, PREDICT_CANVAS)), run(())
    keys_only_in_bucket(monkeypatch, SMALL, PREDICT_CANVAS)
    masked = run(())
    # a view whose answer reached the bucket's edge was run again on the whole canvas: it has the plain answer
    edge = {k for k, (_, g, _) in masked[0].items() if k[0].startswith("same") and g is not None and max(g.shape) >= SMALL}
    for key in edge:
        assert bucketed[0][key][0] == pytest.approx(plain[0][key][0], abs=1e-5)
        assert np.array_equal(bucketed[0][key][1], plain[0][key][1])
    for got, full, want in zip(bucketed, plain, masked):
        assert_same_views({k: v for k, v in got.items() if k not in edge}, want, "same", SMALL, skip=edge)
        assert_same_views(got, full, "odd", PREDICT_CANVAS + 1)
    assert not np.isnan([v[2] for v in bucketed[1].values()]).any()  # every candidate fits its bucket


def test_a_candidate_too_large_for_its_bucket_moves_its_input_to_a_bucket_that_holds_it(mixed_dataset):
    """A candidate that fills its input's bucket (prediction re-ran that view on a bigger one) has every candidate
    of that input scored on the smallest bucket holding it, its EOS edge included: none is cut or left out."""
    ds = mixed_dataset
    task = next(t for t in ds.eval_tasks() if t.id.startswith("same"))
    writer = PredictionsWriter([t.id for t in ds.eval_tasks()])
    writer.add(task.id, 0, 0, 0.5, [np.zeros((SMALL, SMALL), np.uint8)])
    writer.add(task.id, 0, 1, 0.5, [np.zeros((SMALL + 1, 1), np.uint8)])
    scores = rescore(predict_model(ds), ds, writer.finish(), top_k=2, views=2, progress=False,
                     engine=RowEngine(PREDICT_CANVAS, (SMALL, PREDICT_CANVAS), P))
    assert np.isfinite(scores.logp).all()
    assert scores.cells.tolist() == [SMALL * SMALL + 2 * SMALL, (SMALL + 1) + 1 + (SMALL + 1)]


def test_prediction_and_rescoring_on_buckets_shard_over_two_processes_as_one(mixed_dataset, monkeypatch):
    """Each rank's share of the views (mixing both buckets) joined, and the re-scoring sums of both ranks added
    (the all-reduce played in-process), give what one process gives."""
    import pipeline.inference.rescore as rescore_module

    ds, model, engine = mixed_dataset, predict_model(mixed_dataset), RowEngine(PREDICT_CANVAS, (SMALL, PREDICT_CANVAS), P)
    cfg = PredictConfig(max_variants=0, batch_size=3)
    one = predict(model, ds, cfg, progress=False, engine=engine)
    two = Predictions.concatenate([predict(model, ds, cfg, progress=False, engine=engine, rank=r, world=2)
                                   for r in range(2)])
    assert by_view(one).keys() == by_view(two).keys()
    for key, (q, grid, _) in by_view(one).items():
        assert by_view(two)[key][0] == pytest.approx(q, abs=1e-6)
    sums = {}
    monkeypatch.setattr(rescore_module, "all_reduce_sum", lambda t, world: sums.setdefault("rank1", t.clone()))
    rescore(model, ds, one, top_k=2, views=3, batch_size=3, progress=False, engine=engine, rank=1, world=2)
    monkeypatch.setattr(rescore_module, "all_reduce_sum", lambda t, world: t + sums["rank1"])
    sharded = rescore(model, ds, one, top_k=2, views=3, batch_size=3, progress=False, engine=engine, rank=0, world=2)
    monkeypatch.undo()
    alone = rescore(model, ds, one, top_k=2, views=3, batch_size=3, progress=False, engine=engine)
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


# -- the trainer's step on buckets -----------------------------------------------------------------------------------
class FixedRefill:
    """The trainer's refill, played: every halted row takes its row of `fresh`; rows sit on `sides`."""

    def __init__(self, fresh: dict[str, torch.Tensor], sides: np.ndarray):
        self.fresh, self.sides = fresh, sides

    def __call__(self, index, halted):
        return self.fresh

    def watch(self, index, halted):
        pass

    def local_sides(self, index):
        return self.sides


def trainer_state(engine: RowEngine, rows: int):
    from pipeline.config import RunConfig
    from pipeline.training.optim import SignSGD, build_dense_optimizer
    from pipeline.training.state import TrainState

    torch.manual_seed(0)
    model = TRM(model_config(halt_exploration_prob=0.5))
    with torch.no_grad():
        model.puzzle_emb.weights.normal_()
    cfg = RunConfig(model=model.config, global_batch_size=rows, lr=1e-3, lr_warmup_steps=0, ema=False)
    dense = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_dense_optimizer(dense, cfg.optimizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
    table = SignSGD(model.puzzle_emb.weights, lr=cfg.puzzle_emb_lr, weight_decay=cfg.puzzle_emb_weight_decay)
    state = TrainState(model, optimizer, table, None, None, [engine.blank_carry(model, rows, "cpu")], engine=engine)
    return state, cfg


def test_a_training_step_on_buckets_is_the_masked_full_canvas_step(monkeypatch):
    """The trainer's step with rows on mixed buckets (gathered, run, scattered back) equals a whole-canvas step whose
    attention keeps each bucket row off the cells outside its bucket: loss, gradients, the optimizer's update, the
    puzzle rows' update and the carry, over two steps (the second continues the carried rows)."""
    import pipeline.training.step as step_module
    from pipeline.training.runtime import Runtime
    from pipeline.training.step import train_step

    full = corner_batch(rows=3, seed=1)
    sides = np.array([SIDE, CANVAS, SIDE])
    cells = grid_positions(SIDE, CANVAS)
    local = {k: v.clone() for k, v in full.items()}  # bucket-local layout: a bucket row's corner first, PAD after
    for r in np.flatnonzero(sides == SIDE):
        for key, fill in (("inputs", PAD), ("labels", IGNORE_LABEL)):
            local[key][r] = fill
            local[key][r, :SIDE * SIDE] = full[key][r, cells]
    rt = Runtime(accelerator=type("FP32", (), {"autocast": staticmethod(contextlib.nullcontext)})(), rank=0, world=1,
                 device=torch.device("cpu"))

    def run(engine: RowEngine, fresh: dict) -> tuple:
        state, cfg = trainer_state(engine, 3)
        grads, sums = [], torch.zeros(7, dtype=torch.float64)
        real = step_module.all_reduce_gradients
        monkeypatch.setattr(step_module, "all_reduce_gradients", lambda params, world: grads.append(
            [p.grad.clone() for p in params]) or real(params, world))
        for _ in range(2):
            train_step(state, cfg, rt, FixedRefill(fresh, sides if engine.on_buckets else np.full(3, CANVAS)), sums,
                       torch.zeros((), dtype=torch.bool), 10)
        return state, grads, sums

    bucketed = run(RowEngine(CANVAS, (SIDE, CANVAS), P), local)
    visible = torch.ones(3, P + CANVAS * CANVAS, dtype=torch.bool)  # per row: the keys its attention may read
    for r in np.flatnonzero(sides == SIDE):
        visible[r, P:] = False
        visible[r, P + cells] = True
    real_attention = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: real_attention(q, k, v, attn_mask=visible[:, None, None, :]))
    masked = run(RowEngine(CANVAS, (), P), full)
    monkeypatch.undo()

    (b_state, b_grads, b_sums), (m_state, m_grads, m_sums) = bucketed, masked
    torch.testing.assert_close(b_sums, m_sums, atol=1e-5, rtol=1e-6)  # loss, q-loss and metrics
    for b_step, m_step in zip(b_grads, m_grads):
        for b, m in zip(b_step, m_step):
            torch.testing.assert_close(b, m, atol=2e-5, rtol=1e-4)
    for (name, b), m in zip(b_state.model.named_parameters(), m_state.model.parameters()):
        torch.testing.assert_close(b, m, atol=1e-6, rtol=1e-5, msg=name)  # the optimizer's update
    torch.testing.assert_close(b_state.model.puzzle_emb.weights, m_state.model.puzzle_emb.weights, atol=1e-6, rtol=1e-5)
    b_carry, m_carry = b_state.carries[0], m_state.carries[0]
    assert torch.equal(b_carry.steps, m_carry.steps) and torch.equal(b_carry.halted, m_carry.halted)
    slots = torch.cat((torch.arange(P), P + cells))
    for r, side in enumerate(sides.tolist()):
        where = slots if side == SIDE else torch.arange(P + CANVAS * CANVAS)
        torch.testing.assert_close(b_carry.z_H[r, :len(where)], m_carry.z_H[r, where], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(b_carry.z_L[r, :len(where)], m_carry.z_L[r, where], atol=2e-5, rtol=1e-4)


# -- no silent crop --------------------------------------------------------------------------------------------------
class DrawsAnAnswer(torch.nn.Module):
    """A stand-in model that answers every row with one fixed grid (the true output), drawn at the row's canvas
    positions: on a bucket too small for it, it shows the part the bucket holds, as a real model's logits would."""

    def __init__(self, answer: np.ndarray, canvas: int):
        super().__init__()
        self.config = type("Config", (), {"halt_max_steps": 1, "seq_len": canvas * canvas})()
        self.puzzle_len = 0
        tokens = encode_many(answer.ravel(), np.array([0]), np.array([answer.shape[0]]), np.array([answer.shape[1]]),
                             canvas)
        self.tokens = torch.from_numpy(tokens[0]).long()

    def initial_carry(self, batch):
        return type("Carry", (), {"halted": torch.ones(batch["inputs"].shape[0], dtype=torch.bool)})()

    def forward(self, carry, batch, exploration=None, positions=None):
        drawn = self.tokens if positions is None else self.tokens[positions]
        preds = drawn[None].expand(batch["inputs"].shape[0], -1)
        return carry, {"preds": preds, "q_halt_logits": torch.zeros(preds.shape[0])}


def test_an_answer_bigger_than_its_predicted_bucket_is_run_again_on_a_bigger_one():
    """The issue's task: demonstrations 3×3 → 6×6 and 2×2 → 4×4 explain "the output is twice the input", so a 4×4
    test input is given bucket 12 of 12,20; its true output is 16×16. Every view's answer reaches bucket 12's edge,
    is run again on the canvas, and comes back whole (16×16), not cut to 12×12; the input is counted."""
    rng = np.random.default_rng(0)
    grid = lambda h, w: rng.integers(0, 10, (h, w), dtype=np.uint8)  # noqa: E731
    answer = np.full((16, 16), 3, np.uint8)
    task = Task("grow", [(grid(3, 3), grid(6, 6)), (grid(2, 2), grid(4, 4))], [grid(4, 4)], [answer], "t")
    dataset = build_dataset([task], {task.id}, num_aug=3, seed=0, canvas=20, progress=False)
    engine = RowEngine.build("12", 20)
    rows = dataset.test_rows()
    assert engine.held_out_sides(dataset, rows["puzzle_index"], rows["test_index"]).tolist() == [12] * 4
    stats: dict = {}
    predictions = predict(DrawsAnAnswer(answer, 20), dataset, PredictConfig(max_variants=0), progress=False,
                          engine=engine, stats=stats)
    assert len(predictions) == 4 and all(predictions.grid(k).shape == (16, 16) for k in range(4))
    assert stats["rerun_inputs"] == 1
    whole: dict = {}
    predict(DrawsAnAnswer(answer, 20), dataset, PredictConfig(max_variants=0), progress=False, stats=whole)
    assert whole["rerun_inputs"] == 0  # on the whole canvas nothing is run twice
