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
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from fluid.cli import _initialize_distributed
from fluid.data import Loader
from fluid.data._pipeline import DATA_LOG_ENV

STEPS = 3
TIMEOUT_S = 600  # per launch; a hang (a process waiting on a peer that died) fails the test
REPO = Path(__file__).parents[1]


def _env(devices: int, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env[DATA_LOG_ENV] = str(log)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


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


def test_a_process_id_that_is_no_number_is_refused(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' must be a whole number"):
        _initialize_distributed()


def test_a_coordinator_without_a_process_id_is_refused(tmp_path):
    # In a fresh process: JAX can only initialise the distributed runtime before its backend.
    env = _env(1, tmp_path) | {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "fluid.cli", "train", "tiny-fluid", "--dry-run"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    assert done.returncode != 0
    assert "set JAX_NUM_PROCESSES (how many) and JAX_PROCESS_ID" in done.stderr, done.stderr


def _launch(out: Path, log: Path, *, processes: int, devices: int, steps: int = STEPS) -> None:
    """`fluid train tiny-fluid steps=<steps> --out <out>` as `processes` processes of
    `devices` CPU devices each, logging what they read into `log`; fails with every
    process's stderr (and kills the rest) when one fails or the launch outlives `TIMEOUT_S`."""
    log.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "fluid.cli", "train", "tiny-fluid", f"steps={steps}",
               "--out", str(out)]
    env = _env(devices, log)
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(processes)}
    # Files, not pipes: a process blocked on a full pipe would look like a hang.
    errors = [log / f"stderr{i}.txt" for i in range(processes)]
    running = []
    for i, error in enumerate(errors):
        with error.open("w") as stderr:
            running.append(subprocess.Popen(
                command, env=env | ({"JAX_PROCESS_ID": str(i)} if processes > 1 else {}),
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
            ))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            if any(p.poll() for p in running):  # one failed: the others would wait on it
                break
            time.sleep(0.5)
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in running):
        report = "\n".join(f"--- process {i} (status {p.returncode}) stderr:\n"
                           f"{error.read_text()[-4000:]}"
                           for i, (p, error) in enumerate(zip(running, errors)))
        pytest.fail(f"`{' '.join(command)}` failed or hung:\n{report}")


def _read(log: Path, shard: int) -> list[list[int]]:
    return [json.loads(line)["indices"] for line in (log / f"shard{shard}.jsonl").open()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    """The run folder and the data log of one process of 8 devices."""
    root = tmp_path_factory.mktemp("single")
    _launch(root / "run", root / "log", processes=1, devices=8)
    return root / "run", root / "log"


def _assert_same_run(single: tuple[Path, Path], out: Path, log: Path) -> None:
    from fluid.run import load_model

    one, one_log = single
    # (a) Each process read its own half of every global batch, disjoint from the other's,
    # and together they read what the single process read, batch by batch.
    whole, shares = _read(one_log, 0), [_read(log, i) for i in (0, 1)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == STEPS
    assert all(len(b) == 8 for b in whole) and all(len(b) == 4 for b in shares[0] + shares[1])
    assert not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}
    assert [a + b for a, b in zip(*shares)] == whole

    # (b) The same losses and gradient norms step by step, one line per step (process 0
    # writes the metrics). The two runs differ only in how the gradients are summed over
    # devices (gloo across processes against XLA's in-process all-reduce), a float32
    # reordering: 1e-5 relative, the tolerance of a simple computation. (Strided shares,
    # which permute each global batch, moved the first gradient norm by 0.7%.)
    m1, m2 = _metrics(one), _metrics(out)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in m2], [r[key] for r in m1], rtol=1e-5)

    # (c) The checkpoint of the two-process run loads and holds the single run's weights
    # (raw and EMA), within a composite computation's 1e-4.
    for ema in (False, True):
        a, _, _ = load_model(out / "checkpoints" / str(STEPS), ema=ema)
        b, _, _ = load_model(one / "checkpoints" / str(STEPS), ema=ema)
        chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, single):
    _launch(tmp_path / "run", tmp_path / "log", processes=2, devices=4)
    _assert_same_run(single, tmp_path / "run", tmp_path / "log")


@pytest.mark.slow
def test_two_processes_resume_as_one(tmp_path, single):
    # Stopped after one step and run again: each process resumes at its own position (the
    # data log then holds the batches of both launches).
    _launch(tmp_path / "run", tmp_path / "log", processes=2, devices=4, steps=1)
    _launch(tmp_path / "run", tmp_path / "log", processes=2, devices=4)
    _assert_same_run(single, tmp_path / "run", tmp_path / "log")
