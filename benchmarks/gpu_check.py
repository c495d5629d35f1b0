"""One script for a lent GPU: is the bf16 training step right, where does its time go, and how fast is it. It runs
in under 10 minutes on an H100/H200 and ends with one Markdown table to paste into docs/MODEL.md.

    python benchmarks/gpu_check.py --out gpu_check.md     # a GPU: the paper config at 192 rows (halved until it fits)
    python benchmarks/gpu_check.py --tiny                  # anywhere, in seconds: a tiny model and dataset (CI)

In order (each line printed as soon as it is measured, so a cut-off run still says something):
1. versions: torch, CUDA, cuDNN, accelerate, the device and its bf16 peak;
2. the gradient gate: one bf16-autocast training step gives every dense parameter a non-zero gradient;
3. three profiled training steps (forward, loss, backward, Adam-atan2, sign-SGD, EMA) at the per-device batch:
   the share of device time in GEMMs, attention (and which SDPA kernel ran), elementwise and other work, peak
   memory and allocator retries;
4. forward+backward alone vs the full training loop (`pipeline.training.train.train`: refill, collectives, optimizers,
   EMA, logging) over --steps steps, with MFU = model FLOPs per step / step time / device peak;
5. the same with compiled blocks (`model.compile_backend`, --compile; "none" skips it);
6. prediction: views/s (every view run for N_sup ACT steps, decoded, de-augmented and recorded).
Exit status 1 when the gradient gate fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import bench as bench_loop  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from augment.dataset import AugmentedDataset, build_dataset  # noqa: E402
from pipeline.training.batches import TrainSampler  # noqa: E402
from pipeline.config import PredictConfig, RunConfig, apply_overrides, preset  # noqa: E402
from pipeline.data.tasks import load_tasks, select_tasks  # noqa: E402
from pipeline.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from pipeline.model.trm import TRM  # noqa: E402
from pipeline.training.loss import act_loss  # noqa: E402
from pipeline.training.runtime import dense_params_without_gradient  # noqa: E402
from pipeline.training.optim import EMA, SignSGD, build_dense_optimizer  # noqa: E402
from pipeline.model.flops import model_flops_per_row_step  # noqa: E402
from pipeline.inference.predict import predict  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity) by device-name fragment, first match wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))

TINY = {"model.hidden_size": 32, "model.num_heads": 2, "model.puzzle_emb_ndim": 32, "model.puzzle_emb_len": 2,
        "model.H_cycles": 2, "model.L_cycles": 1, "model.halt_max_steps": 3, "model.halt_exploration_prob": 0.5,
        "lr": 1e-3, "ema_rate": 0.9}


def say(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------------- setup
def versions(device: torch.device, peak_override: float) -> tuple[dict, float]:
    import accelerate

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "-",
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "-",
            "accelerate": accelerate.__version__, "device": "cpu", "memory_gb": 0.0, "capability": "-"}
    peak = peak_override
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, memory_gb=props.total_memory / 2**30,
                    capability=f"sm{props.major}{props.minor}")
        if not peak:
            peak = next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in props.name), 0.0)
    info["peak_bf16_tflops"] = peak
    return info, peak


def build_data(root: Path, tiny: bool, num_aug: int) -> Path:
    """The paper's data shape (ARC-AGI-1, 30x30 canvas, evaluation tasks held out) with few variants; or, with
    tiny, 6 training and 2 evaluation tasks whose grids fit a 6x6 canvas."""
    canvas = 6 if tiny else 30
    train = select_tasks(load_tasks("arc-agi-1/training").tasks, max_side=canvas)
    evals = select_tasks(load_tasks("arc-agi-1/evaluation").tasks, max_side=canvas)
    if tiny:
        train, evals = train[:6], evals[:2]
    build_dataset(train + evals, {t.id for t in evals}, num_aug=num_aug, seed=0, canvas=canvas,
                  progress=False).save(root)
    return root


def run_config(tiny: bool, dataset: AugmentedDataset) -> RunConfig:
    cfg = apply_overrides(preset("demo"), [f"{k}={v}" for k, v in TINY.items()]) if tiny else preset("arc1")
    cfg.model.seq_len, cfg.model.num_puzzle_identifiers = dataset.canvas**2, dataset.num_puzzle_identifiers
    return cfg


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU (what training uses there); float32 on a CPU (what training uses there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------- gate
def gradient_gate(cfg: RunConfig, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    model = TRM(copy.deepcopy(cfg.model)).to(device)
    return dense_params_without_gradient(model, device.type, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------- profile
def classify(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "cublas", "nvjet", "xmma", "aten::mm", "aten::addmm", "aten::bmm",
                            "aten::_addmm", "matmul")):
        return "gemm"
    if any(k in n for k in ("memcpy", "memset", "nccl")):
        return "copy/comm"
    if n.startswith("aten::") or not n.startswith(("profilerstep", "autograd::", "optimizer.", "<")):
        return "elementwise"
    return "other"


SDPA_KERNELS = (("_flash_attention_for_cpu", "flash (CPU)"), ("_flash_attention", "flash"),
                ("_efficient_attention", "memory-efficient"), ("_cudnn_attention", "cuDNN"),
                ("_attention_math", "math"))


def training_step_fn(cfg: RunConfig, dataset: AugmentedDataset, rows: int, device: torch.device):
    """One optimizer step as the trainer takes it (forward, loss, backward, Adam-atan2, sign-SGD, EMA) on a fixed
    batch whose halted rows reload the same data; the refill and collectives are measured by the loop below."""
    torch.manual_seed(0)
    model = TRM(copy.deepcopy(cfg.model)).to(device)
    optimizer = build_dense_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    table = SignSGD(model.puzzle_emb.weights, lr=cfg.puzzle_emb_lr, weight_decay=cfg.puzzle_emb_weight_decay)
    ema = EMA(model, decay=cfg.ema_rate)
    sampler = TrainSampler(dataset, seed=0, sampling=cfg.data.sampling, translation=cfg.data.translation,
                           batch_size=rows)
    batch = {k: torch.from_numpy(v).to(device) for k, v in sampler.take(rows).items()}
    carry = [model.initial_carry(batch)]
    explore = (torch.ones(rows, device=device), torch.zeros(rows, dtype=torch.int32, device=device))

    def step() -> None:
        with autocast_for(device):
            carry[0], outputs = model(carry[0], batch, exploration=explore)
            loss, _ = act_loss(outputs, carry[0])
        (loss / rows).backward()
        optimizer.step()
        table.step(model.puzzle_emb.local_ids, model.puzzle_emb.local_weights.grad)
        ema.update(model)
        model.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(cfg: RunConfig, dataset: AugmentedDataset, rows: int, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step = training_step_fn(cfg, dataset, rows, device)
    for _ in range(2):  # warm-up: allocator, kernels chosen, lazy init
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    retries_before = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    seconds = (time.perf_counter() - started) / 3
    shares: dict[str, float] = {"gemm": 0.0, "attention": 0.0, "elementwise": 0.0, "copy/comm": 0.0, "other": 0.0}
    kernels = set()
    events = prof.key_averages()
    for evt in events:
        for fragment, label in SDPA_KERNELS:
            if fragment in evt.key and "backward" not in evt.key:
                kernels.add(label)
                break
    device_events = [e for e in events if device.type == "cuda" and str(e.device_type).endswith("CUDA")]
    for evt in device_events or events:
        if device.type == "cuda":
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        else:
            us = evt.self_cpu_time_total
        shares[classify(evt.key)] += float(us)
    total = sum(shares.values()) or 1.0
    result = {"rows": rows, "profiled_s_per_step": seconds, "share": {k: v / total for k, v in shares.items()},
              "sdpa_kernel": ", ".join(sorted(kernels)) or "-"}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        result.update(peak_allocated_gb=torch.cuda.max_memory_allocated(device) / 2**30,
                      peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 2**30,
                      alloc_retries=stats.get("num_alloc_retries", 0) - retries_before)
    else:
        result.update(peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return result


def profile_at_a_batch_that_fits(cfg: RunConfig, dataset: AugmentedDataset, rows: int, device: torch.device) -> dict:
    """Profile at `rows`; on running out of device memory halve the rows until a step fits."""
    while True:
        try:
            return profile_steps(cfg, dataset, rows, device)
        except torch.cuda.OutOfMemoryError:
            if rows == 1:
                raise
            say(f"  {rows} rows do not fit; trying {rows // 2}")
            torch.cuda.empty_cache()
            rows //= 2


# ----------------------------------------------------------------------------------------------------- prediction
def prediction_rate(cfg: RunConfig, dataset: AugmentedDataset, views: int, batch_size: int,
                    device: torch.device) -> dict:
    model = TRM(copy.deepcopy(cfg.model)).to(device)
    per_view = len(dataset.test_rows(1)["variant"])
    pcfg = PredictConfig(max_variants=max(1, views // max(per_view, 1)), batch_size=batch_size)
    predict(model, dataset, PredictConfig(max_variants=1, batch_size=batch_size, time_budget_s=1e-3), device=device,
            autocast=lambda: autocast_for(device), progress=False)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    out = predict(model, dataset, pcfg, device=device, autocast=lambda: autocast_for(device), progress=False)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"views": len(out), "views_per_s": len(out) / seconds, "batch_size": batch_size,
            "act_steps": cfg.model.halt_max_steps}


# ----------------------------------------------------------------------------------------------------- report
def markdown(r: dict) -> str:
    v, lines = r["versions"], ["| check | result |", "|---|---|"]

    def row(check: str, result: str) -> None:
        lines.append(f"| {check} | {result} |")

    row("torch / CUDA / cuDNN / accelerate", f"{v['torch']} / {v['cuda']} / {v['cudnn']} / {v['accelerate']}")
    peak = f"{v['peak_bf16_tflops']:.0f} TFLOPS bf16 peak" if v["peak_bf16_tflops"] else "peak unknown"
    row("device", f"{v['device']} ({v['capability']}, {v['memory_gb']:.0f} GB, {peak})" if v["memory_gb"]
        else f"{v['device']} ({peak})")
    gate = r["gate"]
    row("gradient gate (bf16 autocast, 1 step)", "pass: every dense parameter gets a gradient" if not gate
        else f"**FAIL**: no gradient for {', '.join(gate)}")
    c = r["config"]
    row("config", f"{c['name']}: D {c['hidden']}, {c['seq_len']} tokens + {c['puzzle_len']} puzzle, T {c['T']}, "
        f"n {c['n']}; {c['flops_per_row_step'] / 1e9:.3g} GFLOP per row-step")
    if "profile" in r:
        p = r["profile"]
        s = p["share"]
        row(f"profile, 3 steps at {p['rows']} rows/device: GEMM / attention / elementwise / copy+comm / other",
            " / ".join(f"{s[k]:.0%}" for k in ("gemm", "attention", "elementwise", "copy/comm", "other")))
        row("SDPA kernel", p["sdpa_kernel"])
        if "peak_allocated_gb" in p:
            row("peak memory (allocated / reserved), allocator retries",
                f"{p['peak_allocated_gb']:.1f} / {p['peak_reserved_gb']:.1f} GB, {p['alloc_retries']}")
        else:
            row("peak RSS", f"{p['peak_rss_gb']:.2f} GB")
    for key, label in (("eager", "eager"), ("compiled", f"compiled blocks ({r.get('compile_backend', '-')})")):
        if key not in r:
            continue
        b = r[key]
        mfu = lambda k: f", MFU {b[k]:.1%}" if k in b else ""  # noqa: E731
        row(f"{label}: forward+backward alone", f"{b['fwd_bwd_s_per_step']:.3f} s/step{mfu('mfu_fwd_bwd')}")
        row(f"{label}: full training loop, {r['steps']} steps",
            f"{b['s_per_step']:.3f} s/step, {b['examples_per_s']:.0f} rows/s{mfu('mfu')}, "
            f"{b['outside_fwd_bwd']:.0%} outside forward+backward")
    if "predict" in r:
        p = r["predict"]
        row("prediction", f"{p['views_per_s']:.1f} views/s ({p['views']} views, batch {p['batch_size']}, "
            f"{p['act_steps']} ACT steps each)")
    for note in r.get("skipped", []):
        row("skipped", note)
    row("wall time of this check", f"{r['wall_s'] / 60:.1f} min")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", "--dry-run", action="store_true", help="a tiny model and dataset: the whole check in seconds")
    p.add_argument("--rows", type=int, default=192, help="rows per device (the paper: 768 over 4 GPUs)")
    p.add_argument("--steps", type=int, default=30, help="training steps timed per arm")
    p.add_argument("--compile", default="inductor", help="backend for the compiled-blocks arm; 'none' skips it")
    p.add_argument("--views", type=int, default=1024, help="prediction views to time")
    p.add_argument("--predict-batch", type=int, default=256)
    p.add_argument("--num-aug", type=int, default=8, help="variants per task in the benchmark dataset")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's bf16 peak (default: known devices)")
    p.add_argument("--max-minutes", type=float, default=9.0, help="skip the sections left after this long")
    p.add_argument("--out", type=Path, help="also write the table here (and the raw figures beside it as .json)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    args = p.parse_args(argv)
    if args.tiny:
        args.rows, args.num_aug = min(args.rows, 8), min(args.num_aug, 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    report: dict = {"steps": args.steps, "skipped": []}
    report["versions"], peak = versions(device, args.peak_tflops)
    say("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        measure(report, args, Path(tmp), device, peak, started)
    report["wall_s"] = time.perf_counter() - started
    table = markdown(report)
    say("\n" + table)
    if args.out is not None:
        atomic_write_text(args.out, table + "\n")
        atomic_write_json(args.out.with_suffix(".json"), report)
    return 1 if report["gate"] else 0


def measure(report: dict, args: argparse.Namespace, tmp: Path, device: torch.device, peak: float,
            started: float) -> None:
    """The sections in order, into `report`: the gradient gate, the batch that fits, the training loop per arm
    (eager, compiled), prediction; the sections left once args.max_minutes have passed are skipped (and said)."""
    data = build_data(tmp / "data", args.tiny, args.num_aug)
    dataset = AugmentedDataset.load(data)
    cfg = run_config(args.tiny, dataset)
    report["config"] = {"name": "tiny" if args.tiny else "paper (arc1)", "hidden": cfg.model.hidden_size,
                        "seq_len": cfg.model.seq_len, "puzzle_len": cfg.model.puzzle_len,
                        "T": cfg.model.H_cycles, "n": cfg.model.L_cycles,
                        "flops_per_row_step": model_flops_per_row_step(cfg.model)}

    report["gate"] = gradient_gate(cfg, device)
    say(f"gradient gate: {'pass' if not report['gate'] else 'FAIL ' + ', '.join(report['gate'])}")

    report["profile"] = profile_at_a_batch_that_fits(cfg, dataset, args.rows, device)
    rows = report["profile"]["rows"]
    say(f"profile: {json.dumps(report['profile'])}")

    arms = [("eager", "")] + ([] if args.compile == "none" else [("compiled", args.compile)])
    report["compile_backend"] = args.compile
    for key, backend in arms:
        if time.perf_counter() - started > args.max_minutes * 60:
            report["skipped"].append(f"{key} arm (over {args.max_minutes} min)")
            continue
        arm = copy.deepcopy(cfg)
        arm.global_batch_size, arm.model.compile_backend = rows, backend
        report[key] = bench_loop(key, arm, data, args.steps, device.type, peak)
        say(f"{key}: {json.dumps(report[key])}")

    if time.perf_counter() - started > args.max_minutes * 60:
        report["skipped"].append(f"prediction (over {args.max_minutes} min)")
    else:
        report["predict"] = prediction_rate(cfg, dataset, args.views, args.predict_batch, device)
        say(f"predict: {json.dumps(report['predict'])}")


if __name__ == "__main__":
    sys.exit(main())
