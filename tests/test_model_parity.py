"""Parity with the published TRM code, through the golden fixture recorded from it (shared/golden/trm_parity,
described in its README): same weights and batch in, same logits, carries, halting, losses, metrics and
gradients out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.model.reference import (
    config_from_reference,
    from_reference_state_dict,
    load_reference_state_dict,
    to_reference_state_dict,
)
from pipeline.model.trm import TRM, ModelConfig
from pipeline.training.loss import act_loss

GOLDEN = Path(__file__).resolve().parent / "golden" / "trm_parity"  # vendored from shared/golden

ATOL_STATE = 1e-4  # logits and carries, over several ACT steps
ATOL_LOSS = 1e-5
ATOL_GRAD = 1e-5
COUNT_METRICS = ("count", "exact_accuracy", "q_halt_accuracy", "steps")
FLOAT_METRICS = ("accuracy", "lm_loss", "q_halt_loss")


def load(name: str):
    return torch.load(GOLDEN / name)


def reference_config(**overrides) -> ModelConfig:
    arch = json.loads((GOLDEN / "config.json").read_text())["model_config"]
    return config_from_reference({**arch, **overrides})


def reference_model(state_dict: dict | None = None, **overrides) -> TRM:
    model = TRM(reference_config(**overrides))
    load_reference_state_dict(model, load("state_dict.pt") if state_dict is None else state_dict)
    return model


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"{what}: max |difference| {err:.3g} > {atol}"


def equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert torch.equal(actual.cpu(), expected.to(actual.dtype)), f"{what}: {actual.tolist()} != {expected.tolist()}"


def check_metrics(metrics: dict, expected: dict, what: str) -> None:
    assert set(metrics) == set(expected), f"{what}: metric names {sorted(metrics)} != {sorted(expected)}"
    for k in COUNT_METRICS:
        assert metrics[k].item() == expected[k].item(), f"{what} {k}: {metrics[k].item()} != {expected[k].item()}"
    for k in FLOAT_METRICS:
        close(metrics[k], expected[k], ATOL_LOSS, f"{what} {k}")
    assert metrics["lm_loss"].dtype == torch.float64


def reference_grads(model: TRM) -> dict[str, torch.Tensor]:
    """Every gradient under the reference's names, the puzzle rows' included."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads = to_reference_state_dict(grads)
    grads["inner.puzzle_emb.local_weights"] = model.puzzle_emb.local_weights.grad
    return grads


def check_grad_norms(model: TRM, expected: dict[str, float], what: str) -> None:
    grads = reference_grads(model)
    assert set(grads) == set(expected), f"{what}: gradient names differ"
    for name, norm in expected.items():
        got = grads[name].double().norm().item()
        assert abs(got - norm) <= 1e-5 * max(1.0, abs(norm)), f"{what} |grad {name}|: {got} != {norm}"


def run_eval(model: TRM, batch: dict, steps: int):
    model.eval()
    results = []
    with torch.inference_mode():
        carry = model.initial_carry(batch)
        for _ in range(steps):
            carry, outputs = model(carry, batch)
            loss, metrics = act_loss(outputs, carry)
            results.append((carry, outputs, loss, metrics))
    return results


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model.", "_orig_mod.model."])
def test_reference_checkpoint_loads_with_every_prefix(prefix):
    raw = load("state_dict.pt")
    model = reference_model({prefix + k: v for k, v in raw.items()})
    ours = model.state_dict()
    for key, value in raw.items():
        assert torch.equal(ours[from_reference_state_dict({key: value}).popitem()[0]], value), key
    assert sum(p.numel() for p in model.parameters()) == 132_738  # the README's trainable count


def test_eval_steps_match_reference():
    expected_steps = load("eval_steps.pt")["steps"]
    results = run_eval(reference_model(), load("batch.pt"), len(expected_steps))
    for i, ((carry, outputs, loss, metrics), exp) in enumerate(zip(results, expected_steps)):
        what = f"eval step {i + 1}"
        close(outputs["logits"], exp["logits"], ATOL_STATE, f"{what} logits")
        close(outputs["q_halt_logits"], exp["q_halt_logits"], ATOL_STATE, f"{what} q_halt")
        close(outputs["q_continue_logits"], exp["q_continue_logits"], ATOL_STATE, f"{what} q_continue")
        equal(outputs["preds"], exp["preds"], f"{what} preds")
        close(carry.z_H, exp["z_H"], ATOL_STATE, f"{what} z_H")
        close(carry.z_L, exp["z_L"], ATOL_STATE, f"{what} z_L")
        equal(carry.steps, exp["carry_steps"], f"{what} steps")
        equal(carry.halted, exp["carry_halted"], f"{what} halted")
        assert carry.steps.dtype == torch.int32 and carry.halted.dtype == torch.bool
        assert bool(carry.halted.all()) == exp["all_finish"]
        assert loss.dtype == torch.float64
        close(loss, exp["loss"], ATOL_LOSS, f"{what} loss")
        check_metrics(metrics, exp["metrics"], what)


def test_train_step_loss_and_every_gradient_match_reference():
    expected = load("train_step.pt")["step0"]
    batch = load("batch.pt")
    model = reference_model()
    model.train()
    carry = model.initial_carry(batch)
    carry, outputs = model(carry, batch)
    loss, metrics = act_loss(outputs, carry)
    loss.backward()

    close(loss, expected["loss"], ATOL_LOSS, "train loss")
    check_metrics(metrics, expected["metrics"], "train step")
    close(outputs["logits"], expected["logits"], ATOL_STATE, "train logits")
    close(outputs["q_halt_logits"], expected["q_halt_logits"], ATOL_STATE, "train q_halt")
    equal(outputs["preds"], expected["preds"], "train preds")
    equal(carry.steps, expected["carry_steps"], "train steps")
    equal(carry.halted, expected["carry_halted"], "train halted")
    equal(model.puzzle_emb.local_ids, expected["local_ids"], "local_ids")
    grads = reference_grads(model)
    assert set(grads) == set(expected["grads"])
    for name, grad in expected["grads"].items():
        close(grads[name], grad, ATOL_GRAD, f"grad {name}")
    check_grad_norms(model, expected["grad_norms"], "train step")


def test_exploration_draws_from_global_rng_like_reference():
    """Training draws torch.rand_like(q_halt) then torch.randint_like(steps) from the global RNG every step
    (even at probability 0), so whatever draws next sees the same RNG state as with the reference."""
    batch = load("batch.pt")
    model = reference_model()
    model.train()
    torch.manual_seed(1234)
    model(model.initial_carry(batch), batch)
    after_model = torch.rand(4)
    torch.manual_seed(1234)
    torch.rand(3)
    torch.randint(2, 5, (3,), dtype=torch.int32)
    assert torch.equal(after_model, torch.rand(4))


def test_train_rollout_matches_reference():
    fixture = load("train_step.pt")
    expected, batch2 = fixture["rollout"], fixture["rollout_batches"]["batch_step_5"]
    batch = load("batch.pt")
    model = reference_model()
    model.train()
    carry = model.initial_carry(batch)
    for i, exp in enumerate(expected):
        what = f"rollout call {i + 1}"
        model.zero_grad()
        carry, outputs = model(carry, batch if i < 4 else batch2)
        loss, metrics = act_loss(outputs, carry)
        loss.backward()
        close(outputs["logits"], exp["logits"], ATOL_STATE, f"{what} logits")
        close(outputs["q_halt_logits"], exp["q_halt_logits"], ATOL_STATE, f"{what} q_halt")
        equal(outputs["preds"], exp["preds"], f"{what} preds")
        equal(carry.steps, exp["carry_steps"], f"{what} steps")
        equal(carry.halted, exp["carry_halted"], f"{what} halted")
        equal(model.puzzle_emb.local_ids, exp["local_ids"], f"{what} local_ids")
        close(loss, exp["loss"], ATOL_LOSS, f"{what} loss")
        check_metrics(metrics, exp["metrics"], what)
        check_grad_norms(model, exp["grad_norms"], what)


def test_train_rollout_with_mixed_halting_matches_reference():
    """q_head.bias = 0, so rows halt at different steps through q_halt > 0 and are refilled one at a time."""
    fixture = load("train_step.pt")["rollout_mixed_halt"]
    state = dict(load("state_dict.pt"))
    state["inner.q_head.bias"] = torch.tensor(fixture["q_head_bias_override"], dtype=torch.float32)
    model = reference_model(state)
    model.train()
    carry = model.initial_carry(fixture["batches"][0])
    halt_pattern = []
    for i, (batch, exp) in enumerate(zip(fixture["batches"], fixture["steps"])):
        what = f"mixed-halt call {i + 1}"
        model.zero_grad()
        carry, outputs = model(carry, batch)
        loss, metrics = act_loss(outputs, carry)
        loss.backward()
        equal(model.puzzle_emb.local_ids, exp["local_ids"], f"{what} local_ids")
        equal(carry.halted, exp["carry_halted"], f"{what} halted")
        equal(carry.steps, exp["carry_steps"], f"{what} steps")
        equal(outputs["preds"], exp["preds"], f"{what} preds")
        close(outputs["q_halt_logits"], exp["q_halt_logits"], ATOL_STATE, f"{what} q_halt")
        close(outputs["q_continue_logits"], exp["q_continue_logits"], ATOL_STATE, f"{what} q_continue")
        close(loss, exp["loss"], ATOL_LOSS, f"{what} loss")
        check_metrics(metrics, exp["metrics"], what)
        check_grad_norms(model, exp["grad_norms"], what)
        halt_pattern.append(carry.halted.tolist())
    # the scenario really is mixed: some call halts only part of the batch
    assert any(0 < sum(h) < len(h) for h in halt_pattern)


def test_puzzle_emb_len_16_variant_matches_reference():
    fixture = load("variant_puzzle_emb_len16.pt")
    assert fixture["config_overrides"] == {"puzzle_emb_len": 16}
    batch = load("batch.pt")
    model = reference_model(**fixture["config_overrides"])
    expected_steps = fixture["eval"]["steps"]
    results = run_eval(model, batch, len(expected_steps))
    for i, ((carry, outputs, loss, metrics), exp) in enumerate(zip(results, expected_steps)):
        what = f"P=16 eval step {i + 1}"
        close(outputs["logits"], exp["logits"], ATOL_STATE, f"{what} logits")
        close(outputs["q_halt_logits"], exp["q_halt_logits"], ATOL_STATE, f"{what} q_halt")
        close(outputs["q_continue_logits"], exp["q_continue_logits"], ATOL_STATE, f"{what} q_continue")
        equal(outputs["preds"], exp["preds"], f"{what} preds")
        close(loss, exp["loss"], ATOL_LOSS, f"{what} loss")
        check_metrics(metrics, exp["metrics"], what)
    close(results[-1][0].z_H, fixture["eval"]["final_z_H"], ATOL_STATE, "P=16 final z_H")

    exp = fixture["train_step0"]
    model.train()
    carry = model.initial_carry(batch)
    carry, outputs = model(carry, batch)
    loss, metrics = act_loss(outputs, carry)
    loss.backward()
    close(loss, exp["loss"], ATOL_LOSS, "P=16 train loss")
    check_metrics(metrics, exp["metrics"], "P=16 train")
    close(outputs["logits"], exp["logits"], ATOL_STATE, "P=16 train logits")
    equal(outputs["preds"], exp["preds"], "P=16 train preds")
    close(model.puzzle_emb.local_weights.grad, exp["grad_local_weights"], ATOL_GRAD, "P=16 grad local_weights")
    close(model.q_head.weight.grad, exp["grad_q_head_weight"], ATOL_GRAD, "P=16 grad q_head")
    close(model.embed_tokens.weight.grad, exp["grad_embed_tokens"], ATOL_GRAD, "P=16 grad embed_tokens")
    check_grad_norms(model, exp["grad_norms"], "P=16 train")


def test_state_dict_round_trips_through_reference_names():
    raw = load("state_dict.pt")
    model = reference_model()
    as_reference = to_reference_state_dict(model.state_dict())
    assert set(as_reference) == set(raw)  # exactly the reference's names, nothing extra or missing
    for key, value in as_reference.items():
        assert value.shape == raw[key].shape and torch.equal(value, raw[key]), key
    fresh = TRM(reference_config())
    load_reference_state_dict(fresh, as_reference)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    compiled_names = to_reference_state_dict(model.state_dict(), prefix="_orig_mod.model.inner.")
    assert from_reference_state_dict(compiled_names).keys() == model.state_dict().keys()
