"""The testing hook TRM_FAULTS: child stages that fail on purpose, deterministically, so that every path the day
can take (out of memory, a kill part-way) is exercised by the tests. Empty in real runs.

`python -m pipeline.kaggle_driver.faults ARGS` is `python -m pipeline.run ARGS` with its stage's faults installed
first; the driver starts its children this way only when faults are set.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Mapping, Sequence

from pipeline.kaggle_driver.settings import ENV

FAULT_KINDS = ("oom_rows_over", "kill_rows_over", "oom_after_calls", "kill_after_calls")
CHILD_MODULE = "pipeline.kaggle_driver.faults"


def parse_faults(text: str) -> dict[str, dict[str, int]]:
    """`STAGE:KIND=N` items, whitespace-separated, e.g. "train:oom_rows_over=4 predict:oom_after_calls=6".
    STAGE is a pipeline.run stage (train, predict); KIND is one of
      oom_rows_over=N     a forward pass over more than N rows raises a CUDA-out-of-memory error
      kill_rows_over=N    ... the process kills itself with SIGKILL (exit -9, as the host's OOM killer does)
      oom_after_calls=N   forward passes after the first N raise the out-of-memory error
      kill_after_calls=N  ... SIGKILL
    so that "out of memory at a big batch" is retried successfully at a smaller one, and "fails after N
    batches" happens at the same point in every run."""
    faults: dict[str, dict[str, int]] = {}
    for item in text.split():
        stage, _, rest = item.partition(":")
        kind, _, number = rest.partition("=")
        if not stage or kind not in FAULT_KINDS or not number.isdigit():
            raise ValueError(f"{ENV['faults']}: cannot read {item!r}; expected STAGE:KIND=N with KIND one of "
                             f"{', '.join(FAULT_KINDS)}")
        faults.setdefault(stage, {})[kind] = int(number)
    return faults


def install_faults(faults: Mapping[str, int]) -> None:
    """Wrap TRM.forward in this process so that it fails as `faults` (one stage's part of parse_faults) says."""
    import torch

    from pipeline.model.trm import TRM

    original = TRM.forward
    calls = 0
    never = 1 << 62

    def forward(self, carry, batch, *args, **kwargs):
        nonlocal calls
        calls += 1
        rows = int(batch["inputs"].shape[0])
        oom = rows > faults.get("oom_rows_over", never) or calls > faults.get("oom_after_calls", never)
        kill = rows > faults.get("kill_rows_over", never) or calls > faults.get("kill_after_calls", never)
        if kill:
            print(f"TRM_FAULTS: SIGKILL at forward pass {calls} ({rows} rows)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if oom:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {ENV['faults']} at forward pass "
                                         f"{calls}, {rows} rows)")
        return original(self, carry, batch, *args, **kwargs)

    TRM.forward = forward


def main(argv: Sequence[str]) -> int:
    from pipeline.run import command

    argv = list(argv)
    stage = argv[argv.index("--stage") + 1] if "--stage" in argv[:-1] else ""
    faults = parse_faults(os.environ.get(ENV["faults"], "")).get(stage)
    if faults:
        install_faults(faults)
    sys.argv = ["pipeline.run", *argv]
    return command()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
