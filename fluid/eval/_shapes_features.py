import typing
from typing import ClassVar

import jax
import numpy as np
from jaxtyping import Float

from ._abstract import AbstractFeatureExtractor
from ._palette import COLOR_NAMES, unmix

# Regions per image side for the colour histograms, and orientation bins of edges.
_GRID = 4
_ORIENTATIONS = 8
# Distance from the palette (RGB, channels in [0, 1]) at which a pixel's colour counts half.
_COLOR_SCALE = 0.15


def _region_means(maps: np.ndarray, regions: int) -> np.ndarray:
    """Mean of `[n, h, w, c]` maps over a `regions x regions` grid, `[n, regions^2 * c]`.

    Region borders fall between pixels at any image size divisible or not: each pixel goes
    to the region its centre lies in.
    """
    n, h, w, c = maps.shape
    row = (np.arange(h) * regions) // h
    col = (np.arange(w) * regions) // w
    cell = (row[:, None] * regions + col[None, :]).ravel()
    sums = np.zeros((n, regions * regions, c))
    np.add.at(sums, (slice(None), cell), maps.reshape(n, h * w, c))
    counts = np.bincount(cell, minlength=regions * regions)
    return (sums / counts[:, None]).reshape(n, -1)


@typing.final
class ShapesFeatures(AbstractFeatureExtractor):
    """Hand-made features of `shapes` images, for a Frechet distance that needs no network.

    Every pixel is unmixed into a palette colour and how much of the pixel it covers (as
    `ShapesEval` does), discounted by how far the pixel lies from any blend of background
    and palette colour. From these coverage maps, 191 features:

    - colour histograms of a 4 x 4 grid of regions (112: what colour is where);
    - per colour, its covered fraction and the raw first and second moments of its
      coverage over image coordinates in [0, 1] (42: how much, where, how spread);
    - histograms of edge orientations (8 bins, weighted by edge strength) of the four
      quadrants of the total coverage (32: circles have edges of every orientation, squares
      only horizontal and vertical ones, triangles two slanted sides and a base);
    - the mean distance from the palette and the fraction of pixels far from it (2: noise,
      off-palette colours), and the mean colour (3).

    Features depend on image content in units of the image side, so images of any size
    give comparable features. Deterministic; pure NumPy.
    """

    name: ClassVar[str] = "shapes-v1"

    def __call__(
        self, images: Float[np.ndarray | jax.Array, "n h w 3"]
    ) -> Float[np.ndarray, "n d"]:
        """Features of a batch of images, `[n, 191]` (see the class docstring)."""
        pixels = (np.asarray(images, np.float64) + 1.0) / 2.0
        n, h, w, _ = pixels.shape
        color, coverage, residual = unmix(pixels)
        conformity = np.exp(-((residual / _COLOR_SCALE) ** 2))
        amount = np.clip(coverage, 0.0, 1.0) * conformity
        one_hot = color[..., None] == np.arange(len(COLOR_NAMES))
        maps = np.where(one_hot, amount[..., None], 0.0)

        histograms = _region_means(maps, _GRID)

        y, x = (np.mgrid[0:h, 0:w] + 0.5) / np.asarray([h, w])[:, None, None]
        coordinates = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y])
        moments = np.einsum("nhwc,khw->nck", maps, coordinates).reshape(n, -1) / (h * w)

        total = maps.sum(-1)
        # Gradients per unit of the image side, so that edge strength does not grow with
        # the image's resolution.
        gy, gx = np.gradient(total, axis=(1, 2))
        strength = np.hypot(gx, gy)
        angle = np.mod(np.arctan2(gy, gx), np.pi)
        bins = np.minimum((angle / np.pi * _ORIENTATIONS).astype(int), _ORIENTATIONS - 1)
        edges = np.where(bins[..., None] == np.arange(_ORIENTATIONS), strength[..., None], 0.0)
        orientations = _region_means(edges, 2) * (h + w) / 2

        off_palette = np.stack([residual.mean((1, 2)), (conformity < 0.5).mean((1, 2))], -1)
        mean_color = pixels.mean((1, 2))
        return np.concatenate([histograms, moments, orientations, off_palette, mean_color], -1)
