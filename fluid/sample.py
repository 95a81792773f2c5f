"""Sampling images from captions: the jitted whole-loop entry point."""

from collections.abc import Sequence

import equinox as eqx
import jax.random as jr
import numpy as np

from ._types import Key
from .model import FluidModel
from .text import CaptionTokenizer


@eqx.filter_jit
def _generate(model, ids, mask, key, steps, cfg, cfg_schedule, temperature):
    return model.generate(
        ids, mask, key=key, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
        temperature=temperature,
    )


def sample_images(
    model: FluidModel,
    text_tokenizer: CaptionTokenizer,
    prompts: Sequence[str],
    *,
    text_len: int,
    key: Key | None = None,
    steps: int = 64,
    cfg: float = 3.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
) -> np.ndarray:
    """Images `[len(prompts), h, w, 3]` in [-1, 1], one per prompt, by one jitted call.

    **Arguments:**

    - `model`: a trained model (its EMA weights, typically).
    - `text_tokenizer`: the tokenizer it was trained with.
    - `prompts`: captions; the empty string asks for an unconditional sample.
    - `text_len`: caption length the model was trained with (`ModelConfig.text_len`).
    - the rest: as `FluidModel.generate`.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string.")
    if len(prompts) == 0:
        raise ValueError("give at least one prompt.")
    ids, mask = text_tokenizer.encode(list(prompts), text_len)
    key = jr.key(0) if key is None else key
    steps = min(steps, model.seq_len)
    out = _generate(model, ids, mask, key, steps, float(cfg), cfg_schedule, float(temperature))
    return np.asarray(out)
