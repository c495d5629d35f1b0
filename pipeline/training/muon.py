"""Muon for the block matrices, Adam-atan2 for the rest: the `optimizer=muon` setting (off in every paper preset).

Muon (torch.optim.Muon, torch >= 2.9) orthogonalises each 2-D gradient's momentum (a few Newton–Schulz
iterations) before the step, so every direction of a matrix moves at the same rate; small models have been
reported to train faster with it than with Adam. It is defined for hidden weight matrices only: the token
embedding, the output heads and anything not 2-D keep the reference's Adam-atan2. Its learning rate is scaled
per matrix to match the update size of an AdamW step (`adjust_lr_fn="match_rms_adamw"`), so the one `lr` setting
(and its schedule) drives both halves.

The project supports torch from 2.4 on; on a torch without torch.optim.Muon the setting fails with one clear error
instead of silently training with something else.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from pipeline.core.errors import ConfigError
from pipeline.training.adam_atan2 import AdamAtan2

MUON_MOMENTUM = 0.95


def muon_matrices(named_params: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(Muon's parameters: the 2-D weights inside the reasoning blocks, the rest)."""
    matrices, rest = [], []
    for name, p in named_params:
        (matrices if name.startswith("blocks.") and p.ndim == 2 else rest).append(p)
    return matrices, rest


class MuonWithAdamAtan2:
    """Two optimisers stepped as one. `param_groups` lists both's groups (the trainer sets every group's lr), the
    state dict holds both."""

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], lr: float, betas: tuple[float, float],
                 weight_decay: float) -> None:
        if not hasattr(torch.optim, "Muon"):
            raise ConfigError(f"optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
        matrices, rest = muon_matrices(named_params)
        if not matrices:
            raise ConfigError("optimizer=muon: the model has no 2-D block weights to give Muon")
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM,
                                     adjust_lr_fn="match_rms_adamw")
        self.adam = AdamAtan2(rest, lr=lr, betas=betas, weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adam.param_groups

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamAtan2.step takes no closure")
        self.muon.step()
        self.adam.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adam.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adam_atan2": self.adam.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adam_atan2"}:
            raise ValueError("the checkpoint's optimizer state is not optimizer=muon's (Muon + Adam-atan2)")
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam_atan2"])
