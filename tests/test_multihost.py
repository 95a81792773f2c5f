"""Several hosts: `fluid train` as two processes on this machine (a loopback coordinator,
4 CPU devices each, gloo collectives) against one process of 8 devices.

The fast tests check what the equality rests on (the loaders' shares stacked in process order
are one process's global batches) and the launch's environment; the slow one launches both
runs through the `fluid train` command and compares what they read, logged and wrote.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

from fluid.cli import _initialize_distributed
from fluid.data import Loader
from fluid.data._pipeline import DATA_LOG_ENV

STEPS = 3
TIMEOUT_S = 600  # per launch; a hang (a process waiting on a peer that died) fails the test


class _Numbered:
    """A source whose record `i` is an image filled with `i`."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict:
        return {"image": np.full((2, 2, 3), i, np.float32), "caption": str(i)}


def _ids(batch) -> list[int]:
    return [int(x) for x in batch["image"][:, 0, 0, 0]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_shares_stacked_in_process_order_are_the_global_batches(shuffle):
    kwargs = {"text_tokenizer": None, "text_len": 2, "shuffle": shuffle, "num_epochs": 1}
    whole = [_ids(b) for b in Loader(_Numbered(), batch_size=8, **kwargs)]
    shares = [
        [_ids(b) for b in Loader(_Numbered(), batch_size=4, shard_index=i, shard_count=2,
                                 **kwargs)]
        for i in range(2)
    ]
    # 40 records: 5 global batches of 8; each process reads 5 of 4.
    assert len(whole) == len(shares[0]) == len(shares[1]) == 5
    assert [a + b for a, b in zip(*shares)] == whole
    assert not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}


def test_a_coordinator_without_process_count_and_id_is_refused(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        _initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="whole number"):
        _initialize_distributed()


def _env(devices: int, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env[DATA_LOG_ENV] = str(log)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


def _launch(out: Path, log: Path, *, processes: int, devices: int) -> None:
    """`fluid train tiny-fluid` as `processes` processes of `devices` CPU devices each; fails
    with every process's stderr when one fails or the launch outlives `TIMEOUT_S`."""
    log.mkdir()
    command = [sys.executable, "-m", "fluid.cli", "train", "tiny-fluid", f"steps={STEPS}",
               "--out", str(out)]
    env = _env(devices, log)
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(processes)}
    running = [
        subprocess.Popen(command, env=env | ({"JAX_PROCESS_ID": str(i)} if processes > 1 else {}),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)
    ]
    outputs, failed = [], False
    try:
        for p in running:
            try:
                outputs.append(p.communicate(timeout=TIMEOUT_S))
            except subprocess.TimeoutExpired:
                failed = True
                break
            failed |= p.returncode != 0
            if failed:
                break
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
        for i, p in enumerate(running[len(outputs):], len(outputs)):
            outputs.append(p.communicate())
    if failed:
        report = "\n".join(f"--- process {i} (status {p.returncode}) stderr:\n{err[-4000:]}"
                           for i, (p, (_, err)) in enumerate(zip(running, outputs)))
        pytest.fail(f"`{' '.join(command)}` failed or hung:\n{report}")


def _read(log: Path, shard: int) -> list[list[int]]:
    return [json.loads(line)["indices"] for line in (log / f"shard{shard}.jsonl").open()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    from fluid.run import load_model

    one, two = tmp_path / "one", tmp_path / "two"
    _launch(two, tmp_path / "log2", processes=2, devices=4)
    _launch(one, tmp_path / "log1", processes=1, devices=8)

    # (a) Each process read its own half of every global batch, disjoint from the other's,
    # and together they read what the single process read, batch by batch.
    single, shares = _read(tmp_path / "log1", 0), [_read(tmp_path / "log2", i) for i in (0, 1)]
    assert len(single) == len(shares[0]) == len(shares[1]) == STEPS
    assert all(len(b) == 8 for b in single) and all(len(b) == 4 for b in shares[0] + shares[1])
    assert not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}
    assert [a + b for a, b in zip(*shares)] == single

    # (b) The same losses and gradient norms step by step, one line per step (process 0
    # writes the metrics). The two runs differ only in how the gradients are summed over
    # devices (gloo across processes against XLA's in-process all-reduce), a float32
    # reordering: 1e-5 relative, the tolerance of a simple computation.
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in m2], [r[key] for r in m1], rtol=1e-5)

    # (c) The checkpoint process 0 wrote of the two-process run loads and holds the weights
    # of the single process's (raw and EMA), within a composite computation's 1e-4.
    for ema in (False, True):
        a, _, _ = load_model(two / "checkpoints" / str(STEPS), ema=ema)
        b, _, _ = load_model(one / "checkpoints" / str(STEPS), ema=ema)
        chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)
