"""What a training run trains (`TrainConfig.task`): how its model is built, evaluated, shown
and saved. The `Trainer`'s loop is the same for every task; what differs lives here, one
class per task, instead of in branches spread over the trainer and the command line."""

import abc
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._types import Key
from ..build import abstract_model, build_model, build_objective
from ..config import TrainConfig
from ..run import RunFolder, save_model_file
from ..text import CaptionTokenizer
from ..tokenizers import psnr
from ._data import caption_tokenizer, fit_images

if TYPE_CHECKING:
    from ._trainer import Trainer

_psnr = jax.jit(psnr)


class Task(abc.ABC):
    """One kind of training run.

    **Class variables:**

    - `name`: the `TrainConfig.task` that selects it.
    - `reads_captions`: whether the run reads captions (a text tokenizer is fitted or
      reused, batches carry `text_ids`).
    """

    name: ClassVar[str]
    reads_captions: ClassVar[bool]

    @abc.abstractmethod
    def builder(
        self, config: TrainConfig, *, source, text_tokenizer: CaptionTokenizer | None, key: Key
    ) -> Callable[[], eqx.Module]:
        """A function of no arguments that builds the model to train (the trainer calls it
        under `jax.jit`, or on the host when pretrained weights are read from files)."""

    @abc.abstractmethod
    def abstract_model(self, config: TrainConfig, *, source=None) -> eqx.Module:
        """The model's structure with `jax.ShapeDtypeStruct` leaves (`fluid presets`,
        `--dry-run`). With the run's data `source`, parts sized by the data are sized as the
        run would size them (the caption vocabulary of the tokenizer it would read with)."""

    def compute_dtype(self, config: TrainConfig) -> jnp.dtype | None:
        """The dtype the backbone computes in, or None when nothing is cast."""
        del config
        return None

    def evaluate(self, trainer: "Trainer") -> dict[str, float]:
        """Held-out metrics of the EMA model, logged every `log_every` steps."""
        del trainer
        return {}

    @abc.abstractmethod
    def sample_grid(
        self, trainer: "Trainer", path: Path, prompts: Sequence[str] | None
    ) -> Path | None:
        """Write a picture of what the EMA model does now to `path` (process 0 only)."""

    @abc.abstractmethod
    def save(self, trainer: "Trainer", model: eqx.Module, directory: Path) -> None:
        """Write the trained `model` into `directory` (beside the run's `config.json`), at
        the paths of `fluid.run.RunFolder(directory)`."""


class GenerateTask(Task):
    """`task="generate"`: the `FluidModel` that `config.model` describes, trained on
    captioned images; its backbone computes in `config.precision`."""

    name = "generate"
    reads_captions = True

    def builder(self, config, *, source, text_tokenizer, key):
        images = fit_images(source, config.data.fit_images)
        return functools.partial(build_model, config.model, text_tokenizer=text_tokenizer,
                                 key=key, fit_images=images)

    def abstract_model(self, config, *, source=None):
        if source is None:
            return abstract_model(config.model)
        vocab = caption_tokenizer(source, config.model).vocab_size
        return abstract_model(config.model, text_vocab_size=vocab)

    def compute_dtype(self, config):
        from ._trainer import resolve_precision

        return resolve_precision(config.precision)

    def sample_grid(self, trainer, path, prompts):
        from ..data.shapes import DEMO_PROMPTS
        from ..sample import sample_images
        from ..viz import save_grid

        config = trainer.config
        prompts = list(prompts or DEMO_PROMPTS)
        images = sample_images(
            trainer.model(ema=True), trainer.text_tokenizer, prompts,
            text_len=config.model.text_len, key=jr.key(config.seed + 1),
            steps=config.sample_steps, cfg=config.sample_cfg,
            temperature=config.sample_temperature,
        )
        if not trainer.is_main:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_grid(images, path, captions=prompts, cols=4)

    def save(self, trainer, model, directory):
        folder = RunFolder(directory)
        trainer.text_tokenizer.save(folder.text_tokenizer)
        # With its step and checksum beside it (`model.json`), verified by `load_model`.
        save_model_file(folder.model, model, step=trainer.step)


class TokenizerTask(Task):
    """`task="tokenizer"`: the image tokenizer `config.model.tokenizer` alone, trained as an
    autoencoder (`AutoencoderObjective`, loss `config.tokenizer_loss`) on images without
    captions; every floating-point leaf trains and nothing is cast. It logs the `psnr` of
    held-out reconstructions and saves the tokenizer as a diffusers folder, `tokenizer/`."""

    name = "tokenizer"
    reads_captions = False

    def builder(self, config, *, source, text_tokenizer, key):
        del source, text_tokenizer
        return functools.partial(
            build_objective, config.model.tokenizer, config.tokenizer_loss, key=key
        )

    def abstract_model(self, config, *, source=None):
        del source
        return eqx.filter_eval_shape(
            build_objective, config.model.tokenizer, config.tokenizer_loss, key=jr.key(0)
        )

    def evaluate(self, trainer):
        images = trainer.held_out_images()
        return {"psnr": float(_psnr(images, trainer.model(ema=True).reconstruct(images)))}

    def sample_grid(self, trainer, path, prompts):
        del prompts
        from ..viz import save_grid

        images = trainer.held_out_images()
        # All of them, as `evaluate` does (one compiled program), then the first 8.
        pairs = (images, trainer.model(ema=True).reconstruct(images))
        if not trainer.is_main:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = np.concatenate([np.asarray(x)[:8] for x in pairs])
        return save_grid(grid, path, cols=8)

    def save(self, trainer, model, directory):
        del trainer
        # `fluid.run.load_model` refuses this run, naming this folder instead.
        model.autoencoder.save_pretrained(RunFolder(directory).tokenizer)


# `fluid.config.TASKS` lists these names for validating a config (tests keep the two equal).
TASKS: dict[str, Task] = {task.name: task for task in (GenerateTask(), TokenizerTask())}


def get_task(name: str) -> Task:
    """The task of a `TrainConfig.task` name."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the tasks are {sorted(TASKS)}.") from None
