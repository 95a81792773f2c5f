"""Pixels of `shapes` images as blends of the background and one palette colour."""

import numpy as np
from jaxtyping import Float, Int

from ..data.shapes import BACKGROUND, COLORS

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in COLOR_NAMES], np.float64)
_BACKGROUND = np.asarray(BACKGROUND, np.float64)


def unmix(
    pixels: Float[np.ndarray, "*shape 3"],
) -> tuple[Int[np.ndarray, "*shape"], Float[np.ndarray, "*shape"], Float[np.ndarray, "*shape"]]:
    """Each pixel as `background + coverage * (colour - background)` for its best colour.

    Returns the index of the colour whose segment passes nearest, the coverage along it
    (not clipped, so that noise averages out) and the distance from the segment (the
    coverage clipped to [0, 1]), all `[...]`.
    """
    direction = _PALETTE - _BACKGROUND
    length2 = (direction**2).sum(-1)
    offset = pixels - _BACKGROUND
    projection = offset @ direction.T
    unclipped = projection / length2
    coverage = np.clip(unclipped, 0.0, 1.0)
    # |offset - coverage * direction|^2, expanded to avoid a [..., k, 3] temporary.
    residual2 = (offset**2).sum(-1, keepdims=True) - 2 * coverage * projection
    residual2 += coverage**2 * length2
    best = residual2.argmin(-1)[..., None]
    return (
        best[..., 0],
        np.take_along_axis(unclipped, best, -1)[..., 0],
        np.sqrt(np.maximum(np.take_along_axis(residual2, best, -1)[..., 0], 0.0)),
    )
