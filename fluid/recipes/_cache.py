"""Tokens and frozen text embeddings computed once, stored as files, and trained from.

A frozen tokenizer (and a frozen text encoder) gives the same output for an image (caption)
every epoch, so MAR precomputed its KL latents once, which halved its training time. Here
`build_cache` runs the model's tokenizer over every record of a finite source (and, when the
text encoder is frozen, the encoder over every caption) and writes, in one directory:

    tokens.npy        [n, seq, token_dim] float32, or [n, seq] int32 for discrete tokens
    posterior.npy     in place of tokens.npy for a tokenizer that samples its posterior
                      (`samples_posterior`: a KL tokenizer with `sample_posterior`):
                      [n, views, ...] float32, its `posterior_moments` of each image and,
                      with flips, of its horizontal flip (a KL tokenizer's mean and
                      log-variance: [n, 2, 2, lh, lw, latent], four times the floats of
                      tokens.npy), from which training draws fresh tokens every step (its
                      `draw_tokens`), as MAR does
    text_hidden.npy   [n, text_len, text_dim] float32 (frozen text encoders only)
    captions.json     the n captions
    valid.npy         [n] bool: False where the record could not be read (skipped)
    fingerprint.json  what the cache was computed with (see `cache_fingerprint`)

The directory appears complete or not at all (written under a temporary name, then renamed).
`CachedSource` reads it back as a random-access source for the `Loader`, records holding
`tokens` or `posterior` (and `text_hidden`) instead of `image`. A cache made with another tokenizer, data
or text set-up is refused with the first difference named, never silently used.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from ..data import BadRecord
from ..model import FluidModel
from ..text import CaptionTokenizer

# 2: the digest of a part covers its plain settings (static fields), not its arrays alone.
CACHE_VERSION = 2
_FILES = ("captions.json", "valid.npy", "fingerprint.json")
# What a cache of posterior moments records in its fingerprint (`"posterior"`), by
# `data.flip`: with flips it holds two views of each image (MAR's), without one; a cache of
# tokens has no such entry, so caches built before the option stay valid.
POSTERIOR_VIEWS = {True: "the posterior moments of each image and of its horizontal flip",
                   False: "the posterior moments of each image"}


class CacheMismatchError(ValueError):
    """A cache directory computed with another tokenizer, data set or text set-up."""


_PLAIN = (bool, int, float, str, type(None))


def _settings(module: Any, prefix: str = "") -> dict[str, Any]:
    """The plain values of a module's fields, static ones included, by dotted name: what
    changes a part's output without changing its arrays (a latent scale, a patch size,
    sampling the posterior)."""
    out: dict[str, Any] = {}
    if isinstance(module, eqx.Module):
        items = [(f.name, getattr(module, f.name, None)) for f in dataclasses.fields(module)]
    elif isinstance(module, (list, tuple)) and not all(isinstance(x, _PLAIN) for x in module):
        items = [(str(i), x) for i, x in enumerate(module)]
    elif isinstance(module, dict):
        items = [(str(k), v) for k, v in sorted(module.items())]
    else:
        return out
    for name, value in items:
        if isinstance(value, _PLAIN) or (
            isinstance(value, tuple) and all(isinstance(x, _PLAIN) for x in value)
        ):
            out[f"{prefix}{name}"] = value
        else:
            out.update(_settings(value, f"{prefix}{name}."))
    return out


def _arrays_digest(module: Any) -> str:
    """A digest of a part's class, plain settings and arrays."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_settings(module), sort_keys=True, default=repr).encode())
    for leaf in jax.tree.leaves(eqx.filter(module, eqx.is_array)):
        leaf = np.asarray(jax.device_get(leaf))
        digest.update(f"{leaf.dtype}{leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def cache_fingerprint(
    model: FluidModel, data: dict[str, Any], text_tokenizer: CaptionTokenizer, text_len: int
) -> dict[str, Any]:
    """What a cache's contents depend on: the data (its config, as a dict, without the keys
    that only change how it is read), the tokenizer's class, settings and weights, and, when
    the text encoder is frozen, the caption tokenizer, text length and the encoder's settings
    and weights. A model whose tokenizer samples its posterior (`FluidModel.samples_posterior`)
    adds `"posterior"`: its cache holds moments, not tokens, of each image and, with
    `data.flip`, of its flip (`POSTERIOR_VIEWS`)."""
    ignored = {"cache", "workers", "shuffle", "flip", "fit_images", "on_change"}
    fingerprint = {
        "version": CACHE_VERSION,
        "data": {k: v for k, v in sorted(data.items()) if k not in ignored},
        "tokenizer": f"{type(model.tokenizer).__name__}:{_arrays_digest(model.tokenizer)}",
        "text": None,
    }
    if model.samples_posterior:
        fingerprint["posterior"] = POSTERIOR_VIEWS[bool(data.get("flip"))]
    if not model.text_encoder.trainable:
        fingerprint["text"] = {
            "encoder": f"{type(model.text_encoder).__name__}:{_arrays_digest(model.text_encoder)}",
            "tokenizer": hashlib.sha256(text_tokenizer.to_bytes()).hexdigest()[:16],
            "text_len": text_len,
        }
    return json.loads(json.dumps(fingerprint))


def _first_difference(saved: dict, now: dict, prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} (cached: {a!r}, now: {b!r})"
    return None


@eqx.filter_jit
def _encode(model: FluidModel, images, ids, mask, with_text: bool, views: int):
    if views:
        tokens = jax.vmap(lambda x: model.tokenizer.posterior_moments(x, views))(images)
    else:
        tokens = model.encode_images(images)
    hidden = jax.vmap(model.text_encoder)(ids, mask) if with_text else None
    return tokens, hidden


def build_cache(
    directory: str | os.PathLike,
    source: Any,
    model: FluidModel,
    text_tokenizer: CaptionTokenizer,
    *,
    fingerprint: dict[str, Any],
    text_len: int,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Encode every record of `source` with `model`'s tokenizer (and frozen text encoder)
    into `directory`, which must not exist yet: its tokens or, when `fingerprint` has a
    `"posterior"` entry (a tokenizer that samples its posterior), the posterior moments of
    each image and of its horizontal flip (the tokenizer's `posterior_moments`). Unreadable
    records are marked invalid with a
    warning, as the loader would skip them. Returns the directory."""
    directory = Path(directory)
    n = len(source)
    if n >= 2**31 - 1:
        raise ValueError(
            "cannot cache an unbounded data set: give the shapes set a size (data.size=50000, "
            "say), or cache a folder or JSONL source."
        )
    with_text = fingerprint["text"] is not None
    moments = fingerprint.get("posterior") is not None
    views = (2 if fingerprint["posterior"] == POSTERIOR_VIEWS[True] else 1) if moments else 0
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    token_shape = (model.seq_len,) + (
        () if model.tokenizer.token_kind == "discrete" else (model.tokenizer.token_dim,)
    )
    if moments:  # [views, ...]: what the tokenizer's posterior_moments gives
        size = model.tokenizer.image_size
        token_shape = jax.eval_shape(
            lambda x: model.tokenizer.posterior_moments(x, views),
            jax.ShapeDtypeStruct((size, size, 3), jnp.float32),
        ).shape
    token_dtype = np.int32 if model.tokenizer.token_kind == "discrete" else np.float32
    name = "posterior.npy" if moments else "tokens.npy"
    tokens = open_memmap(tmp / name, mode="w+", dtype=token_dtype, shape=(n, *token_shape))
    hidden = None
    if with_text:
        shape = (n, text_len, model.text_encoder.dim)
        hidden = open_memmap(tmp / "text_hidden.npy", mode="w+", dtype=np.float32, shape=shape)
    valid = np.ones(n, bool)
    captions = [""] * n
    blank = None
    for start in tqdm(range(0, n, batch_size), disable=not progress, unit="batch",
                      desc=f"caching {n} records"):
        stop = min(start + batch_size, n)
        images = []
        for i in range(start, stop):
            try:
                item = source[i]
            except BadRecord as error:
                warnings.warn(f"cache: skipped {error}", stacklevel=2)
                valid[i] = False
                images.append(None)
                continue
            captions[i] = item["caption"]
            images.append(np.asarray(item["image"], np.float32))
            blank = images[-1] if blank is None else blank
        if blank is None:  # nothing readable yet: leave these rows invalid
            continue
        # A fixed batch shape (padding with a readable image) compiles the encoder once.
        padded = [blank if x is None else x for x in images]
        padded += [blank] * (batch_size - len(padded))
        ids, mask = text_tokenizer.encode(
            [captions[i] for i in range(start, stop)] + [""] * (batch_size - (stop - start)),
            text_len,
        )
        out_tokens, out_hidden = _encode(model, np.stack(padded), ids, mask, with_text, views)
        tokens[start:stop] = np.asarray(out_tokens)[: stop - start]
        if with_text:
            hidden[start:stop] = np.asarray(out_hidden)[: stop - start]
    if not valid.any():
        shutil.rmtree(tmp)
        raise ValueError("no record of the data source could be read; nothing to cache.")
    tokens.flush()
    if hidden is not None:
        hidden.flush()
    del tokens, hidden
    np.save(tmp / "valid.npy", valid)
    (tmp / "captions.json").write_text(json.dumps(captions))
    (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    os.replace(tmp, directory)  # the cache appears whole, or not at all
    return directory


class CachedSource:
    """A cache directory as a random-access source: record `i` is the `i`-th readable one,
    a dict with `tokens` (or, in a cache of posterior moments, `posterior`: `[2, 2, lh, lw,
    latent]`, the image's and its flip's mean and log-variance), `caption` and, if cached,
    `text_hidden`.

    **Arguments:**

    - `directory`: what `build_cache` wrote.
    - `fingerprint`: if given, the cache must have been made with exactly this
      (`cache_fingerprint`); otherwise `CacheMismatchError` names the first difference.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any] | None = None):
        self.directory = Path(directory)
        missing = [f for f in _FILES if not (self.directory / f).exists()]
        saved = {}
        if not missing:
            saved = json.loads((self.directory / "fingerprint.json").read_text())
            # A cache of posterior moments holds them in place of tokens.
            self.field = "posterior" if saved.get("posterior") else "tokens"
            if not (self.directory / f"{self.field}.npy").exists():
                missing.append(f"{self.field}.npy")
        if missing:
            raise FileNotFoundError(
                f"{self.directory} is not a complete token cache (missing {', '.join(missing)}); "
                "delete it and it is rebuilt on the next run."
            )
        if fingerprint is not None:
            if saved.get("posterior") != fingerprint.get("posterior"):
                held, wanted = (x or "tokens" for x in (saved.get("posterior"),
                                                         fingerprint.get("posterior")))
                raise CacheMismatchError(
                    f"the token cache {self.directory} holds {held}, but this run trains on "
                    f"{wanted} (the tokenizer's sample_posterior and data.flip decide): "
                    "delete it to rebuild, or set data.cache to a new directory."
                )
            difference = _first_difference(saved, fingerprint)
            if difference:
                raise CacheMismatchError(
                    f"the token cache {self.directory} was computed with other settings: "
                    f"{difference}. Delete it to rebuild, or set data.cache to a new directory."
                )
        self.fingerprint = saved
        self.tokens = np.load(self.directory / f"{self.field}.npy", mmap_mode="r")
        path = self.directory / "text_hidden.npy"
        self.text_hidden = np.load(path, mmap_mode="r") if path.exists() else None
        self.captions = json.loads((self.directory / "captions.json").read_text())
        self.index = np.flatnonzero(np.load(self.directory / "valid.npy"))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.index[i])
        record = {self.field: np.array(self.tokens[j]), "caption": self.captions[j]}
        if self.text_hidden is not None:
            record["text_hidden"] = np.array(self.text_hidden[j])
        return record

    def caption(self, i: int) -> str:
        return self.captions[int(self.index[i])]

    def __getstate__(self):  # memmaps reopen in worker processes rather than pickle
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.__init__(state["directory"])


def cached_source(
    directory: str | os.PathLike,
    source: Any,
    model: FluidModel,
    text_tokenizer: CaptionTokenizer,
    *,
    fingerprint: dict[str, Any],
    text_len: int,
    progress: bool = True,
) -> CachedSource:
    """The cache at `directory`, built first if it does not exist (by process 0, the others
    waiting for it on a shared file system)."""
    directory = Path(directory)
    if not directory.exists() and jax.process_index() == 0:
        build_cache(directory, source, model, text_tokenizer, fingerprint=fingerprint,
                    text_len=text_len, progress=progress)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fluid token cache")
    return CachedSource(directory, fingerprint)
