"""Canvas buckets (pipeline.canvas): a bucket is the canvas's top-left corner with every cell at its canvas position,
so a model computes on a bucket exactly what it computes on the whole canvas when attention is kept off the cells
outside the bucket; the rules that choose a bucket; encoding on a bucket."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.canvas import output_bound, parse_buckets, side_for, translation_room
from pipeline.encoding import IGNORE_LABEL, PAD, encode_many
from pipeline.model import TRM, ModelConfig, act_loss, grid_positions

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


def keys_only_in_bucket(monkeypatch) -> None:
    """Full-canvas attention with every key outside the bucket masked out (puzzle positions stay visible)."""
    visible = torch.zeros(P + CANVAS * CANVAS, dtype=torch.bool)
    visible[:P] = True
    visible[P + grid_positions(SIDE, CANVAS)] = True
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
