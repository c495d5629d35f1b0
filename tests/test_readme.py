"""Every command shown in README.md, docs/*.md and kaggle/README.md runs as written.

Cheap for all of them: each command is read from the documents themselves and checked the way its program would
read it (the pipeline's parser, flag checks, preset and every `--set` against the config's types, bounds and
relations; torchrun's and accelerate's own parsers; a script's own argparse; pip extras against pyproject.toml).
Dear for a representative few: the README's chain, the paper's runs, the fine-tune after them and the weights
commands of docs/WEIGHTS.md run in this process at toy size (`--preset arc1` becomes the demo preset on a few 6×6
tasks, training gets tests/tiny.py's settings, `torchrun` one process), all on one trained toy run."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import run as pipeline_run
from pipeline.cli.resolve import flag_overrides
from pipeline.config import check_config, preset
from pipeline.core import settings
from pipeline.core.errors import PipelineError
from pipeline.run import main
from pipeline.training.checkpoint import latest_checkpoint
from tiny import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "kaggle" / "README.md"]
TOY_DATA = ["--data", "arc-agi-1/training,arc-agi-1/evaluation", "--set", "data.max_side=6", "--set",
            "data.max_tasks=3", "--canvas", "6", "--num-aug", "3"]
# Programs a document may show besides the pipeline, python and pip: run by hand, not checked further.
OTHER_PROGRAMS = {"rm", "cp", "cat", "mkdir", "ls", "cd", "export", "jupyter", "kaggle", "tensorboard", "wandb",
                  "sbatch", "srun", "scontrol", "head", "hostname", "nvidia-smi", "ssh", "rsync", "echo"}


@dataclass
class Command:
    words: list[str]
    where: str  # "docs/RUNS.md:63"


# ------------------------------------------------------------------------------------------------ reading them
def _fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, line number of the first line, lines) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        start, i = i + 1, i + 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        blocks.append((opening.group(1), start + 1, lines[start:i]))
        i += 1
    return blocks


def _shell_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Lines with their backslash continuations joined."""
    out, pending, start = [], "", first
    for n, line in enumerate(lines, first):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def documented_commands(path: Path) -> list[Command]:
    """Every command in the document's ```bash blocks, and the pipeline commands recorded in its plain blocks (the
    tables' "Commands" lists, where a trailing "(...)" is a note, not part of the command)."""
    name = str(path.relative_to(ROOT))
    commands = []
    for info, first, lines in _fenced_blocks(path.read_text()):
        if info not in ("bash", "sh", "shell", ""):
            continue
        for n, line in _shell_lines(lines, first):
            if info == "":
                if not re.match(r"^(python3?|trm-arc|torchrun)\b", line):
                    continue
                line = re.sub(r"\s+\(.*\)\s*$", "", line)
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in words + ["&&"]:  # one command per part of `a && b`, `a; b`, `a | b`
                if word in ("&&", "||", ";", "|"):
                    if command:
                        commands.append(Command(command, f"{name}:{n}"))
                    command = []
                else:
                    command.append(word)
    return commands


ALL_COMMANDS = [c for doc in DOCUMENTS for c in documented_commands(doc)]


# ------------------------------------------------------------------------------------------------ checking them
def _pipeline_args(words: list[str]) -> tuple[list[str], int] | None:
    """The arguments a command hands to pipeline.run and the number of processes it starts; None when it does not
    run the pipeline. Raises when a launcher's own arguments are wrong."""
    program, rest = words[0], words[1:]
    if program == "trm-arc":
        return rest, 1
    if program in ("python", "python3") and rest[:2] == ["-m", "pipeline.run"]:
        return rest[2:], 1
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(rest)
        assert args.module and args.training_script == "pipeline.run", words
        nnodes = str(args.nnodes).split(":")[-1]
        nnodes = int(nnodes) if nnodes.isdigit() else 1  # "$SLURM_NNODES" in a batch script
        return args.training_script_args, int(args.nproc_per_node) * nnodes
    if program == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert rest[0] == "launch", words
        args = launch_command_parser().parse_args(rest[1:])
        assert args.module and args.training_script == "pipeline.run", words
        return args.training_script_args, (args.num_processes or 1)
    return None


def check_pipeline_command(args: list[str], processes: int, presets: dict[str, str]) -> None:
    """The command line as pipeline.run reads it, before it touches anything: the parser, the flags that contradict
    each other, the preset (the folder's own, for a later command on a folder the document made), every setting."""
    ns = pipeline_run.build_parser().parse_args(args)
    forced = pipeline_run._forced(ns)
    pipeline_run._check_arguments(ns, forced)
    out = ns.out or f"runs/{ns.preset}"
    name = ns.preset or presets.get(out, "demo")
    presets.setdefault(out, name)
    cfg = preset(name)
    settings.apply_settings(cfg, flag_overrides(ns) + ns.set)
    check_config(cfg, processes)


class _Parsed(Exception):
    pass


def check_script_command(script: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The script exists and its own argparse accepts the arguments (parsing stops there: nothing runs)."""
    assert script.is_file(), f"no such script {script}"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    spec = importlib.util.spec_from_file_location(f"documented_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with monkeypatch.context() as patch, pytest.raises(_Parsed):
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [str(script), *args])
        module.main(args) if "argv" in module.main.__code__.co_varnames else module.main()


def check_pip_command(words: list[str]) -> None:
    """`pip install ... -e ".[extra,...]"`: every extra is one pyproject.toml declares."""
    assert words[1] == "install", words
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for word in words[2:]:
        if extras := re.fullmatch(r"\.\[(.*)\]", word):
            assert set(extras.group(1).split(",")) <= set(declared), word


def check_command(command: Command, presets: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    words = command.words
    if words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\$\(.*", words[0]):  # VAR=$(command ...): a shell variable
        return
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value command ...
        words = words[1:]
    if not words:
        return
    if words[0] == "srun" and len(words) > 1 and not words[1].startswith("-"):  # srun COMMAND: check COMMAND
        words = words[1:]
    pipeline = _pipeline_args(words)
    if pipeline is not None:
        check_pipeline_command(*pipeline, presets)
    elif words[0] in ("python", "python3") and words[1:3] == ["-m", "pytest"]:
        assert all((ROOT / w).exists() for w in words[3:] if not w.startswith("-")), words
    elif words[0] in ("python", "python3") and words[1] == "-m":
        assert importlib.util.find_spec(words[2]) is not None, words
    elif words[0] in ("python", "python3"):
        check_script_command(ROOT / words[1], words[2:], monkeypatch)
    elif words[0] == "pip":
        check_pip_command(words)
    else:
        assert words[0] in OTHER_PROGRAMS, f"a program this test does not know: {words[0]}"


def test_the_documents_show_the_commands_this_test_reads():
    """The reader finds what it should: the quick start, the chain, the paper's runs, a torchrun and a script line."""
    readme = [c.words for c in documented_commands(ROOT / "README.md")]
    assert ["pip", "install", "torch==2.13.0", "-e", "."] in readme
    assert ["python", "-m", "pipeline.run", "--stage", "all", "--preset", "demo"] in readme
    assert ["python", "-m", "pytest", "-q"] in readme
    assert any(c[0] == "torchrun" for c in readme)
    assert len(ALL_COMMANDS) > 60 and any(c.words[1:2] == ["kaggle/build_bundle.py"] for c in ALL_COMMANDS)
    assert (ROOT / ".ci" / "run").read_text().count("python3 -m pytest -q\n") == 1  # CI runs the README's test command


def test_every_documented_command_is_accepted_as_written(monkeypatch: pytest.MonkeyPatch):
    failures = []
    for doc in DOCUMENTS:
        presets: dict[str, str] = {}  # run folder -> the preset a command of this document made it with
        for command in documented_commands(doc):
            try:
                check_command(command, presets, monkeypatch)
            except Exception as e:  # noqa: BLE001 - every failure is listed, not only the first
                failures.append(f"{command.where}: {' '.join(command.words)}\n    {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_the_check_refuses_what_the_pipeline_would_refuse(monkeypatch: pytest.MonkeyPatch):
    """The static check is not vacuous: a misspelt flag, setting, preset, value or script argument is caught."""
    bad = [["python", "-m", "pipeline.run", "--stage", "train", "--out", "r", "--set", "lr=fast"],
           ["python", "-m", "pipeline.run", "--stage", "train", "--out", "r", "--set", "model.hidden=3"],
           ["python", "-m", "pipeline.run", "--stage", "trian", "--out", "r"],
           ["trm-arc", "--stage", "all", "--preset", "arc3"],
           ["trm-arc", "--stage", "predict", "--out", "r", "--resume"],
           ["torchrun", "--nproc-per-node", "5", "-m", "pipeline.run", "--stage", "train", "--preset", "arc1"],
           ["python", "kaggle/build_bundle.py", "--checkpint", "x"],
           ["python", "benchmarks/no_such_script.py"],
           ["pip", "install", "-e", ".[tensorbored]"],
           ["make", "all"]]
    for words in bad:
        with pytest.raises((AssertionError, PipelineError, SystemExit)):
            check_command(Command(words, "test"), {}, monkeypatch)
    check_command(Command(["torchrun", "--nproc-per-node", "4", "-m", "pipeline.run", "--stage", "train",
                           "--preset", "arc1"], "test"), {}, monkeypatch)


# ------------------------------------------------------------------------------------------------ running a few
def _section_commands(path: Path, heading: str) -> list[list[list[str]]]:
    """The pipeline commands of each ```bash block under a `## heading`, as argument lists after `pipeline.run`."""
    text = path.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    out = []
    for info, first, lines in _fenced_blocks(text[start:end if end > 0 else None]):
        if info != "bash":
            continue
        commands = []
        for _, line in _shell_lines(lines, first):
            words = shlex.split(line, comments=True)
            if "pipeline.run" in words:
                commands.append(words[words.index("pipeline.run") + 1:])
            elif words[:1] == ["trm-arc"]:
                commands.append(words[1:])
        out.append(commands)
    return out


def _toy(words: list[str], folders: dict[str, Path]) -> list[str]:
    """One documented command at toy size, its folders and files mapped to this test's."""
    for name, path in sorted(folders.items(), key=lambda item: -len(item[0])):
        words = [str(path) + w[len(name):] if w == name or w.startswith(name + "/") else w for w in words]
    stage = words[words.index("--stage") + 1]
    extra = ["--quiet"]
    if "--preset" in words and words[words.index("--preset") + 1] in ("arc1", "demo"):
        words[words.index("--preset") + 1] = "demo"
        extra += TOY_DATA
    if "--preset" in words and words[words.index("--preset") + 1] == "kaggle":
        extra += ["--canvas", "6", "--num-aug", "3"]
    if stage in ("train", "all", "plan"):
        extra += tiny_overrides(max_steps=4, eval_views=2)
    if stage == "plan":
        extra += ["--plan-time-steps", "1"]
    return words + extra


def _challenges(path: Path) -> Path:
    """A small Kaggle challenges file (two 6×6-sized ARC-AGI-1 evaluation tasks, test outputs unknown)."""
    from pipeline.data.tasks import load_tasks, select_tasks

    tasks = select_tasks(load_tasks("arc-agi-1/evaluation").tasks, max_side=6)[-2:]
    as_json = lambda g: g.tolist()  # noqa: E731
    path.write_text(json.dumps({t.id: {"train": [{"input": as_json(i), "output": as_json(o)} for i, o in t.train],
                                       "test": [{"input": as_json(i)} for i in t.test_inputs]} for t in tasks}))
    return path


def test_the_readme_runs_as_written_at_toy_size(tmp_path: Path):
    """The README's chain, then the paper's runs and the fine-tune after them, then docs/WEIGHTS.md's export,
    predict-from-export and fine-tune-from-export, on the paper run's toy model."""
    challenges = _challenges(tmp_path / "my_challenges.json")
    (chain,) = _section_commands(ROOT / "README.md", "The chain")
    assert [c[c.index("--stage") + 1] for c in chain] == ["augment", "train", "predict", "submit", "score", "report"]
    demo = tmp_path / "demo"
    for words in chain:
        assert main(_toy(words, {"runs/demo": demo})) == 0, words
    assert (demo / "report.html").exists() and json.loads((demo / "score.json").read_text())

    recipe, finetune = _section_commands(ROOT / "README.md", "The paper's runs")
    assert [c[c.index("--stage") + 1] for c in recipe] == ["augment", "plan", "train", "predict", "submit", "score"]
    arc1 = tmp_path / "arc1"
    for words in recipe:
        assert main(_toy(words, {"runs/arc1": arc1})) == 0, words
    kinds = [json.loads(line)["kind"] for line in (arc1 / "metrics.jsonl").read_text().splitlines()]
    assert "eval" in kinds and (arc1 / "score.json").exists()
    assert json.loads((arc1 / "plan.json").read_text())["total_steps"] == 4
    # the fine-tune names the arc1 run's final checkpoint; here it is the toy run's
    named = next(w for c in finetune for w in c if w.startswith("runs/arc1/checkpoints/"))
    mapping = {named: latest_checkpoint(arc1 / "checkpoints"), "runs/ft": tmp_path / "ft",
               "my_challenges.json": challenges}
    for words in finetune:
        assert main(_toy(words, mapping)) == 0, words
    assert latest_checkpoint(tmp_path / "ft" / "checkpoints") is not None

    (weights,) = _section_commands(ROOT / "docs" / "WEIGHTS.md", "Publishing and loading weights")
    assert [c[c.index("--stage") + 1] for c in weights] == ["export", "export", "predict", "augment", "train"]
    mapping = {"runs/arc1": arc1, "runs/ft": tmp_path / "ft-export", "my_challenges.json": challenges}
    for words in weights:
        assert main(_toy(words, mapping)) == 0, words
    for folder in ("export", "export-mean"):
        assert (arc1 / folder / "model.safetensors").exists()
    assert latest_checkpoint(tmp_path / "ft-export" / "checkpoints") is not None
