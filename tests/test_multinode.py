"""Several nodes, rehearsed on one machine (torchrun --nnodes 2, one process each): the result equals 1 node x 2
processes, and nothing hangs: a node without the run folder, a node with another dataset, a rank killed while
training all end the job with one error line that says why (not a collective's timeout: no node waits for one)
and no process left; a launcher that forms no group is refused, naming torchrun."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from badinput import SMALL
from pipeline.training import checkpoint as ckpt
from pipeline.core.job import JobError, guarded, launcher_problem
from pipeline.run import cli
from tiny import TORCHRUN, TWO_PROCESS_SETTINGS, free_port, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _launch(nodes: list[list[str]], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """One torchrun per "node" (each in its own session), all on this machine: --nnodes N --node-rank i."""
    port = str(free_port())
    return [subprocess.Popen([*TORCHRUN, "--nnodes", str(len(nodes)),
                              "--node-rank", str(i), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                              "--master-port", port, "-m", "pipeline.run", *args],
                             cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for i, args in enumerate(nodes)]


def _finish(procs: list[subprocess.Popen], timeout: float) -> tuple[list[int], str]:
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise AssertionError("a node did not end: " + "\n".join(q.communicate()[0][-2000:] for q in procs))
    return [p.returncode for p in procs], "\n".join(logs)


def _survivors(*needles: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", "|".join(str(n) for n in needles)], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def _train(out: Path, *extra: str) -> list[str]:
    return ["--stage", "train", "--out", str(out), "--quiet", *extra]


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


def test_two_nodes_without_a_shared_folder_train_like_one_node_with_two_processes(two_process_run: Path, tmp_path: Path):
    """Each node augments its own copy of the run folder with the same settings (no shared filesystem); the ranks
    check that their datasets are the same, train, and rank 0 writes: the same weights, bit for bit, as 1 node x 2
    processes on one folder (the session's two_process_run, conftest.py, with the same settings)."""
    for folder in ("node0", "node1"):
        assert cli(["--stage", "augment", "--preset", "demo", "--out", str(tmp_path / folder), *SMALL]) == 0
    codes, log = _finish(_launch([_train(tmp_path / node, *TWO_PROCESS_SETTINGS) for node in ("node0", "node1")]), 300)
    assert codes == [0, 0], log[-3000:]
    assert not (tmp_path / "node1" / "checkpoints").exists()  # rank 0 alone writes
    a, b = (ckpt.load_training_state(ckpt.latest_checkpoint(run / "checkpoints")) for run in (two_process_run, tmp_path / "node0"))
    assert a["world"] == b["world"] == 2 and a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    middle = [ckpt.load_training_state(run / "checkpoints" / "step_00000003.pt") for run in (two_process_run, tmp_path / "node0")]
    for key in ("z_H", "halted", "data.puzzle_identifiers"):
        assert torch.equal(middle[0]["carry"][key], middle[1]["carry"][key]), key


def _ends_at_once_with_one_error(nodes: list[list[str]], needles: list[str], *folders: Path) -> str:
    codes, log = _finish(_launch(nodes), 120)
    assert all(c != 0 for c in codes), log[-3000:]
    errors = _error_lines(log)
    assert len(errors) == 1, log[-4000:]
    assert all(n in errors[0] for n in needles), errors
    assert f'File "{ROOT / "pipeline"}' not in log  # no traceback of ours (torchrun prints its own summary)
    assert _survivors(*folders) == []
    return errors[0]


def test_a_node_without_the_run_folder_ends_the_job_with_one_error(base_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    missing = tmp_path / "not_on_node_1"
    error = _ends_at_once_with_one_error(
        [_train(run, "--resume", *tiny_overrides(max_steps=6)), _train(missing, "--resume", *tiny_overrides(max_steps=6))],
        ["rank 1 of 2", "node 1", str(missing), "not a run folder"], run, missing)
    assert error.startswith("error: rank 1 of 2 (node 1")
    assert not missing.exists()


def test_a_node_with_another_dataset_ends_the_job_with_one_error(base_run: Path, tmp_path: Path):
    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(base_run, run)
    shutil.copytree(base_run, other)
    assert cli(["--stage", "augment", "--force", "augment", "--out", str(other), "--quiet", "--seed", "7"]) == 0
    train = ["--force", "train", *tiny_overrides(max_steps=2)]
    error = _ends_at_once_with_one_error([_train(run, *train), _train(other, *train)],
                                         ["rank 1 of 2", "dataset's fingerprint differs from rank 0's"], run, other)
    assert "docs/MULTINODE.md" in error
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None  # nothing was removed: refused before any work


def _training_on_two_nodes(base_run: Path, tmp_path: Path) -> tuple[Path, list[subprocess.Popen]]:
    """A copy of the base run training endlessly on 2 nodes x 1 process, once it has logged its first rows."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "metrics.jsonl").unlink()
    args = _train(run, "--force", "train", *tiny_overrides(max_steps=10**6, checkpoint_every=10**6, log_every=1))
    procs = _launch([args, args])
    metrics = run / "metrics.jsonl"
    end = time.monotonic() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert time.monotonic() < end and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.1)
    return run, procs


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process tree is read from /proc")
def test_a_rank_killed_while_training_ends_the_job_with_one_error(base_run: Path, tmp_path: Path):
    run, procs = _training_on_two_nodes(base_run, tmp_path)
    worker = subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(worker) == 1
    os.kill(int(worker[0]), signal.SIGKILL)
    codes, log = _finish(procs, 120)
    assert all(c != 0 for c in codes)
    errors = _error_lines(log)
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 of 2 (node 0"), log[-4000:]
    assert "lost the other processes while waiting for" in errors[0] and "--resume" in errors[0]
    assert _survivors(run) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process tree is read from /proc")
def test_a_stop_signal_to_one_node_stops_every_rank_with_a_checkpoint(base_run: Path, tmp_path: Path):
    """SIGTERM to node 0's launcher alone (a scheduler stopping one node first): rank 0 gets it from its torchrun,
    the ranks agree on the step, rank 0 saves a checkpoint to resume from, and every process of both nodes ends."""
    run, procs = _training_on_two_nodes(base_run, tmp_path)
    procs[0].send_signal(signal.SIGTERM)
    codes, log = _finish(procs, 120)
    assert all(c != 0 for c in codes) and "train: stopped by a signal at step" in log, log[-3000:]
    state = ckpt.load_training_state(ckpt.latest_checkpoint(run / "checkpoints"))
    assert not state["final"] and state["world"] == 2 and state["stopped"]  # a stop-save: no carry (RELIABILITY.md)
    assert _survivors(run) == []


def test_a_launcher_that_forms_no_group_is_refused_naming_torchrun(tmp_path: Path, monkeypatch, capsys):
    """`accelerate launch --cpu --num_machines 2 --machine_rank R ...` (its simple launcher) sets a rendezvous
    address but no WORLD_SIZE/RANK: each process would train alone."""
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert "torchrun --nnodes" in launcher_problem(env)
    assert launcher_problem({**env, "WORLD_SIZE": "2", "RANK": "1"}) is None  # accelerate's --multi_gpu: torchrun
    assert launcher_problem({"ACCELERATE_USE_CPU": "True"}) is None  # one process
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli(["--stage", "augment", "--preset", "demo", "--out", str(tmp_path / "run"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this launcher started independent processes") and "torchrun" in err
    assert not (tmp_path / "run").exists()


def test_a_collective_that_times_out_says_what_it_waited_for():
    with pytest.raises(JobError, match=r"rank 0 of 1.*no answer from every process within 7 s while waiting for "
                                       r"the gradient all-reduce .*TRM_COLLECTIVE_TIMEOUT_S"):
        with guarded("the gradient all-reduce", timeout=7):
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv operation")
    with pytest.raises(JobError, match="lost the other processes while waiting for a row gather"):
        with guarded("a row gather"):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:16052.")
    for bug in (ValueError("a bug"), RuntimeError("Sizes of tensors must match except in dimension 0")):
        with pytest.raises(type(bug)):  # a bug is not a job failure: it keeps its traceback
            with guarded("the gradient all-reduce"):
                raise bug
