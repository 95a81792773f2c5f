import typing

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._types import CONTINUOUS, Image, Key
from ._abstract import AbstractImageTokenizer


def check_grid(image_size: int, patch_size: int) -> tuple[int, int]:
    """The token grid of square images cut into square patches; raises if they do not tile."""
    if patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} must divide image_size={image_size} (both positive)."
        )
    side = image_size // patch_size
    return side, side


def check_image(image: Image, image_size: int) -> None:
    """Raise a clear error for an image the tokenizer was not built for (shapes are static)."""
    if image.shape != (image_size, image_size, 3):
        raise ValueError(
            f"this tokenizer takes images of shape {(image_size, image_size, 3)}, got "
            f"{tuple(image.shape)}; build it with image_size={image.shape[0]} or resize the image."
        )


def patchify(image: Float[Array, "h w c"], patch_size: int) -> Float[Array, "seq token_dim"]:
    """Cut an image (or a latent grid) into patches, row-major over the grid; within a patch
    the channels run over patch rows, then patch columns, then channels (RGB for images)."""
    h, w, c = image.shape
    gh, gw = h // patch_size, w // patch_size
    patches = image.reshape(gh, patch_size, gw, patch_size, c).transpose(0, 2, 1, 3, 4)
    return patches.reshape(gh * gw, patch_size * patch_size * c)


def unpatchify(
    patches: Float[Array, "seq token_dim"], grid: tuple[int, int], patch_size: int
) -> Float[Array, "h w c"]:
    """The inverse of `patchify`."""
    gh, gw = grid
    image = patches.reshape(gh, gw, patch_size, patch_size, -1).transpose(0, 2, 1, 3, 4)
    return image.reshape(gh * patch_size, gw * patch_size, -1)


@typing.final
class PatchTokenizer(AbstractImageTokenizer):
    """Pixels as continuous tokens: each token is one patch of raw pixels, no training.

    Token `i` is grid cell `(i // grid[1], i % grid[1])`; its `patch_size**2 * 3` channels
    run over patch rows, patch columns, then RGB. Decoding is the exact inverse of encoding
    (then clipped to [-1, 1], so that generated tokens always give a valid image).

    **Arguments:**

    - `image_size`: side of the square images in pixels.
    - `patch_size`: side of a patch in pixels; must divide `image_size`.
    - `scale`: tokens are pixels times `scale` (decoding divides by it), to give a head
      targets of a chosen magnitude, as MAR scales its latents.
    """

    token_kind: typing.ClassVar[str] = CONTINUOUS
    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    grid: tuple[int, int] = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    vocab_size: None = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, image_size: int = 32, patch_size: int = 4, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}.")
        self.grid = check_grid(image_size, patch_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.token_dim = patch_size * patch_size * 3
        self.vocab_size = None
        self.scale = float(scale)

    def encode(self, image: Image) -> Float[Array, "seq token_dim"]:
        check_image(image, self.image_size)
        return patchify(image, self.patch_size) * self.scale

    def decode(self, tokens: Float[Array, "seq token_dim"]) -> Image:
        image = unpatchify(tokens / self.scale, self.grid, self.patch_size)
        return jnp.clip(image, -1.0, 1.0)

    def fit(self, images: np.ndarray, *, key: Key) -> "PatchTokenizer":
        del images, key
        return self
