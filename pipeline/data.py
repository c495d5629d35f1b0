"""ARC tasks: one `Task` type, loaders for built-in sets, Kaggle files and task folders, and validation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Task:
    id: str
    train: list[tuple[np.ndarray, np.ndarray]]  # (input, output) demonstration pairs, uint8 grids
    test_inputs: list[np.ndarray]
    test_outputs: list[np.ndarray] | None  # None when unknown (hidden Kaggle tasks)
    source: str  # "arc-agi-1/training", a file path, ...
