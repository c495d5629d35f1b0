"""TRM-Att, the Tiny Recursive Model ("Less is More: Recursive Reasoning with Tiny Networks"), with its ACT
wrapper, computing what the published reference code computes (checked against a recorded fixture,
tests/test_model_parity.py). Only the model: its loss is pipeline.training.loss, its FLOPs pipeline.model.flops,
and which rows run on which canvas bucket (their positions) pipeline.model.rows.

Names. The paper writes x (the embedded question), y (the current answer), z (the latent reasoning state),
n = L_cycles, T = H_cycles and N_sup = halt_max_steps. The reference code, and so this file's tensors and
state-dict keys, call y "z_H" and z "z_L" (and their start values H_init / L_init). Everywhere below:
z_H is y, z_L is z.

Tensors (B = batch rows, L = seq_len grid tokens, or b² on a canvas bucket of side b (pipeline.model.rows),
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
    loss, metrics = act_loss(outputs, carry)   # pipeline.training.loss; summed over rows
    (loss / global_batch_size).backward()
Every dense parameter receives a gradient every step (none is unused), so a hand-written all-reduce over
`model.parameters()` works without DDP (pipeline.training.runtime checks it under autocast). The puzzle table is a
buffer, not a parameter: its gradient for the
batch's rows is `model.puzzle_emb.local_weights.grad` (B, ndim) with the rows' ids in
`model.puzzle_emb.local_ids` (B,), for a sparse optimizer to apply.

Initialisation (as the reference): linear weights truncated normal (±2 sigma) with std 1/sqrt(fan_in) and no
biases except q_head's; token (and learned position) embeddings std 1/sqrt(D); H_init and L_init std 1;
q_head weight 0 and bias -5 (so the model starts by never halting early); puzzle table 0. The std is the
std after truncation.

Precision: parameters, carries, RMS norms and RoPE tables stay float32;
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
from pipeline.model.layers import Block, PuzzleEmbedding, RotaryTables, linear, swiglu_width, trunc_normal_

__all__ = ["BATCH_KEYS", "Carry", "ModelConfig", "TRM", "swiglu_width"]

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
        self._ropes: dict[tuple[int, str], RotaryTables] = {}  # per bucket (length, device): see rope_for
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

    def check_positions(self, positions: Tensor | None, grid_len: int) -> None:
        """Refuses a sequence whose positions do not say where its cells sit (a shape alone never decides)."""
        expected = self.config.seq_len if positions is None else positions.shape[0] - self.puzzle_len
        if grid_len != expected:
            raise ValueError(f"TRM: {grid_len} grid tokens, but the positions given hold {expected} "
                             f"(the whole canvas is {self.config.seq_len}; pass a bucket's positions)")
        if positions is not None and (self.config.mlp_t or self.config.mlp_conv):
            raise ValueError("TRM: canvas buckets need attention and no grid convolution (model.mlp_t and "
                             "model.mlp_conv are built for the whole canvas)")

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
        self, carry: Carry, batch: dict[str, Tensor], exploration: tuple[Tensor, Tensor] | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Carry, dict[str, Tensor]]:
        """One ACT step. Rows halted in `carry` restart from (H_init, L_init) on the row of `batch`; the others
        continue on their current data. Every row of one call is on the same canvas: the whole one (positions
        None, L = seq_len grid tokens) or a bucket, whose state slot i sits at `positions[i]` (int64 (P + L,),
        pipeline.model.rows.RowEngine.positions). `exploration` = (uniform (B,), min_steps (B,)) replaces the
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

        self.check_positions(positions, data["inputs"].shape[1])
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the dense gradients and the puzzle rows' gradient (`puzzle_emb.local_weights.grad`)."""
        super().zero_grad(set_to_none=set_to_none)
        if self.config.puzzle_emb_ndim > 0:
            self.puzzle_emb.local_weights.grad = None
