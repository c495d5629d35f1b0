"""The layers of TRM-Att (pipeline.model.trm): the reference's initialisation, the weightless RMS norm, RoPE,
attention, the SwiGLU MLP (with an optional grid convolution), the post-norm block and the sparse puzzle table.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------------
# Initialisation


_TRUNC_STD = 0.8796256610342398  # std of a standard normal truncated to [-2, 2]


def trunc_normal_(tensor: Tensor, std: float) -> Tensor:
    """Fill with a normal truncated at ±2 sigma, rescaled so that the std after truncation is `std`
    (the reference's JAX-style init; PyTorch's trunc_normal_ would give a smaller std)."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        nn.init.trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0)
        return tensor.mul_(std / _TRUNC_STD)


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A LeCun-initialised linear layer (truncated normal, std 1/sqrt(fan_in), zero bias)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    trunc_normal_(layer.weight, std=in_features**-0.5)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def swiglu_width(width: int, expansion: float) -> int:
    """The reference's SwiGLU inner size: 2/3 of expansion * width, rounded up to a multiple of 256."""
    inner = round(expansion * width * 2 / 3)
    return -(-inner // 256) * 256


# ----------------------------------------------------------------------------------------------------------
# Layers


# Fast paths. Most of the work runs without autograd (the T-1 no-gradient cycles, and evaluation); there the
# norm and SwiGLU write into temporaries they own instead of allocating new ones. With autograd (the last
# cycle), and for the norm under autocast (mixed dtypes), they take the plain out-of-place route. Both routes
# compute the same values.


def add_rms_norm(h: Tensor, update: Tensor, eps: float) -> Tensor:
    """rms(h + update): weightless RMS norm over the last axis, in float32, returned in h's dtype.
    `update` must be a temporary the caller no longer needs (it may be overwritten)."""
    if torch.is_grad_enabled() or h.dtype != torch.float32 or update.dtype != torch.float32:
        s = (h + update).float()
        return (s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)).to(h.dtype)
    s = update.add_(h)
    return s.mul_(torch.rsqrt(s.square().mean(-1, keepdim=True).add_(eps)))


class RotaryTables(nn.Module):
    """RoPE cos/sin tables (S, 1, head_dim), float32, built once; half-split layout: dimension i and
    i + head_dim/2 form a rotating pair with frequency theta^(-2i/head_dim)."""

    def __init__(self, head_dim: int, length: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        half = head_dim // 2
        sin = angles.sin()
        self.register_buffer("cos", angles.cos()[:, None, :], persistent=False)
        # sin with the first half negated, so that rotation needs no separate negation pass
        self.register_buffer("sin_signed", torch.cat((-sin[:, :half], sin[:, half:]), -1)[:, None, :], persistent=False)

    def rotate(self, v: Tensor) -> Tensor:
        """v (B, S, heads, head_dim) -> v rotated by its position: v*cos + (-v2, v1)*sin with (v1, v2) the
        halves of v; in float32, returned in v's dtype."""
        vf = v.float()
        swapped = vf.roll(v.shape[-1] // 2, dims=-1)  # (v2, v1), a new tensor: safe to modify in place
        return swapped.mul_(self.sin_signed).addcmul_(vf, self.cos).to(v.dtype)

    def at(self, positions: Tensor) -> "RotaryTables":
        """Tables (len(positions), 1, head_dim) for a sequence whose slot i sits at position positions[i]
        (a canvas bucket's cells keep their full-canvas positions)."""
        sub = RotaryTables.__new__(RotaryTables)
        nn.Module.__init__(sub)
        sub.register_buffer("cos", self.cos[positions], persistent=False)
        sub.register_buffer("sin_signed", self.sin_signed[positions], persistent=False)
        return sub


class Attention(nn.Module):
    """Non-causal multi-head self-attention with a fused qkv projection and RoPE on q and k."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.qkv = linear(hidden_size, 3 * hidden_size)  # output: heads 0..H-1 q, H..2H-1 k, 2H..3H-1 v
        self.out = linear(hidden_size, hidden_size)

    def forward(self, h: Tensor, rope: RotaryTables | None) -> Tensor:
        B, S, D = h.shape
        H = self.num_heads
        qkv = self.qkv(h).view(B, S, 3 * H, self.head_dim)
        qk, v = qkv[:, :, : 2 * H], qkv[:, :, 2 * H :]
        if rope is not None:
            qk = rope.rotate(qk)  # q and k rotated together: one pass instead of two
        q, k = qk[:, :, :H], qk[:, :, H:]
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(attended.transpose(1, 2).reshape(B, S, D))


class GridConv(nn.Module):
    """a + depthwise_conv(a) over the grid positions of a (B, P + side², C); the P puzzle positions pass as they
    are. Zero-initialised, so a model starts as the one without it (URM's short convolution, in 2-D)."""

    def __init__(self, channels: int, kernel: int, puzzle_len: int):
        super().__init__()
        self.puzzle_len = puzzle_len
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, a: Tensor) -> Tensor:
        B, S, C = a.shape
        P = self.puzzle_len
        side = math.isqrt(S - P)
        grid = a[:, P:].transpose(1, 2).reshape(B, C, side, side)
        mixed = self.conv(grid).reshape(B, C, side * side).transpose(1, 2)
        return torch.cat((a[:, :P], a[:, P:] + mixed), dim=1)


class SwiGLU(nn.Module):
    """down(silu(gate) * up), with gate and up from one fused projection (and optionally a grid convolution of
    the activation before `down`: GridConv)."""

    def __init__(self, width: int, expansion: float, conv: int = 0, puzzle_len: int = 0):
        super().__init__()
        inner = swiglu_width(width, expansion)
        self.gate_up = linear(width, 2 * inner)  # first half gate, second half up
        self.down = linear(inner, width)
        if conv:
            self.conv = GridConv(inner, conv, puzzle_len)

    def forward(self, h: Tensor) -> Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        if not torch.is_grad_enabled():  # the projection's output is ours: reuse its memory
            a = F.silu(gate, inplace=True).mul_(up)
        else:
            a = F.silu(gate) * up
        if hasattr(self, "conv"):
            a = self.conv(a)
        return self.down(a)


class Block(nn.Module):
    """Post-norm block: h = rms(h + mix(h)); h = rms(h + mlp(h)). `mix` is attention over positions, or with
    mlp_t an MLP over the sequence axis (whose norm then, as in the reference, runs over the sequence axis)."""

    def __init__(self, config):  # a pipeline.model.trm.ModelConfig
        super().__init__()
        self.eps = config.rms_norm_eps
        if config.mlp_t:
            self.token_mlp = SwiGLU(config.total_len, config.expansion)
        else:
            self.attn = Attention(config.hidden_size, config.num_heads)
        self.mlp = SwiGLU(config.hidden_size, config.expansion, config.mlp_conv, config.puzzle_len)

    def forward(self, h: Tensor, rope: RotaryTables | None) -> Tensor:
        if hasattr(self, "token_mlp"):
            t = h.transpose(1, 2)  # (B, D, S)
            h = add_rms_norm(t, self.token_mlp(t), self.eps).transpose(1, 2)
        else:
            h = add_rms_norm(h, self.attn(h, rope), self.eps)
        return add_rms_norm(h, self.mlp(h), self.eps)


class PuzzleEmbedding(nn.Module):
    """One learned row per puzzle identifier (augmented variant), trained sparsely.

    `weights` (num_ids, ndim) is a persistent buffer, not a Parameter, so dense optimizers never see it. In
    training, `forward` copies the batch's rows into the leaf tensor `local_weights` (B, ndim,
    requires_grad) and their ids into `local_ids` (B,), and returns `local_weights`: after backward,
    `local_weights.grad` holds one gradient row per example, for a sparse optimizer to scatter into `weights`.
    Each training forward clears `local_weights.grad`, so it always belongs to the latest batch's ids; call
    backward once per forward. Both are reused across steps (reallocated only when B, device or dtype
    change). In eval the rows are read directly.
    """

    def __init__(self, num_ids: int, ndim: int):
        super().__init__()
        self.register_buffer("weights", torch.zeros(num_ids, ndim))
        self.register_buffer("local_weights", torch.zeros(0, ndim, requires_grad=True), persistent=False)
        self.register_buffer("local_ids", torch.zeros(0, dtype=torch.int32), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        if not self.training:
            return self.weights[ids]
        lw = self.local_weights
        if (
            lw.shape[0] != ids.shape[0]
            or lw.device != self.weights.device
            or lw.dtype != self.weights.dtype
            or not lw.is_leaf  # module.to() turns a leaf buffer into a non-leaf copy
        ):
            self.local_weights = torch.zeros(ids.shape[0], self.weights.shape[1], dtype=self.weights.dtype,
                                             device=self.weights.device, requires_grad=True)
            self.local_ids = torch.zeros(ids.shape[0], dtype=torch.int32, device=self.weights.device)
        with torch.no_grad():
            self.local_weights.copy_(self.weights[ids])
            self.local_ids.copy_(ids)
        self.local_weights.grad = None
        return self.local_weights

    def resize(self, num_ids: int) -> None:
        """Replace the table with `num_ids` zero rows (a new dataset's variants)."""
        self.weights = torch.zeros(num_ids, self.weights.shape[1], dtype=self.weights.dtype, device=self.weights.device)


def log_stablemax(logits: Tensor) -> Tensor:
    """log of stablemax over the last axis: s(v) = v + 1 for v >= 0, 1 / (1 - v) for v < 0, normalised.
    A softmax alternative that grows linearly instead of exponentially (no overflow when logits drift)."""
    s = torch.where(logits < 0, 1 / (1 - logits + 1e-30), logits + 1)
    return torch.log(s / s.sum(dim=-1, keepdim=True))
