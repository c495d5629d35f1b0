"""Stage `predict`: run the model on every augmented view of every held-out test input, decode each answer,
undo the view's augmentation and record it as a candidate (pipeline.predictions) for voting.

Each row runs halt_max_steps ACT steps in eval mode (as the reference evaluates); `early_stop` ends a batch
as soon as every row's q_halt > 0. Rows go round-robin over the test inputs (each input's first view, then
each input's second view, ...), so a run cut short by its time budget still has candidates for every input.
With several processes, each takes an interleaved share of the rows and rank 0 joins the shards.
With canvas buckets (`buckets`, pipeline.canvas) each test input is computed on the smallest bucket that holds it and
the output its demonstrations predict (AugmentedDataset.held_out_extent): a batch of rows is split by bucket, one
model call per bucket present.
`predict_to_file` then re-scores the top candidates by their likelihood under a few views (pipeline.rescore,
`predict.rescore_views`), within the same time budget, for the `likelihood` selectors.

`save_partial_every_s` > 0 also writes the candidates made so far to `predictions.partial.npz` (one file per
process) every that many seconds and when the run fails (an exception such as CUDA out-of-memory); a killed
run leaves the last periodic one. The Kaggle driver submits from them when prediction dies part-way.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm import tqdm

from augment.dataset import AugmentedDataset
from pipeline.canvas import parse_buckets
from pipeline.config import PredictConfig
from pipeline.encoding import IGNORE_LABEL, decode_grids
from pipeline.model import TRM
from pipeline.predictions import Predictions, PredictionsWriter
from pipeline.rescore import rescore
from pipeline.rows import bucket_groups


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
    buckets: tuple[int, ...] = (),
) -> Predictions:
    """Candidates for this process's share of the held-out rows (all rows when world == 1); with `partial_path`,
    the candidates so far are saved there every cfg.save_partial_every_s seconds and on an exception. `buckets`:
    the canvas buckets' sides (pipeline.canvas.parse_buckets; () = the whole canvas)."""
    model.eval()
    start_time = time.perf_counter()
    rows = dataset.test_rows(cfg.max_variants if cfg.max_variants > 0 else None)
    view = rows["variant"] - dataset.puzzle_first_variant[rows["puzzle_index"]]  # 0 = the original
    order = np.lexsort((np.arange(len(view)), view))[rank::world]  # round-robin over inputs; this rank's share
    rows = {k: v[order] for k, v in rows.items()}
    rows["side"] = dataset.held_out_sides(rows["puzzle_index"], rows["test_index"], buckets)
    writer = PredictionsWriter(eval_task_ids(dataset))
    bar = tqdm(total=len(order), disable=not progress, desc="predict", unit="ex", dynamic_ncols=True)
    try:
        _predict_rows(model, dataset, cfg, rows, writer, bar, device, autocast, start_time, partial_path)
    except BaseException:
        if partial_path is not None and len(writer):
            writer.finish().save(partial_path)  # what was done survives the failure
        raise
    finally:
        bar.close()
    return writer.finish()


def _predict_batch(model: TRM, dataset: AugmentedDataset, grid: np.ndarray, variant: np.ndarray, side: int,
                   early_stop: bool, device, autocast) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """(q float32 (n,), answer grids in the original orientation, None where nothing decodes) of test input grids
    `grid` seen through `variant`s, all on the bucket of side `side`."""
    inputs = dataset.encode_grids(grid, variant, canvas=side)
    batch = {
        "inputs": torch.from_numpy(inputs).to(device),
        "labels": torch.full(inputs.shape, IGNORE_LABEL, dtype=torch.int32, device=device),
        "puzzle_identifiers": torch.from_numpy((variant + 1).astype(np.int32)).to(device),
    }
    carry = model.initial_carry(batch)
    with autocast() if autocast is not None else nullcontext():  # a fresh context manager per batch
        for _ in range(model.config.halt_max_steps):
            carry, outputs = model(carry, batch)
            if early_stop and bool((outputs["q_halt_logits"] > 0).all()):
                break
    q = torch.sigmoid(outputs["q_halt_logits"].float()).cpu().numpy()
    grids = decode_grids(outputs["preds"].cpu().numpy(), side)
    return q, [None if g is None else dataset.augmentation(int(v)).invert(g) for g, v in zip(grids, variant)]


def _predict_rows(model: TRM, dataset: AugmentedDataset, cfg: PredictConfig, rows: dict[str, np.ndarray],
                  writer: PredictionsWriter, bar: tqdm, device, autocast, start_time: float,
                  partial_path: str | Path | None) -> None:
    """The batch loop of predict(): every row's candidate into `writer`, until the rows or the time run out."""
    lo, hi = 0, len(rows["variant"])
    last_save = time.perf_counter()
    for start in range(lo, hi, cfg.batch_size):
        stop = min(hi, start + cfg.batch_size)
        for side, part in bucket_groups(rows["side"][start:stop], dataset.canvas):
            sl = slice(start, stop) if part is None else start + part
            variant = rows["variant"][sl]
            q, answers = _predict_batch(model, dataset, rows["grid"][sl], variant, side, cfg.early_stop, device,
                                        autocast)
            writer.add([dataset.puzzles[int(p)]["task_id"] for p in rows["puzzle_index"][sl]],
                       rows["test_index"][sl], variant, q, answers)
        bar.update(stop - start)
        if partial_path is not None and cfg.save_partial_every_s > 0 and time.perf_counter() - last_save >= cfg.save_partial_every_s:
            writer.finish().save(partial_path)
            last_save = time.perf_counter()
        if cfg.time_budget_s > 0 and time.perf_counter() - start_time > cfg.time_budget_s:
            bar.write(f"predict: time budget of {cfg.time_budget_s:.0f} s reached after {stop - lo} "
                      f"of {hi - lo} rows")
            break


def partial_predictions_path(out_path: str | Path, rank: int = 0, world: int = 1) -> Path:
    """Where a process keeps its candidates so far: predictions.partial.npz, or .rankR.partial.npz per process."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}{f'.rank{rank}' if world > 1 else ''}.partial.npz")


def predict_to_file(
    dataset_dir: str | Path,
    checkpoint_path: str | Path,
    out_path: str | Path,
    cfg: PredictConfig,
    progress: bool = True,
    canvas_buckets: str = "",
) -> Path:
    """Load the checkpoint (EMA weights unless told otherwise), predict, write one predictions file (on the canvas
    buckets `canvas_buckets`, the setting data.canvas_buckets: "" = the whole canvas)."""
    from accelerate import Accelerator

    from pipeline.checkpoint import load_model_for_inference

    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if on_gpu else "no", cpu=not on_gpu)
    dataset = AugmentedDataset.load(dataset_dir)
    model = load_model_for_inference(checkpoint_path, use_ema=cfg.use_ema).to(accelerator.device)
    if model.config.seq_len != dataset.canvas**2:
        raise ValueError(
            f"checkpoint {checkpoint_path} was trained on a {math.isqrt(model.config.seq_len)}-wide canvas, "
            f"the dataset {dataset_dir} uses {dataset.canvas}"
        )
    if model.config.num_puzzle_identifiers < dataset.num_puzzle_identifiers:
        raise ValueError(
            f"checkpoint {checkpoint_path} has {model.config.num_puzzle_identifiers} puzzle embeddings but the "
            f"dataset {dataset_dir} needs {dataset.num_puzzle_identifiers}: predict with the dataset it was trained on"
        )
    buckets = parse_buckets(canvas_buckets, dataset.canvas)
    rank, world = accelerator.process_index, accelerator.num_processes
    if buckets and accelerator.is_main_process:
        rows = dataset.test_rows(1)
        sides = dataset.held_out_sides(rows["puzzle_index"], rows["test_index"], buckets)
        print("predict: on canvas buckets, test inputs per side: "
              + ", ".join(f"{b}: {int((sides == b).sum())}" for b in buckets))
    start_time = time.perf_counter()
    predict_cfg = cfg
    if cfg.rescore_views > 0 and cfg.time_budget_s > 0:  # the budget covers both passes, in proportion to their rows
        views = len(dataset.test_rows(cfg.max_variants if cfg.max_variants > 0 else None)["variant"])
        rescored = len(dataset.test_rows(cfg.rescore_views)["variant"])
        predict_cfg = dataclasses.replace(cfg, time_budget_s=cfg.time_budget_s * views / (views + rescored))
    out_path = Path(out_path)
    partial = partial_predictions_path(out_path, rank, world) if cfg.save_partial_every_s > 0 else None
    part = predict(
        model, dataset, predict_cfg, device=accelerator.device, autocast=accelerator.autocast,
        rank=rank, world=world, progress=progress and accelerator.is_main_process, partial_path=partial,
        buckets=buckets,
    )

    def with_likelihoods(predictions: Predictions) -> Predictions:
        """The optional second pass; if it fails (out of memory, ...) the candidates are kept without scores."""
        if cfg.rescore_views <= 0:
            return predictions
        left = cfg.time_budget_s - (time.perf_counter() - start_time) if cfg.time_budget_s > 0 else 0.0
        if cfg.time_budget_s > 0 and left <= 0:
            return predictions
        try:
            predictions.logp = rescore(
                model, dataset, predictions, top_k=cfg.rescore_top_k, views=cfg.rescore_views,
                batch_size=cfg.batch_size, device=accelerator.device, autocast=accelerator.autocast,
                time_budget_s=left, progress=progress, buckets=buckets,
            )
        except Exception as e:  # noqa: BLE001 - the candidates matter more than their likelihood scores
            warnings.warn(f"predict: likelihood re-scoring failed ({e!r}); candidates saved without scores")
        return predictions

    if world == 1:
        with_likelihoods(part).save(out_path)
        if partial is not None:
            partial.unlink(missing_ok=True)  # the whole share is saved: no partial file left behind
        return out_path
    shard = out_path.with_name(f"{out_path.stem}.rank{rank}.npz")
    part.save(shard)
    if partial is not None:
        partial.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = [out_path.with_name(f"{out_path.stem}.rank{r}.npz") for r in range(world)]
        # re-scoring runs on the main process only: M views per test input, small next to the views above
        with_likelihoods(Predictions.concatenate([Predictions.load(s) for s in shards])).save(out_path)
        for s in shards:
            s.unlink()
    accelerator.wait_for_everyone()
    return out_path
