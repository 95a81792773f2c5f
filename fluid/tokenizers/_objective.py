"""Training an autoencoder tokenizer (`kl`, `vq`) with the one trainer of fluid.

`AutoencoderObjective` gives the trainer what it asks of a `FluidModel`, `loss_terms`, over
the losses of `fluid.tokenizers._losses`; everything else (sharding, accumulation,
checkpoints, metrics) is the trainer's, unchanged.
"""

import typing
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from .._types import Image, Key, Scalar
from ._kl import KLTokenizer
from ._losses import RECONSTRUCTION_LOSSES, kl_autoencoder_loss, vq_autoencoder_loss
from ._vq import VQTokenizer


@typing.final
class AutoencoderObjective(eqx.Module):
    """A trainable `kl` or `vq` tokenizer and its autoencoder loss; batched.

    For a `KLTokenizer`, `kl_autoencoder_loss` of a latent drawn from the posterior; for a
    `VQTokenizer`, `vq_autoencoder_loss` of the straight-through quantised latent. Every
    inexact array is trained (the codebook too, through the codebook term).

    **Arguments:**

    - `autoencoder`: the tokenizer to train.
    - `reconstruction`: `"l1"` or `"l2"` (see `reconstruction_loss`).
    - `kl_weight`: weight of the KL term (`kl` only).
    - `beta`: weight of the commitment term (`vq` only).
    """

    # Not named `tokenizer`: the sharding rules replicate a generative model's frozen
    # `tokenizer.*`, while this one trains and may be split like any trained part.
    autoencoder: KLTokenizer | VQTokenizer
    reconstruction: str = eqx.field(static=True)
    kl_weight: float = eqx.field(static=True)
    beta: float = eqx.field(static=True)

    def __init__(
        self,
        autoencoder: KLTokenizer | VQTokenizer,
        *,
        reconstruction: str = "l1",
        kl_weight: float = 1e-6,
        beta: float = 0.25,
    ):
        self.autoencoder = autoencoder
        self.reconstruction = reconstruction
        self.kl_weight = float(kl_weight)
        self.beta = float(beta)

    def __check_init__(self):
        if not isinstance(self.autoencoder, (KLTokenizer, VQTokenizer)):
            raise TypeError(
                "AutoencoderObjective trains a KLTokenizer or a VQTokenizer, got "
                f"{type(self.autoencoder).__name__}."
            )
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction must be one of {RECONSTRUCTION_LOSSES}, got "
                f"{self.reconstruction!r}."
            )

    def loss_terms(
        self, batch: Mapping[str, ArrayLike], *, keys: jaxtyping.Key[Array, " batch"]
    ) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
        """Per example: its loss and a count of 1, as `FluidModel.loss_terms` gives them.

        **Arguments:**

        - `batch`: a dict with `image`, float `[batch, h, w, 3]` in [-1, 1] (other keys are
          ignored).
        - `keys`: one key per example; the KL posterior's draw of example `i` comes from
          `keys[i]` alone, so micro-batches with the matching keys give the same sums
          (gradient accumulation is exact). The VQ loss is deterministic.

        **Returns:**

        The loss of each example (a mean over its pixels plus the latent terms) and ones,
        so that the trainer's `sum(total) / sum(count)` is the batch's mean loss.
        """
        images = jnp.asarray(batch["image"], jnp.float32)
        tokenizer = self.autoencoder

        def one(image: Image, key: Key) -> Scalar:
            if isinstance(tokenizer, KLTokenizer):
                loss, _ = kl_autoencoder_loss(
                    image, *tokenizer.reconstruct(image, key=key),
                    kl_weight=self.kl_weight, reconstruction_kind=self.reconstruction,
                )
            else:
                loss, _ = vq_autoencoder_loss(
                    image, *tokenizer.reconstruct(image),
                    beta=self.beta, reconstruction_kind=self.reconstruction,
                )
            return loss

        total = jax.vmap(one)(images, keys)
        return total, jnp.ones_like(total)

    @eqx.filter_jit
    def reconstruct(self, images: Float[Array, "batch h w 3"]) -> Float[Array, "batch h w 3"]:
        """Deterministic round trips, `decode(encode(image))`, as a generative model sees
        them: through the KL posterior's mean, or the nearest codes; clipped to [-1, 1]."""
        tokenizer = self.autoencoder
        return jax.vmap(lambda image: tokenizer.decode(tokenizer.encode(image)))(images)


def psnr(
    images: Float[Array, "batch h w 3"], reconstructions: Float[Array, "batch h w 3"]
) -> Scalar:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], averaged over the images.

    The peak-to-peak range of [-1, 1] is 2, so an image's PSNR is
    `10 * log10(2**2 / MSE) = 10 * log10(4 / MSE)`, its MSE a mean over pixels and channels;
    the same number as 8-bit PSNR (`10 * log10(255**2 / MSE)`) of the images mapped to
    [0, 255]. An exact reconstruction has an infinite PSNR.
    """
    diff = jnp.asarray(reconstructions, jnp.float32) - jnp.asarray(images, jnp.float32)
    mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(4.0 / mse))
