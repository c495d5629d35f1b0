"""A stand-in for a torchrun worker, for the process-tree tests: it records its pid, starts a grandchild of its
own (like a data-loader or compile worker), then sleeps. Mode `ignore`: SIGTERM is ignored (only SIGKILL ends it);
mode `save`: SIGTERM writes `saved.RANK` and exits 0, as the training and prediction loops do; mode `mixed`: rank 0
ignores, the others save."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

folder, mode = Path(sys.argv[1]), sys.argv[2]
rank = os.environ.get("RANK", "0")


def on_sigterm(signum, frame):
    (folder / f"saved.{rank}").write_text("saved")
    sys.exit(0)


ignore = mode == "ignore" or (mode == "mixed" and rank == "0")
signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else on_sigterm)
grandchild = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                               "signal.SIG_IGN); time.sleep(600)"])
(folder / f"pid.{rank}").write_text(f"{os.getpid()} {grandchild.pid}")
while True:
    time.sleep(0.1)
