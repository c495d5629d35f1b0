"""AdamAtan2, the dense-weight optimiser the reference trains with, in plain torch (so it also runs on CPU).

Exactly what the published package computes (checked against its source, adam_atan2-0.0.3,
csrc/adam_atan2.cu and its own consistency test). At step t = 1, 2, ... for every parameter p with gradient g:

    p ← p · (1 − lr·wd)                                   decoupled weight decay, on the pre-update weight
    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    p ← p − a · lr / (1 − β1^t) · atan2(m, b · √v / √(1 − β2^t))

with a = b = 1 (the package has no a/b arguments: they are implicitly 1). Note where the first-moment bias
correction sits: it scales the step *outside* atan2, like torch's Adam folds it into its step size. The
paper that proposed Adam-atan2 ("Scaling Exponents Across Parameterizations and Optimizers", Everett et al.
2024, arXiv 2407.05872) writes the update as a · atan2(m̂, b·√v̂) with m̂ = m/(1 − β1^t) *inside* atan2 and
a = 1.27, b = 1 (also the defaults of the separate `adam-atan2-pytorch` package); `first_moment_correction=
"inside"` with `a=1.27` gives that form. The two agree once β1^t ≈ 0 (a few dozen steps) except for the
constant a; they differ in the first steps (the package form's step can reach lr·π/2/(1 − β1^t)).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal

import torch


class AdamAtan2(torch.optim.Optimizer):
    """Adam with atan2(m, √v) in place of m / (√v + ε): no ε, and each coordinate moves at most a·lr·π/2.

    Defaults are the ones TRM trains with (lr 1e-4, betas (0.9, 0.95), weight decay 0.1); the update itself
    is the published package's (see the module docstring). `lr` is a plain float in `param_groups[i]["lr"]`
    that a scheduler may overwrite before every step. State per parameter: `step` (int), `exp_avg` and
    `exp_avg_sq` (tensors shaped and typed like the parameter).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        a: float = 1.0,
        b: float = 1.0,
        first_moment_correction: Literal["step_size", "inside"] = "step_size",
    ) -> None:
        check_float("lr", lr, minimum=0.0)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamAtan2: betas must lie in [0, 1), got {betas}")
        check_float("weight_decay", weight_decay, minimum=0.0)
        check_float("a", a, minimum=0.0)
        check_float("b", b, minimum=0.0)
        if first_moment_correction not in ("step_size", "inside"):
            raise ValueError(
                f"AdamAtan2: first_moment_correction must be 'step_size' or 'inside', got {first_moment_correction!r}"
            )
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b,
                        first_moment_correction=first_moment_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            raise TypeError("AdamAtan2: param_groups[...]['lr'] must be a Python float, not a tensor")
        beta1, beta2 = group["betas"]
        weight_decay, a, b = group["weight_decay"], group["a"], group["b"]

        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        exp_avgs: list[torch.Tensor] = []
        exp_avg_sqs: list[torch.Tensor] = []
        steps: list[int] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamAtan2 does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = int(state["step"]) + 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return

        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        # denominators b·√v̂, turned in place into the atan2 directions below
        directions = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_mul_(directions, [b / math.sqrt(1.0 - beta2 ** t) for t in steps])
        if group["first_moment_correction"] == "inside":
            numerators = torch._foreach_mul(exp_avgs, [1.0 / (1.0 - beta1 ** t) for t in steps])
            step_sizes = [a * lr for _ in steps]
        else:
            numerators = exp_avgs
            step_sizes = [a * lr / (1.0 - beta1 ** t) for t in steps]
        for numerator, direction in zip(numerators, directions):
            torch.atan2(numerator, direction, out=direction)  # atan2(0, 0) = 0: a zero state never NaNs
        torch._foreach_mul_(directions, [-s for s in step_sizes])
        torch._foreach_add_(params, directions)


def check_float(name: str, value: float, minimum: float) -> None:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite Python number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
