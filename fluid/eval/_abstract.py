import abc

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Float


class AbstractFeatureExtractor(eqx.Module):
    """Maps images to feature vectors, whose statistics the Frechet distance compares.

    FID is this distance with the pool features of an Inception-v3 network
    (`InceptionFeatures`); on the `shapes` data set `ShapesFeatures` needs no network.
    A third-party extractor subclasses this class, gives a `name` and implements
    `__call__`; nothing else is needed for `feature_stats`, `shapes_reference_stats` and
    `FeatureStats.distance` to use it.

    `name` identifies the features: two extractors with the same name must give the same
    features for the same images (change the name when the features change, e.g. a new
    version or other weights). Cached statistics are keyed by it, and statistics of
    different extractors refuse to be compared.
    """

    name: eqx.AbstractVar[str]

    @abc.abstractmethod
    def __call__(
        self, images: Float[np.ndarray | jax.Array, "n h w 3"]
    ) -> Float[np.ndarray, "n d"]:
        """Features of a batch of images.

        **Arguments:**

        - `images`: `[n, h, w, 3]` with values in [-1, 1] (NumPy or JAX). An extractor
          that needs another size resizes them itself.

        **Returns:**

        A float64 NumPy array `[n, d]`, one row per image, with `d` fixed by the extractor
        (whatever the image size) and each row depending only on its own image, so that
        batching does not change the features. Deterministic.
        """
