import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from .._weights import read_safetensors
from ._abstract import AbstractFeatureExtractor


def _how(size: int) -> str:
    return (
        "fluid ships no Inception weights and never downloads any. Supply the network "
        f"yourself: `apply`, a function from images [n, {size}, {size}, 3] in [-1, 1] to "
        "pool features [n, 2048] (a JAX or NumPy port of FID's Inception-v3, say), and, if "
        "it takes its parameters as a first argument, `weights`, a .safetensors file of "
        "them (FID's Inception weights converted once, with the tool of your choice); "
        "fluid then calls apply(params, images) with params a dict from tensor name to "
        "array."
    )


@typing.final
class InceptionFeatures(AbstractFeatureExtractor):
    """Inception-v3 pool features, for FID proper, from a network that the user supplies.

    Images are resized (bilinear) to `input_size` and passed to the network; what it
    returns, flattened per image, are the features. Without `apply`, construction raises
    an error that explains how to supply the network. Nothing is ever downloaded.

    **Arguments:**

    - `apply`: `apply(images)`, or `apply(params, images)` when `weights` is given,
      mapping `[n, input_size, input_size, 3]` float32 images in [-1, 1] to `[n, d]`
      features (the 2048 pool features for FID).
    - `weights`: a `.safetensors` file of the network's parameters, read without torch or
      pickle and passed to `apply` as a dict from tensor name to array.
    - `name`: names the features (see `AbstractFeatureExtractor`); give ports with
      different weights different names, as their FIDs differ.
    - `input_size`: side of the network's input (299 for FID's Inception-v3).
    """

    apply: Callable = eqx.field(static=True)
    params: dict[str, Any] | None
    name: str = eqx.field(static=True)
    input_size: int = eqx.field(static=True)

    def __init__(
        self,
        apply: Callable | None = None,
        *,
        weights: str | os.PathLike | None = None,
        name: str = "inception-v3",
        input_size: int = 299,
    ):
        if apply is None:
            raise ValueError("InceptionFeatures needs a network. " + _how(input_size))
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"no weights file at {weights}. " + _how(input_size))
        self.apply = apply
        self.params = None if weights is None else read_safetensors(weights)
        self.name = name
        self.input_size = input_size

    def __call__(
        self, images: Float[np.ndarray | jax.Array, "n h w 3"]
    ) -> Float[np.ndarray, "n d"]:
        """Features of a batch of images: the network's outputs, `[n, d]` float64."""
        images = jnp.asarray(images, jnp.float32)
        n = images.shape[0]
        resized = jax.image.resize(
            images, (n, self.input_size, self.input_size, 3), method="bilinear"
        )
        out = self.apply(resized) if self.params is None else self.apply(self.params, resized)
        return np.asarray(out, np.float64).reshape(n, -1)
