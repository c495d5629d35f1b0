"""The FLOPs formula (pipeline.model.flops) against an independent count: torch's FlopCounterMode over one real
training ACT step (forward of every cycle, backward of the gradient cycle). The CPU attention kernel is not counted
by torch, so attention is run here as its two explicit matmuls (which torch counts, forward and backward)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model.flops import flops_at_depth, model_flops_per_row_step
from pipeline.model.rows import RowEngine
from pipeline.model.trm import TRM, ModelConfig
from pipeline.training.loss import act_loss

CANVAS, ROWS = 6, 2


def explicit_attention(q, k, v, **_):
    """softmax(q kᵀ / sqrt(d)) v as two counted matmuls (the same values as the fused kernel)."""
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def counted_flops(config: ModelConfig, side: int, cycles: tuple[int, int] | None, monkeypatch,
                  backward: bool = True) -> float:
    """FlopCounterMode's count of one training ACT step of ROWS rows on `side` (a bucket when < CANVAS); with
    backward=False, one prediction ACT step (forward only)."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    torch.manual_seed(0)
    model = TRM(config).train(backward)
    model.cycles = cycles
    engine = RowEngine.build(f"{side}" if side < CANVAS else "", CANVAS, config)
    cells = side * side
    batch = {"inputs": torch.randint(2, 12, (ROWS, cells), dtype=torch.int32),
             "labels": torch.randint(2, 12, (ROWS, cells), dtype=torch.int32),
             "puzzle_identifiers": torch.zeros(ROWS, dtype=torch.int32)}
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        carry, outputs = engine.step(model, engine.fresh_carry(model, batch), batch, side)
        if backward:
            act_loss(outputs, carry)[0].backward()
    return counter.get_total_flops() / ROWS


BASE = dict(vocab_size=12, seq_len=CANVAS * CANVAS, hidden_size=32, num_heads=2, expansion=4, num_layers=2,
            H_cycles=2, L_cycles=3, halt_max_steps=2, puzzle_emb_len=2, puzzle_emb_ndim=32, num_puzzle_identifiers=3)


@pytest.mark.parametrize("case", ["attention", "mlp_t", "mlp_conv", "bucket", "curriculum"])
def test_the_formula_counts_what_torch_counts(case, monkeypatch):
    options, side, cycles, backward = {}, CANVAS, None, True
    if case == "mlp_t":
        options = dict(mlp_t=True, pos_encodings="none")
    elif case == "mlp_conv":
        # forward only: torch counts a grouped (depthwise) convolution's backward as a dense one's
        options, backward = dict(mlp_conv=3), False
    elif case == "bucket":
        side = 4
    elif case == "curriculum":
        cycles = (1, 2)
    config = ModelConfig(**{**BASE, **options})
    counted = counted_flops(config, side, cycles, monkeypatch, backward)
    formula = (flops_at_depth(config, cycles, side * side) if backward
               else model_flops_per_row_step(config, side * side, backward=False))
    # the formula leaves out q_head (2 outputs) and elementwise work: within 1% of torch's count
    assert formula == pytest.approx(counted, rel=0.01), (case, formula, counted)


def test_the_token_mlp_is_counted_instead_of_attention():
    attention = ModelConfig(**BASE)
    token_mlp = dataclasses.replace(attention, mlp_t=True, pos_encodings="none")
    assert model_flops_per_row_step(token_mlp) != model_flops_per_row_step(attention)
