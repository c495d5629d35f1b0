"""ACT steps at prediction (predict.act_steps) and halting when q_halt says so (predict.early_stop)."""
from __future__ import annotations

import torch

from pipeline.model import TRM, ModelConfig
from pipeline.predict import run_act_steps


class Scripted(torch.nn.Module):
    """Step k (1-based) predicts k everywhere; q_halt per row from a script (row r halts at step halt_at[r])."""

    def __init__(self, halt_at: list[int]):
        super().__init__()
        self.halt_at = torch.tensor(halt_at)
        self.calls = 0

    def initial_carry(self, batch):
        return type("Carry", (), {"halted": torch.ones(len(self.halt_at), dtype=torch.bool)})()

    def forward(self, carry, batch):
        self.calls += 1
        rows = len(self.halt_at)
        q = torch.where(self.halt_at <= self.calls, 1.0, -1.0)  # once past its step a row keeps saying "halt"
        q[0] = 1.0 if self.calls == 2 else -1.0  # row 0 says halt at step 2 only
        return carry, {"preds": torch.full((rows, 3), self.calls), "q_halt_logits": q}


def test_halting_freezes_each_row_at_its_first_halt_and_stops_when_all_have():
    model = Scripted([2, 1, 3])
    preds, q = run_act_steps(model, {}, steps=16, halt=True)
    assert model.calls == 3  # every row has halted after step 3
    assert preds[:, 0].tolist() == [2, 1, 3]  # row 0's answer stays the one of step 2, though it said -1 later
    model = Scripted([2, 1, 3])
    preds, _ = run_act_steps(model, {}, steps=5)
    assert model.calls == 5 and preds[:, 0].tolist() == [5, 5, 5]


def test_act_steps_beyond_halt_max_steps_continue_the_recursion():
    torch.manual_seed(0)
    model = TRM(ModelConfig(vocab_size=12, seq_len=16, hidden_size=32, num_heads=2, H_cycles=1, L_cycles=1,
                            halt_max_steps=2, puzzle_emb_len=1, puzzle_emb_ndim=32, num_puzzle_identifiers=3)).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randint(0, 12, (2, 16), generator=g, dtype=torch.int32),
             "labels": torch.full((2, 16), -100, dtype=torch.int32),
             "puzzle_identifiers": torch.ones(2, dtype=torch.int32)}
    with torch.no_grad():
        carry = model.initial_carry(batch)
        for _ in range(4):
            carry, outputs = model(carry, batch)
            carry.halted[:] = False
        four, _ = run_act_steps(model, batch, 4)
        two, _ = run_act_steps(model, batch, 2)
        restarted = model(model(model.initial_carry(batch), batch)[0], batch)[1]  # the plain eval loop: 2 steps
    assert torch.equal(four, outputs["preds"])
    assert torch.equal(two, restarted["preds"])
