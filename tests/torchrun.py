"""`torchrun` for the tests that launch one: torch's own launcher (torch.distributed.run's main), with the objects
its imports made frozen for the garbage collector, as `python -m pipeline.run` does for its own process
(pipeline.run.command). The launcher does nothing else differently; its exit, which the suite pays about 15 times,
is ~0.5 s of CPU cheaper."""
import gc
import sys

from torch.distributed.run import main

if __name__ == "__main__":
    gc.freeze()
    sys.exit(main())
