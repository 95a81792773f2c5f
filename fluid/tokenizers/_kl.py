import os
import typing
from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from .._types import CONTINUOUS, Image, Key
from ._abstract import AbstractImageTokenizer
from ._autoencoder import (
    ATTENTION_BLOCKS,
    ATTN_DOWN_BLOCK,
    ATTN_UP_BLOCK,
    DOWN_BLOCK,
    UP_BLOCK,
    Decoder,
    Encoder,
    abstract,
    block_attention,
    check_image_size,
    downsampling,
    load_folder,
    read_diffusers_config,
    resolve,
    save_folder,
)
from ._patch import check_image, patchify, unpatchify
from ._vae_blocks import Conv2d

CLASS_NAME = "AutoencoderKL"
# Every option of diffusers' `AutoencoderKL` config, with diffusers' default: older configs
# omit options added later.
DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Options fluid implements at one value only. Per-channel latent statistics are applied by
# some diffusers pipelines, not by the model; use scaling_factor and shift_factor instead.
SUPPORTED = {
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
}
# The architecture of a randomly initialised tokenizer when no argument says otherwise: tiny,
# so that building one and compiling it takes seconds on a laptop CPU.
TINY = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
# MAR multiplies its KL-16 latents by this before training on them, and divides sampled
# tokens by it before decoding (LTH14/mar engine_mar.py).
MAR_SCALING_FACTOR = 0.2325
# MAR's KL-16 autoencoder as `KLTokenizer` arguments: LTH14/mar models/vae.py builds
# `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` with ch=128, two residual blocks per
# level, GroupNorms of 32 groups, attention in both mid blocks and in the encoder's last level
# (attn_resolutions=(16,) at 256 px), on 256 px images with patch size 1. The decoder's levels
# are left to the checkpoint: MAR's code builds them without attention (its Decoder's
# attn_resolutions defaults to ()) and loads with strict=False, LDM's config would put one in
# the lowest level. `KLTokenizer(**MAR_KL16, path=folder)` loads a converted kl16.ckpt
# (`convert_ldm_checkpoint`) and fails if it is not this architecture. MAR trains on posterior
# samples: add `sample_posterior=True` where the caller passes `encode` a key.
MAR_KL16 = {
    "image_size": 256,
    "patch_size": 1,
    "block_out_channels": (128, 128, 256, 256, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "latent_channels": 16,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "down_block_types": (DOWN_BLOCK,) * 4 + (ATTN_DOWN_BLOCK,),
    "scaling_factor": MAR_SCALING_FACTOR,
}



def read_kl_config(path: str | os.PathLike) -> dict[str, typing.Any]:
    """The architecture of the diffusers `AutoencoderKL` folder `path`, as `KLTokenizer(path=...)`
    reads it (its `config.json`, checked and completed with diffusers' defaults), without
    loading the weights; with `downsampling` added, the pixels one latent cell spans.

    **Raises:**

    `WeightError` for a folder without `config.json`, another class, or an option fluid does
    not implement.
    """
    config = read_diffusers_config(path, CLASS_NAME, DIFFUSERS_DEFAULTS, SUPPORTED,
                                   ATTENTION_BLOCKS)
    return {**config, "downsampling": downsampling(config["block_out_channels"])}

@typing.final
class KLTokenizer(AbstractImageTokenizer):
    """Continuous tokens from a KL autoencoder in the layout of diffusers' `AutoencoderKL`.

    The encoder gives a diagonal Gaussian posterior over a latent grid (`2**(blocks - 1)`
    times smaller than the image); tokens are its mean (or, with `sample_posterior`, a draw
    from it), shifted and scaled, `(z - shift_factor) * scaling_factor`, and cut into
    `patch_size x patch_size` patches of latent cells (channels ordered over patch rows,
    patch columns, then latent channels, as `PatchTokenizer`'s). Decoding inverts the
    scaling, applies `post_quant_conv` and the decoder, and clips to [-1, 1].

    Fluid tokenizes with a Stable-Diffusion-style KL autoencoder at 8x and 2x2 patches
    (`token_dim = 4 * latent_channels`); MAR with its 16x, 16-channel KL autoencoder, patch 1
    and `scaling_factor=0.2325`, trained on posterior samples (`MAR_KL16` holds its
    arguments). Checkpoints in LDM's layout (MAR's kl16.ckpt, Stable Diffusion's original
    VAE files) become folders this class loads with `convert_ldm_checkpoint`.

    With `path`, the architecture and weights come from a diffusers folder (`config.json` and
    `*.safetensors`; nothing is unpickled): architecture arguments left at `None` take the
    checkpoint's values, and one that is given must agree with them. Without `path`, the
    weights are random and unset architecture arguments take tiny defaults
    (`block_out_channels=(8, 16)`, one layer per block, 4 groups, 4 latent channels).

    **Arguments:**

    - `image_size`: side of the square images in pixels; a multiple of the downsampling
      factor times `patch_size`.
    - `patch_size`: side of a token in latent cells.
    - `block_out_channels`: channels of the encoder's blocks (their number sets the
      downsampling factor).
    - `layers_per_block`: residual blocks per encoder block (one more per decoder block).
    - `norm_num_groups`: groups of every GroupNorm.
    - `latent_channels`: channels of the latent.
    - `mid_block_add_attention`: whether the mid blocks have their self-attention.
    - `use_quant_conv`, `use_post_quant_conv`: whether the 1x1 convolutions after the
      encoder and before the decoder are there.
    - `scaling_factor`, `shift_factor`: the latent normalisation (tokens are
      `(z - shift_factor) * scaling_factor`); `None` for the checkpoint's (1 and 0 without
      `path`). Given values override the checkpoint's.
    - `path`: a diffusers `AutoencoderKL` folder, or `None` for random weights.
    - `down_block_types`, `up_block_types`: diffusers' block types, one per entry of
      `block_out_channels` (`up_block_types` in the decoder's order, lowest resolution
      first): `"DownEncoderBlock2D"`/`"UpDecoderBlock2D"`, or `"AttnDownEncoderBlock2D"`/
      `"AttnUpDecoderBlock2D"` for a level with a self-attention after each residual block
      (LDM's `attn_resolutions`); `None` for the checkpoint's (no attention without `path`).
    - `sample_posterior`: `encode` returns tokens of a latent drawn from the posterior with
      the key it is given (as MAR trains, a fresh draw every step) instead of the mean. A
      generative run trains on such draws, a fresh one per example and step from the
      step's key; with a token cache (`data.cache`), the cache holds the moments of each
      image and of its horizontal flip (`posterior_pair`: four times the floats of a cache
      of means) and each step picks one of the two at random before drawing
      (`draw_posterior_tokens`), as MAR does; without one, images are encoded as they load
      and flipped only as `data.flip` says. Validation encodes the posterior mean.
    - `key`: initialisation key; needed only without `path`.
    """

    token_kind: typing.ClassVar[str] = CONTINUOUS
    encoder: Encoder
    quant_conv: Conv2d | None
    post_quant_conv: Conv2d | None
    decoder: Decoder
    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    grid: tuple[int, int] = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    vocab_size: None = eqx.field(static=True)
    block_out_channels: tuple[int, ...] = eqx.field(static=True)
    layers_per_block: int = eqx.field(static=True)
    norm_num_groups: int = eqx.field(static=True)
    latent_channels: int = eqx.field(static=True)
    mid_block_add_attention: bool = eqx.field(static=True)
    down_block_types: tuple[str, ...] = eqx.field(static=True)
    up_block_types: tuple[str, ...] = eqx.field(static=True)
    sample_posterior: bool = eqx.field(static=True)
    scaling_factor: float = eqx.field(static=True)
    shift_factor: float = eqx.field(static=True)
    force_upcast: bool = eqx.field(static=True)

    def __init__(
        self,
        image_size: int = 16,
        patch_size: int = 1,
        block_out_channels: Sequence[int] | None = None,
        layers_per_block: int | None = None,
        norm_num_groups: int | None = None,
        latent_channels: int | None = None,
        mid_block_add_attention: bool | None = None,
        use_quant_conv: bool | None = None,
        use_post_quant_conv: bool | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        path: str | os.PathLike | None = None,
        *,
        down_block_types: Sequence[str] | None = None,
        up_block_types: Sequence[str] | None = None,
        sample_posterior: bool = False,
        key: Key | None = None,
    ):
        config = (
            None
            if path is None
            else read_diffusers_config(
                path, CLASS_NAME, DIFFUSERS_DEFAULTS, SUPPORTED, ATTENTION_BLOCKS
            )
        )
        arch = resolve(
            {
                "block_out_channels": block_out_channels,
                "layers_per_block": layers_per_block,
                "norm_num_groups": norm_num_groups,
                "latent_channels": latent_channels,
                "mid_block_add_attention": mid_block_add_attention,
                "use_quant_conv": use_quant_conv,
                "use_post_quant_conv": use_post_quant_conv,
            },
            config,
            TINY,
        )
        blocks = len(arch["block_out_channels"])
        arch.update(
            resolve(
                {"down_block_types": down_block_types, "up_block_types": up_block_types},
                config,
                {
                    "down_block_types": (DOWN_BLOCK,) * blocks,
                    "up_block_types": (UP_BLOCK,) * blocks,
                },
            )
        )
        _check_block_types(arch, blocks)
        if scaling_factor is None:
            scaling_factor = 1.0 if config is None else config["scaling_factor"]
        if shift_factor is None:
            shift_factor = 0.0 if config is None else (config["shift_factor"] or 0.0)
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor}.")
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}.")
        side = check_image_size(
            image_size,
            downsampling(arch["block_out_channels"]) * patch_size,
            "the autoencoder's downsampling factor times patch_size",
        )
        self.grid = (side, side)
        self.image_size = image_size
        self.patch_size = patch_size
        self.latent_channels = arch["latent_channels"]
        self.token_dim = patch_size * patch_size * self.latent_channels
        self.vocab_size = None
        self.block_out_channels = tuple(arch["block_out_channels"])
        self.layers_per_block = arch["layers_per_block"]
        self.norm_num_groups = arch["norm_num_groups"]
        self.mid_block_add_attention = bool(arch["mid_block_add_attention"])
        self.down_block_types = arch["down_block_types"]
        self.up_block_types = arch["up_block_types"]
        self.sample_posterior = bool(sample_posterior)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.force_upcast = True if config is None else bool(config["force_upcast"])

        if config is None:
            if key is None:
                raise ValueError("KLTokenizer needs a key to initialise random weights.")
            parts = _build_parts(arch, key=key)
        else:
            # Filled from the checkpoint without initialising anything first.
            parts = load_folder(path, abstract(_build_parts, arch))
        self.encoder = parts["encoder"]
        self.quant_conv = parts["quant_conv"]
        self.post_quant_conv = parts["post_quant_conv"]
        self.decoder = parts["decoder"]

    # -- the autoencoder ----------------------------------------------------------------------
    # Computations are jitted whole: run eagerly, a deep convolutional network would compile
    # each primitive separately (slow) and round differently from the same call under an
    # outer jit. Under an outer jit or vmap they are traced inline.
    @eqx.filter_jit
    def posterior(
        self, image: Image
    ) -> tuple[Float[Array, "lh lw latent"], Float[Array, "lh lw latent"]]:
        """The encoder's diagonal Gaussian over the latent of one image.

        **Arguments:**

        - `image`: `Float[Array, "h w 3"]` with `h == w == image_size`, values in [-1, 1].

        **Returns:**

        The mean and the log-variance (clamped to [-30, 20], as diffusers does) of the
        unscaled latent, channels last, as `AutoencoderKL.encode(x).latent_dist` holds them.
        """
        check_image(image, self.image_size)
        moments = self.encoder(image.astype(jnp.float32))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @eqx.filter_jit
    def decode_latent(self, latent: Float[Array, "lh lw latent"]) -> Image:
        """The decoder's image for an unscaled latent, not clipped (diffusers' `decode`)."""
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)

    def latent_to_tokens(
        self, latent: Float[Array, "lh lw latent"]
    ) -> Float[Array, "seq token_dim"]:
        """Shift, scale and patchify an unscaled latent."""
        return patchify((latent - self.shift_factor) * self.scaling_factor, self.patch_size)

    def tokens_to_latent(
        self, tokens: Float[Array, "seq token_dim"]
    ) -> Float[Array, "lh lw latent"]:
        """The inverse of `latent_to_tokens`."""
        latent = unpatchify(tokens, self.grid, self.patch_size)
        return latent / self.scaling_factor + self.shift_factor

    @eqx.filter_jit
    def sample(self, image: Image, *, key: Key) -> Float[Array, "seq token_dim"]:
        """Tokens of a latent drawn from the posterior, whatever `sample_posterior` says."""
        return self.latent_to_tokens(_draw(*self.posterior(image), key))

    @eqx.filter_jit
    def tokens_from_posterior(
        self,
        mean: Float[Array, "lh lw latent"],
        logvar: Float[Array, "lh lw latent"],
        *,
        key: Key | None = None,
    ) -> Float[Array, "seq token_dim"]:
        """The tokens `encode` gives for an image whose posterior is `(mean, logvar)` (as
        `posterior` returns them): of a latent drawn with `key` when `sample_posterior`, of
        the mean otherwise. A cache of posteriors (MAR caches them for each image and its
        flip) draws fresh tokens from them every step with this."""
        if not self.sample_posterior:
            return self.latent_to_tokens(mean)
        if key is None:
            raise ValueError(
                "KLTokenizer(sample_posterior=True) draws its tokens from the posterior and "
                "needs a key: pass key=..., or build it with sample_posterior=False for the "
                "posterior mean."
            )
        return self.latent_to_tokens(_draw(mean, logvar, key))

    @eqx.filter_jit
    def posterior_pair(self, image: Image) -> Float[Array, "2 2 lh lw latent"]:
        """The posterior's moments of an image and of its horizontal flip, as a token cache
        of a tokenizer with `sample_posterior` stores them (MAR's `main_cache.py`):
        `[[mean, logvar] of image, [mean, logvar] of image[:, ::-1]]`, each as `posterior`
        returns it. Four times the floats of the posterior mean alone."""
        flipped = image[:, ::-1]
        return jnp.stack([jnp.stack(self.posterior(image)), jnp.stack(self.posterior(flipped))])

    @eqx.filter_jit
    def reconstruct(
        self, image: Image, *, key: Key
    ) -> tuple[Image, Float[Array, "lh lw latent"], Float[Array, "lh lw latent"]]:
        """What training needs: the decoder's image (unclipped) of a latent drawn from the
        posterior by reparameterisation, and the posterior's mean and log-variance (the
        arguments of `kl_autoencoder_loss`)."""
        mean, logvar = self.posterior(image)
        return self.decode_latent(_draw(mean, logvar, key)), mean, logvar

    # -- the tokenizer interface --------------------------------------------------------------
    @eqx.filter_jit
    def encode(self, image: Image, *, key: Key | None = None) -> Float[Array, "seq token_dim"]:
        """Tokens of one image: of its posterior mean, or, with `sample_posterior`, of a
        latent drawn from the posterior with `key` (required then, ignored otherwise)."""
        return self.tokens_from_posterior(*self.posterior(image), key=key)

    @eqx.filter_jit
    def decode(self, tokens: Float[Array, "seq token_dim"]) -> Image:
        return jnp.clip(self.decode_latent(self.tokens_to_latent(tokens)), -1.0, 1.0)

    # -- training on posterior draws (`AbstractImageTokenizer`'s optional part) --------------
    @property
    def samples_posterior(self) -> bool:
        return self.sample_posterior

    def sample_tokens(self, image: Image, *, key: Key) -> Float[Array, "seq token_dim"]:
        """`sample`: tokens of a latent drawn from the posterior with `key`."""
        return self.sample(image, key=key)

    def mean_tokens(self, image: Image) -> Float[Array, "seq token_dim"]:
        """Tokens of the posterior mean."""
        return self.latent_to_tokens(self.posterior(image)[0])

    def posterior_moments(self, image: Image, views: int) -> Float[Array, "views 2 lh lw latent"]:
        """The posterior's mean and log-variance of `image` (`views=1`) or of it and its
        flip (`views=2`, `posterior_pair`; the flip is not encoded for one view)."""
        if views == 2:
            return self.posterior_pair(image)
        if views != 1:
            raise ValueError(f"views is 1 (the image) or 2 (it and its flip), got {views}.")
        return jnp.stack(self.posterior(image))[None]

    def draw_tokens(
        self, moments: Float[Array, "views 2 lh lw latent"], *, key: Key
    ) -> Float[Array, "seq token_dim"]:
        """`draw_posterior_tokens(self, moments, key)`."""
        return draw_posterior_tokens(self, moments, key)

    def fit(self, images: np.ndarray, *, key: Key) -> "KLTokenizer":
        del images, key
        return self

    # -- diffusers folders --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        image_size: int,
        patch_size: int = 1,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = False,
    ) -> "KLTokenizer":
        """A tokenizer with the architecture and weights of a diffusers `AutoencoderKL`
        folder, as `KLTokenizer(image_size, patch_size, path=path)` builds it."""
        return cls(
            image_size,
            patch_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            path=path,
            sample_posterior=sample_posterior,
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `config.json` and `diffusion_pytorch_model.safetensors` as diffusers'
        `AutoencoderKL.save_pretrained` does, so that diffusers (and `from_pretrained`)
        reads them. `patch_size` is fluid's, not the checkpoint's, and is not saved."""
        config = {
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.image_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": None,
            "latents_std": None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.quant_conv is not None,
            "use_post_quant_conv": self.post_quant_conv is not None,
            "mid_block_add_attention": self.mid_block_add_attention,
            "down_block_types": self.down_block_types,
            "up_block_types": self.up_block_types,
        }
        parts = {
            "encoder": self.encoder,
            "quant_conv": self.quant_conv,
            "post_quant_conv": self.post_quant_conv,
            "decoder": self.decoder,
        }
        save_folder(path, CLASS_NAME, config, parts)


def _draw(
    mean: Float[Array, "lh lw latent"], logvar: Float[Array, "lh lw latent"], key: Key
) -> Float[Array, "lh lw latent"]:
    """A reparameterised draw from the diagonal Gaussian, differentiable in its moments."""
    return mean + jnp.exp(0.5 * logvar) * jr.normal(key, mean.shape, mean.dtype)


def draw_posterior_tokens(
    tokenizer: KLTokenizer, moments: Float[Array, "pair 2 lh lw latent"], key: Key
) -> Float[Array, "seq token_dim"]:
    """Tokens of a latent drawn from one of cached posteriors, as MAR trains (`engine_mar.py`
    with its cache): one of the `pair` entries of `moments` (an image and its flip, as
    `KLTokenizer.posterior_pair` gives them) picked uniformly, then `mean + exp(logvar / 2) *
    eps`, shifted, scaled and patchified as `encode` does, whatever `sample_posterior` says.

    **Arguments:**

    - `tokenizer`: the tokenizer the moments come from.
    - `moments`: `[pair, 2, lh, lw, latent]`, per entry its mean and log-variance.
    - `key`: split in two, `k_pick, k_eps = jr.split(key)`: the entry is
      `jr.randint(k_pick, (), 0, pair)`, and `eps = jr.normal(k_eps, mean.shape)`.

    **Returns:**

    `Float[Array, "seq token_dim"]`, differentiable in `moments`.
    """
    k_pick, k_eps = jr.split(key)
    mean, logvar = moments[jr.randint(k_pick, (), 0, moments.shape[0])]
    return tokenizer.latent_to_tokens(_draw(mean, logvar, k_eps))


def _check_block_types(arch: dict, blocks: int) -> None:
    for name, kinds in ATTENTION_BLOCKS.items():
        types = arch[name]
        if len(types) != blocks or any(t not in kinds for t in types):
            raise ValueError(
                f"{name}={types!r} must give one of {kinds} for each of the {blocks} entries "
                "of block_out_channels."
            )


# One compilation per architecture (its ints, tuples and flags are static under filter_jit)
# instead of one per primitive and shape, which costs tens of seconds eagerly on a small CPU.
@eqx.filter_jit
def _build_parts(arch: dict, *, key: Key) -> dict:
    k_enc, k_quant, k_post, k_dec = jr.split(key, 4)
    latent = arch["latent_channels"]
    common = {
        "block_out_channels": arch["block_out_channels"],
        "layers_per_block": arch["layers_per_block"],
        "norm_num_groups": arch["norm_num_groups"],
        "mid_block_add_attention": arch["mid_block_add_attention"],
    }
    return {
        "encoder": Encoder(
            latent,
            double_z=True,
            **common,
            block_attention=block_attention(arch["down_block_types"], ATTN_DOWN_BLOCK),
            key=k_enc,
        ),
        "quant_conv": Conv2d(2 * latent, 2 * latent, 1, key=k_quant)
        if arch["use_quant_conv"]
        else None,
        "post_quant_conv": Conv2d(latent, latent, 1, key=k_post)
        if arch["use_post_quant_conv"]
        else None,
        "decoder": Decoder(
            latent,
            **common,
            block_attention=block_attention(arch["up_block_types"], ATTN_UP_BLOCK),
            key=k_dec,
        ),
    }
