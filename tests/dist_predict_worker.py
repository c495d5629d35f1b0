"""One process of a 2-process prediction (run by tests/test_stop_signals.py with the torchrun environment set):
predict_to_file, whose re-scoring pass is sharded over the processes."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.training.collectives import close_process_group
from pipeline.config import PredictConfig
from pipeline.inference.predict import predict_to_file

data, checkpoint, out = sys.argv[1:4]
cfg = PredictConfig(max_variants=4, batch_size=2, rescore_views=3, rescore_top_k=2)
predict_to_file(data, checkpoint, Path(out), cfg, progress=False)

import torch.distributed as dist  # noqa: E402

print(f"world {dist.get_world_size() if dist.is_initialized() else 1}")
close_process_group()  # as the CLI does: leaving with the group up can abort in gloo's teardown
