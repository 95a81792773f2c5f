"""`shapes`: the built-in procedural data set of captioned coloured shapes.

Each item is a small image of coloured shapes on a dark background with a caption
in one of GenEval's six categories (Ghosh et al., 2023): a single object, a colour, two
objects, a count, a relative position, or colours attributed to two objects. Items are
generated on the fly and deterministically from `(seed, index)`, so the set needs no
download, any index can be read in any order (a random-access source for Grain), and a
generated image can be checked against its prompt automatically.

Two styles draw the same objects: `flat` fills each with its palette colour on a plain
background, which a palette of a few hundred colours reproduces exactly; `shaded` lights each
object unevenly (a brightness ramp or a highlight, and a faint texture), softens the edges,
textures the background and adds noise, so that quantising colours loses information.

Coordinates are in pixels: `x` grows to the right, `y` grows downwards, and pixel `(row, col)`
covers `[col, col + 1) x [row, row + 1)`. An object's `size` is the side of its bounding box
(a circle's diameter, a square's side, a triangle's base and height).
"""

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import LAYOUTS, STYLES

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Hues far apart in RGB, so that a nearest-colour check of a generated pixel is unambiguous.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND: tuple[float, float, float] = (0.08, 0.08, 0.10)
CATEGORIES: tuple[str, ...] = (
    "single_object",
    "colors",
    "two_object",
    "counting",
    "position",
    "color_attr",
)
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

DEMO_PROMPTS: tuple[str, ...] = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a purple square",
    "an orange triangle",
    "a red square and a blue circle",
    "a white circle and a green triangle",
)

# Anti-aliasing: shapes are rasterised at this many samples per pixel side, then averaged.
_SUPERSAMPLE = 4
# Object sizes as fractions of the image side, by how many objects share the image: at 32 px
# one object spans 10-14 px and each of four objects 8-10 px.
_SIZE_RANGE: dict[int, tuple[float, float]] = {
    1: (0.31, 0.44),
    2: (0.25, 0.38),
    3: (0.25, 0.33),
    4: (0.25, 0.31),
}
# Largest object size by object count when sizes are scaled up (`object_scale`): what still
# leaves room for every object of a crowded image.
_MAX_SIZE: dict[int, float] = {1: 0.8, 2: 0.46, 3: 0.4, 4: 0.4}
_MAX_TRIES = 1000
_OBJECT_TRIES = 50
# `slots` layout: object centres as fractions of the image side, by object count, and the
# jitter around them (a fraction of the side, either way).
_SLOTS: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.5, 0.5),),
    2: ((0.25, 0.5), (0.75, 0.5)),
    3: ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75)),
    4: ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)),
}
_SLOT_JITTER = 0.06
# `shaded` style: an object's brightness (a factor of its palette colour) stays in this
# range; its darkest end lies in [0.6, 0.75] and its brightest in [1.0, 1.15].
_SHADE_RANGE = (0.6, 1.15)
# Amplitude of the stripes textured into an object's brightness.
_FILL_TEXTURE = 0.04
# Edges are blurred by a Gaussian of this standard deviation (a fraction of the image side:
# 0.6 px at 32 px).
_EDGE_BLUR = 0.6 / 32
# Standard deviation of the per-pixel noise (channels in [0, 1]): enough that a palette of
# 512 patches reproduces almost no pixel of a shaded image exactly.
_NOISE = 0.025


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(shape: str, color: str | None = None) -> str:
    words = f"{color} {shape}" if color else shape
    return f"{_article(words)} {words}"


def _inside(obj: dict[str, Any], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean coverage of one object at sample points `x`, `y` (pixel units)."""
    cx, cy = obj["center"]
    half = obj["size"] / 2
    if obj["shape"] == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if obj["shape"] == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if obj["shape"] == "triangle":
        # Apex up; the half-width grows linearly from 0 at the apex to `half` at the base.
        top = cy - half
        return (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    raise ValueError(f"unknown shape {obj['shape']!r}; shapes are {SHAPES}.")


def _shading(obj: dict[str, Any], x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
    """Brightness of one object at sample points: a linear ramp across it in a random
    direction or a fall-off from a highlight, plus faint stripes, within `_SHADE_RANGE`."""
    cx, cy = obj["center"]
    half = obj["size"] / 2
    dark, bright = rng.uniform(0.6, 0.75), rng.uniform(1.0, 1.15)
    ux, uy = np.cos(angle := rng.uniform(0, 2 * np.pi)), np.sin(angle)
    if rng.random() < 0.5:
        ramp = ((x - cx) * ux + (y - cy) * uy) / (2 * half) + 0.5
    else:
        ramp = 1 - np.hypot(x - cx - 0.4 * half * ux, y - cy - 0.4 * half * uy) / (1.4 * half)
    tx, ty = np.cos(angle := rng.uniform(0, np.pi)), np.sin(angle)
    frequency = rng.uniform(0.6, 1.2) * np.pi / half
    stripes = np.sin(frequency * (x * tx + y * ty) + rng.uniform(0, 2 * np.pi))
    brightness = dark + (bright - dark) * np.clip(ramp, 0, 1) + _FILL_TEXTURE * stripes
    return np.clip(brightness, *_SHADE_RANGE)


def _textured_background(x: np.ndarray, y: np.ndarray, image_size: int, rng: np.random.Generator):
    """A dark background, tinted, with a brightness gradient and soft waves: values about
    0.03-0.25."""
    tint = np.asarray(BACKGROUND) + rng.uniform(-0.02, 0.02, 3)
    u, v = x / image_size - 0.5, y / image_size - 0.5
    ux, uy = np.cos(angle := rng.uniform(0, 2 * np.pi)), np.sin(angle)
    factor = 1 + rng.uniform(0.4, 0.9) * (u * ux + v * uy)
    for _ in range(2):
        wx, wy = rng.normal(0, 1, 2)
        cycles = rng.uniform(1.5, 4.0) * 2 * np.pi / max(np.hypot(wx, wy), 1e-6)
        factor = factor + 0.25 * np.sin(cycles * (u * wx + v * wy) + rng.uniform(0, 2 * np.pi))
    return tint * np.clip(factor, 0.4, 2.2)[..., None]


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of `[h, w, 3]`, edges reflected."""
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    rows = sum(k * padded[i : i + h] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel))


def render(
    objects: Sequence[dict[str, Any]],
    image_size: int,
    style: str = "flat",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw objects on the dark background, anti-aliased.

    **Arguments:**

    - `objects`: dicts with `shape` (one of `SHAPES`), `color` (a key of `COLORS`),
      `center` (`(x, y)` in pixels) and `size` (bounding-box side in pixels). Later objects
      are drawn over earlier ones.
    - `image_size`: side of the square image in pixels.
    - `style`: `"flat"`: each object in its palette colour on the plain `BACKGROUND`;
      `"shaded"`: each object's colour scaled by a brightness of 0.6-1.15 that varies across
      it (a ramp or a highlight, faint stripes), on a tinted background with a gradient and
      soft waves, edges blurred (a Gaussian of 0.6 px at 32 px, in proportion at other
      sizes) and noise added (0.025 per channel, in [0, 1]).
    - `rng`: draws the shading, background and noise of `"shaded"` (a fixed seed when
      `None`); `"flat"` uses none.

    **Returns:**

    A float32 array `[image_size, image_size, 3]` with values in [-1, 1].
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles are {STYLES}.")
    shaded = style == "shaded"
    if shaded and rng is None:
        rng = np.random.default_rng(0)
    n = image_size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    y, x = coords[:, None], coords[None, :]
    canvas = np.empty((n, n, 3), np.float32)
    canvas[...] = BACKGROUND
    covered = np.zeros((n, n), bool)
    for obj in objects:
        if obj["color"] not in COLORS:
            raise ValueError(f"unknown colour {obj['color']!r}; colours are {tuple(COLORS)}.")
        inside = _inside(obj, x, y)
        if shaded:
            brightness = _shading(obj, x, y, rng)[inside]
            canvas[inside] = np.minimum(np.outer(brightness, COLORS[obj["color"]]), 1.0)
            covered |= inside
        else:
            canvas[inside] = COLORS[obj["color"]]
    if shaded:
        background = _textured_background(x, y, image_size, rng)
        canvas = np.where(covered[..., None], canvas, background)
    image = canvas.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean((1, 3))
    if shaded:
        image = _blur(image, _EDGE_BLUR * image_size) + rng.normal(0, _NOISE, image.shape)
        image = np.clip(image, 0.0, 1.0)
    return (image * 2 - 1).astype(np.float32)


def _separated(a: dict[str, Any], b: dict[str, Any], gap: float) -> bool:
    """Bounding boxes at least `gap` pixels apart along x or along y."""
    reach = (a["size"] + b["size"]) / 2 + gap
    return (
        abs(a["center"][0] - b["center"][0]) >= reach
        or abs(a["center"][1] - b["center"][1]) >= reach
    )


def relation_holds(a: dict[str, Any], b: dict[str, Any], relation: str) -> bool:
    """Whether object `a` is clearly `relation` object `b` (one of `RELATIONS`).

    Clearly means: the bounding boxes do not overlap along the relation's axis, and the
    centres are further apart along that axis than across it.
    """
    dx = b["center"][0] - a["center"][0]
    dy = b["center"][1] - a["center"][1]
    reach = (a["size"] + b["size"]) / 2
    if relation == "to the left of":
        return dx >= reach and dx > abs(dy)
    if relation == "to the right of":
        return -dx >= reach and -dx > abs(dy)
    if relation == "above":
        return dy >= reach and dy > abs(dx)
    if relation == "below":
        return -dy >= reach and -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; relations are {RELATIONS}.")


def _size_range(count: int, scale: float, image_size: int) -> tuple[float, float]:
    """Object sizes in pixels: the count's range, scaled, and capped so that the objects
    still fit with room to move (the 1 px margins and gaps do not shrink with the image)."""
    lo, hi = _SIZE_RANGE[count]
    if scale != 1.0:
        hi = min(hi * scale, max(hi, _MAX_SIZE[count]))
    per_row = 1 if count == 1 else 2
    room = 0.95 if count <= 2 else 0.8  # three or four objects share both rows
    hi = min(hi * image_size, room * (image_size - 3) / per_row)
    return min(lo * scale * image_size, hi), hi


def _slot_centres(count: int, relation: str | None) -> list[tuple[float, float]]:
    """Slot centres (fractions) in caption order: the first object left, or as `relation` says."""
    slots = list(_SLOTS[count])
    if relation in ("above", "below"):
        slots = [(y, x) for x, y in slots]  # top and bottom instead of left and right
    if relation in ("to the right of", "below"):
        slots[0], slots[1] = slots[1], slots[0]
    return slots


def _layout(
    rng: np.random.Generator,
    shapes: Sequence[str],
    colors: Sequence[str],
    image_size: int,
    relation: str | None = None,
    scale: float = 1.0,
    layout: str = "random",
) -> list[dict[str, Any]]:
    """Place objects inside the image, 1 px apart, with `objects[0] relation objects[1]`.

    `random` puts each object anywhere it fits; `slots` puts object `i` near a fixed slot
    (the centre for one object, left and right halves for two, quadrants for more).
    """
    lo, hi = _size_range(len(shapes), scale, image_size)
    margin = 1.0
    slots = _slot_centres(len(shapes), relation) if layout == "slots" else None
    for _ in range(_MAX_TRIES):
        placed: list[dict[str, Any]] = []
        for i, (shape, color) in enumerate(zip(shapes, colors)):
            size = float(rng.uniform(lo, hi))
            half = size / 2
            # Retrying each object where it failed, not the whole layout, keeps crowded
            # images (four objects at 16 px) from needing thousands of attempts.
            for _ in range(_OBJECT_TRIES):
                if slots is None:
                    x, y = rng.uniform(margin + half, image_size - margin - half, 2)
                else:
                    jitter = rng.uniform(-_SLOT_JITTER, _SLOT_JITTER, 2)
                    x, y = np.clip((np.array(slots[i]) + jitter) * image_size,
                                   margin + half, image_size - margin - half)
                obj = {"shape": shape, "color": color, "center": (float(x), float(y)), "size": size}
                if all(_separated(obj, other, margin) for other in placed):
                    placed.append(obj)
                    break
            else:
                break
        else:
            if relation is None or relation_holds(placed[0], placed[1], relation):
                return placed
    raise RuntimeError(  # unreachable with the size ranges above: layouts succeed within tries
        f"could not place {len(shapes)} objects in a {image_size} px image."
    )


def _sample(
    rng: np.random.Generator, category: str, image_size: int, scale: float = 1.0,
    layout: str = "random",
):
    def pick_shapes(k):
        return [SHAPES[i] for i in rng.choice(len(SHAPES), k, replace=False)]

    def pick_colors(k, distinct):
        return [tuple(COLORS)[i] for i in rng.choice(len(COLORS), k, replace=not distinct)]

    if category in ("single_object", "colors"):
        (shape,), (color,) = pick_shapes(1), pick_colors(1, True)
        objects = _layout(rng, [shape], [color], image_size, scale=scale, layout=layout)
        caption = _noun_phrase(shape, color if category == "colors" else None)
    elif category in ("two_object", "color_attr"):
        shapes, colors = pick_shapes(2), pick_colors(2, category == "color_attr")
        objects = _layout(rng, shapes, colors, image_size, scale=scale, layout=layout)
        named = colors if category == "color_attr" else [None, None]
        caption = " and ".join(_noun_phrase(s, c) for s, c in zip(shapes, named))
    elif category == "counting":
        count = int(rng.integers(2, 5))
        (shape,) = pick_shapes(1)
        objects = _layout(
            rng, [shape] * count, pick_colors(count, False), image_size, scale=scale, layout=layout
        )
        caption = f"{NUMBERS[count]} {PLURALS[shape]}"
    elif category == "position":
        shapes, colors = pick_shapes(2), pick_colors(2, False)
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        objects = _layout(rng, shapes, colors, image_size, relation, scale=scale, layout=layout)
        caption = f"{_noun_phrase(shapes[0])} {relation} {_noun_phrase(shapes[1])}"
    else:
        raise ValueError(f"unknown category {category!r}; categories are {CATEGORIES}.")
    return caption, objects


class ShapesDataset:
    """Captioned images of coloured shapes, generated deterministically per index.

    Item `i` depends only on `(seed, i)` (and `image_size`), so items can be read in any
    order, by any number of workers, and reproduced anywhere.

    **Arguments:**

    - `image_size`: side of the square images in pixels, at least 16.
    - `seed`: seed of the whole set.
    - `size`: number of items; `None` for an unbounded set (its length is then `2**31 - 1`,
      so that it still serves as a random-access source).
    - `categories`: the GenEval categories to draw captions from (see `CATEGORIES`).
    - `category_weights`: relative frequency of each category; uniform when `None`.
    - `object_scale`: multiplies the objects' sizes (capped so that every object still
      fits). Larger objects have less room to move, which makes a small model's job easier:
      the demo trains at 1.6.
    - `layout`: `"random"` places objects anywhere they fit; `"slots"` near fixed slots in
      caption order (one object centred; two side by side, the first named on the left, or
      as a position caption says; more in the quadrants), jittered by 6% of the side. Slots
      take most of the "where" out of the task, which a model trained for minutes on a CPU
      cannot yet learn: the demo uses them.
    - `style`: `"flat"` colours on a plain background, or `"shaded"` objects (uneven
      brightness, soft edges) on a textured background with noise (see `render`). Both
      styles give the same captions and objects for an index; a shaded image's randomness
      comes from `(seed, index)` too.

    Items are dicts: `image` (float32 `[h, w, 3]` in [-1, 1]), `caption`, `category` and
    `objects` (as `render` takes them).
    """

    def __init__(
        self,
        image_size: int = 32,
        seed: int = 0,
        size: int | None = None,
        categories: Sequence[str] = CATEGORIES,
        category_weights: Sequence[float] | None = None,
        object_scale: float = 1.0,
        layout: str = "random",
        style: str = "flat",
    ):
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; styles are {STYLES}.")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; layouts are {LAYOUTS}.")
        if object_scale <= 0:
            raise ValueError(f"object_scale must be positive, got {object_scale}.")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}.")
        categories = tuple(categories)
        unknown = [c for c in categories if c not in CATEGORIES]
        if not categories or unknown:
            raise ValueError(
                f"categories must be a non-empty subset of {CATEGORIES}, got {categories}."
            )
        if category_weights is None:
            weights = np.ones(len(categories))
        else:
            weights = np.asarray(category_weights, np.float64)
            if weights.shape != (len(categories),) or np.any(weights < 0) or weights.sum() <= 0:
                raise ValueError(
                    "category_weights must give one non-negative weight per category (not all "
                    f"zero); got {category_weights} for {categories}."
                )
        if size is not None and size < 0:
            raise ValueError(f"size must be non-negative or None, got {size}.")
        self.image_size = image_size
        self.seed = seed
        self.size = size
        self.categories = categories
        self.category_weights = weights / weights.sum()
        self.object_scale = float(object_scale)
        self.layout = layout
        self.style = style

    def __len__(self) -> int:
        return 2**31 - 1 if self.size is None else self.size

    def _index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"indices must be integers, got {type(index).__name__}.")
        index = int(index)
        n = len(self)
        if index < 0 and self.size is not None:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} items.")
        return index

    def describe(self, index: int) -> dict[str, Any]:
        """Item `index` without its image: `caption`, `category` and `objects`."""
        rng = np.random.default_rng((self.seed, self._index(index)))
        category = self.categories[int(rng.choice(len(self.categories), p=self.category_weights))]
        caption, objects = _sample(
            rng, category, self.image_size, self.object_scale, self.layout
        )
        return {"caption": caption, "category": category, "objects": objects}

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.describe(index)
        # A stream of its own, so that shading leaves the objects of an index unchanged.
        rng = np.random.default_rng((self.seed, self._index(index), 1))
        item["image"] = render(item["objects"], self.image_size, self.style, rng)
        return item

    def captions(self, n: int, start: int = 0) -> list[str]:
        """Captions of items `start, ..., start + n - 1`, without rendering their images."""
        return [self.describe(start + i)["caption"] for i in range(n)]


def shapes_options(config: Any) -> dict[str, Any]:
    """The `ShapesDataset` options a `fluid.config.DataConfig` sets besides image size, seed
    and size: object scale, layout, style and (when given) categories. Training data, held-out data
    and reference statistics (`fluid.eval`) are built with the same ones.

    (`config` is not annotated as a `DataConfig`: `fluid.config` checks its values against
    this module's `LAYOUTS` and `CATEGORIES`, so this module cannot import it.)"""
    options: dict[str, Any] = {"object_scale": config.object_scale, "layout": config.layout}
    # Flat (the default) is left out, so that reference statistics cached before styles
    # existed keep their file names.
    if config.style != "flat":
        options["style"] = config.style
    if config.categories is not None:
        options["categories"] = tuple(config.categories)
    return options


def caption_corpus(n: int = 4096, seed: int = 0) -> list[str]:
    """Captions for training a text tokenizer: `n` drawn from every category, plus the demo
    prompts, so every word of the data set's vocabulary occurs."""
    return ShapesDataset(seed=seed, size=n).captions(n) + list(DEMO_PROMPTS)


def parse_caption(caption: str) -> dict[str, Any]:
    """What a caption of this data set asks for, the inverse of the captioning.

    **Returns:**

    A dict with `category` and `objects`, a list of dicts with `shape` and `color` (`None`
    when the caption names none); for `position` also `relation` (between objects 0 and 1).
    Raises `ValueError` for a caption that no category produces.
    """
    shape = "|".join(SHAPES)
    color = "|".join(COLORS)
    phrase = rf"an? (?:({color}) )?({shape})"
    if m := re.fullmatch(phrase, caption):
        category = "colors" if m[1] else "single_object"
        return {"category": category, "objects": [{"shape": m[2], "color": m[1]}]}
    if m := re.fullmatch(rf"{phrase} and {phrase}", caption):
        category = "color_attr" if m[1] and m[3] else "two_object"
        objects = [{"shape": m[2], "color": m[1]}, {"shape": m[4], "color": m[3]}]
        return {"category": category, "objects": objects}
    relation = "|".join(RELATIONS)
    if m := re.fullmatch(rf"an? ({shape}) ({relation}) an? ({shape})", caption):
        objects = [{"shape": m[1], "color": None}, {"shape": m[3], "color": None}]
        return {"category": "position", "objects": objects, "relation": m[2]}
    number = "|".join(NUMBERS.values())
    if m := re.fullmatch(rf"({number}) ({'|'.join(PLURALS.values())})", caption):
        count = {v: k for k, v in NUMBERS.items()}[m[1]]
        single = {v: k for k, v in PLURALS.items()}[m[2]]
        return {"category": "counting", "objects": [{"shape": single, "color": None}] * count}
    raise ValueError(f"{caption!r} is not a caption of the shapes data set.")
