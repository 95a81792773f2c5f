"""The T5 encoder (Raffel et al., 2020) as Hugging Face `transformers` computes it.

Fluid conditions on a frozen T5-XXL. This module is `T5EncoderModel`'s forward pass, written
anew in JAX: a token embedding shared with the (absent) decoder and not scaled, pre-norm
blocks of self-attention and a feed-forward network, T5's RMS norm (no mean, no bias,
statistics in float32), attention without the 1/sqrt(d) scaling, and one relative position
bias computed from layer 0's table and added in every layer. Weights come from a Hugging
Face folder (`config.json` and `*.safetensors`) without torch and without unpickling.
"""

import math
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_dtypes
import numpy as np
from jaxtyping import Array, Bool, Float

from .._types import Key, TextIds, TextMask
from .._weights import StateDict, WeightError, read_config, read_folder_weights
from ..nn import stacked_field
from ._abstract import AbstractTextEncoder
from ._caption_tokenizer import AbstractCaptionTokenizer
from ._t5_tokenizer import T5CaptionTokenizer

# transformers' ACT2FN names; "gated-gelu" means the tanh approximation ("gelu_new"), as
# T5 v1.1 and Flan-T5 were trained with, while a plain "gelu" is the exact one.
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
# float16 is left out on purpose: T5's activations overflow it (transformers keeps `wo` in
# float32 and clamps infinities to cope); bfloat16 has float32's range.
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# A random encoder (no `path`) is tiny unless told otherwise: it exists for tests and demos.
_RANDOM_DEFAULTS = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
}
_MODEL_TYPES = ("t5", "mt5")  # mT5 is T5 v1.1's architecture; umT5's per-layer biases are not


def _feed_forward(proj: str) -> tuple[str, bool]:
    """`(activation, gated)` of a `feed_forward_proj` string, as `T5Config` parses it."""
    parts = proj.split("-")
    gated = parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {proj!r}.")
    activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"feed_forward_proj {proj!r}: unknown activation {activation!r} "
            f"(known: {', '.join(_ACTIVATIONS)})."
        )
    return activation, gated


def _rms_norm(x: Float[Array, "ctx d_model"], weight: Float[Array, " d_model"], eps: float):
    # T5LayerNorm: mean of squares in float32 whatever the dtype, no mean subtracted, no bias.
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return weight[None, :] * (x32 * jax.lax.rsqrt(variance + eps)).astype(weight.dtype)


def relative_position_buckets(ctx: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucket of every (query, key) pair, `int32 [ctx, ctx]`.

    Half the buckets are for keys after the query, half for keys before (or at) it; in each
    half, distances below a quarter of `num_buckets` get a bucket each, longer ones share
    logarithmically wider buckets, and distances from `max_distance` on share the last.

    Computed with NumPy on the host (`ctx` is static): the bucket is a float32 logarithm
    truncated to an integer, so a device whose `log` rounds differently could move a
    boundary; this order of float32 operations is the one of Mesh TensorFlow and
    `transformers`.
    """
    pos = np.arange(ctx, dtype=np.int32)
    relative = pos[None, :] - pos[:, None]  # key position minus query position
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
            / np.float32(math.log(max_distance / exact))
            * np.float32(half - exact)
        )
    large = np.minimum(exact + scaled.astype(np.int32), half - 1)
    buckets = np.where(relative > 0, half, 0) + np.where(distance < exact, distance, large)
    return buckets.astype(np.int32)


# The layers are a parameter container built two ways (random, stacked under vmap; or from
# checkpoint arrays already stacked), so it keeps the dataclass constructor; leaves carry a
# leading `layers` axis when held by the encoder and lose it inside `jax.lax.scan`.
@typing.final
class _T5Layer(eqx.Module):
    """One encoder block: pre-norm self-attention, then a pre-norm feed-forward network.

    Matrices keep the `[out, in]` layout of the checkpoint. `wi` is the activated input
    projection (`wi`, or `wi_0` when gated) and `wi_linear` the gated variant's linear one
    (`wi_1`), `None` otherwise.
    """

    attn_norm: Float[Array, "*layers d_model"]
    q: Float[Array, "*layers inner d_model"]
    k: Float[Array, "*layers inner d_model"]
    v: Float[Array, "*layers inner d_model"]
    o: Float[Array, "*layers d_model inner"]
    ff_norm: Float[Array, "*layers d_model"]
    wi: Float[Array, "*layers d_ff d_model"]
    wi_linear: Float[Array, "*layers d_ff d_model"] | None
    wo: Float[Array, "*layers d_model d_ff"]
    num_heads: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __call__(
        self,
        h: Float[Array, "ctx d_model"],
        bias: Float[Array, "heads ctx ctx"],
        mask: Bool[Array, " ctx"],
    ) -> Float[Array, "ctx d_model"]:
        ctx = h.shape[0]
        x = _rms_norm(h, self.attn_norm, self.eps)
        q, k, v = (
            (x @ w.T).reshape(ctx, self.num_heads, -1) for w in (self.q, self.k, self.v)
        )
        # No 1/sqrt(d_kv): T5 folds that scale into its initialisation of `q`.
        logits = jnp.einsum("qhd,khd->hqk", q, k).astype(jnp.float32) + bias
        # The lowest finite float, not -inf: padding keys get exactly zero weight and a
        # caption with no real token cannot turn into NaN.
        lowest = jnp.asarray(jnp.finfo(jnp.float32).min, jnp.float32)
        logits = jnp.where(mask[None, None, :], logits, lowest)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attended = jnp.einsum("hqk,khd->qhd", weights, v).reshape(ctx, -1)
        h = h + attended @ self.o.T

        x = _rms_norm(h, self.ff_norm, self.eps)
        hidden = _ACTIVATIONS[self.activation](x @ self.wi.T)
        if self.wi_linear is not None:
            hidden = hidden * (x @ self.wi_linear.T)
        return h + hidden @ self.wo.T


def _normal(key: Key, shape: tuple[int, ...], std: float) -> Float[Array, "..."]:
    return std * jr.normal(key, shape)


# One compilation per configuration (ints and strings are static under filter_jit):
# initialising eagerly compiles every primitive of every shape one by one.
@eqx.filter_jit
def _random_layers(
    num_layers, d_model, d_kv, d_ff, num_heads, activation, gated, eps, dtype, key
) -> _T5Layer:
    inner = d_kv * num_heads

    def make(key):
        kq, kk, kv, ko, ki, kl, kw = jr.split(key, 7)
        # transformers' `_init_weights` at initializer_factor 1.
        return _T5Layer(
            attn_norm=jnp.ones((d_model,), dtype),
            q=_normal(kq, (inner, d_model), (d_model * d_kv) ** -0.5).astype(dtype),
            k=_normal(kk, (inner, d_model), d_model**-0.5).astype(dtype),
            v=_normal(kv, (inner, d_model), d_model**-0.5).astype(dtype),
            o=_normal(ko, (d_model, inner), inner**-0.5).astype(dtype),
            ff_norm=jnp.ones((d_model,), dtype),
            wi=_normal(ki, (d_ff, d_model), d_model**-0.5).astype(dtype),
            wi_linear=_normal(kl, (d_ff, d_model), d_model**-0.5).astype(dtype) if gated else None,
            wo=_normal(kw, (d_model, d_ff), d_ff**-0.5).astype(dtype),
            num_heads=num_heads,
            activation=activation,
            eps=eps,
        )

    return eqx.filter_vmap(make)(jr.split(key, num_layers))


@typing.final
class T5TextEncoder(AbstractTextEncoder):
    """The encoder of T5 (`transformers.T5EncoderModel`), frozen by default.

    Outputs the final-layer-normed hidden states (`last_hidden_state`) at real tokens and
    zero at padding; padding keys are masked in every attention, so padding ids never
    reach a real position. T5's relative positions need no maximum length.

    With `path`, everything comes from a Hugging Face folder: a `T5EncoderModel` or a whole
    `T5ForConditionalGeneration` (its decoder and `lm_head` are ignored), `config.json` plus
    `*.safetensors` (sharded or not). The architecture arguments must then be left unset.
    Without `path`, a randomly initialised encoder (transformers' initialisation) of the
    given shape; unset arguments take tiny defaults (width 32, 2 layers of 4 heads of 8,
    feed-forward 64, gated GELU, 32 buckets, maximum distance 128).

    **Arguments:**

    - `vocab_size`: the id space the caption tokenizer uses. Required without `path`; with
      it, at most the checkpoint's number of embeddings (T5 rounds its 32,100 ids up to
      32,128 rows), which becomes `vocab_size`.
    - `d_model`: width (`dim`).
    - `d_kv`: width of one attention head.
    - `d_ff`: hidden width of the feed-forward network.
    - `num_layers`: number of blocks.
    - `num_heads`: attention heads.
    - `relative_attention_num_buckets`, `relative_attention_max_distance`: the relative
      position buckets.
    - `feed_forward_proj`: `"relu"` (the original T5) or `"gated-gelu"` (T5 v1.1,
      Flan-T5), or any `"ACT"`/`"gated-ACT"` with ACT in relu, gelu, gelu_new, silu.
    - `layer_norm_epsilon`: epsilon of the RMS norms.
    - `path`: a Hugging Face-format folder to load.
    - `dtype`: `"float32"` or `"bfloat16"`, of the parameters and the computation (norm
      statistics and attention softmax always run in float32).
    - `trainable`: whether the trainer updates it; `False` freezes it.
    - `max_len`: accepted so the builder can pass the caption length; unused.
    - `key`: initialisation key; required without `path`, ignored with it.
    """

    embed: Float[Array, "vocab d_model"]
    relative_bias: Float[Array, "buckets heads"]
    layers: _T5Layer = stacked_field()
    final_norm: Float[Array, " d_model"]
    vocab_size: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    relative_attention_num_buckets: int = eqx.field(static=True)
    relative_attention_max_distance: int = eqx.field(static=True)
    feed_forward_proj: str = eqx.field(static=True)
    trainable: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        vocab_size: int | None = None,
        d_model: int | None = None,
        d_kv: int | None = None,
        d_ff: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        relative_attention_num_buckets: int | None = None,
        relative_attention_max_distance: int | None = None,
        feed_forward_proj: str | None = None,
        layer_norm_epsilon: float | None = None,
        path: str | os.PathLike | None = None,
        dtype: str = "float32",
        trainable: bool = False,
        max_len: int | None = None,
        *,
        key: Key | None = None,
    ):
        del max_len
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
        arch = {
            "d_model": d_model,
            "d_kv": d_kv,
            "d_ff": d_ff,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "relative_attention_num_buckets": relative_attention_num_buckets,
            "relative_attention_max_distance": relative_attention_max_distance,
            "feed_forward_proj": feed_forward_proj,
            "layer_norm_epsilon": layer_norm_epsilon,
        }
        self.trainable = trainable
        if path is not None:
            given = [name for name, value in arch.items() if value is not None]
            if given:
                raise TypeError(
                    f"T5TextEncoder: {', '.join(given)} come from {path}/config.json; pass "
                    "either `path` or the architecture, not both."
                )
            params, arch = _load(os.fspath(path), _DTYPES[dtype])
            if vocab_size is not None and vocab_size > arch["vocab_size"]:
                raise ValueError(
                    f"the caption tokenizer has {vocab_size} ids but {path} embeds only "
                    f"{arch['vocab_size']}; use the tokenizer of this checkpoint "
                    "(T5CaptionTokenizer on its spiece.model)."
                )
        else:
            if vocab_size is None:
                raise TypeError("T5TextEncoder needs `vocab_size` (or `path`).")
            if key is None:
                raise TypeError("T5TextEncoder needs `key` to initialise without `path`.")
            arch = {
                name: _RANDOM_DEFAULTS[name] if value is None else value
                for name, value in arch.items()
            }
            arch["vocab_size"] = vocab_size
            params = _random(arch, _DTYPES[dtype], key)
        self.embed, self.relative_bias, self.layers, self.final_norm = params
        self.vocab_size = arch["vocab_size"]
        self.dim = arch["d_model"]
        self.num_layers = arch["num_layers"]
        self.num_heads = arch["num_heads"]
        self.relative_attention_num_buckets = arch["relative_attention_num_buckets"]
        self.relative_attention_max_distance = arch["relative_attention_max_distance"]
        self.feed_forward_proj = arch["feed_forward_proj"]

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, dtype: str = "float32", trainable: bool = False
    ) -> "T5TextEncoder":
        """The encoder of a Hugging Face T5 folder (`config.json` and `*.safetensors`).

        Reads NumPy arrays and converts them; no JAX computation runs, so it may be called
        outside `jit`. Raises `WeightError` naming any missing, mis-shaped or unused key.
        """
        return cls(path=folder, dtype=dtype, trainable=trainable)

    @classmethod
    def caption_tokenizer(cls, kwargs: Mapping[str, Any]) -> AbstractCaptionTokenizer | None:
        """With `path`, the folder's own `spiece.model` (`T5CaptionTokenizer`): its
        embeddings are of that vocabulary. A random encoder (no `path`) reads any."""
        if "path" not in kwargs:
            return None
        return T5CaptionTokenizer.from_pretrained(kwargs["path"])

    def position_bias(self, ctx: int) -> Float[Array, "heads ctx ctx"]:
        """The relative position bias every layer adds to its attention logits."""
        buckets = relative_position_buckets(
            ctx, self.relative_attention_num_buckets, self.relative_attention_max_distance
        )
        return jnp.transpose(self.relative_bias[buckets], (2, 0, 1)).astype(jnp.float32)

    def __call__(self, ids: TextIds, mask: TextMask) -> Float[Array, "ctx text_dim"]:
        """The final hidden states of one caption, zero at padding positions."""
        bias = self.position_bias(ids.shape[0])
        h = self.embed[ids]
        params, static = eqx.partition(self.layers, eqx.is_array)

        def body(h, p):
            return eqx.combine(p, static)(h, bias, mask), None

        h, _ = jax.lax.scan(body, h, params)
        h = _rms_norm(h, self.final_norm, self.layers.eps)
        return jnp.where(mask[:, None], h, jnp.zeros((), h.dtype))


def _random(arch: dict, dtype: np.dtype, key: Key):
    activation, gated = _feed_forward(arch["feed_forward_proj"])
    d_model, heads = arch["d_model"], arch["num_heads"]
    k_embed, k_bias, k_layers = jr.split(key, 3)
    embed = jr.normal(k_embed, (arch["vocab_size"], d_model)).astype(dtype)
    bias = _normal(k_bias, (arch["relative_attention_num_buckets"], heads), d_model**-0.5)
    layers = _random_layers(
        arch["num_layers"], d_model, arch["d_kv"], arch["d_ff"], heads, activation, gated,
        float(arch["layer_norm_epsilon"]), dtype, k_layers,
    )
    return embed, bias.astype(dtype), layers, jnp.ones((d_model,), dtype)


def _load(folder: str, dtype: np.dtype):
    """`(embed, relative_bias, layers, final_norm)` and the architecture of a folder."""
    config = read_config(folder)
    model_type = config.get("model_type", "t5")
    if model_type not in _MODEL_TYPES:
        raise WeightError(
            f"{folder}: config.json has model_type {model_type!r}; the t5 encoder reads "
            f"{', '.join(_MODEL_TYPES)} checkpoints."
        )
    required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    missing = [name for name in required if name not in config]
    if missing:
        raise WeightError(f"{folder}: config.json lacks {', '.join(missing)}.")
    # transformers' T5Config defaults, for configs written before a field existed.
    arch = {name: int(config[name]) for name in required}
    arch["relative_attention_num_buckets"] = int(config.get("relative_attention_num_buckets", 32))
    arch["relative_attention_max_distance"] = int(
        config.get("relative_attention_max_distance", 128)
    )
    arch["feed_forward_proj"] = str(config.get("feed_forward_proj", "relu"))
    arch["layer_norm_epsilon"] = float(config.get("layer_norm_epsilon", 1e-6))
    activation, gated = _feed_forward(arch["feed_forward_proj"])

    state = StateDict(read_folder_weights(folder), source=folder)
    d, ff, heads = arch["d_model"], arch["d_ff"], arch["num_heads"]
    inner = arch["d_kv"] * heads

    def take(name, shape):
        return np.asarray(state.take(name, shape), dtype)

    # T5EncoderModel ties `encoder.embed_tokens` to `shared`; a checkpoint may hold either
    # name or both (older saves wrote both copies).
    names = [n for n in ("shared.weight", "encoder.embed_tokens.weight") if n in state]
    embed_shape = (arch["vocab_size"], d)
    embed = take(names[0] if names else "shared.weight", embed_shape)
    for other in names[1:]:
        state.take(other, embed_shape)
    bias = take(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (arch["relative_attention_num_buckets"], heads),
    )

    def stacked(suffix, shape):
        return np.stack([take(f"encoder.block.{i}.{suffix}", shape)
                         for i in range(arch["num_layers"])])

    attn, ffn = "layer.0.SelfAttention", "layer.1.DenseReluDense"
    wi = f"{ffn}.wi_0.weight" if gated else f"{ffn}.wi.weight"
    arrays = {
        "attn_norm": stacked("layer.0.layer_norm.weight", (d,)),
        "q": stacked(f"{attn}.q.weight", (inner, d)),
        "k": stacked(f"{attn}.k.weight", (inner, d)),
        "v": stacked(f"{attn}.v.weight", (inner, d)),
        "o": stacked(f"{attn}.o.weight", (d, inner)),
        "ff_norm": stacked("layer.1.layer_norm.weight", (d,)),
        "wi": stacked(wi, (ff, d)),
        "wi_linear": stacked(f"{ffn}.wi_1.weight", (ff, d)) if gated else None,
        "wo": stacked(f"{ffn}.wo.weight", (d, ff)),
    }
    final_norm = take("encoder.final_layer_norm.weight", (d,))
    # The rest of a T5ForConditionalGeneration is the decoder and the language-model head.
    state.finish(
        ignore=[n for n in state.unused() if n.startswith("decoder.") or n == "lm_head.weight"]
    )
    layers = _T5Layer(
        **{name: None if a is None else jnp.asarray(a) for name, a in arrays.items()},
        num_heads=heads,
        activation=activation,
        eps=arch["layer_norm_epsilon"],
    )
    params = (jnp.asarray(embed), jnp.asarray(bias), layers, jnp.asarray(final_norm))
    return params, arch
