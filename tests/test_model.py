"""TRM-Att beyond the golden fixture: sizes, initialisation, the ablation options, bf16 autocast, the sparse
puzzle rows, halting, and reference-checkpoint loading edge cases."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.reference import (
    from_reference_state_dict,
    load_reference_state_dict,
    strip_reference_prefix,
    to_reference_state_dict,
)
import torch.nn.functional as F

from pipeline.model.trm import TRM, ModelConfig, swiglu_width
from pipeline.training.loss import act_loss
from pipeline.training.runtime import dense_params_without_gradient


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=12, seq_len=16, hidden_size=32, num_heads=2, expansion=4, num_layers=2, H_cycles=2,
                L_cycles=2, halt_max_steps=3, halt_exploration_prob=0.0, puzzle_emb_len=2, puzzle_emb_ndim=32,
                num_puzzle_identifiers=7)
    return ModelConfig(**{**base, **overrides})


def tiny_batch(config: ModelConfig, rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, config.vocab_size, (rows, config.seq_len), generator=g, dtype=torch.int32)
    labels = torch.randint(1, config.vocab_size, (rows, config.seq_len), generator=g, dtype=torch.int32)
    labels[:, -3:] = -100
    ids = torch.randint(1, config.num_puzzle_identifiers, (rows,), generator=g, dtype=torch.int32)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


def train_step(model: TRM, batch: dict, carry=None):
    model.train()
    carry = model.initial_carry(batch) if carry is None else carry
    carry, outputs = model(carry, batch)
    loss, metrics = act_loss(outputs, carry)
    loss.backward()
    return carry, outputs, loss, metrics


# -- sizes and initialisation --------------------------------------------------------------------------------


def test_paper_preset_has_the_reference_parameter_count():
    config = ModelConfig.paper_arc(num_puzzle_identifiers=1_300_000)
    assert (config.hidden_size, config.num_heads, config.num_layers, config.H_cycles, config.L_cycles) == (512, 8, 2, 3, 4)
    assert (config.halt_max_steps, config.puzzle_emb_len, config.seq_len, config.pos_encodings) == (16, 16, 900, "rope")
    assert swiglu_width(512, 4) == 1536
    with torch.device("meta"):
        model = TRM(config)
    assert sum(p.numel() for p in model.parameters()) == 6_829_058
    # the 1.3M-row puzzle table is a buffer, out of every dense optimizer's reach
    assert model.puzzle_emb.weights.shape == (1_300_000, 512)
    assert all(p is not model.puzzle_emb.weights for p in model.parameters())


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = TRM(tiny_config(hidden_size=128, num_heads=4))
    assert torch.equal(model.q_head.weight, torch.zeros(2, 128))
    assert torch.equal(model.q_head.bias, torch.full((2,), -5.0))
    assert torch.count_nonzero(model.puzzle_emb.weights) == 0
    w = model.blocks[0].mlp.gate_up.weight  # (1024, 128): std 1/sqrt(128), truncated at 2 sigma of the base normal
    assert abs(w.std().item() * 128**0.5 - 1) < 0.02
    assert w.abs().max().item() <= 2 / 0.8796256610342398 * 128**-0.5 + 1e-6
    assert abs(model.embed_tokens.weight.std().item() * 128**0.5 - 1) < 0.25  # only 12x128 values
    assert model.lm_head.bias is None and model.blocks[0].attn.qkv.bias is None
    torch.manual_seed(0)
    again = TRM(tiny_config(hidden_size=128, num_heads=4))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="num_heads"):
        TRM(tiny_config(num_heads=3))
    with pytest.raises(ValueError, match="pos_encodings"):
        TRM(tiny_config(pos_encodings="alibi"))
    with pytest.raises(ValueError, match="does not fit"):
        TRM(tiny_config(puzzle_emb_ndim=100))
    assert tiny_config(puzzle_emb_len=0, puzzle_emb_ndim=40).puzzle_len == 2  # ceil(40 / 32), as the reference


# -- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(pos_encodings="learned"), dict(pos_encodings="none"),
                                     dict(mlp_t=True, pos_encodings="none"), dict(puzzle_emb_len=5)])
def test_ablation_options_run_forward_and_backward(options):
    torch.manual_seed(0)
    config = tiny_config(**options)
    model = TRM(config)
    batch = tiny_batch(config)
    carry, outputs, loss, _ = train_step(model, batch)
    assert outputs["logits"].shape == (3, config.seq_len, 12)
    assert carry.z_H.shape == (3, config.total_len, 32) and carry.z_H.dtype == torch.float32
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if options.get("pos_encodings") == "learned":
        assert model.embed_pos.weight.shape == (config.total_len, 32)
        assert model.embed_pos.weight.grad.abs().sum() > 0
    if options.get("mlp_t"):
        assert not hasattr(model.blocks[0], "attn")
        assert model.blocks[0].token_mlp.gate_up.weight.shape == (2 * swiglu_width(config.total_len, 4), config.total_len)
    # the fast no-autograd path computes what the autograd path computes
    model.eval()
    with torch.no_grad():
        plain = model(model.initial_carry(batch), batch)[1]["logits"]
    with torch.enable_grad():
        recorded = model(model.initial_carry(batch), batch)[1]["logits"]
    torch.testing.assert_close(plain, recorded.detach(), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu_runs_and_stays_close_to_float32():
    torch.manual_seed(0)
    config = tiny_config()
    model = TRM(config)
    batch = tiny_batch(config)
    model.eval()
    with torch.no_grad():
        _, ref_outputs = model(model.initial_carry(batch), batch)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        carry, outputs = model(model.initial_carry(batch), batch)
        loss, metrics = act_loss(outputs, carry)
    loss.backward()
    assert outputs["logits"].dtype == torch.bfloat16
    assert carry.z_H.dtype == torch.float32 and outputs["q_halt_logits"].dtype == torch.float32
    assert loss.dtype == torch.float64 and metrics["lm_loss"].dtype == torch.float64
    assert (outputs["logits"].float() - ref_outputs["logits"]).abs().max() < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -- the gradient gate under bf16 autocast --------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(), dict(mlp_t=True), dict(pos_encodings="learned", H_cycles=3)])
def test_one_bf16_autocast_step_gives_every_dense_parameter_a_gradient(options):
    torch.manual_seed(0)
    model = TRM(tiny_config(**options))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert dense_params_without_gradient(model, "cpu", torch.bfloat16) == []
    # the gate leaves no trace: weights, gradients, mode and the global RNG as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_gate_catches_a_stale_no_grad_weight_cache_and_the_model_clears_it(monkeypatch):
    """Emulates the autocast cache of torch releases before the fix of pytorch#158232, whatever torch runs
    this test: a linear layer's bf16 weight copy is cached on first use *in the grad mode of that moment* and
    reused until torch.clear_autocast_cache(). Without the model's cache clear before the gradient cycle the
    gate names exactly the block weights; with it every dense parameter learns."""
    cache: dict[int, torch.Tensor] = {}
    real_linear, real_clear = F.linear, torch.clear_autocast_cache

    def linear_with_old_cache(inputs, weight, bias=None):
        if torch.is_autocast_enabled("cpu") and weight.requires_grad and weight.is_leaf:
            if id(weight) not in cache:
                cache[id(weight)] = weight.to(torch.bfloat16)  # no history when made under no_grad
            weight, inputs = cache[id(weight)], inputs.to(torch.bfloat16)
        return real_linear(inputs, weight, bias)

    def clear():
        cache.clear()
        real_clear()

    monkeypatch.setattr(F, "linear", linear_with_old_cache)
    monkeypatch.setattr(torch, "clear_autocast_cache", clear)
    torch.manual_seed(0)
    model = TRM(tiny_config())
    block_weights = {name for name, _ in model.named_parameters() if name.startswith("blocks.")}
    assert dense_params_without_gradient(model, "cpu", torch.bfloat16) == []

    # the same model and emulated cache with every clear disabled: the emulation does reproduce the failure
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: None)
    cache.clear()
    assert set(dense_params_without_gradient(model, "cpu", torch.bfloat16)) == block_weights


def test_injection_is_formed_once_per_cycle():
    """y + x is hoisted out of the n z-updates: they all receive the same tensor, formed once per cycle."""
    torch.manual_seed(0)
    config = tiny_config(H_cycles=3, L_cycles=4)
    model = TRM(config).eval()
    batch = tiny_batch(config)
    injections = []
    net = model.net

    def recording_net(h, injection, *rope):
        injections.append(injection)
        return net(h, injection, *rope)

    model.net = recording_net
    with torch.no_grad():
        model(model.initial_carry(batch), batch)
    n = config.L_cycles
    cycles = [injections[c * (n + 1):(c + 1) * (n + 1)] for c in range(config.H_cycles)]
    assert len(injections) == config.H_cycles * (n + 1)
    for cycle in cycles:
        assert all(z_update is cycle[0] for z_update in cycle[:n])  # one y + x for the n z-updates
    assert len({id(cycle[0]) for cycle in cycles}) == config.H_cycles


def test_compiled_blocks_compute_the_same_and_keep_their_names():
    torch.manual_seed(0)
    config = tiny_config()
    eager = TRM(config)
    compiled = TRM(tiny_config(compile_backend="aot_eager"))
    compiled.load_state_dict(eager.state_dict())
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    batch = tiny_batch(config)
    _, out_e, loss_e, _ = train_step(eager, batch)
    _, out_c, loss_c, _ = train_step(compiled, batch)
    torch.testing.assert_close(out_c["logits"], out_e["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_c, loss_e)
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="compile_backend"):
        TRM(tiny_config(compile_backend=None))


# -- puzzle rows ---------------------------------------------------------------------------------------------


def test_puzzle_rows_are_a_reused_leaf_with_per_batch_gradients():
    torch.manual_seed(0)
    config = tiny_config()
    model = TRM(config)
    with torch.no_grad():
        model.puzzle_emb.weights.normal_()
    batch = tiny_batch(config)
    train_step(model, batch)
    rows = model.puzzle_emb.local_weights
    assert rows.is_leaf and rows.requires_grad and rows.shape == (3, 32)
    assert torch.equal(model.puzzle_emb.local_ids, batch["puzzle_identifiers"])
    assert torch.equal(rows.detach(), model.puzzle_emb.weights[batch["puzzle_identifiers"]])
    first_grad = rows.grad.clone()
    assert first_grad.abs().sum() > 0

    # A second step with new data reuses the same tensor, and the first step's gradient does not linger
    # on it (it belonged to other ids).
    batch2 = tiny_batch(config, seed=1)
    model(model.initial_carry(batch2), batch2)
    assert model.puzzle_emb.local_weights is rows and rows.grad is None
    assert torch.equal(model.puzzle_emb.local_ids, batch2["puzzle_identifiers"])

    model.eval()  # eval reads the table directly and leaves the training rows alone
    with torch.no_grad():
        model(model.initial_carry(batch), batch)
    assert torch.equal(model.puzzle_emb.local_ids, batch2["puzzle_identifiers"])


def test_puzzle_rows_survive_module_to():
    config = tiny_config()
    model = TRM(config)
    train_step(model, tiny_batch(config))
    model.to(torch.float32)  # a .to() turns buffers into copies; the rows must become a leaf again
    train_step(model, tiny_batch(config))
    assert model.puzzle_emb.local_weights.is_leaf and model.puzzle_emb.local_weights.grad is not None


# -- ACT -----------------------------------------------------------------------------------------------------


def test_eval_runs_exactly_halt_max_steps_and_training_halts_on_q_halt():
    torch.manual_seed(0)
    config = tiny_config(halt_max_steps=4)
    model = TRM(config)
    batch = tiny_batch(config)
    model.eval()
    with torch.no_grad():
        model.q_head.bias.fill_(10.0)  # q_halt > 0 everywhere: ignored in eval
        carry = model.initial_carry(batch)
        for step in range(1, 5):
            carry, _ = model(carry, batch)
            assert carry.steps.tolist() == [step] * 3
            assert carry.halted.all() == (step == 4)
    model.train()
    carry, _ = model(model.initial_carry(batch), batch)
    assert carry.halted.all() and carry.steps.tolist() == [1, 1, 1]


def test_explicit_exploration_draws_set_a_minimum_number_of_steps():
    torch.manual_seed(0)
    config = tiny_config(halt_max_steps=4, halt_exploration_prob=0.5)
    model = TRM(config)
    batch = tiny_batch(config)
    with torch.no_grad():
        model.q_head.bias.fill_(10.0)  # wants to halt at once
    model.train()
    uniform = torch.tensor([0.1, 0.9, 0.2])  # rows 0 and 2 explore (< 0.5)
    min_steps = torch.tensor([3, 3, 2], dtype=torch.int32)
    carry = model.initial_carry(batch)
    halted_at = [None] * 3
    for step in range(1, 5):
        state = torch.random.get_rng_state()
        carry, _ = model(carry, batch, exploration=(uniform, min_steps))
        assert torch.equal(state, torch.random.get_rng_state())  # explicit draws leave the global RNG alone
        for r in range(3):
            if halted_at[r] is None and carry.halted[r]:
                halted_at[r] = step
        carry.halted &= torch.tensor([halted_at[r] is None for r in range(3)])  # keep rows going to observe
    assert halted_at == [3, 1, 2]


def test_rows_continue_on_their_own_data_until_they_halt():
    torch.manual_seed(0)
    config = tiny_config(halt_max_steps=2)
    model = TRM(config)
    batch, other = tiny_batch(config), tiny_batch(config, seed=5)
    model.eval()
    with torch.no_grad():
        carry, _ = model(model.initial_carry(batch), batch)
        carry.halted = torch.tensor([True, False, False])
        carry, _ = model(carry, other)
    assert torch.equal(carry.current_data["inputs"][0], other["inputs"][0])
    assert torch.equal(carry.current_data["inputs"][1:], batch["inputs"][1:])
    assert carry.steps.tolist() == [1, 2, 2]


def test_prediction_batches_need_no_labels():
    config = tiny_config()
    model = TRM(config).eval()
    batch = tiny_batch(config)
    del batch["labels"]
    with torch.no_grad():
        carry, outputs = model(model.initial_carry(batch), batch)
    assert set(carry.current_data) == {"inputs", "puzzle_identifiers"}
    assert outputs["preds"].shape == (3, config.seq_len)


def test_loss_normalises_per_sequence_and_sums_over_rows():
    """Duplicating the batch doubles the loss: rows are summed, each averaged over its own valid labels."""
    torch.manual_seed(0)
    config = tiny_config()
    model = TRM(config).eval()
    batch = tiny_batch(config)
    double = {k: torch.cat([v, v]) for k, v in batch.items()}
    with torch.no_grad():
        c1, o1 = model(model.initial_carry(batch), batch)
        c2, o2 = model(model.initial_carry(double), double)
        l1, m1 = act_loss(o1, c1)
        l2, m2 = act_loss(o2, c2)
    torch.testing.assert_close(l2, 2 * l1)
    assert m1["count"] == 0  # nothing halted after one eval step
    # by hand: the stablemax cross-entropy averaged over each row's valid labels, summed over rows
    rows = []
    for r in range(3):
        lg = o1["logits"][r].double()
        sr = torch.where(lg < 0, 1 / (1 - lg), lg + 1)
        lab = batch["labels"][r].long()
        v = lab != -100
        rows.append(-torch.log((sr / sr.sum(-1, keepdim=True))[v, lab[v]]).mean())
    torch.testing.assert_close(m1["lm_loss"], sum(rows))


# -- reference checkpoints -----------------------------------------------------------------------------------


def test_reference_names_cover_every_option_and_round_trip():
    for options in (dict(), dict(pos_encodings="learned"), dict(mlp_t=True)):
        model = TRM(tiny_config(**options))
        ours = model.state_dict()
        as_reference = to_reference_state_dict(ours, prefix="_orig_mod.model.inner.")
        assert all(k.startswith("_orig_mod.model.inner.") for k in as_reference)
        back = from_reference_state_dict(as_reference)
        assert back.keys() == ours.keys()
    assert strip_reference_prefix("model.inner.H_init") == "H_init"
    with pytest.raises(KeyError, match="prefix"):
        strip_reference_prefix("encoder.H_init")
    with pytest.raises(KeyError, match="unknown tensor"):
        from_reference_state_dict({"inner.H_level.layers.0.mlp.down_proj.weight": torch.zeros(1)})


def test_reference_checkpoint_with_another_puzzle_table_size():
    source = TRM(tiny_config(num_puzzle_identifiers=11))
    with torch.no_grad():
        source.puzzle_emb.weights.normal_()
    reference = to_reference_state_dict(source.state_dict())

    with pytest.raises(ValueError, match="11 rows but the model's has 7"):
        load_reference_state_dict(TRM(tiny_config()), reference)

    resized = TRM(tiny_config())
    report = load_reference_state_dict(resized, reference, on_puzzle_mismatch="resize")
    assert (report.checkpoint_puzzle_rows, report.model_puzzle_rows, report.puzzle_table) == (11, 7, "resized_to_checkpoint")
    assert report.puzzle_rows_differ and resized.config.num_puzzle_identifiers == 11
    assert torch.equal(resized.puzzle_emb.weights, source.puzzle_emb.weights)

    kept = TRM(tiny_config())
    report = load_reference_state_dict(kept, reference, on_puzzle_mismatch="keep_model")
    assert report.puzzle_table == "kept_model" and kept.puzzle_emb.weights.shape == (7, 32)
    assert torch.equal(kept.blocks[1].mlp.down.weight, source.blocks[1].mlp.down.weight)


# -- issue-17 options: the grid convolution in the MLP, a shallower depth, FLOPs --------------------------------


def test_grid_convolution_starts_as_the_plain_model_and_leaves_puzzle_positions_alone():
    from pipeline.model.flops import model_flops_per_row_step

    torch.manual_seed(0)
    plain = TRM(tiny_config())
    torch.manual_seed(0)
    conv = TRM(tiny_config(mlp_conv=3))
    conv.load_state_dict(plain.state_dict(), strict=False)  # the same weights; the convolutions stay at zero
    batch = tiny_batch(plain.config)
    plain.eval(), conv.eval()
    with torch.no_grad():
        same = [m(m.initial_carry(batch), batch)[1]["logits"] for m in (plain, conv)]
    torch.testing.assert_close(same[0], same[1])
    carry, _, loss, _ = train_step(conv, batch)  # the zero kernels still get a gradient: they learn
    assert conv.blocks[0].mlp.conv.conv.weight.grad.abs().sum() > 0
    layer = conv.blocks[0].mlp.conv
    with torch.no_grad():
        layer.conv.weight.normal_()
    a = torch.randn(2, conv.config.total_len, layer.conv.in_channels)
    mixed = layer(a)
    P = conv.config.puzzle_len
    assert torch.equal(mixed[:, :P], a[:, :P]) and not torch.allclose(mixed[:, P:], a[:, P:])
    side = 4  # seq_len 16: a 4x4 grid; the centre cell (1, 1) sees its 3x3 neighbourhood only
    probe = torch.zeros_like(a)
    probe[:, P + 3 * side + 3] = 1.0  # cell (3, 3): outside the neighbourhood of (1, 1)
    assert layer(probe)[:, P + 1 * side + 1].abs().sum() == 0
    assert model_flops_per_row_step(conv.config) > model_flops_per_row_step(plain.config)
    with pytest.raises(ValueError, match="odd"):
        TRM(tiny_config(mlp_conv=2))
    with pytest.raises(ValueError, match="square"):
        TRM(tiny_config(mlp_conv=3, seq_len=15))


def test_cycles_override_runs_a_shallower_model_and_counts_its_flops():
    from pipeline.model.flops import flops_at_depth, model_flops_per_row_step

    torch.manual_seed(0)
    deep = TRM(tiny_config())
    torch.manual_seed(0)
    shallow = TRM(tiny_config(H_cycles=1, L_cycles=1))
    deep.cycles = (1, 1)
    batch = tiny_batch(deep.config)
    deep.eval(), shallow.eval()
    with torch.no_grad():
        a, b = (m(m.initial_carry(batch), batch)[1]["logits"] for m in (deep, shallow))
    torch.testing.assert_close(a, b)
    assert flops_at_depth(deep.config, deep.cycles) == model_flops_per_row_step(shallow.config)
    deep.cycles = None
    assert flops_at_depth(deep.config, deep.cycles, 9) == model_flops_per_row_step(deep.config, 9) < model_flops_per_row_step(deep.config)
    forward = model_flops_per_row_step(deep.config, backward=False)
    assert 0 < forward < model_flops_per_row_step(deep.config)
