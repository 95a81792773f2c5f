"""CLIP (Radford et al., 2021) as Hugging Face `transformers` computes it, for evaluation.

`CLIPEncoder` is `transformers.CLIPModel`'s `get_image_features` and `get_text_features`,
written anew in JAX: a vision transformer (patch convolution without bias, a class token,
learned positions, a LayerNorm before the blocks and one on the class token after them, a
projection without bias) and a causal text transformer (token and learned position
embeddings, a final LayerNorm, the hidden state at the end-of-text token, a projection
without bias). Blocks are pre-LayerNorm with biased projections and `hidden_act` (CLIP's
`quick_gelu`, or `gelu`). Weights come from a Hugging Face `CLIPModel` folder
(`config.json` and `*.safetensors`) without torch and without unpickling; the captions'
tokenizer is the folder's own (`CLIPCaptionTokenizer`, on the host).
"""

import hashlib
import os
import typing
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._errors import MissingInputError
from .._weights import HF_CONFIG, StateDict, WeightError, read_config, read_folder_weights
from ..nn import attention_mask, dot_product_attention, stacked_field

# transformers' ACT2FN names that CLIP checkpoints use.
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
# CLIPImageProcessor's normalisation (`OPENAI_CLIP_MEAN`, `OPENAI_CLIP_STD`), used when a
# folder has no preprocessor_config.json saying otherwise.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for configs saved
# without the fields that kept their default value.
_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}
_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
# Full float32 products: a GPU's default (TF32 inputs, 10-bit mantissas) would move scores
# reported to two decimals and the parity with `transformers` (torch keeps float32 products
# by default) far past 1e-5.
_PRECISION = "highest"
# CLIP configs written before transformers fixed `eos_token_id` carry 2; for them the
# end-of-text token is found as the largest id (CLIP's EOT, 49407, is its largest).
_LEGACY_EOS_TOKEN_ID = 2


def _layer_norm(
    x: Float[Array, "*seq dim"], weight: Float[Array, " dim"], bias: Float[Array, " dim"],
    eps: float,
) -> Float[Array, "*seq dim"]:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    shape = (1,) * (x.ndim - 1) + weight.shape
    return (x - mean) * jax.lax.rsqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)


def _linear(
    x: Float[Array, "seq in"], weight: Float[Array, "out in"], bias: Float[Array, " out"]
) -> Float[Array, "seq out"]:
    return x @ weight.T + bias[None, :]


# A parameter container filled from checkpoint arrays already stacked, so it keeps the
# dataclass constructor; leaves carry a leading `layers` axis when held by a tower and lose
# it inside `jax.lax.scan`. Matrices keep the checkpoint's `[out, in]` layout.
@typing.final
class _CLIPLayer(eqx.Module):
    """One block: `h + attn(LN1(h))`, then `h + fc2(act(fc1(LN2(h))))`."""

    norm1_weight: Float[Array, "*layers dim"]
    norm1_bias: Float[Array, "*layers dim"]
    q_weight: Float[Array, "*layers dim dim"]
    q_bias: Float[Array, "*layers dim"]
    k_weight: Float[Array, "*layers dim dim"]
    k_bias: Float[Array, "*layers dim"]
    v_weight: Float[Array, "*layers dim dim"]
    v_bias: Float[Array, "*layers dim"]
    out_weight: Float[Array, "*layers dim dim"]
    out_bias: Float[Array, "*layers dim"]
    norm2_weight: Float[Array, "*layers dim"]
    norm2_bias: Float[Array, "*layers dim"]
    fc1_weight: Float[Array, "*layers hidden dim"]
    fc1_bias: Float[Array, "*layers hidden"]
    fc2_weight: Float[Array, "*layers dim hidden"]
    fc2_bias: Float[Array, "*layers dim"]
    num_heads: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __call__(
        self, h: Float[Array, "seq dim"], mask: Bool[Array, "seq seq"] | None
    ) -> Float[Array, "seq dim"]:
        seq, dim = h.shape
        x = _layer_norm(h, self.norm1_weight, self.norm1_bias, self.eps)
        q, k, v = (
            _linear(x, w, b).reshape(seq, self.num_heads, dim // self.num_heads)
            for w, b in (
                (self.q_weight, self.q_bias),
                (self.k_weight, self.k_bias),
                (self.v_weight, self.v_bias),
            )
        )
        attended = dot_product_attention(q, k, v, mask).reshape(seq, dim)
        h = h + _linear(attended, self.out_weight, self.out_bias)
        x = _layer_norm(h, self.norm2_weight, self.norm2_bias, self.eps)
        hidden = _ACTIVATIONS[self.activation](_linear(x, self.fc1_weight, self.fc1_bias))
        return h + _linear(hidden, self.fc2_weight, self.fc2_bias)


def _run_layers(
    layers: _CLIPLayer, h: Float[Array, "seq dim"], mask: Bool[Array, "seq seq"] | None
) -> Float[Array, "seq dim"]:
    params, static = eqx.partition(layers, eqx.is_array)

    def body(h, p):
        return eqx.combine(p, static)(h, mask), None

    return jax.lax.scan(body, h, params)[0]


@typing.final
class _CLIPVisionTower(eqx.Module):
    """`CLIPVisionModel`'s pooled output: the post-LayerNormed class token."""

    patch_weight: Float[Array, "dim 3 patch patch"]
    class_embedding: Float[Array, " dim"]
    positions: Float[Array, "tokens dim"]
    pre_norm_weight: Float[Array, " dim"]
    pre_norm_bias: Float[Array, " dim"]
    layers: _CLIPLayer = stacked_field()
    post_norm_weight: Float[Array, " dim"]
    post_norm_bias: Float[Array, " dim"]

    def __call__(self, pixels: Float[Array, "size size 3"]) -> Float[Array, " dim"]:
        dim, channels, p, _ = self.patch_weight.shape
        grid = pixels.shape[0] // p
        # The stride-p convolution as one product: patches flattened in the kernel's
        # (channel, row, column) order, row-major over the grid as torch's `flatten(2)`.
        patches = pixels.reshape(grid, p, grid, p, channels).transpose(0, 2, 4, 1, 3)
        tokens = patches.reshape(grid * grid, channels * p * p) @ self.patch_weight.reshape(
            dim, -1
        ).T
        h = jnp.concatenate([self.class_embedding[None, :], tokens]) + self.positions
        h = _layer_norm(h, self.pre_norm_weight, self.pre_norm_bias, self.layers.eps)
        h = _run_layers(self.layers, h, None)
        return _layer_norm(h[0], self.post_norm_weight, self.post_norm_bias, self.layers.eps)


@typing.final
class _CLIPTextTower(eqx.Module):
    """`CLIPTextModel`'s pooled output: the final-LayerNormed state at the end-of-text
    token."""

    token_embedding: Float[Array, "vocab dim"]
    positions: Float[Array, "max_ctx dim"]
    layers: _CLIPLayer = stacked_field()
    final_norm_weight: Float[Array, " dim"]
    final_norm_bias: Float[Array, " dim"]
    eos_token_id: int = eqx.field(static=True)

    def eos_position(self, ids: Int[Array, " ctx"]) -> Int[Array, ""]:
        """Where `CLIPTextModel` pools: the first `eos_token_id`, or the first position
        when there is none; with a legacy config (`eos_token_id` 2), the first largest id."""
        if self.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(ids)
        return jnp.argmax(ids == self.eos_token_id)

    def __call__(self, ids: Int[Array, " ctx"], mask: Bool[Array, " ctx"]) -> Float[Array, " dim"]:
        ctx = ids.shape[0]
        h = self.token_embedding[ids] + self.positions[:ctx]
        h = _run_layers(self.layers, h, attention_mask(ctx, mask, causal=True))
        pooled = h[self.eos_position(ids)]
        return _layer_norm(pooled, self.final_norm_weight, self.final_norm_bias, self.layers.eps)


@typing.final
class CLIPCaptionTokenizer:
    """Captions to a CLIP folder's ids with a mask, on the host (NumPy, not JAX).

    The folder's own BPE tokenizer (`vocab.json` and `merges.txt`, or `tokenizer.json`),
    read by `transformers.CLIPTokenizerFast`: `<|startoftext|>`, the pieces, then
    `<|endoftext|>`, padded with the folder's pad token (CLIP's is `<|endoftext|>` again;
    the mask, not the id, tells padding apart). Captions longer than the text tower's
    positions are truncated before the end-of-text token, which is kept: the text feature
    is read there.

    **Arguments:**

    - `tokenizer`: a `transformers` CLIP tokenizer.
    - `context_length`: the default and largest `max_len` (the text tower's
      `max_position_embeddings`, 77 for OpenAI's CLIPs).
    """

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, context_length: int
    ) -> "CLIPCaptionTokenizer":
        """The tokenizer of a Hugging Face CLIP folder; raises `MissingInputError` when it
        has no tokenizer files."""
        folder = os.fspath(folder)
        files = ("tokenizer.json",), ("vocab.json", "merges.txt")
        if not any(all(os.path.isfile(os.path.join(folder, f)) for f in names)
                   for names in files):
            raise MissingInputError(
                f"{folder}: no CLIP tokenizer (tokenizer.json, or vocab.json and merges.txt); "
                "copy the tokenizer files of the checkpoint into the folder, or pass ids "
                "to CLIPEncoder.text_features yourself."
            )
        # Imported here: transformers is slow to import, and only the host tokenizes.
        from transformers import CLIPTokenizerFast

        return cls(CLIPTokenizerFast.from_pretrained(folder), context_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids included."""
        return len(self.tokenizer)

    def encode(
        self, captions: Sequence[str], max_len: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, mask)`: int32 and bool `[len(captions), max_len]` (`max_len` defaults to
        `context_length`), the mask True at real tokens, which come first."""
        max_len = self.context_length if max_len is None else int(max_len)
        if not 2 <= max_len <= self.context_length:
            raise ValueError(
                f"max_len must lie in [2, {self.context_length}] (the text tower's "
                f"positions, and room for the start and end tokens); got {max_len}."
            )
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string.")
        out = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=max_len
        )
        ids = np.asarray(out["input_ids"], np.int32).reshape(len(captions), max_len)
        mask = np.asarray(out["attention_mask"], bool).reshape(len(captions), max_len)
        return ids, mask


@eqx.filter_jit
def _image_features(encoder: "CLIPEncoder", images: Float[Array, "n h w 3"]):
    pixels = encoder.preprocess(images)
    return jax.vmap(encoder.vision)(pixels) @ encoder.visual_projection.T


@eqx.filter_jit
def _text_features(encoder: "CLIPEncoder", ids: Int[Array, "n ctx"], mask: Bool[Array, "n ctx"]):
    return jax.vmap(encoder.text)(ids, mask) @ encoder.text_projection.T


@typing.final
class CLIPEncoder(eqx.Module):
    """CLIP's image and text features (`transformers.CLIPModel.get_image_features` and
    `get_text_features`), in JAX, float32, frozen; build it with `from_pretrained`.

    The two towers work on one example; `image_features` and `text_features` take batches.

    **Arguments (`from_pretrained` fills them):**

    - `vision`, `text`: the towers.
    - `visual_projection`, `text_projection`: `[projection_dim, width]`, no bias.
    - `image_size`: the vision tower's input side.
    - `image_mean`, `image_std`: the per-channel normalisation of pixels in [0, 1].
    - `context_length`: the text tower's positions.
    - `tokenizer`: the folder's `CLIPCaptionTokenizer`, or `None` if it has none.
    - `fingerprint`: a digest of the folder's config and weights (`CLIPFeatures` names its
      features with it).
    """

    vision: _CLIPVisionTower
    text: _CLIPTextTower
    visual_projection: Float[Array, "proj vision_dim"]
    text_projection: Float[Array, "proj text_dim"]
    image_size: int = eqx.field(static=True)
    image_mean: tuple[float, float, float] = eqx.field(static=True)
    image_std: tuple[float, float, float] = eqx.field(static=True)
    context_length: int = eqx.field(static=True)
    tokenizer: CLIPCaptionTokenizer | None = eqx.field(static=True)
    fingerprint: str = eqx.field(static=True)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "CLIPEncoder":
        """The CLIP of a Hugging Face `CLIPModel` folder: `config.json`, `*.safetensors`
        (any float dtype, computed in float32), and optionally the tokenizer files and
        `preprocessor_config.json` (for `image_mean`/`image_std`).

        Raises `MissingInputError` for a folder that does not exist and `WeightError` for
        one that is not a CLIP folder, or whose weights miss, mis-shape or add a key.
        """
        return _load(os.fspath(folder))

    @property
    def projection_dim(self) -> int:
        """Width of the features."""
        return self.visual_projection.shape[0]

    def preprocess(
        self, images: Float[np.ndarray | Array, "n h w 3"]
    ) -> Float[Array, "n size size 3"]:
        """Images in [-1, 1] as the vision tower reads them, as `CLIPImageProcessor` makes
        them: the shorter side resized to `image_size` (the longer one to
        `int(image_size * long / short)`), the centre `image_size` square cropped, then
        `(x - image_mean) / image_std` with `x` in [0, 1].

        Images already `image_size` square are not resampled. Others are resampled by
        `jax.image.resize`'s bicubic (Keys' a = -0.5, PIL's BICUBIC kernel, widened when
        shrinking as PIL does) and clipped to [0, 1] as an 8-bit image would be; the
        processor also rounds to 8 bits first, so resampled pixels differ from its by about
        that rounding (half a level in 255) and the interpolation's arithmetic.
        """
        x = (jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0) + 1.0) / 2.0
        n, h, w, _ = x.shape
        size = self.image_size
        if (h, w) != (size, size):
            short, long = min(h, w), max(h, w)
            other = int(size * long / short)
            new_h, new_w = (size, other) if h <= w else (other, size)
            x = jax.image.resize(x, (n, new_h, new_w, 3), method="bicubic", antialias=True)
            x = jnp.clip(x, 0.0, 1.0)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            x = x[:, top : top + size, left : left + size]
        mean = jnp.asarray(self.image_mean, x.dtype).reshape(1, 1, 1, 3)
        std = jnp.asarray(self.image_std, x.dtype).reshape(1, 1, 1, 3)
        return (x - mean) / std

    def image_features(
        self, images: Float[np.ndarray | Array, "n h w 3"]
    ) -> Float[Array, "n proj"]:
        """The projected image embeddings (`get_image_features`, not normalised) of images
        in [-1, 1] of any size (see `preprocess`)."""
        with jax.default_matmul_precision(_PRECISION):
            return _image_features(self, jnp.asarray(images, jnp.float32))

    def text_features(
        self, ids: Int[np.ndarray | Array, "n ctx"], mask: Bool[np.ndarray | Array, "n ctx"]
    ) -> Float[Array, "n proj"]:
        """The projected text embeddings (`get_text_features`, not normalised) of
        tokenized captions (`tokenize`), `ctx` at most `context_length`; `mask` is the
        attention mask (True at real tokens)."""
        ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must be [n, ctx] alike; got {ids.shape} and "
                             f"{mask.shape}.")
        if ids.shape[1] > self.context_length:
            raise ValueError(f"captions of {ids.shape[1]} tokens are longer than the text "
                             f"tower's {self.context_length} positions.")
        with jax.default_matmul_precision(_PRECISION):
            return _text_features(self, ids, mask)

    def tokenize(
        self, captions: Sequence[str], max_len: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, mask)` of captions by the folder's tokenizer (`CLIPCaptionTokenizer.encode`)."""
        if self.tokenizer is None:
            raise MissingInputError(
                "this CLIP was loaded from a folder without tokenizer files (vocab.json and "
                "merges.txt, or tokenizer.json): add them, or tokenize the captions yourself "
                "and call text_features(ids, mask)."
            )
        return self.tokenizer.encode(captions, max_len)

    def caption_features(self, captions: Sequence[str]) -> Float[Array, "n proj"]:
        """`text_features` of captions, tokenized to `context_length`."""
        return self.text_features(*self.tokenize(captions))


# -- loading ------------------------------------------------------------------------------
def _arch(config: dict, defaults: dict, folder: str, which: str) -> dict:
    arch = {**defaults, **{k: config[k] for k in defaults if k in config}}
    if arch["hidden_act"] not in _ACTIVATIONS:
        raise WeightError(f"{folder}: {which} hidden_act {arch['hidden_act']!r} is not one "
                          f"fluid computes (known: {', '.join(_ACTIVATIONS)}).")
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise WeightError(f"{folder}: {which} hidden_size {arch['hidden_size']} is not "
                          f"divisible by num_attention_heads {arch['num_attention_heads']}.")
    return arch


def _tower_config(config: dict, tower: str, folder: str) -> dict:
    # Configs saved by early transformers versions also hold `<tower>_config_dict`; when
    # present, transformers builds the tower's config from it alone (defaults for the
    # rest), whatever `<tower>_config` says.
    given = config.get(f"{tower}_config_dict")
    if given is None:
        given = config.get(f"{tower}_config")
    if not isinstance(given, dict):
        raise WeightError(f"{folder}: config.json has no {tower}_config; CLIPEncoder reads a "
                          "CLIPModel folder (model_type 'clip', with text_config and "
                          "vision_config).")
    return given


def _square(value: Any, name: str, folder: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise WeightError(f"{folder}: vision {name} {value} is not square.")
        value = value[0]
    return int(value)


def _layers(state: StateDict, prefix: str, arch: dict) -> _CLIPLayer:
    d, hidden = arch["hidden_size"], arch["intermediate_size"]

    def stacked(suffix: str, shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(np.stack([
            np.asarray(state.take(f"{prefix}.encoder.layers.{i}.{suffix}", shape), np.float32)
            for i in range(arch["num_hidden_layers"])
        ]))

    arrays = {
        "norm1_weight": stacked("layer_norm1.weight", (d,)),
        "norm1_bias": stacked("layer_norm1.bias", (d,)),
        "norm2_weight": stacked("layer_norm2.weight", (d,)),
        "norm2_bias": stacked("layer_norm2.bias", (d,)),
        "fc1_weight": stacked("mlp.fc1.weight", (hidden, d)),
        "fc1_bias": stacked("mlp.fc1.bias", (hidden,)),
        "fc2_weight": stacked("mlp.fc2.weight", (d, hidden)),
        "fc2_bias": stacked("mlp.fc2.bias", (d,)),
    }
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
        arrays[f"{ours}_weight"] = stacked(f"self_attn.{theirs}.weight", (d, d))
        arrays[f"{ours}_bias"] = stacked(f"self_attn.{theirs}.bias", (d,))
    return _CLIPLayer(
        **arrays,
        num_heads=int(arch["num_attention_heads"]),
        activation=str(arch["hidden_act"]),
        eps=float(arch["layer_norm_eps"]),
    )


def _fingerprint(folder: str) -> str:
    digest = hashlib.sha256()
    # Everything that decides the features: architecture, weights, normalisation.
    names = [HF_CONFIG, "preprocessor_config.json",
             *sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))]
    for name in (n for n in names if os.path.isfile(os.path.join(folder, n))):
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:16]


def _normalisation(folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config = read_config(folder, "preprocessor_config.json")
    mean = tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise WeightError(f"{folder}: preprocessor_config.json's image_mean and image_std "
                          "must have 3 values each.")
    return mean, std


def _load(folder: str) -> CLIPEncoder:
    if not os.path.isdir(folder):
        raise MissingInputError(
            f"no CLIP folder at {folder}: fluid reads a Hugging Face CLIPModel folder "
            "(config.json, model.safetensors, and the tokenizer's vocab.json and merges.txt) "
            "and never downloads one; save it there first (CLIPModel.save_pretrained, or a "
            "copy of the checkpoint's files)."
        )
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type != "clip":
        raise WeightError(
            f"{folder}: config.json has model_type {model_type!r}; CLIPEncoder reads a "
            "CLIPModel folder (model_type 'clip', with text_config and vision_config)."
        )
    text = _arch(_tower_config(config, "text", folder), _TEXT_DEFAULTS, folder, "text")
    vision = _arch(_tower_config(config, "vision", folder), _VISION_DEFAULTS, folder, "vision")
    if not isinstance(text["eos_token_id"], int):
        raise WeightError(f"{folder}: text eos_token_id must be one id, got "
                          f"{text['eos_token_id']!r}.")
    if vision["num_channels"] != 3:
        raise WeightError(f"{folder}: the vision tower reads {vision['num_channels']} "
                          "channels; fluid's images have 3.")
    size = _square(vision["image_size"], "image_size", folder)
    patch = _square(vision["patch_size"], "patch_size", folder)
    if size % patch:
        raise WeightError(f"{folder}: image_size {size} is not a multiple of patch_size {patch}.")
    proj = int(config.get("projection_dim", 512))

    state = StateDict(read_folder_weights(folder), source=folder)

    def take(name: str, shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(np.asarray(state.take(name, shape), np.float32))

    dv, dt = vision["hidden_size"], text["hidden_size"]
    vision_tower = _CLIPVisionTower(
        patch_weight=take("vision_model.embeddings.patch_embedding.weight", (dv, 3, patch, patch)),
        class_embedding=take("vision_model.embeddings.class_embedding", (dv,)),
        positions=take("vision_model.embeddings.position_embedding.weight",
                       ((size // patch) ** 2 + 1, dv)),
        pre_norm_weight=take("vision_model.pre_layrnorm.weight", (dv,)),
        pre_norm_bias=take("vision_model.pre_layrnorm.bias", (dv,)),
        layers=_layers(state, "vision_model", vision),
        post_norm_weight=take("vision_model.post_layernorm.weight", (dv,)),
        post_norm_bias=take("vision_model.post_layernorm.bias", (dv,)),
    )
    text_tower = _CLIPTextTower(
        token_embedding=take("text_model.embeddings.token_embedding.weight",
                             (text["vocab_size"], dt)),
        positions=take("text_model.embeddings.position_embedding.weight",
                       (text["max_position_embeddings"], dt)),
        layers=_layers(state, "text_model", text),
        final_norm_weight=take("text_model.final_layer_norm.weight", (dt,)),
        final_norm_bias=take("text_model.final_layer_norm.bias", (dt,)),
        eos_token_id=text["eos_token_id"],
    )
    visual_projection = take("visual_projection.weight", (proj, dv))
    text_projection = take("text_projection.weight", (proj, dt))
    # The contrastive temperature, and position-id buffers that older saves wrote.
    state.finish(ignore=[n for n in state.unused()
                         if n == "logit_scale" or n.endswith("embeddings.position_ids")])
    mean, std = _normalisation(folder)
    context_length = int(text["max_position_embeddings"])
    has_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")
    )
    return CLIPEncoder(
        vision=vision_tower,
        text=text_tower,
        visual_projection=visual_projection,
        text_projection=text_projection,
        image_size=size,
        image_mean=mean,
        image_std=std,
        context_length=context_length,
        tokenizer=(CLIPCaptionTokenizer.from_pretrained(folder, context_length)
                   if has_tokenizer else None),
        fingerprint=_fingerprint(folder),
    )
