"""Training a generative model: the `FluidModel` that `config.model` describes, on captioned
images (or their cached tokens)."""

import functools
import time
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.typing import DTypeLike

from .. import viz
from ..build import abstract_model, build_model
from ..config import to_dict
from ..model import FluidModel
from ..nn import has_lora, lora_mask
from ..run import RunFolder, copy_weights, load_source, save_model_file
from ..sample import sample_images
from ..train import AbstractObjective
from ._cache import cache_fingerprint, cached_source
from ._data import caption_tokenizer, demo_prompts, fit_images, grid_captions
from ._recipe import Recipe


def resolve_precision(precision: str) -> jnp.dtype:
    """The backbone's compute dtype for a `TrainConfig.precision`.

    `"auto"` is bfloat16 on accelerators and float32 on CPU, where bfloat16 matmuls are
    emulated and measure slower (`benchmarks/throughput.py --precision`).
    """
    if precision == "auto":
        precision = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(precision)


def cast_backbone(model: FluidModel, dtype: DTypeLike) -> FluidModel:
    """`model` with the backbone's floating-point parameters in `dtype` (for its compute)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return model

    def cast(x):
        return x.astype(dtype) if eqx.is_inexact_array(x) else x

    return eqx.tree_at(lambda m: m.backbone, model, jax.tree.map(cast, model.backbone))


def trainable_mask(model: FluidModel, freeze: Sequence[str] = ()):
    """True at the floating-point leaves of a `FluidModel` the optimiser updates: the image
    tokenizer is always frozen; the text encoder unless it declares itself trainable;
    integer buffers (the empty caption) never train. A backbone with LoRA adapters
    (`ModelConfig.lora_rank`) trains its adapters alone; the parts named in `freeze`
    (`TrainConfig.freeze`, of `fluid.config.FREEZABLE`) do not train at all."""
    mask = jtu.tree_map(eqx.is_inexact_array, model)
    frozen = lambda tree: jtu.tree_map(lambda _: False, tree)
    mask = eqx.tree_at(lambda m: m.tokenizer, mask, replace=frozen(model.tokenizer))
    if not model.text_encoder.trainable:
        mask = eqx.tree_at(lambda m: m.text_encoder, mask, replace=frozen(model.text_encoder))
    if has_lora(model.backbone):
        mask = eqx.tree_at(lambda m: m.backbone, mask, replace=lora_mask(model.backbone))
    for part in freeze:
        mask = eqx.tree_at(lambda m, p=part: getattr(m, p), mask,
                           replace=frozen(getattr(model, part)))
    return mask


def _reads_other_captions(config, source) -> bool:
    # Whether a tokenizer made for this run would differ from the source's: another text
    # encoder, or other captions to fit one to.
    data = ("dataset", "path", "categories", "layout", "size", "seed")
    return config.model.text_encoder != source.model.text_encoder or any(
        getattr(config.data, k) != getattr(source.data, k) for k in data
    )


class FluidObjective(AbstractObjective):
    """`FluidModel.loss_terms` with the backbone computing in `dtype` (float32 master
    weights; the head and the loss stay float32)."""

    dtype: jnp.dtype = eqx.field(static=True, default=jnp.dtype(jnp.float32))

    def loss_terms(self, model, batch, keys):
        return cast_backbone(model, self.dtype).loss_terms(batch, keys=keys)


class GenerateRecipe(Recipe):
    """`task="generate"`: the `FluidModel` that `config.model` describes, trained on
    captioned images, or on their tokens when `config.data.cache` names a token cache; its
    backbone computes in `config.precision`. It saves the EMA model with the caption
    tokenizer, and its report samples the demo prompts."""

    name = "generate"
    reads_captions = True
    # What `config.init_from` names, read when a fresh run starts (`_text_tokenizer`).
    _init_source = None

    def _text_tokenizer(self, reuse):
        # A fine-tuning run (`init_from`) reads captions as its source did: the text
        # embedding was trained on that vocabulary. A resumed run (`reuse`) continues from its
        # checkpoint, with the tokenizer it saved, and reads no source.
        if reuse or self.config.init_from is None:
            return super()._text_tokenizer(reuse)
        source = self._init_source = load_source(self.config.init_from)
        tokenizer = source.text_tokenizer
        saved = self.folder.text_tokenizer if self.folder is not None else None
        if saved is not None and self.is_main:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(saved)
        if self.is_main:
            print(f"init_from: starting from {source.description}")
            note = ""
            if _reads_other_captions(self.config, source.config):
                note = ("; the new data or text encoder would have another one: kept the "
                        "source's, which its text embedding was trained with")
            print(f"init_from: captions are read with the source's caption tokenizer "
                  f"(vocabulary {tokenizer.vocab_size}){note}")
        return tokenizer

    def builder(self, *, key):
        config = self.config
        images = fit_images(self.source, config.data.fit_images)
        build = functools.partial(build_model, config.model, text_tokenizer=self.text_tokenizer,
                                  key=key, fit_images=images)
        if self._init_source is not None:
            # Built on the host, the source's arrays copied in by name, then placed.
            model, report = copy_weights(build(), self._init_source.model,
                                         strict=config.init_strict, source_name=config.init_from)
            if self.is_main:
                print("\n".join(report.lines()))
            return model
        if any("path" in spec.kwargs for spec in (config.model.tokenizer,
                                                   config.model.text_encoder)):
            # Pretrained weights read from files: under jit they would become constants of
            # the compiled program; build on the host, then place.
            return build()
        return build

    @classmethod
    def abstract_model(cls, config, *, source=None):
        if source is None:
            return abstract_model(config.model)
        vocab = caption_tokenizer(source, config.model).vocab_size
        return abstract_model(config.model, text_vocab_size=vocab)

    def objective(self):
        return FluidObjective(resolve_precision(self.config.precision))

    def trainable(self, model):
        return trainable_mask(model, self.config.freeze)

    def training_source(self, model):
        config = self.config
        if not config.data.cache:
            return self.source
        fingerprint = cache_fingerprint(
            model, to_dict(config.data), self.text_tokenizer, config.model.text_len
        )
        return cached_source(
            config.data.cache, self.source, model, self.text_tokenizer,
            fingerprint=fingerprint, text_len=config.model.text_len, progress=self.progress,
        )

    def sample_images(self, prompts: Sequence[str]) -> np.ndarray:
        """The EMA model's samples of `prompts` at the run's sampling settings."""
        config = self.config
        return sample_images(
            self.model(ema=True), self.text_tokenizer, list(prompts),
            text_len=config.model.text_len, key=jr.key(config.seed + 1),
            steps=config.sample_steps, cfg=config.sample_cfg,
            temperature=config.sample_temperature,
        )

    def sample_grid(self, prompts=None, *, path=None):
        if path is None:
            if self.folder is None:
                return None
            path = self.folder.sample_grid(self.step)
        prompts = list(prompts or demo_prompts(self.text_tokenizer))
        images = self.sample_images(prompts)
        if not self.is_main:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        captions = grid_captions(self.text_tokenizer, prompts)
        return viz.save_grid(images, path, captions=captions, cols=4)

    def write_model(self, model, directory):
        folder = RunFolder(directory)
        self.text_tokenizer.save(folder.text_tokenizer)
        # With its step and checksum beside it (`model.json`), verified by `load_model`.
        save_model_file(folder.model, model, step=self.step)

    def report(self):
        t0 = time.perf_counter()
        grid = self.sample_grid(path=self.folder.samples)
        return {
            "sample_seconds": time.perf_counter() - t0,
            "samples": str(grid),
            "model": str(self.folder.model),
        }
