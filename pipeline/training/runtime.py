"""Where a process runs and in which precision: the Accelerator, the device, bf16 or fp32, and the gradient gate
that refuses a mixed precision under which some weight would silently get no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.core.tracking import accelerator_settings
from pipeline.model.trm import TRM
from pipeline.training.loss import act_loss


@dataclass
class Runtime:
    """Where this process sits in the job."""

    accelerator: Any
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def native_bf16() -> bool:
    """Whether this process's GPU computes in bf16 natively. T4 and P100 only emulate it (far slower than fp32),
    and torch's plain is_bf16_supported() says yes for them; older torch has no `including_emulation`."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.get_device_capability()[0] >= 8  # bf16 arithmetic came with Ampere


def auto_mixed_precision() -> str:
    """What mixed_precision "auto" means: bf16 where the GPU has it natively, fp32 ("no") elsewhere."""
    return "bf16" if native_bf16() else "no"


def make_runtime(cfg: RunConfig, out_dir: Path | None = None) -> Runtime:
    """The Accelerator of this process; with `cfg.log_with`, its experiment trackers too (pipeline.core.tracking)."""
    from accelerate import Accelerator

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = auto_mixed_precision()
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              **accelerator_settings(cfg.log_with, out_dir))
    return Runtime(accelerator, accelerator.process_index, accelerator.num_processes, accelerator.device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without blocking (a copy from pageable memory
    would make the host wait for the device's queue)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def dense_params_without_gradient(
    model: TRM, device_type: str, dtype: torch.dtype = torch.bfloat16, rows: int = 2, seed: int = 0
) -> list[str]:
    """The names of the dense parameters that one training step under `torch.autocast(device_type, dtype)`
    (its weight-cast cache on, as Accelerate leaves it) leaves without a non-zero, finite gradient; [] when
    every one learns. A cheap guard against silent mixed-precision failures such as pytorch#158232 (bf16
    weight copies cached under no_grad reused by the gradient cycle), run before training on a device.

    The step uses `rows` random rows from its own generator and explicit exploration draws, so the global
    RNG, the weights and the optimizers are untouched; gradients are cleared and the mode restored after."""
    cfg, device = model.config, model.H_init.device
    g = torch.Generator().manual_seed(seed)
    batch = {
        "inputs": torch.randint(2, cfg.vocab_size, (rows, cfg.seq_len), generator=g, dtype=torch.int32),
        "labels": torch.randint(2, cfg.vocab_size, (rows, cfg.seq_len), generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(0, cfg.num_puzzle_identifiers, (rows,), generator=g, dtype=torch.int32),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    no_exploration = (torch.ones(rows, device=device), torch.zeros(rows, dtype=torch.int32, device=device))
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=True):
                carry, outputs = model(model.initial_carry(batch), batch, exploration=no_exploration)
                loss, _ = act_loss(outputs, carry)
            loss.backward()
        return [
            name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(torch.isfinite(p.grad).all() and p.grad.ne(0).any()))
        ]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def check_gradient_gate(model: TRM, rt: Runtime) -> None:
    """Before training under mixed precision: one throw-away step must give every dense parameter a gradient;
    stops the run with the names otherwise. Logged on rank 0, so a run's log (the Kaggle fine-tune's too) shows
    that its torch trains every weight."""
    precision = rt.accelerator.mixed_precision
    if precision not in ("bf16", "fp16"):
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    missing = dense_params_without_gradient(model, rt.device.type, dtype)
    if missing:
        raise RuntimeError(
            f"gradient gate: under {precision} autocast on torch {torch.__version__} ({rt.device}), {len(missing)} "
            f"dense parameters get no gradient ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); "
            f"training would silently leave them untrained"
        )
    if rt.is_main:
        n = sum(1 for p in model.parameters() if p.requires_grad)
        print(f"gradient gate: all {n} dense parameter tensors get a gradient under {precision} autocast "
              f"(torch {torch.__version__}, {rt.device})")
