"""The README's commands run as written, at toy size: the stage-by-stage recipe, the paper's recipe and the
fine-tune that follows it. Each command is read from the README itself, so a command that changes there is
tested as it reads. Toy size: `--preset arc1` becomes the demo preset on a few 6×6 tasks, training gets the tiny
settings of tests/tiny.py, and `torchrun` runs one process."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from pipeline.training.checkpoint import latest_checkpoint
from pipeline.run import main
from tiny import tiny_overrides

README = Path(__file__).resolve().parents[1] / "README.md"
TOY_DATA = ["--data", "arc-agi-1/training,arc-agi-1/evaluation", "--set", "data.max_side=6", "--set",
            "data.max_tasks=3", "--canvas", "6", "--num-aug", "3"]


def _section_commands(heading: str) -> list[list[list[str]]]:
    """The pipeline commands of each ```bash block under a `## heading`, as argument lists after `pipeline.run`
    (or the installed `trm-arc`, the same command)."""
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end if end > 0 else None], re.S)
    out = []
    for block in blocks:
        commands = []
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "pipeline.run" in words:
                commands.append(words[words.index("pipeline.run") + 1:])
            elif words[:1] == ["trm-arc"]:
                commands.append(words[1:])
        out.append(commands)
    return out


def _toy(words: list[str], runs: dict[str, Path], checkpoint_names: dict[str, Path]) -> list[str]:
    """One README command at toy size."""
    words = [str(runs.get(w, w)) for w in words]
    for name, path in checkpoint_names.items():
        words = [w.replace(name, str(path)) for w in words]
    for key, value in [("runs/arc1", runs["runs/arc1"]), ("runs/ft", runs["runs/ft"])]:
        words = [w.replace(key, str(value)) if w.startswith(key) else w for w in words]
    stage = words[words.index("--stage") + 1]
    extra = ["--quiet"]
    if "--preset" in words and words[words.index("--preset") + 1] == "arc1":
        words[words.index("--preset") + 1] = "demo"
        extra += TOY_DATA
    if "--preset" in words and words[words.index("--preset") + 1] == "kaggle":
        extra += ["--canvas", "6", "--num-aug", "3"]
    if stage in ("train", "all", "plan"):
        extra += tiny_overrides(max_steps=4, eval_views=2)
    if stage == "plan":
        extra += ["--plan-time-steps", "1"]
    return words + extra


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, Path]:
    return {"runs/arc1": tmp_path / "arc1", "runs/ft": tmp_path / "ft",
            "my_challenges.json": _challenges(tmp_path / "my_challenges.json")}


def _challenges(path: Path) -> Path:
    """A small Kaggle challenges file (two 6×6-sized ARC-AGI-1 evaluation tasks, test outputs unknown)."""
    from pipeline.data.tasks import load_tasks, select_tasks

    tasks = select_tasks(load_tasks("arc-agi-1/evaluation").tasks, max_side=6)[-2:]
    as_json = lambda g: g.tolist()  # noqa: E731
    path.write_text(json.dumps({t.id: {"train": [{"input": as_json(i), "output": as_json(o)} for i, o in t.train],
                                       "test": [{"input": as_json(i)} for i in t.test_inputs]} for t in tasks}))
    return path


def test_stage_by_stage_commands_run_as_written(runs: dict[str, Path]):
    (block,) = _section_commands("The stages")
    assert [c[c.index("--stage") + 1] for c in block] == [
        "augment", "plan", "train", "predict", "submit", "score", "report", "all"]
    for words in block:
        assert main(_toy(words, runs, {})) == 0, words
    out = runs["runs/arc1"]
    for name in ("plan.json", "metrics.jsonl", "predictions.npz", "submission.json", "report.html"):
        assert (out / name).exists(), name
    assert json.loads((out / "plan.json").read_text())["total_steps"] == 4


def test_paper_recipe_and_finetune_run_as_written(runs: dict[str, Path]):
    recipe, finetune = _section_commands("The paper's runs")
    assert [c[c.index("--stage") + 1] for c in recipe] == ["augment", "plan", "train", "predict", "submit", "score"]
    for words in recipe:
        assert main(_toy(words, runs, {})) == 0, words
    out = runs["runs/arc1"]
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval" in kinds and (out / "score.json").exists()
    # the fine-tune names the arc1 run's final checkpoint; here it is the toy run's
    named = next(w for c in finetune for w in c if w.startswith("runs/arc1/checkpoints/"))
    checkpoint_names = {named: latest_checkpoint(out / "checkpoints")}
    for words in finetune:
        assert main(_toy(words, runs, checkpoint_names)) == 0, words
    assert latest_checkpoint(runs["runs/ft"] / "checkpoints") is not None


def test_publishing_and_loading_weights_run_as_written(runs: dict[str, Path]):
    (block,) = _section_commands("Publishing and loading weights")
    assert [c[c.index("--stage") + 1] for c in block] == ["export", "export", "predict", "augment", "train"]
    for words in (["--stage", "augment", "--preset", "arc1", "--out", "runs/arc1"],
                  ["--stage", "train", "--out", "runs/arc1"]):  # a toy run to export
        assert main(_toy(words, runs, {})) == 0, words
    for words in block:
        assert main(_toy(words, runs, {})) == 0, words
    for folder in ("export", "export-mean"):
        assert (runs["runs/arc1"] / folder / "model.safetensors").exists()
    assert latest_checkpoint(runs["runs/ft"] / "checkpoints") is not None
