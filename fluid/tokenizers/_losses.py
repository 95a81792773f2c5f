"""Training losses of the autoencoder tokenizers, on ONE example (vmap and average outside).

Each takes the arrays a tokenizer's `reconstruct` returns, so a training step is
`loss(image, *tokenizer.reconstruct(image, ...))`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._types import Image, Scalar

RECONSTRUCTION_LOSSES = ("l1", "l2")


def reconstruction_loss(image: Image, reconstruction: Image, kind: str = "l1") -> Scalar:
    """Mean absolute (`"l1"`) or mean squared (`"l2"`) error over pixels and channels."""
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(
            f"reconstruction loss must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}."
        )
    diff = reconstruction.astype(jnp.float32) - image.astype(jnp.float32)
    return jnp.mean(jnp.abs(diff)) if kind == "l1" else jnp.mean(jnp.square(diff))


def gaussian_kl(mean: Float[Array, "lh lw latent"], logvar: Float[Array, "lh lw latent"]) -> Scalar:
    """KL divergence of the diagonal Gaussian `N(mean, exp(logvar))` to `N(0, I)`, summed
    over every latent element (diffusers' `DiagonalGaussianDistribution.kl()`):
    `0.5 * sum(mean**2 + exp(logvar) - 1 - logvar)`."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def kl_autoencoder_loss(
    image: Image,
    reconstruction: Image,
    mean: Float[Array, "lh lw latent"],
    logvar: Float[Array, "lh lw latent"],
    *,
    kl_weight: float = 1e-6,
    reconstruction_kind: str = "l1",
) -> tuple[Scalar, dict[str, Scalar]]:
    """The KL autoencoder's loss: reconstruction plus `kl_weight` times the posterior's KL
    divergence to the standard normal.

    **Arguments:**

    - `image`: the input image.
    - `reconstruction`: the decoder's image of a latent drawn from the posterior (as
      `KLTokenizer.reconstruct` returns it, with `mean` and `logvar`).
    - `mean`, `logvar`: the posterior over the latent.
    - `kl_weight`: weight of the KL term. Stable Diffusion's autoencoders used 1e-6 against
      a reconstruction summed over pixel values; the reconstruction here is their mean, so
      the same balance is 1e-6 divided by `h * w * 3`.
    - `reconstruction_kind`: `"l1"` or `"l2"` (see `reconstruction_loss`).

    **Returns:**

    The total and its parts, `{"reconstruction": ..., "kl": ...}` (the KL unweighted).
    """
    rec = reconstruction_loss(image, reconstruction, reconstruction_kind)
    kl = gaussian_kl(mean, logvar)
    return rec + kl_weight * kl, {"reconstruction": rec, "kl": kl}


def vq_autoencoder_loss(
    image: Image,
    reconstruction: Image,
    latent: Float[Array, "lh lw dim"],
    codes: Float[Array, "lh lw dim"],
    *,
    beta: float = 0.25,
    reconstruction_kind: str = "l2",
) -> tuple[Scalar, dict[str, Scalar]]:
    """The VQ autoencoder's loss (van den Oord et al., 2017): reconstruction, plus the
    codebook term `mean((stop_gradient(latent) - codes)**2)` that moves codes to the
    encoder's outputs, plus `beta` times the commitment term
    `mean((latent - stop_gradient(codes))**2)` that keeps the encoder near its codes.

    (diffusers' `VectorQuantizer`, in its default `legacy` mode, puts `beta` on the codebook
    term instead; this is the paper's form.)

    **Arguments:**

    - `image`: the input image.
    - `reconstruction`: the decoder's image of the straight-through quantised latent (as
      `VQTokenizer.reconstruct` returns it, with `latent` and `codes`).
    - `latent`: the encoder's latent before quantisation.
    - `codes`: the nearest code of each latent cell, taken from the codebook.
    - `beta`: weight of the commitment term.
    - `reconstruction_kind`: `"l1"` or `"l2"` (see `reconstruction_loss`).

    **Returns:**

    The total and its parts, `{"reconstruction": ..., "codebook": ..., "commitment": ...}`
    (the commitment unweighted).
    """
    rec = reconstruction_loss(image, reconstruction, reconstruction_kind)
    latent, codes = latent.astype(jnp.float32), codes.astype(jnp.float32)
    codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(latent) - codes))
    commitment = jnp.mean(jnp.square(latent - jax.lax.stop_gradient(codes)))
    total = rec + codebook + beta * commitment
    return total, {"reconstruction": rec, "codebook": codebook, "commitment": commitment}
