"""Sampling images from captions: the jitted whole-loop entry point."""

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from ._errors import ConfigError, MissingInputError
from ._types import Key, Keys
from .model import FluidModel, sampling_switches
from .text import CaptionTokenizer


def warn_truncated(text_tokenizer: CaptionTokenizer, prompts: Sequence[str], text_len: int) -> None:
    """Warn about each prompt longer than the `text_len` tokens the model reads (it is cut)."""
    # A row is cut at `text_len` exactly when it fills a row one token longer.
    _, longer = text_tokenizer.encode(list(prompts), text_len + 1)
    cut = [p for p, row in zip(prompts, longer) if row.all()]
    if cut:
        _, full = text_tokenizer.encode(cut, 1024)
        listed = "; ".join(f"{p!r} ({int(n)} tokens)" for p, n in zip(cut, full.sum(-1)))
        warnings.warn(
            f"{len(cut)} prompt(s) are longer than the {text_len} tokens the model reads and "
            f"are cut to that length: {listed}.",
            stacklevel=3,
        )


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line (surrounding whitespace stripped, blank
    lines skipped). Raises `MissingInputError` for a missing or unreadable file and
    `ConfigError` for one without a prompt."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MissingInputError(f"cannot read the prompts file {path} ({error}); expected a "
                                "UTF-8 text file with one prompt per line.") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"the prompts file {path} has no prompt (write one per line).")
    return prompts


def _checked_steps(model: FluidModel, steps: int, cfg: float, temperature: float) -> int:
    """`steps`, at most the model's tokens (with a warning); bad settings refused."""
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}.")
    if temperature < 0:
        raise ConfigError(
            f"temperature must be >= 0 (0: the most likely token), got {temperature}."
        )
    if cfg < 0:
        raise ConfigError(f"cfg must be >= 0 (1: no guidance, 0: unconditional), got {cfg}.")
    if steps > model.seq_len:
        warnings.warn(
            f"steps={steps} is more than the model's {model.seq_len} tokens; sampling in "
            f"{model.seq_len} steps (one token each).",
            stacklevel=3,
        )
        return model.seq_len
    return steps


def _encode_negatives(text_tokenizer: CaptionTokenizer, prompts: Sequence[str],
                      negative_prompts: Sequence[str] | None,
                      text_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The negative prompts' `(ids, mask)`, one per prompt, or None; bad ones refused."""
    if negative_prompts is None:
        return None
    if isinstance(negative_prompts, str) or len(negative_prompts) != len(prompts):
        raise ConfigError(
            f"give one negative prompt per prompt ({len(prompts)}), as a sequence of "
            "strings; \"\" for a prompt that has none."
        )
    warn_truncated(text_tokenizer, negative_prompts, text_len)
    return text_tokenizer.encode(list(negative_prompts), text_len)


@eqx.filter_jit
def _generate(model, ids, mask, key, steps, cfg, cfg_schedule, temperature, negative,
              cfg_interval, head_steps, cfg_refresh):
    negative_ids, negative_mask = (None, None) if negative is None else negative
    return model.generate(
        ids, mask, key=key, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
        temperature=temperature, negative_ids=negative_ids, negative_mask=negative_mask,
        cfg_interval=cfg_interval, head_steps=head_steps, cfg_refresh=cfg_refresh,
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
    cfg_schedule: str | None = None,
    temperature: float = 1.0,
    negative_prompts: Sequence[str] | None = None,
    cfg_interval: tuple[float, float] | None = None,
    head_steps: int | Sequence[int] | None = None,
    cfg_refresh: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """Images `[len(prompts), h, w, 3]` in [-1, 1], one per prompt, by one jitted call.

    **Arguments:**

    - `model`: a trained model (its EMA weights, typically).
    - `text_tokenizer`: the tokenizer it was trained with.
    - `prompts`: captions; the empty string asks for an unconditional sample.
    - `text_len`: caption length the model was trained with (`ModelConfig.text_len`).
    - `negative_prompts`: one per prompt, read by guidance's unconditional half in place of
      the empty caption (`""`: as without one); only with `cfg != 1`.
    - `cfg_interval`, `head_steps`, `cfg_refresh`: the fast-sampling switches of
      `FluidModel.generate` (a guidance interval over progress; the head's chain, or a DiSA
      schedule of them; LazyMAR's reuse of the guidance residual between refreshes).
    - `devices`: spread the batch over these devices (`jax.local_devices()`: every device
      of this host): the prompts padded with copies of the last to a multiple of their
      number, split row by row, the model replicated on each. Row `i` draws with the key
      it draws on one device (`jr.split`'s `i`-th key depends on `i` alone), so the images
      are one device's up to floating-point rounding (each device multiplies fewer rows).
      `None` or one device: the default device, no copies.
    - the rest: as `FluidModel.generate`.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string.")
    if len(prompts) == 0:
        raise ConfigError("give at least one prompt.")
    switches = sampling_switches(model.head, cfg=cfg, negative=negative_prompts is not None,
                                 cfg_interval=cfg_interval, head_steps=head_steps,
                                 cfg_refresh=cfg_refresh, backbone=model.backbone)
    ids, mask = text_tokenizer.encode(list(prompts), text_len)
    warn_truncated(text_tokenizer, prompts, text_len)
    negative = _encode_negatives(text_tokenizer, prompts, negative_prompts, text_len)
    key = jr.key(0) if key is None else key
    steps = _checked_steps(model, steps, cfg, temperature)
    count = len(prompts)
    spread = spread_over(devices, count)
    if spread is not None:  # rows padded with copies of the last, cut off the images below
        def padded(rows):
            return np.concatenate([rows, np.repeat(rows[-1:], spread.rows - count, axis=0)])

        ids, mask, negative = jax.tree.map(padded, (ids, mask, negative))
        ids, mask, negative = jax.device_put((ids, mask, negative), spread.rows_sharding)
        key = jax.device_put(key, spread.replicated)
        model = place(model, spread.replicated)
    out = _generate(model, ids, mask, key, steps, float(cfg), cfg_schedule, float(temperature),
                    negative, *switches)
    return np.asarray(out)[:count]


class Spread(NamedTuple):
    """A batch spread over devices: `rows` (the batch padded to a multiple of the device
    count), the sharding that splits rows over the devices, and the one that replicates."""

    rows: int
    rows_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


def place(tree, sharding: jax.sharding.Sharding):
    """`tree` with its arrays put on `sharding` (`jax.device_put`: arrays committed to one
    device move too, and arrays already there are not copied)."""
    arrays, rest = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, sharding), rest)


def spread_over(devices: Sequence[jax.Device] | None, count: int) -> Spread | None:
    """How `count` rows spread over `devices`; `None` for no devices or one."""
    if devices is None or len(devices) < 2:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    rows = -(-count // len(devices)) * len(devices)
    return Spread(rows, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")),
                  jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


@eqx.filter_jit
def _generate_per_key(model, ids, mask, keys, steps, cfg, cfg_schedule, temperature, negative,
                      cfg_interval, head_steps, cfg_refresh):
    # Each image is a batch of one of its own: what it draws depends on its key alone, not on
    # its row or on the other rows (the vmap adds a batch axis, nothing crosses it).
    def one(i, m, k, n):
        negative_ids, negative_mask = (None, None) if n is None else (n[0][None], n[1][None])
        return model.generate(
            i[None], m[None], key=k, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
            temperature=temperature, negative_ids=negative_ids, negative_mask=negative_mask,
            cfg_interval=cfg_interval, head_steps=head_steps, cfg_refresh=cfg_refresh,
        )[0]

    return jax.vmap(one)(ids, mask, keys, negative)


def sample_images_per_key(
    model: FluidModel,
    text_tokenizer: CaptionTokenizer,
    prompts: Sequence[str],
    keys: Keys,
    *,
    text_len: int,
    steps: int = 64,
    cfg: float = 3.0,
    cfg_schedule: str | None = None,
    temperature: float = 1.0,
    negative_prompts: Sequence[str] | None = None,
    cfg_interval: tuple[float, float] | None = None,
    head_steps: int | Sequence[int] | None = None,
    cfg_refresh: int | None = None,
) -> np.ndarray:
    """Images `[len(prompts), h, w, 3]` in [-1, 1] by one jitted call, each drawn with its
    own key: image `i` is what `sample_images(model, text_tokenizer, [prompts[i]],
    key=keys[i], ...)` gives, whatever the other prompts and keys are. A server batches
    unrelated requests this way (`fluid.serve`).

    **Arguments:**

    - `keys`: one typed key per prompt (`jnp.stack([jr.key(0), jr.key(7)])`).
    - the rest: as `sample_images`.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string.")
    if len(prompts) == 0:
        raise ConfigError("give at least one prompt.")
    switches = sampling_switches(model.head, cfg=cfg, negative=negative_prompts is not None,
                                 cfg_interval=cfg_interval, head_steps=head_steps,
                                 cfg_refresh=cfg_refresh, backbone=model.backbone)
    if keys.shape != (len(prompts),):
        raise ConfigError(f"give one key per prompt: {len(prompts)} prompts, keys of shape "
                          f"{keys.shape}.")
    ids, mask = text_tokenizer.encode(list(prompts), text_len)
    warn_truncated(text_tokenizer, prompts, text_len)
    negative = _encode_negatives(text_tokenizer, prompts, negative_prompts, text_len)
    steps = _checked_steps(model, steps, cfg, temperature)
    out = _generate_per_key(model, ids, mask, keys, steps, float(cfg), cfg_schedule,
                            float(temperature), negative, *switches)
    return np.asarray(out)
