"""The dataset folder on disk: writing its four files, and reading them back with every file checked.

    grids.npz      pixels uint8 (N,): every original grid row-major, back to back;
                   table int64 (G, 3): (offset into pixels, height, width) of grid g
    puzzles.json   one entry per puzzle: task_id, source, is_eval and the grid indices of its train_inputs,
                   train_outputs, test_inputs, test_outputs (null when unknown)
    variants.npz   puzzle_index int32 (V,), dihedral uint8 (V,), colours uint8 (V, 10); each puzzle's variants
                   are contiguous and its first one is the identity (the original)
    manifest.json  build settings and counts; written last, so its presence means the folder is complete
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from augment.transforms import NUM_DIHEDRAL
from pipeline.core.errors import InputFileError
from pipeline.core.io import atomic_write_json, atomic_write_with, check_fields, read_json

FORMAT = "trm-arc-augmented-dataset/1"
# what a dataset is made of, in the order AugmentedDataset takes them
Parts = tuple[np.ndarray, np.ndarray, list, np.ndarray, np.ndarray, np.ndarray, dict]


def save_parts(root: str | Path, pixels: np.ndarray, grid_table: np.ndarray, puzzles: list, variant_puzzle: np.ndarray,
               variant_dihedral: np.ndarray, variant_colours: np.ndarray, manifest: dict[str, Any]) -> None:
    """Write the folder; manifest.json goes last so a crash never leaves a folder that looks complete."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    atomic_write_with(root / "grids.npz", lambda f: np.savez(f, pixels=pixels, table=grid_table))
    atomic_write_json(root / "puzzles.json", puzzles, indent=None)
    atomic_write_with(
        root / "variants.npz",
        lambda f: np.savez_compressed(f, puzzle_index=variant_puzzle, dihedral=variant_dihedral,
                                      colours=variant_colours),
    )
    atomic_write_json(root / "manifest.json", manifest)


def load_parts(root: str | Path) -> Parts:
    """The dataset folder, every file checked (shapes, types, ranges, counts against the manifest): a file that
    is missing, truncated or of something else raises InputFileError naming it, never a numpy error later."""
    root = Path(root)
    manifest = read_manifest(root)
    pixels, table = _read_arrays(root / "grids.npz", {"pixels": 1, "table": 2}).values()
    vp, vd, vc = _read_arrays(root / "variants.npz", {"puzzle_index": 1, "dihedral": 1, "colours": 2}).values()
    puzzles = read_json(root / "puzzles.json", "dataset file")
    _check_grids(root / "grids.npz", pixels, table, manifest["canvas"])
    _check_puzzles(root / "puzzles.json", puzzles, len(table))
    _check_variants(root / "variants.npz", vp, vd, vc, len(puzzles))
    if len(puzzles) != manifest["num_puzzles"] or len(vp) != manifest["num_variants"]:
        raise InputFileError(root / "manifest.json", f"says {manifest['num_puzzles']} puzzles / "
                             f"{manifest['num_variants']} variants, but puzzles.json / variants.npz hold "
                             f"{len(puzzles)} / {len(vp)}", "dataset manifest")
    return pixels, table, puzzles, vp, vd, vc, manifest


MANIFEST_FIELDS = {"format": str, "canvas": int, "num_puzzles": int, "num_variants": int}


def read_manifest(root: str | Path) -> dict[str, Any]:
    """A dataset folder's manifest.json, checked; its absence means no complete dataset is there."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise InputFileError(path, "no augmented dataset here (missing or unfinished build; run --stage augment)",
                             "dataset manifest")
    manifest = check_fields(read_json(path, "dataset manifest"), MANIFEST_FIELDS, path, "dataset manifest")
    if manifest["format"] != FORMAT:
        raise InputFileError(path, f"format {manifest['format']!r}, expected {FORMAT!r}", "dataset manifest")
    if not 1 <= manifest["canvas"] <= 30 or manifest["num_puzzles"] < 0 or manifest["num_variants"] < 0:
        raise InputFileError(path, "canvas must be 1..30 and the counts non-negative", "dataset manifest")
    return manifest


def _read_arrays(path: Path, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """The named integer arrays of an .npz file, with their number of dimensions checked."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in dims if name in z.files}
    except FileNotFoundError:
        raise InputFileError(path, "no such file", "dataset file") from None
    except Exception as e:  # noqa: BLE001 - numpy raises many types for a file that is not an .npz; all mean that
        raise InputFileError(path, f"not a readable .npz file ({type(e).__name__})", "dataset file") from None
    for name, ndim in dims.items():
        if name not in arrays:
            raise InputFileError(path, f"missing array {name!r}", "dataset file")
        if arrays[name].ndim != ndim or arrays[name].dtype.kind not in "iu":
            raise InputFileError(path, f"array {name!r} should be {ndim}-D integers, got {arrays[name].dtype} "
                                 f"{arrays[name].shape}", "dataset file")
    return arrays


def _check_grids(path: Path, pixels: np.ndarray, table: np.ndarray, canvas: int) -> None:
    if table.shape[1:] != (3,):
        raise InputFileError(path, f"table should be (grids, 3), got {table.shape}", "dataset file")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 9):
        raise InputFileError(path, "pixels hold a value outside the colours 0-9", "dataset file")
    start, h, w = table.T.astype(np.int64)
    if table.size and (start.min() < 0 or h.min() < 1 or w.min() < 1 or max(h.max(), w.max()) > canvas
                       or (start + h * w).max() > len(pixels)):
        raise InputFileError(path, f"the grid table points outside the pixels or holds a side outside 1..{canvas}",
                             "dataset file")


_PUZZLE_FIELDS = {"task_id": str, "source": str, "is_eval": bool, "train_inputs": list, "train_outputs": list,
                  "test_inputs": list, "test_outputs": (list, type(None))}


def _check_puzzles(path: Path, puzzles: Any, num_grids: int) -> None:
    if not isinstance(puzzles, list):
        raise InputFileError(path, f"not a JSON list of puzzles (got {type(puzzles).__name__})", "dataset file")
    for p, puzzle in enumerate(puzzles):
        check_fields(puzzle, _PUZZLE_FIELDS, f"{path} (puzzle {p})", "dataset file")
        lists = [puzzle[k] for k in ("train_inputs", "train_outputs", "test_inputs")] + [puzzle["test_outputs"] or []]
        if not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < num_grids for ids in lists
                   for g in ids):
            raise InputFileError(path, f"puzzle {p}: a grid index outside 0..{num_grids - 1}", "dataset file")
        if len(lists[0]) != len(lists[1]) or (puzzle["test_outputs"] is not None and len(lists[3]) != len(lists[2])):
            raise InputFileError(path, f"puzzle {p}: inputs and outputs differ in number", "dataset file")


def _check_variants(path: Path, vp: np.ndarray, vd: np.ndarray, vc: np.ndarray, num_puzzles: int) -> None:
    n = len(vp)
    if vd.shape != (n,) or vc.shape != (n, 10):
        raise InputFileError(path, f"arrays of different lengths ({vp.shape}, {vd.shape}, {vc.shape})", "dataset file")
    if n and (vp.min() < 0 or np.any(np.diff(vp) < 0) or vp.max() >= num_puzzles):
        raise InputFileError(path, f"puzzle_index must be sorted and within 0..{num_puzzles - 1}", "dataset file")
    if n and (vd.min() < 0 or vd.max() >= NUM_DIHEDRAL or vc.min() < 0 or vc.max() > 9):
        raise InputFileError(path, "a dihedral id outside 0..7 or a colour outside 0..9", "dataset file")
