"""ACT steps at prediction (predict.act_steps) and halting when q_halt says so (predict.early_stop)."""
from __future__ import annotations

import torch

from pipeline.model.trm import TRM, ModelConfig
from pipeline.inference.predict import run_act_steps


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


def test_the_act_study_scores_what_predict_would_have_made(tmp_path):
    """benchmarks/act_steps.py reads K steps (and halting) off one pass; stage predict with act_steps=K (and
    early_stop) makes the same candidates."""
    import sys
    from pathlib import Path

    import numpy as np

    from augment.dataset import AugmentedDataset
    from pipeline.config import PredictConfig
    from pipeline.inference.predict import predict
    from tiny import build_tiny_dataset

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from act_steps import act_study, candidates, halting_steps, step_outputs

    dataset = AugmentedDataset.load(build_tiny_dataset(tmp_path / "data", num_tasks=2, num_aug=2))
    torch.manual_seed(0)
    model = TRM(ModelConfig(vocab_size=12, seq_len=36, hidden_size=32, num_heads=2, H_cycles=1, L_cycles=1,
                            halt_max_steps=2, puzzle_emb_len=1, puzzle_emb_ndim=32,
                            num_puzzle_identifiers=dataset.num_puzzle_identifiers)).eval()
    with torch.no_grad():
        model.q_head.bias.fill_(0.0)
        model.q_head.weight.normal_()  # some rows halt early, some do not

    def rows(p):
        return sorted((int(p.task[i]), int(p.test_index[i]), int(p.variant[i]),
                       None if p.grid(i) is None else p.grid(i).tobytes()) for i in range(len(p)))

    out = step_outputs(model, dataset, 3)
    n = len(out["variant"])
    for k in (1, 3):
        made = predict(model, dataset, PredictConfig(act_steps=k), progress=False)
        assert rows(candidates(dataset, out, np.full(n, k))) == rows(made)
    halted = predict(model, dataset, PredictConfig(early_stop=True), progress=False)
    steps = halting_steps(out["q"], 2)
    assert 1 in steps and rows(candidates(dataset, out, steps)) == rows(halted)
    table = act_study(model, dataset, steps=(1, 2, 4))
    assert [r["name"] for r in table] == ["1 steps", "2 steps", "4 steps", "halt (≤ 2)", "halt (≤ 4)"]
    assert all(0 <= r["pass2_task"] <= r["oracle_task"] <= 1 and r["ce_true"] > 0 for r in table)
