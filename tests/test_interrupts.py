"""Nothing lost: Ctrl-C at any point of a step, kill -9, and loading the newest weights.

Every scenario compares the losses that `metrics.jsonl` holds after the interruption and a
resume with those of one uninterrupted run: equal losses at every step, each step once.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import numpy as np
import pytest
from helpers import arrays as _arrays

from fluid.cli import main
from fluid.data import Loader
from fluid.presets import get_config
from fluid.recipes import prepare
from fluid.run import read_metrics
from fluid.train import (
    CheckpointManager,
    TrainingInterrupted,
    find_weights,
    load_model,
)

STEPS = 6


def _config():
    # A smaller tiny-fluid (one block): every trainer here compiles the same program.
    config = get_config(
        "tiny-fluid", **{"model.backbone.depth": 1, "data.fit_images": 16, "log_every": 100}
    )
    return dataclasses.replace(config, steps=STEPS, checkpoint_every=2)


@pytest.fixture(scope="module")
def straight() -> np.ndarray:
    """The losses of an uninterrupted run."""
    return np.array([r["loss"] for r in prepare(_config(), progress=False).run()])


def _logged(run: Path) -> tuple[list[int], np.ndarray]:
    records = read_metrics(run / "metrics.jsonl")
    return [r["step"] for r in records], np.array([r["loss"] for r in records])


def _once_at(call: int):
    """A function that sends this process SIGINT on its `call`-th call (1-based)."""
    calls = [0]

    def maybe_interrupt():
        calls[0] += 1
        if calls[0] == call:
            signal.raise_signal(signal.SIGINT)

    return maybe_interrupt


def _interrupt_in_loader(monkeypatch, trainer, call, *, after):
    fire, original = _once_at(call), Loader.__next__

    def next_batch(self):
        if not after:
            fire()
        batch = original(self)
        if after:  # the loader's position has moved past this batch already
            fire()
        return batch

    monkeypatch.setattr(Loader, "__next__", next_batch)


def _interrupt_in_step(monkeypatch, trainer, call, *, after):
    fire, original = _once_at(call), trainer.trainer.step_fn

    def step(*args):
        if not after:
            fire()
        out = original(*args)
        if after:  # dispatched, not yet finished: the loss is read next
            fire()
        return out

    monkeypatch.setattr(trainer.trainer, "step_fn", step)


def _interrupt_in_checkpoint(monkeypatch, trainer, call, *, after):
    # `call` counts checkpoint writes (every 2 steps).
    fire, original = _once_at(call), CheckpointManager._commit

    def commit(self, step):
        if not after:
            fire()  # arrays written, commit file not yet
        original(self, step)
        if after:
            fire()

    monkeypatch.setattr(CheckpointManager, "_commit", commit)


POINTS = {
    "before the loader reads": (_interrupt_in_loader, 3, False, 3),
    "after the loader moved on": (_interrupt_in_loader, 3, True, 3),
    "before the step": (_interrupt_in_step, 3, False, 3),
    "while the step runs": (_interrupt_in_step, 3, True, 3),
    "inside a checkpoint write": (_interrupt_in_checkpoint, 2, False, 4),
    "after a checkpoint write": (_interrupt_in_checkpoint, 1, True, 2),
}


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_anywhere_in_a_step_resumes_exactly(tmp_path, monkeypatch, straight, point):
    install, call, after, stopped_at = POINTS[point]
    trainer = prepare(_config(), out_dir=tmp_path, progress=False)
    install(monkeypatch, trainer, call, after=after)
    with pytest.raises(TrainingInterrupted) as interrupted:
        trainer.run()
    monkeypatch.undo()
    # The step the signal landed in is finished and saved, with the data position after it.
    assert interrupted.value.step == stopped_at
    assert CheckpointManager(tmp_path / "checkpoints").latest_step() == stopped_at
    resumed = prepare(_config(), out_dir=tmp_path, progress=False)
    assert resumed.step == stopped_at
    resumed.run()
    steps, losses = _logged(tmp_path)
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(losses, straight)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, straight):
    trainer = prepare(_config(), out_dir=tmp_path, progress=False)
    original = trainer.trainer.step_fn
    calls = [0]

    def step(*args):
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # raises here, before the step runs
        return original(*args)

    trainer.trainer.step_fn = step
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        trainer.run()
    assert not isinstance(interrupted.value, TrainingInterrupted)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    resumed = prepare(_config(), out_dir=tmp_path, progress=False)
    assert resumed.step == 2
    resumed.run()
    steps, losses = _logged(tmp_path)
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(losses, straight)


def test_cli_ctrl_c_saves_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    fire, original = _once_at(2), Loader.__next__

    def next_batch(self):
        batch = original(self)
        fire()
        return batch

    monkeypatch.setattr(Loader, "__next__", next_batch)
    run = tmp_path / "run"
    code = main(["train", "tiny-fluid", "--out", str(run), "steps=6", "checkpoint_every=4",
                 "model.backbone.depth=1", "data.fit_images=16"])
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"interrupted after step 2: checkpoint saved in {run / 'checkpoints' / '2'}; "
                       "run the same command again to resume.")
    assert not any("Traceback" in line for line in err)
    assert CheckpointManager(run / "checkpoints").latest_step() == 2
    assert not (run / "model.eqx").exists()  # nothing after training ran: no sampling, no save


_KILLED_RUN = """
import dataclasses, os, signal, sys
sys.path.insert(0, {tests!r})
import test_interrupts
from fluid.recipes import prepare

def kill(trainer, record):
    if record["step"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)

prepare(test_interrupts._config(), out_dir={out!r}, progress=False).run(callback=kill)
"""


def test_metrics_after_kill_9_hold_each_step_once(tmp_path, straight):
    # Killed at step 5: metrics.jsonl has steps 1-5, the newest checkpoint is step 4.
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), kill_at=5, out=str(tmp_path))
    env = dict(os.environ)  # conftest's XLA flags
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    steps, _ = _logged(tmp_path)
    assert steps == [1, 2, 3, 4, 5]
    # A crash in the middle of a line leaves half a record; it must not survive either.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')

    resumed = prepare(_config(), out_dir=tmp_path, progress=False)
    assert resumed.step == 4
    steps, _ = _logged(tmp_path)
    assert steps == [1, 2, 3, 4]  # lines after the restored step are dropped at once
    resumed.run()
    steps, losses = _logged(tmp_path)
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(losses, straight)
    # Every line parses: nothing half-written is left.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == steps


def _event_records(path: Path) -> list[bytes]:
    data, records = path.read_bytes(), []
    while data:
        length = int.from_bytes(data[:8], "little")
        records.append(data[12 : 12 + length])
        data = data[16 + length :]
    return records


def test_tensorboard_restart_marks_the_resumed_step(tmp_path):
    config = dataclasses.replace(_config(), steps=3)
    prepare(config, out_dir=tmp_path, progress=False).run(2)
    prepare(config, out_dir=tmp_path, progress=False).run()
    first, second = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"),
                           key=lambda p: p.stat().st_mtime)
    # Event.step (field 2) = 3 and Event.session_log (field 7) = SessionLog{status: START}.
    start = b"\x10\x03\x3a\x02\x08\x01"
    assert not any(start in r for r in _event_records(first))
    assert any(start in r for r in _event_records(second))


# -- which weights a run folder gives ---------------------------------------------------------
def test_a_run_folder_loads_its_newest_weights(tmp_path, capsys):
    config = _config()
    first = prepare(dataclasses.replace(config, steps=4), out_dir=tmp_path, progress=False)
    first.run()
    first.save()
    assert find_weights(tmp_path).kind == "model"  # saved model and checkpoint 4 tie
    assert json.loads((tmp_path / "model.json").read_text())["step"] == 4
    # Resumed to step 6 and killed before its save: the checkpoint is newer than model.eqx.
    prepare(config, out_dir=tmp_path, progress=False).run()
    weights = find_weights(tmp_path)
    assert (weights.kind, weights.step) == ("checkpoint", 6)
    loaded, _, _ = load_model(tmp_path)
    newest, _, _ = load_model(tmp_path / "checkpoints" / "6")
    chex.assert_trees_all_equal(_arrays(loaded), _arrays(newest))
    stale, _, _ = load_model(tmp_path / "checkpoints" / "4")
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(_arrays(loaded), _arrays(stale))

    grid = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path), "--prompt", "a red circle", "--out", str(grid),
                 "--steps", "2"]) == 0
    assert f"loading step 6 from the checkpoint {tmp_path / 'checkpoints' / '6'}" in (
        capsys.readouterr().out
    )


def test_raw_weights_need_a_checkpoint(tmp_path):
    config = dataclasses.replace(_config(), steps=2)
    trainer = prepare(config, progress=False)
    trainer.run()
    trainer.save(tmp_path)
    assert find_weights(tmp_path).kind == "model"
    with pytest.raises(FileNotFoundError, match="only the EMA weights"):
        find_weights(tmp_path, ema=False)
    assert main(["sample", str(tmp_path), "--prompt", "a red circle", "--raw"]) == 2
