"""TRM-Att, the Tiny Recursive Model ("Less is More: Recursive Reasoning with Tiny Networks"), with its ACT
wrapper and loss, computing what the published reference code computes (checked against a recorded fixture,
tests/test_model_parity.py).

Names. The paper writes x (the embedded question), y (the current answer), z (the latent reasoning state),
n = L_cycles, T = H_cycles and N_sup = halt_max_steps. The reference code, and so this file's tensors and
state-dict keys, call y "z_H" and z "z_L" (and their start values H_init / L_init). Everywhere below:
z_H is y, z_L is z.

Tensors (B = batch rows, L = seq_len grid tokens, or b² on a canvas bucket of side b (pipeline.data.canvas),
P = puzzle_emb_len, S = P + L, D = hidden_size, V = vocab):
    batch["inputs"]              int32 (B, L)   question tokens (0 PAD, 1 EOS, 2..11 colours)
    batch["labels"]              int32 (B, L)   answer tokens, -100 = ignored position (absent at prediction)
    batch["puzzle_identifiers"]  int32 (B,)     row of the puzzle-embedding table (one per augmented variant)
    x                            (B, S, D)      input embedding: P puzzle tokens then L grid tokens, times sqrt(D)
    carry.z_H = y, carry.z_L = z (B, S, D)      answer and latent states, carried between ACT steps (detached)
    outputs["logits"]            (B, L, V)      lm_head(y) without the P puzzle positions
    outputs["q_halt_logits"]     float32 (B,)   q_head(y[:, 0])[:, 0]: "the answer is already right" logit
    outputs["q_continue_logits"] float32 (B,)   q_head(y[:, 0])[:, 1]: reported only (the Q-continue loss is dropped)
    outputs["preds"]             int64 (B, L)   argmax of logits

One ACT step (`TRM.forward`): rows that halted last step restart from (H_init, L_init) with new data; then
T-1 cycles without gradient and one with gradient, each cycle being n updates z ← net(z, y + x) followed by
one y ← net(y, z). `net(h, inj)` is ONE shared stack of `num_layers` post-norm blocks applied to h + inj.
In training a row halts when q_halt > 0 or after N_sup steps (exploration may force a minimum number of
steps); in eval every row runs exactly N_sup steps. `act_loss` gives lm_loss (stablemax cross-entropy, float64,
averaged per sequence and summed over rows) + 0.5 * q_halt_loss (BCE against "the sequence is exactly right").

Usage in a training loop:
    carry = model.initial_carry(batch)
    carry, outputs = model(carry, batch)       # batch rows are only read for rows that halted last step
    loss, metrics = act_loss(outputs, carry)   # loss is summed over rows: divide by the global batch size
    (loss / global_batch_size).backward()
Every dense parameter receives a gradient every step (none is unused), so a hand-written all-reduce over
`model.parameters()` works without DDP; `dense_params_without_gradient` checks that under autocast. The puzzle table is a buffer, not a parameter: its gradient for the
batch's rows is `model.puzzle_emb.local_weights.grad` (B, ndim) with the rows' ids in
`model.puzzle_emb.local_ids` (B,), for a sparse optimizer to apply.

Initialisation (as the reference): linear weights truncated normal (±2 sigma) with std 1/sqrt(fan_in) and no
biases except q_head's; token (and learned position) embeddings std 1/sqrt(D); H_init and L_init std 1;
q_head weight 0 and bias -5 (so the model starts by never halting early); puzzle table 0. The std is the
std after truncation.

Precision: parameters, carries, RMS norms, RoPE tables and the loss stay float32 (the lm loss float64);
under `torch.autocast(dtype=torch.bfloat16)` the matmuls and attention run in bfloat16. The autocast weight
cache is cleared before the gradient cycle (see `recurse`), so the gradients are right on every torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.errors import ConfigError

IGNORE_LABEL = -100  # the same value as pipeline.data.encoding.IGNORE_LABEL
BATCH_KEYS = ("inputs", "labels", "puzzle_identifiers")  # the batch entries the model carries per row


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    """Every architecture setting. The defaults are the paper's ARC-AGI configuration (`paper_arc`)."""

    vocab_size: int = 12
    seq_len: int = 900  # L: grid tokens per example (30x30 canvas)
    hidden_size: int = 512  # D
    num_heads: int = 8
    expansion: float = 4.0  # SwiGLU inner size = round_up(round(expansion * width * 2/3), 256)
    num_layers: int = 2  # blocks in the shared network (reference: L_layers)
    H_cycles: int = 3  # T
    L_cycles: int = 4  # n
    halt_max_steps: int = 16  # N_sup
    halt_exploration_prob: float = 0.1
    puzzle_emb_len: int = 16  # P; 0 means ceil(puzzle_emb_ndim / hidden_size), as in the reference
    puzzle_emb_ndim: int = 512  # values per puzzle-table row; 0 disables the puzzle embedding
    num_puzzle_identifiers: int = 1  # rows of the puzzle table (the dataset sets this)
    pos_encodings: Literal["rope", "learned", "none"] = "rope"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    mlp_t: bool = False  # mix tokens with an MLP over the sequence instead of attention (small fixed grids)
    # > 0 (odd): a depthwise k×k convolution over the grid inside each block's MLP (after URM's short
    # convolution), added to the SwiGLU activation and zero-initialised; 0 (the paper) = none
    mlp_conv: int = 0
    # How the blocks run, not what they compute: torch.compile each block with this backend ("" = eager,
    # the default; "inductor" fuses the elementwise work around the GEMMs on a GPU). Off until measured.
    compile_backend: str = ""

    @classmethod
    def paper_arc(cls, **overrides) -> "ModelConfig":
        """The paper's TRM-Att ARC configuration (6,829,058 dense parameters)."""
        return cls(**overrides)

    @property
    def puzzle_len(self) -> int:
        """P, the number of puzzle-embedding positions in front of the grid tokens."""
        if self.puzzle_emb_len == 0:
            return -(-self.puzzle_emb_ndim // self.hidden_size)
        return self.puzzle_emb_len

    @property
    def total_len(self) -> int:
        """S = P + L, the length of every state tensor."""
        return self.puzzle_len + self.seq_len

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pos_encodings not in ("rope", "learned", "none"):
            raise ConfigError(f"ModelConfig: pos_encodings must be 'rope', 'learned' or 'none', not {self.pos_encodings!r}")
        if self.puzzle_emb_ndim == 0 and self.puzzle_emb_len > 0:
            raise ConfigError("ModelConfig: puzzle_emb_len > 0 needs puzzle_emb_ndim > 0 (set puzzle_emb_len=0)")
        if self.puzzle_emb_ndim > self.puzzle_len * self.hidden_size:
            raise ConfigError(
                f"ModelConfig: puzzle_emb_ndim {self.puzzle_emb_ndim} does not fit in puzzle_emb_len "
                f"{self.puzzle_len} x hidden_size {self.hidden_size}"
            )
        if self.mlp_conv < 0 or (self.mlp_conv and self.mlp_conv % 2 == 0):
            raise ConfigError(f"ModelConfig: mlp_conv must be 0 (off) or an odd kernel size, not {self.mlp_conv}")
        if self.mlp_conv and math.isqrt(self.seq_len) ** 2 != self.seq_len:
            raise ConfigError(f"ModelConfig: mlp_conv needs a square grid (seq_len {self.seq_len} is not a square)")
        if self.H_cycles < 1 or self.L_cycles < 1 or self.halt_max_steps < 1 or self.num_layers < 1:
            raise ConfigError("ModelConfig: H_cycles, L_cycles, halt_max_steps and num_layers must be >= 1")
        if self.num_puzzle_identifiers < 1:
            raise ConfigError("ModelConfig: num_puzzle_identifiers must be >= 1")
        if not isinstance(self.compile_backend, str):
            raise ConfigError(f"ModelConfig: compile_backend must be a backend name or '', not {self.compile_backend!r}")


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


def grid_positions(side: int, canvas: int) -> Tensor:
    """int64 (side*side,): the canvas position (row-major on the canvas) of each cell of the top-left side×side
    corner, itself flattened row-major: how a canvas bucket's cells keep their full-canvas positions."""
    axis = torch.arange(side)
    return (axis[:, None] * canvas + axis[None, :]).reshape(-1)


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

    def __init__(self, config: ModelConfig):
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


# ----------------------------------------------------------------------------------------------------------
# The model and its ACT wrapper


@dataclass
class Carry:
    """State carried between ACT steps. z_H = y (answer), z_L = z (latent): (B, S, D) float32, detached.
    steps int32 (B,): ACT steps taken by each row's current example; halted bool (B,): the row finished
    last step, so the next step restarts it on new data; current_data: the rows' batch entries
    (BATCH_KEYS present in the batch)."""

    z_H: Tensor
    z_L: Tensor
    steps: Tensor
    halted: Tensor
    current_data: dict[str, Tensor] = field(default_factory=dict)


class TRM(nn.Module):
    """TRM-Att with ACT: `initial_carry`, then one `forward` per ACT step; see the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        D = config.hidden_size
        self.puzzle_len = config.puzzle_len
        self.embed_scale = math.sqrt(D)

        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        trunc_normal_(self.embed_tokens.weight, std=1 / self.embed_scale)
        if config.pos_encodings == "learned":
            self.embed_pos = nn.Embedding(config.total_len, D)
            trunc_normal_(self.embed_pos.weight, std=1 / self.embed_scale)
        if config.puzzle_emb_ndim > 0:
            self.puzzle_emb = PuzzleEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim)
        self.rope = (
            RotaryTables(D // config.num_heads, config.total_len, config.rope_theta)
            if config.pos_encodings == "rope" and not config.mlp_t
            else None
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.lm_head = linear(D, config.vocab_size)
        self.q_head = linear(D, 2, bias=True)  # [q_halt, q_continue]
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("H_init", trunc_normal_(torch.empty(D), std=1.0))  # y's start value
        self.register_buffer("L_init", trunc_normal_(torch.empty(D), std=1.0))  # z's start value
        # (T, n) to run instead of the config's, or None: training's depth curriculum (pipeline.training.compute) sets it
        self.cycles: tuple[int, int] | None = None
        self._positions: dict[tuple[int, str], Tensor] = {}  # per (bucket grid length, device); see positions
        self._ropes: dict[tuple[int, str], RotaryTables] = {}
        if config.compile_backend:
            self.compile_blocks(config.compile_backend)

    def compile_blocks(self, backend: str = "inductor", **options) -> None:
        """torch.compile each block in place (`nn.Module.compile`, so state-dict names do not change). The
        whole model cannot be compiled as is (the puzzle embedding replaces buffers and clears `.grad` in
        forward); a block is pure tensor work, where RoPE, the norms and SiLU·mul fuse around the GEMMs."""
        import torch._dynamo

        # Each block's graph is specialised per grad mode (no-grad cycles, gradient cycle, prediction) and batch
        # shape; beyond the recompile limit (8 by default) torch silently falls back to eager.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        for block in self.blocks:
            block.compile(backend=backend, **options)

    # -- positions: the whole canvas, or a bucket (its top-left corner) -------------------------------------
    def positions(self, grid_len: int) -> Tensor | None:
        """int64 (P + grid_len,): the position of each state slot for `grid_len` grid tokens, a square corner of
        the canvas (pipeline.data.canvas); None for the whole canvas (slot i is position i)."""
        if grid_len == self.config.seq_len:
            return None
        canvas, side = math.isqrt(self.config.seq_len), math.isqrt(grid_len)
        if side * side != grid_len or side > canvas:
            raise ValueError(f"TRM: {grid_len} grid tokens are not a square corner of the {canvas}x{canvas} canvas")
        if self.config.mlp_t:
            raise ValueError("TRM: canvas buckets need attention; the token MLP (mlp_t) is built for one length")
        key = (grid_len, str(self.H_init.device))
        if key not in self._positions:
            grid = self.puzzle_len + grid_positions(side, canvas)
            self._positions[key] = torch.cat((torch.arange(self.puzzle_len), grid)).to(self.H_init.device)
        return self._positions[key]

    def rope_for(self, positions: Tensor | None) -> RotaryTables | None:
        """The RoPE tables of these positions (kept per bucket: compiled blocks see one object per shape)."""
        if self.rope is None or positions is None:
            return self.rope
        key = (positions.shape[0], str(positions.device))
        if key not in self._ropes:
            self._ropes[key] = self.rope.at(positions)
        return self._ropes[key]

    # -- one application of the shared network -------------------------------------------------------------
    def net(self, h: Tensor, injection: Tensor, rope: RotaryTables | None = None) -> Tensor:
        """The shared reasoning network: the block stack applied to h + injection (RoPE tables: `rope` for a
        bucket, else the whole canvas's)."""
        h = h + injection
        rope = self.rope if rope is None else rope
        for block in self.blocks:
            h = block(h, rope)
        return h

    def embed_input(self, inputs: Tensor, puzzle_identifiers: Tensor | None,
                    positions: Tensor | None = None) -> Tensor:
        """x (B, S, D): puzzle tokens (the table row, zero-padded to P*D) then token embeddings, times sqrt(D).
        With learned positions, (x + pos) / sqrt(2) is scaled instead, as in the reference (pos of `positions`
        for a bucket)."""
        x = self.embed_tokens(inputs)
        if self.config.puzzle_emb_ndim > 0:
            puzzle = self.puzzle_emb(puzzle_identifiers)
            puzzle = F.pad(puzzle, (0, self.puzzle_len * self.config.hidden_size - puzzle.shape[-1]))
            x = torch.cat((puzzle.view(-1, self.puzzle_len, self.config.hidden_size).to(x.dtype), x), dim=1)
        if self.config.pos_encodings == "learned":
            pos = self.embed_pos.weight if positions is None else self.embed_pos.weight[positions]
            x = 0.707106781 * (x + pos)
        return self.embed_scale * x

    def recurse(self, z_H: Tensor, z_L: Tensor, x: Tensor, rope: RotaryTables | None = None) -> tuple[Tensor, Tensor]:
        """T cycles of (n times z ← net(z, y + x), then y ← net(y, z)); only the last keeps gradients.
        y does not change during a cycle's n z-updates, so y + x is formed once per cycle."""
        H_cycles, L_cycles = self.cycles or (self.config.H_cycles, self.config.L_cycles)
        with torch.no_grad():
            for _ in range(H_cycles - 1):
                injection = z_H + x
                for _ in range(L_cycles):
                    z_L = self.net(z_L, injection, rope)
                z_H = self.net(z_H, z_L, rope)
        if torch.is_grad_enabled():
            # Under autocast the no-gradient cycles may have cached bf16 copies of the weights. On torch
            # releases without the fix of pytorch#158232 (PR #165068) such a copy carries no autograd history,
            # and the gradient cycle would reuse it: the block weights would get no gradient at all. Dropping
            # the cache here makes the gradient cycle cast afresh on every torch (a few µs per step on a GPU).
            torch.clear_autocast_cache()
        injection = z_H + x
        for _ in range(L_cycles):
            z_L = self.net(z_L, injection, rope)
        z_H = self.net(z_H, z_L, rope)
        return z_H, z_L

    # -- ACT ------------------------------------------------------------------------------------------------
    def initial_carry(self, batch: dict[str, Tensor]) -> Carry:
        """A carry with every row halted, so the first `forward` loads every row of its batch (of any bucket)."""
        B, grid_len = batch["inputs"].shape
        device = self.H_init.device
        shape = (B, self.puzzle_len + grid_len, self.config.hidden_size)
        return Carry(
            z_H=torch.zeros(shape, device=device),
            z_L=torch.zeros(shape, device=device),
            steps=torch.zeros(B, dtype=torch.int32, device=device),
            halted=torch.ones(B, dtype=torch.bool, device=device),
            current_data={k: torch.zeros_like(batch[k]) for k in BATCH_KEYS if k in batch},
        )

    def forward(
        self, carry: Carry, batch: dict[str, Tensor], exploration: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Carry, dict[str, Tensor]]:
        """One ACT step. Rows halted in `carry` restart from (H_init, L_init) on the row of `batch`; the others
        continue on their current data. Every row of one call is on the same canvas: the whole one (L = seq_len
        grid tokens) or a bucket of side b (L = b², its cells at their canvas positions: pipeline.data.canvas). `exploration` = (uniform (B,), min_steps (B,)) replaces the
        reference's draws from the torch global RNG (torch.rand then torch.randint, made every training step
        even with probability 0); with it, a row explores when uniform < halt_exploration_prob and may
        then halt only once steps >= min_steps."""
        halted = carry.halted
        reset = halted.view(-1, 1, 1)
        z_H = torch.where(reset, self.H_init, carry.z_H)
        z_L = torch.where(reset, self.L_init, carry.z_L)
        steps = torch.where(halted, 0, carry.steps)
        data = {}
        for k, v in carry.current_data.items():
            if k not in batch:
                raise KeyError(f"TRM.forward: the batch lacks {k!r}, which the carry holds")
            data[k] = torch.where(halted.view((-1,) + (1,) * (v.ndim - 1)), batch[k], v)

        positions = self.positions(data["inputs"].shape[1])
        x = self.embed_input(data["inputs"], data.get("puzzle_identifiers"), positions)
        z_H, z_L = self.recurse(z_H, z_L, x, self.rope_for(positions))
        logits = self.lm_head(z_H[:, self.puzzle_len :])
        q = self.q_head(z_H[:, 0]).float()
        outputs = {"logits": logits, "q_halt_logits": q[:, 0], "q_continue_logits": q[:, 1]}

        with torch.no_grad():
            outputs["preds"] = logits.argmax(dim=-1)
            steps = steps + 1
            halted = steps >= self.config.halt_max_steps
            if self.training and self.config.halt_max_steps > 1:
                halted = halted | (outputs["q_halt_logits"] > 0)
                if exploration is None:
                    uniform = torch.rand_like(outputs["q_halt_logits"])
                    min_steps = torch.randint_like(steps, low=2, high=self.config.halt_max_steps + 1)
                else:
                    uniform, min_steps = exploration
                explore_steps = (uniform < self.config.halt_exploration_prob) * min_steps
                halted = halted & (steps >= explore_steps)
        return Carry(z_H.detach(), z_L.detach(), steps, halted, data), outputs

    def act_loss(self, outputs: dict[str, Tensor], carry: Carry) -> tuple[Tensor, dict[str, Tensor]]:
        """See the module-level `act_loss`."""
        return act_loss(outputs, carry)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the dense gradients and the puzzle rows' gradient (`puzzle_emb.local_weights.grad`)."""
        super().zero_grad(set_to_none=set_to_none)
        if self.config.puzzle_emb_ndim > 0:
            self.puzzle_emb.local_weights.grad = None


# ----------------------------------------------------------------------------------------------------------
# Loss and metrics


def log_stablemax(logits: Tensor) -> Tensor:
    """log of stablemax over the last axis: s(v) = v + 1 for v >= 0, 1 / (1 - v) for v < 0, normalised.
    A softmax alternative that grows linearly instead of exponentially (no overflow when logits drift)."""
    s = torch.where(logits < 0, 1 / (1 - logits + 1e-30), logits + 1)
    return torch.log(s / s.sum(dim=-1, keepdim=True))


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


# ----------------------------------------------------------------------------------------------------------
# The gradient gate


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
