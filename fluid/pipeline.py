"""One line from a trained model to pictures: `fluid.load(path)` and its `Pipeline`."""

import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.random as jr
import numpy as np
from tqdm.auto import tqdm

from ._errors import ConfigError, MissingInputError
from .build import mar_model
from .config import ComponentSpec, TrainConfig
from .convert import MarFolder, is_mar_folder, read_mar_folder
from .model import FluidModel
from .presets import mar_converted
from .run import is_pretrained, load_model, load_pretrained, save_pretrained
from .sample import place, sample_images, spread_over
from .text import CaptionTokenizer, ClassLabelTokenizer
from .tokenizers import KLTokenizer, read_kl_config


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
    - `devices`: where a batch is sampled, split row by row (`fluid.sample.sample_images`'s
      `devices`); every local device by default (`jax.local_devices()`), the model
      replicated on them once, at the first call.
    """

    def __init__(self, model: FluidModel, text_tokenizer: CaptionTokenizer, config: TrainConfig,
                 *, devices: Sequence[jax.Device] | None = None):
        self.model = model
        self.text_tokenizer = text_tokenizer
        self.config = config
        self.devices = tuple(jax.local_devices() if devices is None else devices)
        self._placed: tuple[FluidModel, FluidModel] | None = None

    def _placed_model(self) -> FluidModel:
        """The model replicated on `devices` (copied once per model, not per call)."""
        spread = spread_over(self.devices, 1)
        if spread is None:
            return self.model
        if self._placed is None or self._placed[0] is not self.model:
            self._placed = (self.model, place(self.model, spread.replicated))
        return self._placed[1]

    @property
    def default_cfg_schedule(self) -> str:
        """The model's (`FluidModel.default_cfg_schedule`): `"linear"` for a random order
        (MAR, Fluid); `"constant"` for an order that does not draw a permutation (raster:
        LlamaGen uses a constant scale)."""
        return self.model.default_cfg_schedule

    def __call__(self, prompts: str | Sequence[str], **options) -> list:
        """`images(prompts, **options)` as a list of `PIL.Image.Image`,
        `len(prompts) * num_images_per_prompt` of them."""
        return to_pil(self.images(prompts, **options))

    def images(
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
        cfg_refresh: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Sample images of `prompts` (one string, or several), as one array.

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
        - `cfg_interval`, `head_steps`, `cfg_refresh`: fast-sampling switches, as
          `FluidModel.generate`'s (guidance only over a part of the progress; the head's
          chain length, or a DiSA schedule of them; the unconditional backbone pass only
          every `cfg_refresh` guided steps, its residual reused between). Off by default.
        - `progress`: a progress bar over the batches (the first one's time includes
          compiling the sampler, once per shape and setting).

        **Returns:**

        `[len(prompts) * num_images_per_prompt, h, w, 3]` images in [-1, 1] (`__call__`
        gives them as PIL images).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(self.text_tokenizer, ClassLabelTokenizer):
            _check_class_prompts(self.text_tokenizer, prompts)
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
        starts = range(0, len(wanted), size)
        bar = tqdm(starts, desc="sampling", unit="batch", disable=not progress,
                   postfix="the first batch compiles")
        model = self._placed_model()
        for batch, start in enumerate(bar):
            # The first batch samples with the seed's key itself, as `fluid sample` does.
            sub = key if batch == 0 else jr.fold_in(key, batch)
            images.append(sample_images(
                model, self.text_tokenizer, wanted[start:start + size],
                text_len=config.model.text_len, key=sub,
                steps=config.sample_steps if steps is None else steps,
                cfg=config.sample_cfg if cfg is None else cfg,
                cfg_schedule=cfg_schedule,
                temperature=config.sample_temperature if temperature is None else temperature,
                negative_prompts=None if negatives is None else negatives[start:start + size],
                cfg_interval=cfg_interval, head_steps=head_steps, cfg_refresh=cfg_refresh,
                devices=self.devices,
            ))
            bar.set_postfix_str("")
        return np.concatenate(images)

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> Path:
        """Write the model as a pretrained folder (`fluid.run.save_pretrained`)."""
        return save_pretrained(folder, self.model, self.text_tokenizer, self.config, **kwargs)


def load(path: str | os.PathLike, *, ema: bool = True,
         vae: str | os.PathLike | None = None) -> Pipeline:
    """A `Pipeline` from a pretrained folder (`Pipeline.save_pretrained`), a run folder (its
    newest saved model or checkpoint), one checkpoint `<run>/checkpoints/<step>`, a folder
    `fluid train` saved, or a MAR model that `fluid convert mar` wrote.

    **Arguments:**

    - `path`: the folder.
    - `ema`: the EMA weights (a checkpoint also has the raw ones). A MAR folder holds the
      weights chosen when it was converted; `ema=False` is refused for one that holds the
      EMA weights (convert again with `weights="model"`).
    - `vae`: for a MAR folder only, and needed there: the folder of MAR's KL autoencoder
      (kl16.ckpt converted with `fluid convert ldm --mar`). Its latent channels, in patches,
      must make the model's tokens; the image size follows from the token grid, the patch
      and the autoencoder's downsampling (256 px for MAR's released models).

    A MAR pipeline samples classes: its prompts are class numbers (`"207"`), `""` is
    unconditional; its defaults are MAR's (`fluid.presets.mar_converted`: 64 steps, the
    linear guidance schedule, temperature 1, guidance 2.9 / 3.0 / 3.2 for MAR-B / L / H).

    **Raises:**

    `ConfigError` for a MAR folder without `vae`, an autoencoder whose latents do not make
    the model's tokens (naming both channel counts), or `vae` given for another folder; the
    loaders' errors for a missing or damaged folder.
    """
    if is_mar_folder(path):
        return mar_pipeline(path, vae=vae, ema=ema)
    if vae is not None:
        raise ConfigError(
            f"{path}: vae is for a MAR model that `fluid convert mar` wrote; this folder is "
            "not one, and a fluid run or pretrained folder names its image tokenizer in its "
            "config: leave vae out."
        )
    if is_pretrained(path):
        return Pipeline(*load_pretrained(path))
    return Pipeline(*load_model(path, ema=ema))


def missing_vae(path: str | os.PathLike) -> ConfigError:
    """The error for a MAR folder given without its autoencoder: what to convert and pass."""
    return ConfigError(
        f"{path} holds MAR's model alone; its tokens are latents of MAR's KL-16 "
        "autoencoder, a checkpoint of its own (kl16.ckpt). Convert it with `fluid convert "
        "ldm --mar kl16.ckpt VAE/` and pass the folder: fluid.load(..., vae='VAE/'), or "
        "`fluid sample ... --vae VAE/`."
    )


def mar_pipeline(path: str | os.PathLike | MarFolder, *, vae: str | os.PathLike | None,
                 ema: bool = True) -> Pipeline:
    """`load` for a MAR folder (`fluid convert mar`; or the `MarFolder` that
    `fluid.convert.read_mar_folder` read from one): `fluid.build.mar_model` over its weights
    with the `kl` tokenizer of `vae`, the caption tokenizer `ClassLabelTokenizer` and the
    config `fluid.presets.mar_converted` describes it with."""
    folder = path if isinstance(path, MarFolder) else None
    path = folder.folder if folder is not None else os.fspath(path)
    if vae is None:
        raise missing_vae(path)
    folder = folder or read_mar_folder(path)
    if not ema and folder.config["weights"] == "model_ema":
        raise ConfigError(
            f"{path} holds MAR's EMA weights (chosen when it was converted); for the raw "
            "ones convert the checkpoint again with `fluid convert mar --weights model`."
        )
    spec = mar_tokenizer_spec(folder, vae)
    config = mar_converted(folder.config["architecture"], num_heads=folder.num_heads,
                           tokenizer=spec, batch_mul=folder.config["batch_mul"],
                           sampling_steps=folder.config["sampling_steps"])
    model = mar_model(folder.tensors, tokenizer=KLTokenizer(**spec.kwargs),
                      text_len=config.model.text_len,
                      caption_dropout=config.model.caption_dropout, **folder.load_kwargs)
    return Pipeline(model, ClassLabelTokenizer(model.text_encoder.num_classes), config)


def mar_tokenizer_spec(folder: MarFolder, vae: str | os.PathLike) -> ComponentSpec:
    """The `kl` tokenizer that makes the tokens of the MAR model in `folder` from the
    autoencoder folder `vae`: `image_size` and `patch_size` follow from the model's token
    grid and channels and the autoencoder's latent channels and downsampling.

    **Raises:**

    `MissingInputError` if `vae` is not a folder; `ConfigError` if its latents do not make
    the model's tokens; `WeightError` if it is not an `AutoencoderKL` folder.
    """
    vae = os.fspath(vae)
    if not os.path.isdir(vae):
        raise MissingInputError(f"{vae}: no such folder; `fluid convert ldm --mar kl16.ckpt "
                                f"{vae}` writes one from MAR's autoencoder.")
    arch, args = folder.config["architecture"], folder.config.get("mar_args") or {}
    token_dim, seq_len = arch["token_dim"], arch["seq_len"]
    kl = read_kl_config(vae)
    channels = kl["latent_channels"]
    # MAR's tokens are patch x patch cells of latents: token_dim = patch**2 * vae_embed_dim.
    patch = math.isqrt(token_dim // channels) if token_dim >= channels else 0
    trained_on = args.get("vae_embed_dim")
    if patch * patch * channels != token_dim or trained_on not in (None, channels):
        why = (f"it was trained on latents of {trained_on} channels (its vae_embed_dim)"
               if trained_on not in (None, channels) else
               f"patches of p x p latent cells have p*p*{channels} channels, never {token_dim}")
        raise ConfigError(
            f"the MAR model {folder.folder} takes tokens of {token_dim} channels, and the "
            f"autoencoder {vae} makes latents of {channels} channels: {why}. Give the "
            "autoencoder the model was trained with (MAR's kl16.ckpt for its released models, "
            "converted with `fluid convert ldm --mar`)."
        )
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ConfigError(f"the MAR model {folder.folder} has {seq_len} tokens, not a square "
                          "grid; fluid's tokenizers make square grids.")
    return ComponentSpec(name="kl", kwargs={"image_size": side * patch * kl["downsampling"],
                                            "patch_size": patch, "path": vae})


def _check_class_prompts(text_tokenizer: ClassLabelTokenizer, prompts: Sequence[str]) -> None:
    """Refuse a prompt that is not a class number (or `""`) of a class-conditional model."""
    for p in prompts:
        text = p.strip()
        if text and not (text.isascii() and text.isdigit()):
            raise ConfigError(
                f"this model is class-conditional ({text_tokenizer.num_classes} classes), not "
                f"a text one: a prompt is a class number ('207'), or '' for no class; got "
                f"{p!r}."
            )
        if text:
            text_tokenizer.label(text)  # in range, or refused naming the range
