"""Stage `predict`: run the model on every augmented view of every held-out test input, decode each answer,
undo the view's augmentation and record it as a candidate (pipeline.inference.predictions) for voting.

Each row runs halt_max_steps ACT steps in eval mode (as the reference evaluates), or `act_steps`; with
`early_stop` each row halts as in training (its answer is the one of its first step with q_halt > 0) and a batch
ends once every row has. Rows go round-robin over the test inputs (each input's first view, then
each input's second view, ...), so a run cut short by its time budget still has candidates for every input.
With several processes, each takes an interleaved share of the rows and every process gets the joined
candidates. `predict_to_file` writes them at once, then re-scores the top candidates by their likelihood under a
few views (pipeline.inference.rescore, `predict.rescore_views`; sharded over the processes too), within the same time
budget, for the `likelihood` selectors, and writes the file again with the scores.
With canvas buckets (`engine`, pipeline.model.rows.RowEngine) each test input is computed on the smallest bucket that
holds it and the output its demonstrations predict (AugmentedDataset.held_out_extent): a batch of rows is split by
bucket, one model call per bucket present. That prediction of the output's size can be wrong, so nothing is cropped
silently: a view whose decoded answer reaches its bucket's edge (no room left for the EOS edge) is run again on the
next bigger bucket, up to the whole canvas, and the number of test inputs this happened to is reported.

Nothing done is lost: `save_partial_every_s` > 0 writes the candidates made so far to `predictions.partial.npz`
(one file per process) every that many seconds and when the run fails (an exception such as CUDA out-of-memory),
so a killed run leaves the last periodic one (the Kaggle driver submits from them). SIGTERM (pipeline.core.signals)
ends the pass at the next batch: the candidates so far are written (during re-scoring: with the scores of the
views it ran), then the process exits as stopped.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from tqdm import tqdm

from augment.dataset import AugmentedDataset
from pipeline.config import PredictConfig
from pipeline.training.collectives import all_reduce_sum, gather_objects
from pipeline.data.encoding import IGNORE_LABEL, decode_grids
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.model.rows import RowEngine
from pipeline.model.trm import TRM
from pipeline.inference.predictions import Predictions, PredictionsWriter
from pipeline.inference.rescore import rescore
from pipeline.core.signals import Stopped, stop_requested, stoppable


def eval_task_ids(dataset: AugmentedDataset) -> list[str]:
    return [p["task_id"] for p in dataset.puzzles if p["is_eval"]]


@torch.inference_mode()
def predict(
    model: TRM,
    dataset: AugmentedDataset,
    cfg: PredictConfig,
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    partial_path: str | Path | None = None,
    stop: Callable[[], object] | None = None,
    engine: RowEngine | None = None,
    stats: dict | None = None,
) -> Predictions:
    """Candidates for this process's share of the held-out rows (all rows when world == 1); with `partial_path`,
    the candidates so far are saved there every cfg.save_partial_every_s seconds and on an exception. `stop()`
    returning true (checked after every batch) ends the pass like the time budget does. `engine`: the rows'
    canvas or buckets (default the whole canvas); `stats["rerun_inputs"]` gets the number of this process's test
    inputs run again on a bigger bucket."""
    model.eval()
    engine = engine or RowEngine(dataset.canvas, puzzle_len=model.puzzle_len)
    start_time = time.perf_counter()
    rows = dataset.test_rows(cfg.max_variants if cfg.max_variants > 0 else None)
    view = rows["variant"] - dataset.puzzle_first_variant[rows["puzzle_index"]]  # 0 = the original
    order = np.lexsort((np.arange(len(view)), view))[rank::world]  # round-robin over inputs; this rank's share
    rows = {k: v[order] for k, v in rows.items()}
    rows["side"] = engine.held_out_sides(dataset, rows["puzzle_index"], rows["test_index"])
    writer = PredictionsWriter(eval_task_ids(dataset))
    bar = tqdm(total=len(order), disable=not progress, desc="predict", unit="ex", dynamic_ncols=True)
    rerun: set[tuple[int, int]] = set()
    try:
        _predict_rows(model, dataset, engine, cfg, rows, writer, bar, device, autocast, start_time, partial_path,
                      stop, rerun)
    except BaseException:
        if partial_path is not None and len(writer):
            writer.finish().save(partial_path)  # what was done survives the failure
        raise
    finally:
        bar.close()
    if stats is not None:
        stats["rerun_inputs"] = len(rerun)
    return writer.finish()


def _predict_batch(model: TRM, dataset: AugmentedDataset, engine: RowEngine, grid: np.ndarray, variant: np.ndarray,
                   side: int, steps: int, early_stop: bool, device, autocast) -> tuple[np.ndarray, list, np.ndarray]:
    """(q float32 (n,), answer grids in the original orientation (None where nothing decodes), bool (n,): run
    again on a bigger bucket) of test input grids `grid` seen through `variant`s, first on the bucket of side
    `side`, after `steps` ACT steps (run_act_steps). A view whose answer reaches its bucket's edge is run again on
    the next bigger bucket (recursively, up to the canvas)."""
    inputs = dataset.encode_grids(grid, variant, canvas=side)
    batch = {
        "inputs": torch.from_numpy(inputs).to(device),
        "labels": torch.full(inputs.shape, IGNORE_LABEL, dtype=torch.int32, device=device),
        "puzzle_identifiers": torch.from_numpy((variant + 1).astype(np.int32)).to(device),
    }
    with autocast() if autocast is not None else nullcontext():  # a fresh context manager per batch
        preds, q_logits = run_act_steps(model, batch, steps, early_stop, engine, side)
    q = torch.sigmoid(q_logits.float()).cpu().numpy()
    grids = decode_grids(preds.cpu().numpy(), side)
    rerun = np.zeros(len(grids), bool)
    if side < engine.canvas:
        rerun[[i for i, g in enumerate(grids) if g is not None and max(g.shape) >= side]] = True
    answers = [None if g is None else dataset.augmentation(int(v)).invert(g) for g, v in zip(grids, variant)]
    if rerun.any():
        again = np.flatnonzero(rerun)
        q[again], bigger, _ = _predict_batch(model, dataset, engine, grid[again], variant[again],
                                             engine.bigger(side), steps, early_stop, device, autocast)
        for i, answer in zip(again.tolist(), bigger):
            answers[i] = answer
    return q, answers, rerun


def _predict_rows(model: TRM, dataset: AugmentedDataset, engine: RowEngine, cfg: PredictConfig,
                  rows: dict[str, np.ndarray], writer: PredictionsWriter, bar: tqdm, device, autocast,
                  start_time: float, partial_path: str | Path | None, stop: Callable[[], object] | None,
                  rerun: set[tuple[int, int]]) -> None:
    """The batch loop of predict(): every row's candidate into `writer`, until the rows or the time run out."""
    total = len(rows["variant"])
    steps = cfg.act_steps or model.config.halt_max_steps
    last_save = time.perf_counter()
    for start in range(0, total, cfg.batch_size):
        end = min(total, start + cfg.batch_size)
        for side, part in engine.groups(rows["side"][start:end]):
            picked = np.arange(start, end) if part is None else start + part
            variant = rows["variant"][picked]
            q, answers, again = _predict_batch(model, dataset, engine, rows["grid"][picked], variant, side, steps,
                                               cfg.early_stop, device, autocast)
            rerun.update(zip(rows["puzzle_index"][picked][again].tolist(), rows["test_index"][picked][again].tolist()))
            writer.add([dataset.puzzles[int(p)]["task_id"] for p in rows["puzzle_index"][picked]],
                       rows["test_index"][picked], variant, q, answers)
        bar.update(end - start)
        if partial_path is not None and cfg.save_partial_every_s > 0 and time.perf_counter() - last_save >= cfg.save_partial_every_s:
            writer.finish().save(partial_path)
            last_save = time.perf_counter()
        if stop is not None and stop():
            bar.write(f"predict: stopped by a signal after {end} of {total} rows")
            break
        if cfg.time_budget_s > 0 and time.perf_counter() - start_time > cfg.time_budget_s:
            bar.write(f"predict: time budget of {cfg.time_budget_s:.0f} s reached after {end} "
                      f"of {total} rows")
            break


def run_act_steps(model: TRM, batch: dict[str, torch.Tensor], steps: int, halt: bool = False,
                  engine: RowEngine | None = None, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(preds int64 (B, L), q_halt logits (B,)) after `steps` ACT steps from a fresh carry (past halt_max_steps
    the recursion continues instead of restarting), every row on `side` (default: the whole canvas); with `halt`,
    each row's at its first step with q_halt > 0, stopping early once every row has halted."""
    carry = model.initial_carry(batch)
    preds = q = done = None
    for _ in range(steps):
        if engine is None:  # the whole canvas
            carry, outputs = model(carry, batch)
        else:
            carry, outputs = engine.step(model, carry, batch, engine.canvas if side is None else side)
        carry.halted = torch.zeros_like(carry.halted)  # eval halts only at halt_max_steps; go on past it
        if not halt:
            preds, q = outputs["preds"], outputs["q_halt_logits"]
            continue
        if done is None:
            preds, q = outputs["preds"].clone(), outputs["q_halt_logits"].clone()
            done = q > 0
        else:
            running = ~done
            preds[running] = outputs["preds"][running]
            q[running] = outputs["q_halt_logits"][running]
            done |= running & (outputs["q_halt_logits"] > 0)
        if bool(done.all()):
            break
    return preds, q


def partial_predictions_path(out_path: str | Path, rank: int = 0, world: int = 1) -> Path:
    """Where a process keeps its candidates so far: predictions.partial.npz, or .rankR.partial.npz per process."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}{f'.rank{rank}' if world > 1 else ''}.partial.npz")


@stoppable
def predict_to_file(
    dataset_dir: str | Path,
    checkpoint_path: str | Path,
    out_path: str | Path,
    cfg: PredictConfig,
    progress: bool = True,
    canvas_buckets: str = "",
    checkpoint_choice: str | None = None,
) -> Path:
    """Load the checkpoint (EMA weights unless told otherwise), predict, write one predictions file (stamped with
    the dataset's fingerprint: which dataset's inputs it answers), then re-score and write it again with the
    scores; on the canvas buckets `canvas_buckets` (the setting data.canvas_buckets; "" = the whole canvas).
    `checkpoint_choice` (how the weights were chosen, pipeline.cli.choose's text) is stored in the same file.
    Every process of a job calls it; rank 0 writes."""
    from accelerate import Accelerator

    from pipeline.training.checkpoint import dataset_fingerprint
    from pipeline.training.runtime import auto_mixed_precision

    check_rescore_settings(cfg)
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=auto_mixed_precision(), cpu=not on_gpu)
    dataset = AugmentedDataset.load(dataset_dir)
    fingerprint = dataset_fingerprint(dataset_dir)
    model = load_checked_model(checkpoint_path, dataset, dataset_dir, cfg.use_ema).to(accelerator.device)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    engine = RowEngine.build(canvas_buckets, dataset.canvas, model.config)
    if engine.on_buckets and rank == 0:
        print(f"predict: on canvas buckets, test inputs per side: {bucket_shares(dataset, engine)}")
    stats: dict = {}
    start_time = time.perf_counter()
    out_path = Path(out_path)
    partial = partial_predictions_path(out_path, rank, world) if cfg.save_partial_every_s > 0 else None
    part = predict(model, dataset, prediction_share(cfg, dataset), device=device, autocast=accelerator.autocast,
                   rank=rank, world=world, progress=progress and rank == 0, partial_path=partial, stop=stop_requested,
                   engine=engine, stats=stats)
    if engine.on_buckets:  # each process its share
        print(f"predict: {stats['rerun_inputs']} test input(s) run again on a bigger bucket (a decoded answer "
              f"reached its bucket's edge){f' on process {rank}' if world > 1 else ''}", flush=True)
    part.dataset_fingerprint, part.checkpoint_choice = fingerprint, checkpoint_choice
    predictions = join_and_write(part, out_path, rank, world)
    if partial is not None:
        partial.unlink(missing_ok=True)  # the whole share is in the file: no partial file left behind
    rescore_and_save(model, dataset, predictions, cfg, out_path, start_time, accelerator, engine, progress)
    if stop_requested() is not None:
        message = f"predict: stopped by a signal; {len(predictions)} candidates in {out_path}"
        if rank == 0:
            print(message, flush=True)
        raise Stopped(stop_requested(), message)
    return out_path


def rescore_and_save(model: TRM, dataset: AugmentedDataset, predictions: Predictions, cfg: PredictConfig,
                     out_path: Path, start_time: float, accelerator: Any, engine: RowEngine, progress: bool) -> None:
    """The second pass: likelihood scores of the top candidates in what is left of the time budget, written into
    the same file by rank 0. Every process re-scores, or none does (the budget spent or a stop asked on any);
    a failure costs the scores, never the candidates already written."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    left = cfg.time_budget_s - (time.perf_counter() - start_time) if cfg.time_budget_s > 0 else 0.0
    skip = (cfg.time_budget_s > 0 and left <= 0) or stop_requested() is not None
    if cfg.rescore_views <= 0 or _anyone(skip, world, device):
        return
    try:
        predictions.logp, predictions.logp_cells = rescore(
            model, dataset, predictions, top_k=cfg.rescore_top_k, views=cfg.rescore_views,
            batch_size=cfg.batch_size, device=device, autocast=accelerator.autocast, time_budget_s=left,
            progress=progress and rank == 0, rank=rank, world=world, stop=stop_requested, engine=engine,
        )
        if rank == 0:
            predictions.save(out_path)
    except Exception as e:  # noqa: BLE001 - the candidates (already in the file) matter more than their scores
        warnings.warn(f"predict: likelihood re-scoring failed ({e!r}); candidates saved without scores")


def bucket_shares(dataset: AugmentedDataset, engine: RowEngine) -> str:
    """How many test inputs go on each bucket first, e.g. "12: 3, 30: 1"."""
    rows = dataset.test_rows(1)
    sides = engine.held_out_sides(dataset, rows["puzzle_index"], rows["test_index"])
    return ", ".join(f"{b}: {int((sides == b).sum())}" for b in engine.buckets)


def check_rescore_settings(cfg: PredictConfig) -> None:
    if cfg.rescore_views < 0:
        raise ConfigError(f"--set predict.rescore_views: must be at least 0 (0 = no re-scoring), got {cfg.rescore_views}")
    if cfg.rescore_views > 0 and cfg.rescore_top_k < 1:
        raise ConfigError(f"--set predict.rescore_top_k: must be at least 1 when re-scoring is on "
                          f"(predict.rescore_views={cfg.rescore_views}), got {cfg.rescore_top_k}")


def load_checked_model(checkpoint_path: str | Path, dataset: AugmentedDataset, dataset_dir: str | Path,
                       use_ema: bool) -> TRM:
    """The checkpoint's model, refused when it was trained on another canvas or on fewer puzzle variants."""
    from pipeline.model.loading import load_model_for_inference

    model = load_model_for_inference(checkpoint_path, use_ema=use_ema,
                                     num_puzzle_identifiers=dataset.num_puzzle_identifiers,
                                     rows_named="identifiers" in dataset.manifest)
    if model.config.seq_len != dataset.canvas**2:
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: was trained on a {math.isqrt(model.config.seq_len)}-wide canvas, "
            f"the dataset {dataset_dir} uses {dataset.canvas}"
        )
    if model.config.num_puzzle_identifiers < dataset.num_puzzle_identifiers:
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: has {model.config.num_puzzle_identifiers} puzzle embeddings but the "
            f"dataset {dataset_dir} needs {dataset.num_puzzle_identifiers}: predict with the dataset it was trained on"
        )
    return model


def prediction_share(cfg: PredictConfig, dataset: AugmentedDataset) -> PredictConfig:
    """cfg with the prediction pass's part of the time budget: the budget covers both passes, in proportion to
    their rows (both are sharded over the processes alike)."""
    if cfg.rescore_views <= 0 or cfg.time_budget_s <= 0:
        return cfg
    views = len(dataset.test_rows(cfg.max_variants if cfg.max_variants > 0 else None)["variant"])
    rescored = len(dataset.test_rows(cfg.rescore_views)["variant"])
    return dataclasses.replace(cfg, time_budget_s=cfg.time_budget_s * views / (views + rescored))


def join_and_write(part: Predictions, out_path: Path, rank: int, world: int) -> Predictions:
    """Every process's candidates joined (the same on every process); rank 0 writes them to out_path at once.
    With several processes each first saves its own shard (predictions.rankR.npz), which a job that dies while
    joining leaves for the Kaggle driver to collect; rank 0 removes the shards once the whole file is written."""
    if world == 1:
        part.save(out_path)
        return part
    shard = out_path.with_name(f"{out_path.stem}.rank{rank}.npz")
    part.save(shard)
    joined = Predictions.concatenate(gather_objects(part, world))  # every shard is on disk before this returns
    if rank == 0:
        joined.save(out_path)
        for r in range(world):
            out_path.with_name(f"{out_path.stem}.rank{r}.npz").unlink(missing_ok=True)
    return joined


def _anyone(flag: bool, world: int, device: torch.device) -> bool:
    """Whether `flag` is set on any process (a collective with several)."""
    if world == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), world).item() > 0)
