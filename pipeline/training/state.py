"""Everything a training step changes and a checkpoint holds: building it, saving it, restoring it, and keeping
the weights of every evaluation.

The carry (2 × global batch × S × D floats: 2.9 GB for the paper config) is what makes a resume exact; the final
checkpoint, kept for prediction and fine-tuning, leaves it out. Every process calls `save_state` (the carry gather
is a collective); rank 0 writes.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from augment.dataset import AugmentedDataset
from pipeline.config import RunConfig, to_dict
from pipeline.core.io import atomic_write_with
from pipeline.core.tracking import log_row
from pipeline.model.loading import init_from_checkpoint
from pipeline.model.new_rows import start_new_rows
from pipeline.model.rows import RowEngine
from pipeline.model.trm import TRM, Carry
from pipeline.training import checkpoint as ckpt
from pipeline.training.batches import TrainSampler
from pipeline.training.collectives import barrier, gather_carries, gather_rows_to_main
from pipeline.training.compute import FinetunePlan, nominal_epoch
from pipeline.training.optim import EMA, SignSGD, build_dense_optimizer
from pipeline.training.runtime import Runtime

EVALUATED_DIR = "evaluated"  # checkpoints/evaluated/step_N.pt: the weights of every evaluation, kept for good

# evaluator(model, runtime) -> the metrics of one evaluation (on rank 0; None elsewhere), model in eval mode
Evaluator = Callable[[TRM, Runtime], "dict[str, Any] | None"]


@dataclass
class TrainState:
    """Everything a step changes and a checkpoint holds."""

    model: TRM
    optimizer: torch.optim.Optimizer
    table: SignSGD  # sparse sign-SGD over the puzzle-embedding rows
    ema: EMA | None
    sampler: TrainSampler
    carries: list[Carry] | None  # one per micro-batch; None until the first step (or after a final checkpoint)
    sides: np.ndarray | None = None  # int64 (G,): every global row's bucket side (Refill); None with the carries
    step: int = 0
    dataset_fingerprint: str | None = None  # saved in every checkpoint: it works only with this dataset
    flops: float = 0.0  # model FLOPs computed by the training steps so far, all processes (the `flops` column)
    wall_s: float = 0.0  # seconds spent in training steps so far, evaluations and checkpoints left out
    engine: RowEngine | None = None  # which rows run on which bucket (built from the config by build_state)
    plan: FinetunePlan | None = None  # a planned fine-tune's plan (finetune_plan), kept in every checkpoint


def build_state(cfg: RunConfig, dataset: AugmentedDataset, rt: Runtime,
                init_checkpoint: str | Path | None = None) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = TRM(cfg.model)
    source = init_from_checkpoint(model, init_checkpoint, rt.is_main) if init_checkpoint is not None else None
    model.to(rt.device)
    started = start_new_rows(model, source, cfg.new_rows, dataset, cfg.new_rows_candidates)
    if source is not None and rt.is_main:
        print(f"init: {started}")
    dense = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = build_dense_optimizer(
        dense, cfg.optimizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    table = SignSGD(model.puzzle_emb.weights, lr=cfg.puzzle_emb_lr, weight_decay=cfg.puzzle_emb_weight_decay)
    ema = EMA(model, decay=cfg.ema_rate) if cfg.ema else None
    engine = RowEngine.build(cfg.data.canvas_buckets, dataset.canvas, cfg.model)
    return TrainState(model, optimizer, table, ema, make_sampler(cfg, dataset, engine), carries=None, engine=engine)


def make_sampler(cfg: RunConfig, dataset: AugmentedDataset, engine: RowEngine) -> TrainSampler:
    return TrainSampler(dataset, seed=cfg.seed, sampling=cfg.data.sampling, translation=cfg.data.translation,
                        batch_size=cfg.global_batch_size, buckets=engine.buckets, variants=cfg.train_variants)


def blank_carries(model: TRM, cfg: RunConfig, micro: int, device: torch.device) -> list[Carry]:
    """Carries whose rows are all halted, so that the first step fills every row from the sampler."""
    engine = RowEngine(int(round(cfg.model.seq_len ** 0.5)), puzzle_len=model.puzzle_len)
    return [engine.blank_carry(model, micro, device) for _ in range(cfg.grad_accum_steps)]


def restore_state(state: TrainState, path: Path, cfg: RunConfig, rt: Runtime) -> None:
    saved = ckpt.load_training_state(path)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.table.load_state_dict(saved["table_optimizer"])
    if state.ema is not None and saved.get("ema") is not None:
        state.ema.load_state_dict(saved["ema"])
    state.sampler.load_state_dict(saved["sampler"])
    state.step = saved["step"]
    state.flops = float(saved.get("flops", 0.0))
    state.wall_s = float(saved.get("wall_s", 0.0))
    if saved.get("carry") is not None:  # a final checkpoint has none: its rows then start afresh
        state.carries = ckpt.carries_from_state(saved["carry"], rt.rank, rt.world, cfg.grad_accum_steps, rt.device)
        if "sides" in saved["carry"]:  # absent when saved before buckets existed (train() fills in the canvas)
            state.sides = saved["carry"]["sides"].numpy().astype(np.int64)
    ckpt.set_rng_state(saved["rng"])


def save_state(state: TrainState, cfg: RunConfig, rt: Runtime, ckpt_dir: Path, final: bool,
               carry: bool | None = None) -> Path:
    """A checkpoint of everything (rank 0 writes; every rank must call: the carry gather is a collective).

    The carry (2.9 GB at the paper's batch) is what makes a resume exact; the final checkpoint leaves it out, and
    so does the one saved on a stop request (`carry=False`): that must be written within the sender's kill grace,
    and a resume from it is correct if not bit-exact (rows in flight start afresh; docs/RELIABILITY.md)."""
    global_carry = None
    if (not final) if carry is None else carry:  # gathered to rank 0 alone (the only writer); the others get empties
        global_carry = gather_carries(state.carries, lambda t: gather_rows_to_main(t, rt.world))
        global_carry["sides"] = torch.from_numpy(state.sides.copy())  # every process holds all of them
    path = ckpt_dir / f"step_{state.step:08d}.pt"
    if rt.is_main:
        ckpt.save_training_state(
            path,
            {
                "step": state.step,
                "config": to_dict(cfg),
                "model": state.model.state_dict(),
                "ema": state.ema.state_dict() if state.ema is not None else None,
                "optimizer": state.optimizer.state_dict(),
                "table_optimizer": state.table.state_dict(),
                "sampler": state.sampler.state_dict(),
                "carry": global_carry,
                "rng": ckpt.get_rng_state(),
                "world": rt.world,
                "final": final,
                "stopped": carry is False and not final,  # saved on a stop request, without the carry
                "dataset_fingerprint": state.dataset_fingerprint,
                "flops": state.flops,
                "wall_s": state.wall_s,
                **({"finetune_plan": asdict(state.plan)} if state.plan is not None else {}),
            },
            keep=cfg.keep_checkpoints,
        )
    if rt.world > 1:
        barrier()
    return path


def run_evaluation(state: TrainState, cfg: RunConfig, rt: Runtime, dataset: AugmentedDataset,
                   evaluator: Evaluator, out_dir: Path) -> dict[str, Any] | None:
    """Evaluate with the EMA weights (what prediction uses), log a `kind: eval` row, keep the evaluated weights.
    Every process calls it (the evaluation is sharded); they leave together, after rank 0 has written."""
    started = time.perf_counter()
    state.model.cycles = None  # evaluated at the model's full depth (the next step sets the curriculum's again)
    with state.ema.swap(state.model) if state.ema is not None else nullcontext():
        result = evaluator(state.model, rt)
    state.model.train()
    row = None
    if rt.is_main and result is not None:
        row = {"kind": "eval", "step": state.step, "epoch": nominal_epoch(cfg, dataset, state.step),
               "flops": state.flops, "wall_s": state.wall_s, **result, "seconds": time.perf_counter() - started}
        log_row(rt.accelerator, out_dir / "metrics.jsonl", row)
        weights = {"step": state.step, "config": to_dict(cfg), "model": state.model.state_dict(),
                   "ema": state.ema.state_dict() if state.ema is not None else None, "final": True, "eval": row,
                   "dataset_fingerprint": state.dataset_fingerprint}
        atomic_write_with(out_dir / "checkpoints" / EVALUATED_DIR / f"step_{state.step:08d}.pt",
                          lambda f: torch.save(weights, f))
    if rt.world > 1:
        barrier()
    return row
