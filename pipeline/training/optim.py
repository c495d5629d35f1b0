"""Optimisers, weight averaging and the learning-rate schedule used to train TRM-Att.

Four pieces, each matching what the TRM reference trains with:

* `AdamAtan2` — the dense-weight optimiser. The reference installs the `adam-atan2` package from PyPI
  (v0.0.3, a compiled CUDA extension); this is the same update in plain torch so that it also runs on CPU.
* `SignSGD` — the sparse update of the puzzle-embedding table (a buffer with up to ~1.3M rows), which
  touches only the rows a batch used and keeps no per-row optimiser state.
* `EMA` — a float32 exponential moving average of the dense parameters, evaluated in place of the weights.
* `lr_at` — linear warm-up, then constant or cosine decay.

The AdamAtan2 update itself, and how it matches the published package, is in pipeline.training.adam_atan2.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from pipeline.training.collectives import all_gather_rows
from pipeline.core.errors import ConfigError
from pipeline.training.adam_atan2 import AdamAtan2, check_float
from pipeline.training.muon import MuonWithAdamAtan2

__all__ = [
    "AdamAtan2",
    "SignSGD",
    "sign_sgd_update_",
    "EMA",
    "lr_at",
    "build_dense_optimizer",
]


def build_dense_optimizer(
    params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    name: Literal["adam_atan2", "adamw", "muon"] = "adam_atan2",
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
) -> Any:
    """The optimiser for every dense weight: the reference's AdamAtan2, torch's AdamW for comparison, or Muon for
    the block matrices with AdamAtan2 for the rest (pipeline.training.muon; needs (name, parameter) pairs)."""
    params = list(params)
    named = bool(params) and isinstance(params[0], tuple)
    if name == "muon":
        if not named:
            raise ValueError("optimizer=muon needs the parameters with their names (model.named_parameters())")
        return MuonWithAdamAtan2(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if named:
        params = [p for _, p in params]
    if name == "adam_atan2":
        return AdamAtan2(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"optimizer: unknown dense optimizer {name!r}; expected 'adam_atan2', 'adamw' or 'muon'")


# ---------------------------------------------------------------------------------------------------------
# SignSGD for the puzzle-embedding table
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sign_sgd_update_(
    weights: torch.Tensor,
    ids: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    weight_decay: float,
) -> torch.Tensor:
    """Apply w ← w·(1 − lr·wd) − lr·sign(Σ g) to the rows named in `ids`, in place; return the ids, sorted
    (repeats kept).

    weights: (N, D) the embedding table. ids: (B,) integer row per gradient row (repeats allowed: the
    gradients of a repeated id are summed before the sign). grads: (B, D). Rows not in `ids` are left
    exactly as they are, not even decayed — that is what makes the update sparse.

    On a GPU nothing here waits for the device: every tensor has a size known on the host (B rows), so
    repeats are grouped by sorting instead of `torch.unique` (whose output size is data-dependent), every
    position of a repeated id computes the same new row, and the range check is a device-side assertion.
    """
    if weights.ndim != 2:
        raise ValueError(f"SignSGD: the table must be (N, D), got shape {tuple(weights.shape)}")
    if ids.ndim != 1 or grads.ndim != 2 or grads.shape != (ids.shape[0], weights.shape[1]):
        raise ValueError(
            f"SignSGD: expected ids (B,) and grads (B, {weights.shape[1]}), "
            f"got ids {tuple(ids.shape)} and grads {tuple(grads.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"SignSGD: ids must be integers, got {ids.dtype}")
    if ids.numel() == 0:
        return ids.new_empty(0, dtype=torch.long)
    ids = ids.to(device=weights.device, dtype=torch.long)
    num_rows = weights.shape[0]
    message = f"SignSGD: puzzle identifiers must lie in [0, {num_rows})"
    try:  # on a CPU this raises here; on a GPU the device raises it later, without the host waiting now
        torch._assert_async(((ids >= 0) & (ids < num_rows)).all(), message)
    except RuntimeError as error:
        raise IndexError(message) from error

    sorted_ids, order = torch.sort(ids)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = torch.cumsum(starts, 0) - 1  # position -> index of its id among the distinct ids (B groups at most)
    summed = torch.zeros(ids.shape[0], weights.shape[1], dtype=torch.float32, device=weights.device)
    summed.index_add_(0, group, grads.to(device=weights.device, dtype=torch.float32).index_select(0, order))
    rows = weights.index_select(0, sorted_ids)  # read before any write: repeats see the same old row
    rows.mul_(1.0 - lr * weight_decay).sub_(torch.sign(summed.index_select(0, group)).to(rows.dtype), alpha=lr)
    weights.index_copy_(0, sorted_ids, rows)  # repeats write identical values, so the order of writes is moot
    return sorted_ids


class SignSGD:
    """Sparse SignSGD with decoupled weight decay for the puzzle-embedding table (defaults lr 1e-2, wd 0.1).

    The table is a buffer, not a Parameter, so this is not a torch Optimizer: each step is handed the batch's
    identifiers and the gradient of the embedding rows the model looked up. With torch.distributed running
    and more than one process, every process's (ids, grads) are all-gathered first, so every process applies
    the identical update to its own copy of the table; every process must pass the same number of rows.

    Identifier 0 (the blank row) gets no special case, as in the reference: if it appears in a batch it is
    decayed and moved like any other row.

    `param_groups` (one group holding lr and weight_decay) mirrors torch optimisers so that the same
    scheduler loop can set the learning rate of every optimiser; there is no other state.
    """

    def __init__(self, weights: torch.Tensor, lr: float = 1e-2, weight_decay: float = 0.1) -> None:
        if weights.ndim != 2:
            raise ValueError(f"SignSGD: the table must be (N, D), got shape {tuple(weights.shape)}")
        check_float("lr", lr, minimum=0.0)
        check_float("weight_decay", weight_decay, minimum=0.0)
        self.weights = weights
        self.param_groups: list[dict[str, float]] = [{"lr": float(lr), "weight_decay": float(weight_decay)}]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["weight_decay"]

    @torch.no_grad()
    def step(self, local_ids: torch.Tensor, local_grads: torch.Tensor,
             group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Update the rows of this step's batch (gathered over all processes); return the ids touched, sorted
        (repeats kept). No host synchronisation on a GPU (see `sign_sgd_update_`).

        local_ids: (B,) this process's puzzle identifiers. local_grads: (B, D) their embedding gradients.
        """
        ids, grads = local_ids, local_grads
        world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if world_size > 1:
            ids = all_gather_rows(local_ids.contiguous(), world_size, group)
            grads = all_gather_rows(local_grads.contiguous(), world_size, group)
        return sign_sgd_update_(self.weights, ids, grads, self.lr, self.weight_decay)

    def state_dict(self) -> dict[str, Any]:
        return {"param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1 or set(groups[0]) != {"lr", "weight_decay"}:
            raise ValueError(f"SignSGD.load_state_dict: expected one group with lr and weight_decay, got {state!r}")
        self.param_groups = [{"lr": float(groups[0]["lr"]), "weight_decay": float(groups[0]["weight_decay"])}]


# ---------------------------------------------------------------------------------------------------------
# EMA of the dense weights
# ---------------------------------------------------------------------------------------------------------

class EMA:
    """A float32 moving average of a module's weights: shadow ← decay·shadow + (1 − decay)·weight per update.

    Tracks the parameters that require grad (as the reference does); floating-point buffers too when
    `include_buffers` is set. The shadow starts as a copy of the weights and lives on their device. Pass the
    plain module (not a DDP / torch.compile wrapper, whose names carry a prefix).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, include_buffers: bool = False) -> None:
        check_float("decay", decay, minimum=0.0)
        if decay > 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.include_buffers = include_buffers
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().to(torch.float32, copy=True) for name, tensor in self._tracked(model)
        }

    def _tracked(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        tracked = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if self.include_buffers:
            tracked += [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
        return tracked

    def _matched(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tracked = self._tracked(model)
        names = [name for name, _ in tracked]
        if set(names) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(names))[:5]
            extra = sorted(set(names) - set(self.shadow))[:5]
            raise ValueError(f"EMA: module does not match the averaged weights (missing {missing}, unexpected {extra})")
        return [self.shadow[name] for name in names], [t for _, t in tracked]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the module's current weights into the average (call after every optimiser step)."""
        shadows, weights = self._matched(model)
        weights = [w.detach().to(device=s.device, dtype=torch.float32) for s, w in zip(shadows, weights)]
        torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the module's weights with the average (for good: see `swap` to get them back)."""
        shadows, weights = self._matched(model)
        for shadow, weight in zip(shadows, weights):
            weight.copy_(shadow)

    @contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the averaged weights inside the block; the trained weights come back on exit."""
        _, weights = self._matched(model)
        with torch.no_grad():
            saved = [w.detach().clone() for w in weights]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for weight, original in zip(weights, saved):
                    weight.copy_(original)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "include_buffers": self.include_buffers,
                "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state.get("shadow")
        if not isinstance(shadow, dict) or set(shadow) != set(self.shadow):
            got = sorted(shadow)[:5] if isinstance(shadow, dict) else type(shadow).__name__
            raise ValueError(f"EMA.load_state_dict: saved weights do not match this model (got {got} ...)")
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA.load_state_dict: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.decay = float(state["decay"])
        self.include_buffers = bool(state.get("include_buffers", self.include_buffers))
        self.num_updates = int(state.get("num_updates", 0))


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------

def lr_at(
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 1.0,
    schedule: Literal["constant", "cosine"] = "cosine",
) -> float:
    """The learning rate for optimiser step `step` (1 for the first update, as the reference counts).

    Linear warm-up base_lr·step/warmup_steps, then `cosine`: base_lr·(min_ratio + (1 − min_ratio)·½(1 +
    cos(π·progress))) with progress = (step − warmup)/(total − warmup), held at the floor past total_steps;
    or `constant`: base_lr. The reference's "cosine with lr_min_ratio 1.0" is therefore constant.
    """
    if step < 0 or warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"lr_at: step, warmup_steps and total_steps must be >= 0, got {step}, {warmup_steps}, {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"lr_at: min_ratio must be in [0, 1], got {min_ratio}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_at: schedule must be 'constant' or 'cosine', got {schedule!r}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return float(base_lr)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + max(0.0, (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))
