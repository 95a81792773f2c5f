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


# Background pixels: darker than this in every channel and this close to grey (channels in
# [0, 1]). The data set's backgrounds, plain or textured, lie below 0.26 and within 0.1 of
# grey; its objects are brighter than 0.3 even shaded and dimmed to 0.7 of their brightness.
_DARK = 0.3
_GREY = 0.15


def _shift(array: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """`out[:, y, x] = array[:, y + dy, x + dx]`, `fill` outside the image."""
    out = np.full_like(array, fill)
    h, w = array.shape[1:3]
    out[:, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)] = array[
        :, max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)
    ]
    return out


def _box_sum(array: np.ndarray, radius: int) -> np.ndarray:
    """Sum of `[n, h, w, ...]` over the `(2 radius + 1)^2` window around each pixel (the
    part inside the image)."""
    n, h, w = array.shape[:3]
    total = np.zeros((n, h + 1, w + 1, *array.shape[3:]))
    total[:, 1:, 1:] = array.cumsum(1).cumsum(2)
    top, bottom = np.clip(np.arange(h) - radius, 0, h), np.clip(np.arange(h) + radius + 1, 0, h)
    left, right = np.clip(np.arange(w) - radius, 0, w), np.clip(np.arange(w) + radius + 1, 0, w)
    rows = total[:, bottom] - total[:, top]
    return rows[:, :, right] - rows[:, :, left]


def local_background(pixels: Float[np.ndarray, "n h w 3"]) -> Float[np.ndarray, "n h w 3"]:
    """Each pixel's background colour: the mean of the dark, greyish pixels (whose eight
    neighbours are dark and greyish too, so not an object's faint edge) within an eighth of
    the image side; the mean over the whole image where none is that near; `BACKGROUND`
    where the image has none."""
    h, w = pixels.shape[1:3]
    value = pixels.max(-1)
    dark = (value < _DARK) & (value - pixels.min(-1) < _GREY)
    eroded = dark.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            eroded &= _shift(dark, dy, dx, True)
    weight = eroded.astype(np.float64)
    radius = max(2, min(h, w) // 8)
    count = _box_sum(weight, radius)[..., None]
    local = _box_sum(pixels * weight[..., None], radius) / np.maximum(count, 1.0)
    total = weight.sum((1, 2))[:, None, None, None]
    overall = np.where(
        total > 0,
        (pixels * weight[..., None]).sum((1, 2), keepdims=True) / np.maximum(total, 1.0),
        _BACKGROUND,
    )
    return np.where(count > 0, local, overall)


def unmix_shaded(
    pixels: Float[np.ndarray, "n h w 3"],
) -> tuple[Int[np.ndarray, "n h w"], Float[np.ndarray, "n h w"], Float[np.ndarray, "n h w 3"]]:
    """Each pixel as `background + amount * (colour - BACKGROUND)` for its best colour, at
    any brightness: `unmix` with the image's own (local) background and without the
    colour's end, so that a shaded, dimmed or brightened colour is still that colour.

    Returns the index of the colour whose ray (from the pixel's background along the
    colour's direction) passes nearest and the amount along it (1 for the palette colour on
    `BACKGROUND`, 0.8 for it dimmed to 0.8; for an edge, times its coverage), both
    `[n, h, w]`, and the pixel's offset from the ray, `[n, h, w, 3]` (its norm is the
    distance). The nearest ray is the one at the smallest angle
    from the pixel's difference from its background: colour is judged by hue and chroma,
    not brightness.
    """
    direction = _PALETTE - _BACKGROUND
    length2 = (direction**2).sum(-1)
    offset = pixels - local_background(pixels)
    projection = offset @ direction.T
    amount = projection / length2
    along = np.maximum(amount, 0.0)
    residual2 = (offset**2).sum(-1, keepdims=True) - 2 * along * projection
    residual2 += along**2 * length2
    best = residual2.argmin(-1)[..., None]
    chosen = np.take_along_axis(amount, best, -1)
    perpendicular = offset - np.maximum(chosen, 0.0) * direction[best[..., 0]]
    return best[..., 0], chosen[..., 0], perpendicular
