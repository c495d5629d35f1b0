"""Optimisers, EMA and LR schedule checked against updates worked out by hand (float64 formulas, literals)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.training.optim import EMA, AdamAtan2, SignSGD, build_dense_optimizer, lr_at, sign_sgd_update_

LR, BETA1, BETA2, WD = 0.01, 0.9, 0.95, 0.1


def manual_adam_atan2(p0, grads, lr=LR, b1=BETA1, b2=BETA2, wd=WD, a=1.0, b=1.0, inside=False):
    """The update written out element by element in Python floats (float64), one grad list per step."""
    p = list(p0)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            p[i] *= 1.0 - lr * wd
            m[i] = b1 * m[i] + (1.0 - b1) * g[i]
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] ** 2
            v_hat_sqrt = math.sqrt(v[i] / (1.0 - b2 ** t))
            if inside:
                p[i] -= a * lr * math.atan2(m[i] / (1.0 - b1 ** t), b * v_hat_sqrt)
            else:
                p[i] -= a * lr / (1.0 - b1 ** t) * math.atan2(m[i], b * v_hat_sqrt)
    return p


def run_adam_atan2(p0, grads, dtype=torch.float64, **kwargs):
    p = torch.tensor(p0, dtype=dtype, requires_grad=True)
    opt = AdamAtan2([p], lr=LR, betas=(BETA1, BETA2), weight_decay=WD, **kwargs)
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return p.detach(), opt


P0 = [0.5, -1.0, 2.0, 0.0]
GRADS = [[0.1, -0.2, 0.0, 3.0], [-0.3, 0.05, 0.0, 1.0]]


def test_adam_atan2_first_step_literal():
    # t = 1: m = 0.1·g, √v̂ = |g|, so the step is (lr/0.1)·atan(0.1)·sign(g); p=0.5, g=0.1:
    # 0.5·(1 − 0.001) − 0.1·atan(0.1) = 0.4995 − 0.009966865249116204
    p, _ = run_adam_atan2(P0, GRADS[:1])
    assert p[0].item() == pytest.approx(0.4895331347508838, abs=1e-15)
    # zero gradient and zero state: atan2(0, 0) = 0, only the weight decay acts
    assert p[2].item() == pytest.approx(2.0 * (1 - LR * WD), abs=1e-15)
    assert p[3].item() == pytest.approx(-0.1 * math.atan(0.1), abs=1e-15)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_adam_atan2_matches_manual_formula(steps, dtype, tol):
    p, opt = run_adam_atan2(P0, GRADS[:steps], dtype=dtype)
    expected = manual_adam_atan2(P0, GRADS[:steps])
    assert p.tolist() == pytest.approx(expected, abs=tol)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"] == steps
    assert not torch.isnan(p).any()


@pytest.mark.parametrize("steps", [1, 2])
def test_adam_atan2_paper_form(steps):
    p, _ = run_adam_atan2(P0, GRADS[:steps], a=1.27, b=1.0, first_moment_correction="inside")
    expected = manual_adam_atan2(P0, GRADS[:steps], a=1.27, inside=True)
    assert p.tolist() == pytest.approx(expected, abs=1e-14)
    if steps == 1:  # t = 1: m̂ = g, √v̂ = |g| → step a·lr·π/4
        assert p[0].item() == pytest.approx(0.5 * (1 - LR * WD) - 1.27 * LR * math.pi / 4, abs=1e-15)


def test_adam_atan2_weight_decay_is_decoupled():
    with_wd, opt_wd = run_adam_atan2(P0, GRADS)
    p = torch.tensor(P0, dtype=torch.float64, requires_grad=True)
    opt = AdamAtan2([p], lr=LR, betas=(BETA1, BETA2), weight_decay=0.0)
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    # the moments never see the decay ...
    s_wd, s = opt_wd.state[opt_wd.param_groups[0]["params"][0]], opt.state[p]
    assert torch.equal(s_wd["exp_avg"], s["exp_avg"]) and torch.equal(s_wd["exp_avg_sq"], s["exp_avg_sq"])
    # ... and the weights differ only by the shrinkage of the starting weights: the atan2 steps are equal
    shrink = (1 - LR * WD)
    updates_wd = manual_adam_atan2(P0, GRADS)
    assert with_wd.tolist() == pytest.approx(updates_wd, abs=1e-14)
    step1 = [x - y for x, y in zip(manual_adam_atan2(P0, GRADS[:1], wd=0.0), P0)]
    step2 = [x - y for x, y in zip(p.detach().tolist(), manual_adam_atan2(P0, GRADS[:1], wd=0.0))]
    expected = [(p0 * shrink + d1) * shrink + d2 for p0, d1, d2 in zip(P0, step1, step2)]
    assert with_wd.tolist() == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("inside", [False, True])
def test_adam_atan2_update_is_bounded_and_finite(inside):
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(200, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    start = p.detach().clone()
    a = 1.27 if inside else 1.0
    opt = AdamAtan2([p], lr=LR, betas=(BETA1, BETA2), weight_decay=WD, a=a,
                    first_moment_correction="inside" if inside else "step_size")
    for t in range(1, 31):
        scale = 10.0 ** torch.randint(-8, 8, (200,), generator=gen).double()
        grad = torch.randn(200, generator=gen, dtype=torch.float64) * scale
        grad[::7] = 0.0  # some coordinates get no gradient at all
        p.grad = grad
        before = p.detach().clone()
        opt.step()
        atan2_step = p.detach() - before * (1 - LR * WD)
        bound = a * LR * math.pi / 2 * (1.0 if inside else 1.0 / (1 - BETA1 ** t))
        assert torch.isfinite(p).all()
        assert atan2_step.abs().max().item() <= bound + 1e-15
    # coordinates whose gradient is always zero only decay
    assert torch.allclose(p.detach()[::7], start[::7] * (1 - LR * WD) ** 30, rtol=1e-14, atol=0)


def test_adam_atan2_zero_gradient_zero_state_no_nan():
    p = torch.zeros(5, requires_grad=True)
    opt = AdamAtan2([p])
    p.grad = torch.zeros(5)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(5))


def test_adam_atan2_skips_params_without_grad_and_follows_scheduled_lr():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = AdamAtan2([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=0.0)
    a.grad = torch.full((3,), 0.5)
    opt.param_groups[0]["lr"] = 0.02  # a scheduler writes a float here before the step
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    expected = 1.0 * (1 - 0.02 * 0.1) - 0.02 / 0.1 * math.atan2(0.05, 0.5)
    assert a.detach().tolist() == pytest.approx([expected] * 3, abs=1e-7)
    opt.param_groups[0]["lr"] = torch.tensor(0.01)
    with pytest.raises(TypeError, match="Python float"):
        opt.step()


def test_adam_atan2_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt = AdamAtan2(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    twin_opt = AdamAtan2(twin.parameters(), lr=5.0)
    buffer = io.BytesIO()  # through bytes, as a checkpoint does (a live state dict shares its tensors)
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer))
    assert twin_opt.param_groups[0]["lr"] == 1e-3
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert all(twin_opt.state[p]["step"] == 4 for p in twin.parameters())


def test_build_dense_optimizer():
    params = [nn.Parameter(torch.zeros(2))]
    opt = build_dense_optimizer(params, "adam_atan2", lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    assert isinstance(opt, AdamAtan2) and opt.param_groups[0]["lr"] == 3e-4
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1
    assert isinstance(build_dense_optimizer(params, "adamw"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown dense optimizer"):
        build_dense_optimizer(params, "sgd")


# --- SignSGD -------------------------------------------------------------------------------------------

def test_sign_sgd_sums_duplicates_before_sign_and_leaves_other_rows_alone():
    table = torch.arange(18, dtype=torch.float32).reshape(6, 3) / 10  # row r = [.3r, .3r+.1, .3r+.2]
    original = table.clone()
    ids = torch.tensor([2, 4, 2, 5], dtype=torch.int32)
    grads = torch.tensor([[1.0, -0.5, 0.0],
                          [0.2, 0.0, -7.0],
                          [-3.0, 0.2, 0.0],   # with row 0: id 2 sums to [-2.0, -0.3, 0.0]
                          [0.0, 0.0, 1e-9]])
    opt = SignSGD(table, lr=0.01, weight_decay=0.1)
    touched = opt.step(ids, grads)
    assert touched.tolist() == [2, 2, 4, 5]
    decay = 1 - 0.01 * 0.1
    # id 2: row [0.6, 0.7, 0.8]; signs of the sum (-1, -1, 0): the per-row signs would have cancelled
    assert table[2].tolist() == pytest.approx([0.6 * decay + 0.01, 0.7 * decay + 0.01, 0.8 * decay], abs=1e-6)
    assert table[4].tolist() == pytest.approx([1.2 * decay - 0.01, 1.3 * decay, 1.4 * decay + 0.01], abs=1e-6)
    assert table[5].tolist() == pytest.approx([1.5 * decay, 1.6 * decay, 1.7 * decay - 0.01], abs=1e-6)
    for untouched in (0, 1, 3):  # not even decayed
        assert torch.equal(table[untouched], original[untouched])


def test_sign_sgd_literal_values_and_blank_row():
    table = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    sign_sgd_update_(table, torch.tensor([0, 0]), torch.tensor([[0.3, 0.1], [0.3, -0.2]]), lr=0.5, weight_decay=0.2)
    # id 0 is not special-cased: 1.0·0.9 − 0.5 = 0.4, −1.0·0.9 + 0.5 = −0.4
    assert table.flatten().tolist() == pytest.approx([0.4, -0.4, 2.0, 0.5], abs=1e-7)


def test_sign_sgd_rejects_bad_input_and_keeps_state():
    table = torch.zeros(4, 2)
    opt = SignSGD(table)
    assert (opt.lr, opt.weight_decay) == (1e-2, 0.1)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        opt.step(torch.tensor([1, 4]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="grads"):
        opt.step(torch.tensor([1, 2]), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="integers"):
        opt.step(torch.tensor([1.0]), torch.zeros(1, 2))
    opt.param_groups[0]["lr"] = 0.003
    other = SignSGD(torch.zeros(4, 2), lr=1.0)
    other.load_state_dict(opt.state_dict())
    assert (other.lr, other.weight_decay) == (0.003, 0.1)
    bf16_grads = torch.tensor([[1.0, -1.0]], dtype=torch.bfloat16)
    other.step(torch.tensor([3]), bf16_grads)
    assert other.weights[3].tolist() == pytest.approx([-0.003, 0.003])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=12), st.integers(0, 2**31 - 1))
def test_sign_sgd_equals_a_per_id_loop(ids, seed):
    """Grouping repeats by sorting gives what summing per distinct id gives, for any repeats and order."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(8, 3, generator=g)
    grads = torch.randn(len(ids), 3, generator=g)
    grads[0, 0] = 0.0  # a zero sum keeps its coordinate (sign 0)
    expected = table.clone()
    for i in set(ids):
        total = sum(grads[k] for k, j in enumerate(ids) if j == i)
        expected[i] = expected[i] * (1 - 0.02 * 0.1) - 0.02 * torch.sign(total)
    touched = sign_sgd_update_(table, torch.tensor(ids), grads, lr=0.02, weight_decay=0.1)
    torch.testing.assert_close(table, expected, atol=1e-6, rtol=0)
    assert touched.tolist() == sorted(ids)


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_sign_sgd_on_a_device_never_reads_a_value_back_to_the_host():
    """Off the CPU (here: the meta device, which has no values to read, so any .item() or data-dependent
    shape would fail) the update is a fixed sequence of device ops: no unique, nonzero or scalar read."""
    table = torch.zeros(100, 4, device="meta")
    opt = SignSGD(table, lr=0.01, weight_decay=0.1)
    with RecordOps() as recorder:
        touched = opt.step(torch.zeros(6, dtype=torch.int32, device="meta"), torch.zeros(6, 4, device="meta"))
    assert touched.shape == (6,)
    syncing = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
               "unique_dim", "masked_select"}
    names = {op.split(".")[0] for op in recorder.ops}
    assert "_assert_async" in names and not names & syncing, recorder.ops


# --- EMA -----------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)
        self.register_buffer("table", torch.tensor([[3.0]]))


def test_ema_three_steps_by_hand():
    model = Tiny()
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"w"}  # no frozen parameter, no buffer
    with torch.no_grad():
        for new in ([2.0, 0.0], [4.0, 1.0], [0.0, 3.0]):
            model.w.copy_(torch.tensor(new))
            ema.update(model)
    # w0 = 1:  0.9·1 + 0.1·2 = 1.1; 0.9·1.1 + 0.4 = 1.39; 0.9·1.39 + 0 = 1.251
    # w1 = −2: −1.8 + 0 = −1.8; −1.62 + 0.1 = −1.52; −1.368 + 0.3 = −1.068
    assert ema.shadow["w"].tolist() == pytest.approx([1.251, -1.068], abs=1e-6)
    assert ema.shadow["w"].dtype == torch.float32 and ema.num_updates == 3

    with ema.swap(model):
        assert model.w.tolist() == pytest.approx([1.251, -1.068], abs=1e-6)
    assert model.w.tolist() == [0.0, 3.0]
    with pytest.raises(RuntimeError):
        with ema.swap(model):
            raise RuntimeError("evaluation failed")
    assert model.w.tolist() == [0.0, 3.0]  # restored even on error

    ema.copy_to(model)
    assert model.w.tolist() == pytest.approx([1.251, -1.068], abs=1e-6)


def test_ema_buffers_low_precision_and_state_dict():
    model = Tiny().to(torch.bfloat16)
    ema = EMA(model, decay=0.5, include_buffers=True)
    assert set(ema.shadow) == {"w", "table"}
    with torch.no_grad():
        model.table.fill_(5.0)
        model.w.copy_(torch.tensor([3.0, 2.0]))
    ema.update(model)
    assert ema.shadow["table"].item() == 4.0 and ema.shadow["w"].tolist() == [2.0, 0.0]
    assert ema.shadow["w"].dtype == torch.float32

    fresh = EMA(Tiny(), decay=0.9, include_buffers=True)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.decay == 0.5 and fresh.num_updates == 1
    assert torch.equal(fresh.shadow["table"], ema.shadow["table"])
    with pytest.raises(ValueError, match="do not match"):
        EMA(Tiny(), decay=0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        EMA(Tiny()).update(nn.Linear(1, 1))


# --- LR schedule ---------------------------------------------------------------------------------------

def test_lr_schedule_values():
    base = 1e-4
    warm = dict(base_lr=base, warmup_steps=10, total_steps=110)
    assert lr_at(0, **warm) == 0.0
    assert lr_at(1, **warm) == pytest.approx(1e-5)
    assert lr_at(5, **warm) == pytest.approx(5e-5)
    assert lr_at(10, **warm) == pytest.approx(base)
    # the reference's default: cosine with min ratio 1.0 is constant after warm-up
    assert lr_at(60, **warm) == pytest.approx(base) and lr_at(110, **warm) == pytest.approx(base)
    assert lr_at(60, **warm, schedule="constant") == base
    # cosine to 10 %: halfway 0.1 + 0.9·0.5 = 0.55; quarter 0.1 + 0.9·0.5·(1 + cos(π/4))
    assert lr_at(60, **warm, min_ratio=0.1) == pytest.approx(5.5e-5)
    assert lr_at(35, **warm, min_ratio=0.1) == pytest.approx(base * (0.1 + 0.45 * (1 + math.sqrt(0.5))))
    assert lr_at(110, **warm, min_ratio=0.1) == pytest.approx(1e-5)
    assert lr_at(500, **warm, min_ratio=0.1) == pytest.approx(1e-5)  # held at the floor past the end
    assert lr_at(0, base, 0, 100) == base
    with pytest.raises(ValueError):
        lr_at(1, base, 10, 100, schedule="linear")
    with pytest.raises(ValueError):
        lr_at(1, base, 10, 100, min_ratio=1.5)


def test_muon_takes_the_block_matrices_and_adam_atan2_the_rest(monkeypatch):
    from pipeline.model.trm import TRM, ModelConfig
    from pipeline.training.muon import MuonWithAdamAtan2, muon_matrices

    model = TRM(ModelConfig(vocab_size=12, seq_len=16, hidden_size=32, num_heads=2, H_cycles=1, L_cycles=1,
                            halt_max_steps=2, puzzle_emb_len=1, puzzle_emb_ndim=32, num_puzzle_identifiers=3))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices, rest = muon_matrices(named)
    assert {id(p) for p in matrices} == {id(p) for n, p in named if n.startswith("blocks.") and p.ndim == 2}
    assert any(p is model.embed_tokens.weight for p in rest) and any(p is model.lm_head.weight for p in rest)
    if not hasattr(torch.optim, "Muon"):
        with pytest.raises(ValueError, match="torch >= 2.9"):
            build_dense_optimizer(named, "muon")
        return
    opt = build_dense_optimizer(named, "muon", lr=1e-2)
    assert isinstance(opt, MuonWithAdamAtan2) and len(opt.param_groups) == 2
    before = {n: p.detach().clone() for n, p in named}
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    for group in opt.param_groups:  # the trainer sets every group's lr
        group["lr"] = 1e-2
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in named)
    again = build_dense_optimizer(named, "muon", lr=1e-2)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["muon"]["state"].keys() == opt.state_dict()["muon"]["state"].keys()
    with pytest.raises(ValueError, match="names"):
        build_dense_optimizer([p for _, p in named], "muon")
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ValueError, match="torch >= 2.9"):
        build_dense_optimizer(named, "muon")
