"""One line from a trained model to pictures: `fluid.load(path)` and its `Pipeline`."""

import os
from collections.abc import Sequence
from pathlib import Path

import jax.random as jr
import numpy as np

from ._errors import ConfigError
from .config import TrainConfig
from .model import FluidModel
from .run import is_pretrained, load_model, load_pretrained, save_pretrained
from .sample import sample_images
from .text import CaptionTokenizer


def to_pil(images: np.ndarray) -> list:
    """Images `[n, h, w, 3]` in [-1, 1] as PIL images (8 bits per channel)."""
    from PIL import Image

    pixels = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255)
    return [Image.fromarray(x.astype(np.uint8)) for x in pixels]


class Pipeline:
    """A trained model ready to sample: prompts in, PIL images out, with the run's sampling
    settings as defaults.

    **Arguments:**

    - `model`, `text_tokenizer`, `config`: the model, the caption tokenizer it was trained
      with and its training config (as `fluid.run.load_model` returns them).
    """

    def __init__(self, model: FluidModel, text_tokenizer: CaptionTokenizer, config: TrainConfig):
        self.model = model
        self.text_tokenizer = text_tokenizer
        self.config = config

    @property
    def default_cfg_schedule(self) -> str:
        """`"linear"` for a random order (MAR, Fluid); `"constant"` for an order that does not
        draw a permutation (raster: LlamaGen uses a constant scale)."""
        return "linear" if self.model.order.random_permutation else "constant"

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        batch_size: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        cfg_interval: tuple[float, float] | None = None,
        head_steps: int | Sequence[int] | None = None,
    ) -> list:
        """Sample images of `prompts` (one string, or several).

        **Arguments:**

        - `prompts`: captions; `""` asks for an unconditional image.
        - `num_images_per_prompt`: images of each prompt, prompt by prompt in order.
        - `seed`: the images of a call depend only on it and the other arguments (and on
          `batch_size`: batch `b > 0` samples with `fold_in(key(seed), b)`; one batch gives
          what `fluid sample --seed` gives).
        - `steps`, `cfg`, `temperature`: default to the run's `sample_steps`, `sample_cfg`,
          `sample_temperature`.
        - `cfg_schedule`: `"linear"` or `"constant"`; by default `default_cfg_schedule`.
        - `batch_size`: images per compiled call (default: all at once).
        - `negative_prompt`: what guidance's unconditional half reads in place of the empty
          caption, pushing the images away from it: one string for every prompt, or one
          per prompt. Needs guidance (`cfg` above 1).
        - `cfg_interval`, `head_steps`: fast-sampling switches, as `FluidModel.generate`'s
          (guidance only over a part of the progress; the head's chain length, or a DiSA
          schedule of them). Off by default.

        **Returns:**

        A list of `PIL.Image.Image`, `len(prompts) * num_images_per_prompt` of them.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt must be at least 1, got "
                              f"{num_images_per_prompt}.")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        config = self.config
        wanted = [p for p in prompts for _ in range(num_images_per_prompt)]
        if not wanted:
            raise ConfigError("give at least one prompt.")
        negatives = None
        if negative_prompt is not None:
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(prompts)
            if len(negative_prompt) != len(prompts):
                raise ConfigError(
                    f"give one negative prompt for all prompts, or one per prompt: "
                    f"{len(negative_prompt)} for {len(prompts)} prompts."
                )
            negatives = [n for n in negative_prompt for _ in range(num_images_per_prompt)]
        size = batch_size or len(wanted)
        key = jr.key(seed)
        images = []
        for batch, start in enumerate(range(0, len(wanted), size)):
            # The first batch samples with the seed's key itself, as `fluid sample` does.
            sub = key if batch == 0 else jr.fold_in(key, batch)
            images.append(sample_images(
                self.model, self.text_tokenizer, wanted[start:start + size],
                text_len=config.model.text_len, key=sub,
                steps=config.sample_steps if steps is None else steps,
                cfg=config.sample_cfg if cfg is None else cfg,
                cfg_schedule=cfg_schedule or self.default_cfg_schedule,
                temperature=config.sample_temperature if temperature is None else temperature,
                negative_prompts=None if negatives is None else negatives[start:start + size],
                cfg_interval=cfg_interval, head_steps=head_steps,
            ))
        return to_pil(np.concatenate(images))

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> Path:
        """Write the model as a pretrained folder (`fluid.run.save_pretrained`)."""
        return save_pretrained(folder, self.model, self.text_tokenizer, self.config, **kwargs)


def load(path: str | os.PathLike, *, ema: bool = True) -> Pipeline:
    """A `Pipeline` from a pretrained folder (`Pipeline.save_pretrained`), a run folder (its
    newest saved model or checkpoint), one checkpoint `<run>/checkpoints/<step>`, or a folder
    `fluid train` saved. `ema`: the EMA weights (a checkpoint also has the raw ones)."""
    if is_pretrained(path):
        return Pipeline(*load_pretrained(path))
    return Pipeline(*load_model(path, ema=ema))
