"""The training loss of one ACT step, the reference's: lm_loss (stablemax cross-entropy in float64, averaged per
sequence, summed over rows) + 0.5 × q_halt_loss (BCE of q_halt against "the sequence is exactly right"), and the
step's metrics. Prediction's re-scoring reads the same distribution (`log_stablemax`, the model's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.encoding import IGNORE_LABEL
from pipeline.model.layers import log_stablemax
from pipeline.model.trm import Carry

METRIC_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss")


def act_loss(outputs: dict[str, Tensor], carry: Carry) -> tuple[Tensor, dict[str, Tensor]]:
    """The reference loss of one ACT step over every row (halted or not), summed over rows:
    lm_loss (float64) = sum over rows of the mean stablemax cross-entropy over that row's valid labels;
    q_halt_loss = sum of BCE(q_halt, row is exactly right); loss = lm_loss + 0.5 * q_halt_loss.
    metrics, over rows that halted this step and have labels (`count` of them), as sums: accuracy (mean
    token accuracy of each row), exact_accuracy, q_halt_accuracy ((q_halt >= 0) == exactly right), steps;
    plus lm_loss and q_halt_loss (detached)."""
    labels = carry.current_data["labels"]
    logits, q_halt = outputs["logits"], outputs["q_halt_logits"]
    mask = labels != IGNORE_LABEL
    with torch.no_grad():
        counts = mask.sum(-1)
        divisor = counts.clamp_min(1).unsqueeze(-1)
        correct = mask & (logits.argmax(dim=-1) == labels)
        seq_correct = correct.sum(-1) == counts
        valid = carry.halted & (counts > 0)
        metrics = {
            "count": valid.sum(),
            "accuracy": torch.where(valid, (correct.to(torch.float32) / divisor).sum(-1), 0).sum(),
            "exact_accuracy": (valid & seq_correct).sum(),
            "q_halt_accuracy": (valid & ((q_halt >= 0) == seq_correct)).sum(),
            "steps": torch.where(valid, carry.steps, 0).sum(),
        }
    logprobs = log_stablemax(logits.to(torch.float64))
    target_logprobs = logprobs.gather(-1, torch.where(mask, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    token_loss = -torch.where(mask, target_logprobs, 0)
    lm_loss = (token_loss / divisor).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.to(q_halt.dtype), reduction="sum")
    metrics["lm_loss"] = lm_loss.detach()
    metrics["q_halt_loss"] = q_halt_loss.detach()
    return lm_loss + 0.5 * q_halt_loss, metrics
