import os
import typing
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int

from .._types import DISCRETE, Image, Key
from ._abstract import AbstractImageTokenizer
from ._autoencoder import (
    Decoder,
    Encoder,
    abstract,
    check_image_size,
    downsampling,
    load_folder,
    read_diffusers_config,
    resolve,
    save_folder,
)
from ._patch import check_image
from ._vae_blocks import Conv2d

CLASS_NAME = "VQModel"
# Every option of diffusers' `VQModel` config, with diffusers' default.
DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}
# Options fluid implements at one value only. `norm_type="spatial"` (MoVQ's decoder, whose
# norms are conditioned on the quantised latent) is not implemented. `lookup_from_codebook`
# and `force_upcast` only change how diffusers' pipelines call the model (fluid always looks
# indices up and computes in float32), so both values are read and kept.
SUPPORTED = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "norm_type": "group"}
# A tiny randomly initialised tokenizer in the layout aMUSEd's VQ-GAN uses (no mid-block
# attention, indices decoded by codebook lookup).
TINY = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "num_vq_embeddings": 32,
    "vq_embed_dim": None,
    "mid_block_add_attention": False,
}


@typing.final
class VectorQuantizer(eqx.Module):
    """A codebook and nearest-code quantisation (diffusers' `VectorQuantizer` without index
    remapping).

    **Arguments:**

    - `num_embeddings`: number of codes.
    - `dim`: channels of a code.
    - `key`: initialisation key (codes uniform in +-1/num_embeddings, as diffusers').
    """

    embedding: eqx.nn.Embedding

    def __init__(self, num_embeddings: int, dim: int, *, key: Key):
        bound = 1.0 / num_embeddings
        weight = jr.uniform(key, (num_embeddings, dim), minval=-bound, maxval=bound)
        self.embedding = eqx.nn.Embedding(weight=weight)

    @property
    def codebook(self) -> Float[Array, "vocab dim"]:
        return self.embedding.weight

    def nearest(self, z: Float[Array, "n dim"]) -> Int[Array, " n"]:
        """Index of the code nearest to each row of `z` in Euclidean distance (the first on a
        tie), through one matrix product as torch's `cdist` computes it for many rows."""
        codebook = self.codebook
        # Full float32 products: on GPUs the default precision would round the inputs to
        # fewer mantissa bits and pick a different code near ties.
        cross = jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
        d2 = (
            jnp.sum(z**2, axis=-1, keepdims=True)
            - 2 * cross
            + jnp.sum(codebook**2, axis=-1)[None, :]
        )
        return jnp.argmin(d2, axis=-1).astype(jnp.int32)

    def lookup(self, indices: Int[Array, " n"]) -> Float[Array, "n dim"]:
        """The codes of `indices`."""
        return jnp.take(self.codebook, indices, axis=0)


@typing.final
class VQTokenizer(AbstractImageTokenizer):
    """Discrete tokens from a VQ autoencoder in the layout of diffusers' `VQModel` (the one
    aMUSEd's VQ-GAN uses).

    The encoder and `quant_conv` map an image to a latent grid (`2**(blocks - 1)` times
    smaller); each cell becomes the index of its nearest code (Euclidean, as diffusers).
    Decoding looks the codes up, applies `post_quant_conv` and the decoder, and clips to
    [-1, 1]. Tokens run row-major over the latent grid.

    With `path`, the architecture and weights come from a diffusers folder (`config.json` and
    `*.safetensors`; nothing is unpickled): architecture arguments left at `None` take the
    checkpoint's values, and one that is given must agree with them. Without `path`, the
    weights are random and unset arguments take tiny defaults in aMUSEd's layout
    (`block_out_channels=(8, 16)`, one layer per block, 4 groups, 4 latent channels, 32 codes,
    no mid-block attention).

    **Arguments:**

    - `image_size`: side of the square images in pixels; a multiple of the downsampling
      factor.
    - `block_out_channels`: channels of the encoder's blocks.
    - `layers_per_block`: residual blocks per encoder block (one more per decoder block).
    - `norm_num_groups`: groups of every GroupNorm.
    - `latent_channels`: channels of the encoder's and decoder's latent.
    - `num_vq_embeddings`: number of codes (the vocabulary).
    - `vq_embed_dim`: channels of a code; `None` for `latent_channels`.
    - `mid_block_add_attention`: whether the mid blocks have their self-attention.
    - `path`: a diffusers `VQModel` folder, or `None` for random weights.
    - `key`: initialisation key; needed only without `path`.
    """

    token_kind: typing.ClassVar[str] = DISCRETE
    encoder: Encoder
    quant_conv: Conv2d
    quantize: VectorQuantizer
    post_quant_conv: Conv2d
    decoder: Decoder
    image_size: int = eqx.field(static=True)
    grid: tuple[int, int] = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    block_out_channels: tuple[int, ...] = eqx.field(static=True)
    layers_per_block: int = eqx.field(static=True)
    norm_num_groups: int = eqx.field(static=True)
    latent_channels: int = eqx.field(static=True)
    mid_block_add_attention: bool = eqx.field(static=True)
    # Kept only to write them back in `save_pretrained`: they change nothing in fluid.
    scaling_factor: float = eqx.field(static=True)
    lookup_from_codebook: bool = eqx.field(static=True)
    force_upcast: bool = eqx.field(static=True)

    def __init__(
        self,
        image_size: int = 16,
        block_out_channels: Sequence[int] | None = None,
        layers_per_block: int | None = None,
        norm_num_groups: int | None = None,
        latent_channels: int | None = None,
        num_vq_embeddings: int | None = None,
        vq_embed_dim: int | None = None,
        mid_block_add_attention: bool | None = None,
        path: str | os.PathLike | None = None,
        *,
        key: Key | None = None,
    ):
        config = (
            None
            if path is None
            else read_diffusers_config(path, CLASS_NAME, DIFFUSERS_DEFAULTS, SUPPORTED)
        )
        if config is not None and config["vq_embed_dim"] is None:
            config["vq_embed_dim"] = config["latent_channels"]  # diffusers' meaning of None
        arch = resolve(
            {
                "block_out_channels": block_out_channels,
                "layers_per_block": layers_per_block,
                "norm_num_groups": norm_num_groups,
                "latent_channels": latent_channels,
                "num_vq_embeddings": num_vq_embeddings,
                "vq_embed_dim": vq_embed_dim,
                "mid_block_add_attention": mid_block_add_attention,
            },
            config,
            TINY,
        )
        if arch["vq_embed_dim"] is None:
            arch["vq_embed_dim"] = arch["latent_channels"]
        if arch["num_vq_embeddings"] < 1:
            raise ValueError(
                f"num_vq_embeddings must be positive, got {arch['num_vq_embeddings']}."
            )
        side = check_image_size(
            image_size,
            downsampling(arch["block_out_channels"]),
            "the autoencoder's downsampling factor",
        )
        self.image_size = image_size
        self.grid = (side, side)
        self.token_dim = arch["vq_embed_dim"]
        self.vocab_size = arch["num_vq_embeddings"]
        self.block_out_channels = tuple(arch["block_out_channels"])
        self.layers_per_block = arch["layers_per_block"]
        self.norm_num_groups = arch["norm_num_groups"]
        self.latent_channels = arch["latent_channels"]
        self.mid_block_add_attention = bool(arch["mid_block_add_attention"])
        self.scaling_factor = 0.18215 if config is None else float(config["scaling_factor"])
        self.lookup_from_codebook = True if config is None else bool(config["lookup_from_codebook"])
        self.force_upcast = True if config is None else bool(config["force_upcast"])

        if config is None:
            if key is None:
                raise ValueError("VQTokenizer needs a key to initialise random weights.")
            parts = _build_parts(arch, key=key)
        else:
            parts = load_folder(path, abstract(_build_parts, arch))
        self.encoder = parts["encoder"]
        self.quant_conv = parts["quant_conv"]
        self.quantize = parts["quantize"]
        self.post_quant_conv = parts["post_quant_conv"]
        self.decoder = parts["decoder"]

    # -- the autoencoder ----------------------------------------------------------------------
    # Computations are jitted whole: run eagerly, a deep convolutional network would compile
    # each primitive separately (slow) and round differently from the same call under an
    # outer jit. Under an outer jit or vmap they are traced inline.
    @eqx.filter_jit
    def encode_latent(self, image: Image) -> Float[Array, "lh lw token_dim"]:
        """The latent before quantisation (diffusers' `VQModel.encode(x).latents`).

        **Arguments:**

        - `image`: `Float[Array, "h w 3"]` with `h == w == image_size`, values in [-1, 1].
        """
        check_image(image, self.image_size)
        return self.quant_conv(self.encoder(image.astype(jnp.float32)))

    @eqx.filter_jit
    def quantize_latent(
        self, latent: Float[Array, "lh lw token_dim"]
    ) -> tuple[Float[Array, "lh lw token_dim"], Int[Array, " seq"]]:
        """Replace each cell of a latent by its nearest code, with a straight-through
        gradient: the value is the code's, the gradient flows to `latent` unchanged.

        **Returns:**

        The quantised latent `latent + stop_gradient(code - latent)` and the indices,
        row-major. (No gradient reaches the codebook through it; `vq_autoencoder_loss`
        trains the codebook.)
        """
        h, w, d = latent.shape
        indices = self.quantize.nearest(latent.reshape(h * w, d))
        codes = self.quantize.lookup(indices).reshape(h, w, d)
        return latent + jax.lax.stop_gradient(codes - latent), indices

    @eqx.filter_jit
    def decode_latent(self, quantized: Float[Array, "lh lw token_dim"]) -> Image:
        """The decoder's image for a quantised latent, not clipped."""
        return self.decoder(self.post_quant_conv(quantized))

    @eqx.filter_jit
    def reconstruct(
        self, image: Image
    ) -> tuple[Image, Float[Array, "lh lw token_dim"], Float[Array, "lh lw token_dim"]]:
        """What training needs: the decoder's image (unclipped) of the straight-through
        quantised latent, the latent, and its nearest codes (with the codebook's gradient);
        the arguments of `vq_autoencoder_loss`."""
        latent = self.encode_latent(image)
        quantized, indices = self.quantize_latent(latent)
        codes = self.quantize.lookup(indices).reshape(latent.shape)
        return self.decode_latent(quantized), latent, codes

    # -- the tokenizer interface --------------------------------------------------------------
    @eqx.filter_jit
    def encode(self, image: Image) -> Int[Array, " seq"]:
        latent = self.encode_latent(image)
        h, w, d = latent.shape
        return self.quantize.nearest(latent.reshape(h * w, d))

    @eqx.filter_jit
    def decode(self, tokens: Int[Array, " seq"]) -> Image:
        codes = self.quantize.lookup(tokens).reshape(*self.grid, self.token_dim)
        return jnp.clip(self.decode_latent(codes), -1.0, 1.0)

    def fit(self, images: np.ndarray, *, key: Key) -> "VQTokenizer":
        del images, key
        return self

    # -- diffusers folders --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, image_size: int) -> "VQTokenizer":
        """A tokenizer with the architecture and weights of a diffusers `VQModel` folder, as
        `VQTokenizer(image_size, path=path)` builds it."""
        return cls(image_size, path=path)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `config.json` and `diffusion_pytorch_model.safetensors` as diffusers'
        `VQModel.save_pretrained` does, so that diffusers (and `from_pretrained`) reads
        them."""
        config = {
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.image_size,
            "num_vq_embeddings": self.vocab_size,
            "vq_embed_dim": self.token_dim,
            "scaling_factor": self.scaling_factor,
            "norm_type": "group",
            "mid_block_add_attention": self.mid_block_add_attention,
            "lookup_from_codebook": self.lookup_from_codebook,
            "force_upcast": self.force_upcast,
        }
        parts = {
            "encoder": self.encoder,
            "quant_conv": self.quant_conv,
            "quantize": self.quantize,
            "post_quant_conv": self.post_quant_conv,
            "decoder": self.decoder,
        }
        save_folder(path, CLASS_NAME, config, parts)


# One compilation per architecture (its ints, tuples and flags are static under filter_jit)
# instead of one per primitive and shape, which costs tens of seconds eagerly on a small CPU.
@eqx.filter_jit
def _build_parts(arch: dict, *, key: Key) -> dict:
    k_enc, k_quant, k_codes, k_post, k_dec = jr.split(key, 5)
    latent, dim = arch["latent_channels"], arch["vq_embed_dim"]
    common = {
        "block_out_channels": arch["block_out_channels"],
        "layers_per_block": arch["layers_per_block"],
        "norm_num_groups": arch["norm_num_groups"],
        "mid_block_add_attention": arch["mid_block_add_attention"],
    }
    return {
        "encoder": Encoder(latent, double_z=False, **common, key=k_enc),
        "quant_conv": Conv2d(latent, dim, 1, key=k_quant),
        "quantize": VectorQuantizer(arch["num_vq_embeddings"], dim, key=k_codes),
        "post_quant_conv": Conv2d(dim, latent, 1, key=k_post),
        "decoder": Decoder(latent, **common, key=k_dec),
    }
