"""A launched job (torchrun, accelerate launch, srun): its process group, the ranks' agreement, and no endless wait.

A collective waits for every process. One that never comes (it stopped on an error before the collective, its
node lacks the run folder, it was killed) would leave the others waiting with no output. So:
  - the process group is set up first thing (`start_job`), with a timeout on every collective
    (TRM_COLLECTIVE_TIMEOUT_S, default 30 minutes: long enough for rank 0 to augment or write a checkpoint while the
    others wait);
  - every process then checks what it will read and reports to `agree` either its problem or the facts it read
    (a dataset's fingerprint, the checkpoint it will load); all of them leave with one error naming the rank and
    the problem when any failed or any read something else than rank 0;
  - a collective that fails later (a peer killed, a timeout) becomes one error line saying what it waited for
    (`guarded`), instead of a traceback or a hang.
Only rank 0 prints an error the ranks agreed on (`JobError.quiet` on the others), so a failed job says it once.
"""
from __future__ import annotations

import functools
import os
import re
import socket
from datetime import timedelta
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from pipeline.core.errors import ConfigError, PipelineError

TIMEOUT_ENV = "TRM_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
F = TypeVar("F", bound=Callable[..., Any])

_agreement_group: Any = None  # a gloo group for the agreement (objects travel on the host even under NCCL)


class JobError(PipelineError, RuntimeError):
    """The job cannot go on: a process failed its checks, read other inputs than rank 0, or a collective failed.
    `quiet`: another process (rank 0) says it; this one only exits with the same status."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def where(r: int | None = None) -> str:
    """`rank R of W` and, for this process, its node and host: what an error line names."""
    r = rank() if r is None else r
    text = f"rank {r} of {world_size()}"
    if r == rank():
        node = os.environ.get("GROUP_RANK")
        text += f" (node {node}, host {socket.gethostname()})" if node is not None else f" (host {socket.gethostname()})"
    return text


def launcher_problem(env: Mapping[str, str] = os.environ) -> str | None:
    """Why this launch cannot form a process group, or None. `accelerate launch --cpu` with several machines (or
    processes) starts plain independent processes here: a rendezvous address but no WORLD_SIZE/RANK, so each
    would train alone (and race for the run folder)."""
    accelerate_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    if accelerate_cpu and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and not mpi:
        return ("this launcher started independent processes (accelerate launch --cpu with several machines or "
                "processes sets no WORLD_SIZE/RANK, so no process group forms and each process would train alone): "
                "launch with torchrun --nnodes N --node-rank R --nproc-per-node P --master-addr HOST --master-port "
                "PORT -m pipeline.run ... (docs/MULTINODE.md)")
    return None


def collective_timeout(env: Mapping[str, str] = os.environ) -> float:
    """Seconds any collective may wait for the other processes."""
    text = env.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 7 * 24 * 3600:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: seconds between 1 and 604800")
    return value


def backend() -> str:
    """NCCL where this process has a GPU, gloo elsewhere: the choice Accelerate makes, made here first."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def start_job() -> None:
    """Set up the process group (no-op alone, or when it is up): before any check that could fail, so that a
    process that fails can still tell the others. Accelerate later finds it up and uses it."""
    global _agreement_group
    if problem := launcher_problem():
        raise ConfigError(problem)
    timeout = collective_timeout()
    if world_size() == 1 or dist.is_initialized():
        return
    kind = backend()
    if kind == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with guarded("the start of the job (every process joining the process group)", timeout):
        dist.init_process_group(kind, timeout=timedelta(seconds=timeout))
        _agreement_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if kind != "gloo" \
            else None


_TRANSPORT = re.compile(r"gloo|nccl|connection|timed out|timeout|socket|peer|broken pipe|store", re.IGNORECASE)


def _is_transport_failure(error: BaseException) -> bool:
    """A failure of the processes' communication (a peer gone, a timeout), not a bug in the code around it."""
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and bool(_TRANSPORT.search(str(error)))


class guarded:
    """Turns a collective's failure (a peer gone, a timeout) into one JobError saying what it waited for."""

    def __init__(self, what: str, timeout: float | None = None):
        self.what, self.timeout = what, timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if error is None or isinstance(error, PipelineError) or not _is_transport_failure(error):
            return False  # a bug inside the collective's function keeps its traceback
        cause = " ".join(str(error).split())
        cause = cause.split(" This is typically caused")[0]
        if "timed out" in cause.lower() or "timeout" in cause.lower():
            limit = self.timeout if self.timeout is not None else collective_timeout()
            problem = (f"no answer from every process within {limit:.0f} s while waiting for {self.what} (a process "
                       f"is stuck or gone; {TIMEOUT_ENV} sets the limit)")
        else:
            problem = (f"lost the other processes while waiting for {self.what}: a process of the job stopped or was "
                       f"killed (its own log says why; --resume continues from the last checkpoint) [{cause}]")
        raise JobError(f"{where()}: {problem}") from error


def collective(what: str) -> Callable[[F], F]:
    """Decorator: the function is a collective whose failure is `guarded(what)`."""
    def wrap(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with guarded(what):
                return function(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


def agree(problem: BaseException | None, facts: Mapping[str, str], what: str) -> None:
    """Every process reports its problem (or None) and the facts it read; all leave with the same error when any
    failed or read something other than rank 0. Alone: `problem` is raised as it is."""
    if world_size() == 1 or not dist.is_initialized():
        if problem is not None:
            raise problem
        return
    text = None if problem is None else " ".join(str(problem).split()) or type(problem).__name__
    reports: list[Any] = [None] * world_size()
    with guarded(what):
        dist.all_gather_object(reports, (text, dict(facts), where()), group=_agreement_group)
    me = rank()
    failed = [(r, report) for r, report in enumerate(reports) if report[0] is not None]
    if failed:
        r, (text, _, place) = failed[0]
        more = f" (and {len(failed) - 1} other process(es))" if len(failed) > 1 else ""
        raise JobError(f"{place}{more}: {text}", quiet=me != 0) from problem
    _, reference, _ = reports[0]
    for r, (_, facts_r, place) in enumerate(reports):
        for key, value in reference.items():
            if facts_r.get(key) != value:
                raise JobError(f"{place}: {key} differs from rank 0's ({facts_r.get(key)} vs {value}): every process "
                               "must read the same inputs: a shared filesystem, or the same --stage augment settings "
                               "on every node (docs/MULTINODE.md)", quiet=me != 0)


def leave(ok: bool) -> None:
    """Leave the job: after success, together (barrier, then take the group down: a process that exits with the
    group up can abort in gloo's teardown once its peer has gone); after a failure, at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        with guarded("the end of the job (every process finishing)"):
            dist.barrier()
    try:
        dist.destroy_process_group()
    except RuntimeError:  # a peer already gone: nothing to take down together
        pass
