"""A recipe wires one kind of training run: its data, caption tokenizer, model, token cache
and loader, handed to the `Trainer`, which knows none of them; and what the run shows
(held-out metrics, sample grids), saves and reports."""

import abc
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.random as jr
import optax

from .._types import Key
from ..config import TrainConfig
from ..run import RunFolder, read_metrics
from ..text import CaptionTokenizer, load_caption_tokenizer
from ..train import (
    AbstractObjective,
    CheckpointManager,
    Trainer,
    config_mesh,
    is_main_process,
    open_checkpoints,
    place_model,
)
from ..viz import save_loss_curve
from ._data import caption_tokenizer, make_loader, make_source


class Recipe(abc.ABC):
    """One training run of a `TrainConfig`, wired: a subclass per `TrainConfig.task`
    (`fluid.recipes.RECIPES`), its `trainer` ready to `run`.

    Building one reads the data source `config.data` names, fits or reuses the caption
    tokenizer when the run reads captions (a resumed run reuses the one it saved), builds
    the model in its shardings, lets the subclass turn the source into what the loader reads
    (a token cache), and makes the loader and the `Trainer`. The trainer calls back the
    recipe's `evaluate` every `log_every` steps and its `sample_grid` every `sample_every`.

    **Class variables:**

    - `name`: the `TrainConfig.task` that selects it.
    - `reads_captions`: whether the run reads captions (a caption tokenizer is fitted or
      reused, batches carry `text_ids`).

    **Arguments:**

    - `config`: the run.
    - `out_dir`: where checkpoints, metrics, the config and the final model go; `None`
      writes nothing.
    - `progress`: show progress bars.
    - `resume`: continue from the latest checkpoint in `out_dir` if there is one.
    - `devices`: the devices of the mesh; all by default.
    - `optimizer`: an optax transformation instead of the config's AdamW.
    """

    name: ClassVar[str]
    reads_captions: ClassVar[bool]

    def __init__(
        self,
        config: TrainConfig,
        *,
        out_dir: str | Path | None = None,
        progress: bool = True,
        resume: bool = True,
        devices: Sequence[jax.Device] | None = None,
        optimizer: optax.GradientTransformation | None = None,
    ):
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.folder = RunFolder(self.out_dir) if self.out_dir is not None else None
        self._progress = progress
        self.mesh = config_mesh(config, devices)
        self.source = make_source(config.data)
        # Opened once, here, to look for a checkpoint before the loader exists; the trainer
        # resumes from the same manager.
        checkpoints = (
            open_checkpoints(self.out_dir, config) if self.out_dir is not None else None
        )
        self.text_tokenizer = (
            self._text_tokenizer(reuse=resume and _has_checkpoint(checkpoints))
            if self.reads_captions else None
        )
        k_model, k_train = jr.split(jr.key(config.seed))
        model = place_model(self.builder(key=k_model), self.mesh, config)
        self.source = self.training_source(model)
        loader = make_loader(
            self.source,
            config.data,
            text_tokenizer=self.text_tokenizer,
            batch_size=config.batch_size,
            text_len=config.model.text_len,
        )
        self.trainer = Trainer(
            model,
            self.objective(),
            loader,
            config=config,
            trainable=self.trainable(model),
            key=k_train,
            mesh=self.mesh,
            out_dir=self.out_dir,
            progress=progress,
            resume=resume,
            checkpoints=checkpoints,
            optimizer=optimizer,
            evaluate=lambda trainer: self.evaluate(),
            sample=lambda trainer, path: self.sample_grid(path=path),
        )

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (`fluid.train.is_main_process`, as
        the trainer's `is_main`)."""
        return is_main_process()

    @property
    def progress(self) -> bool:
        """Whether progress bars show: asked for, and this is the main process (as the
        trainer's `progress`)."""
        return self._progress and self.is_main

    # -- what a subclass says -------------------------------------------------------------
    @abc.abstractmethod
    def builder(self, *, key: Key) -> Any:
        """The initial model, or a function of no arguments that builds it (then built
        under `jax.jit` in its shardings; a model that reads weights from files is built on
        the host and returned built, see `fluid.train.place_model`)."""

    @classmethod
    @abc.abstractmethod
    def abstract_model(cls, config: TrainConfig, *, source=None) -> eqx.Module:
        """The model's structure with `jax.ShapeDtypeStruct` leaves (`fluid presets`,
        `--dry-run`). With the run's data `source`, parts sized by the data are sized as the
        run would size them (the caption vocabulary of the tokenizer it would read with)."""

    @abc.abstractmethod
    def objective(self) -> AbstractObjective:
        """What the trainer minimises."""

    def trainable(self, model: eqx.Module) -> Any:
        """Which leaves of `model` train (an Equinox filter spec): every floating-point
        array unless a subclass says otherwise."""
        del model
        return eqx.is_inexact_array

    def training_source(self, model: eqx.Module) -> Any:
        """The source the loader reads, given the built model: `self.source`, or a subclass's
        token cache of it."""
        del model
        return self.source

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the EMA model, logged every `log_every` steps."""
        return {}

    @abc.abstractmethod
    def sample_grid(
        self, prompts: Sequence[str] | None = None, *, path: Path | None = None
    ) -> Path | None:
        """Write a picture of what the EMA model does now to `path` (by default the run's
        `samples/step_<n>.png`); process 0 writes, every process computes."""

    @abc.abstractmethod
    def write_model(self, model: eqx.Module, directory: Path) -> None:
        """Write the trained `model` into `directory` (beside the run's `config.json`), at
        the paths of `fluid.run.RunFolder(directory)` (process 0 only)."""

    def report(self) -> dict[str, Any]:
        """What the end of a run adds to its `summary.json` (its outputs' paths, scores)."""
        return {}

    def describe(self) -> str:
        """What the run trains, for the line that starts it."""
        return f"{self.config.steps} steps of batch {self.config.batch_size}"

    def closing_lines(self, summary: dict[str, Any]) -> list[str]:
        """What `fluid train` prints after the summary: how to use what the run wrote."""
        del summary
        return []

    # -- the run ----------------------------------------------------------------------------
    def run(self, steps: int | None = None, **kwargs) -> list[dict[str, float | int]]:
        """`Trainer.run`: train for `steps` (default: up to `config.steps`)."""
        return self.trainer.run(steps, **kwargs)

    def model(self, ema: bool = True) -> eqx.Module:
        """`Trainer.model`: the current model, EMA weights by default."""
        return self.trainer.model(ema)

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def history(self) -> list[dict[str, float | int]]:
        return self.trainer.history

    def checkpoint(self) -> Path | None:
        """`Trainer.checkpoint`: a resumable checkpoint of the current step."""
        return self.trainer.checkpoint()

    def save(self, directory: str | Path | None = None) -> Path:
        """Write the config and the EMA model (`write_model`) into `directory` (the run's
        `out_dir` by default); see `fluid.run.load_model`. On several hosts every process
        calls it, process 0 writes."""
        directory = Path(directory or self.out_dir)
        model = self.trainer.gathered_model(ema=True)
        if not self.is_main:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        RunFolder(directory).write_config(self.config)
        self.write_model(model, directory)
        return directory

    def train_and_report(self, *, time_budget: float | None = None) -> dict[str, Any]:
        """Train up to `config.steps` (or `time_budget` seconds), save into `out_dir`, and
        write the loss curve of the whole run (steps before a resume included) and
        `summary.json`; returns the summary (what `fluid train` prints)."""
        t0 = time.perf_counter()
        history = self.run(time_budget=time_budget)
        train_time = time.perf_counter() - t0
        self.save()
        outputs = self.report()
        last = history[-50:]
        summary = {
            "steps": self.step,
            "final_loss_mean_of_last_50": float(sum(r["loss"] for r in last) / max(len(last), 1)),
            "train_seconds": train_time,
            **outputs,
        }
        if not self.is_main:
            return summary
        logged = read_metrics(self.folder.metrics)
        curve = save_loss_curve(
            [r["step"] for r in logged], [r["loss"] for r in logged], self.folder.loss_curve
        )
        summary["loss_curve"] = str(curve)
        self.folder.summary.write_text(json.dumps(summary, indent=1))
        return summary

    # -- shared wiring ----------------------------------------------------------------------
    def _text_tokenizer(self, reuse: bool) -> CaptionTokenizer:
        # A resumed run must read captions exactly as before: reuse the saved tokenizer.
        saved = self.folder.text_tokenizer if self.folder is not None else None
        if reuse and saved is not None and saved.exists():
            return load_caption_tokenizer(saved)
        tokenizer = caption_tokenizer(self.source, self.config.model)
        if saved is not None and self.is_main:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(saved)
        return tokenizer


def _has_checkpoint(checkpoints: CheckpointManager | None) -> bool:
    """Whether the trainer will resume: a complete checkpoint in the run folder."""
    return checkpoints is not None and checkpoints.latest_step() is not None
