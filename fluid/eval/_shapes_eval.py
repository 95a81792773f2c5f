"""`ShapesEval`: a GenEval-style automatic judge of images of the built-in `shapes` data set.

GenEval (Ghosh et al., 2023) scores a text-to-image model by detecting the objects in its
images and checking each prompt's requirements: an object, two objects, a count, a colour, a
relative position, colours attributed to two objects. On `shapes` images an object detector
needs no training: objects have colours from a known palette on a dark background, so each
pixel is unmixed into (palette colour, amount) along the ray from its background (the mean
of the dark, greyish pixels around it) in that colour's direction: the colour is the ray at
the smallest angle (hue and chroma, not brightness), and the amount is how far along it the
pixel lies (the palette colour on the plain background is 1; anti-aliased edges, shading and
dimming scale it). Coverage is the amount over the object's own brightness nearby (the
largest amount of its colour within 2 px); covered pixels are grouped into connected
components per colour, and each component's shape is read from its geometry: how much of
its bounding box it fills (square 1, circle pi/4, triangle 1/2) and how far its mass sits
below the box's centre (a triangle points up, so 1/6 of its height; circles and squares 0).
A component whose pixels scatter about their colour as noise does is no shape.

On flat images (the `flat` style) the background found is `BACKGROUND` and the brightness
1, so the judge finds what it found before it judged shaded ones (measured on 720 data-set
images: the same objects, shapes and colours; boxes within 0.13 px).
"""

import itertools
import typing
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jaxtyping import Float

from ..data.shapes import (
    CATEGORIES,
    COLORS,
    NUMBERS,
    PLURALS,
    RELATIONS,
    SHAPES,
    parse_caption,
)
from ._palette import COLOR_NAMES, unmix_shaded

# Shape prototypes in (fill of the bounding box, mass offset below the box centre / height).
_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (np.pi / 4, 0.0),
    "square": (1.0, 0.0),
    "triangle": (0.5, 1 / 6),
}
# The offset is weighed up so that both cues span a similar range (0.5 fill, 1/6 offset).
_OFFSET_WEIGHT = 2.0
# Objects are as wide as high; a component much longer one way is not one object.
_MAX_ASPECT = 1.35
# Edge pixels covered less than this are background: it keeps faint noise (and float error,
# about 1e-8 in a rendered image) from widening a box.
_MIN_EDGE_COVERAGE = 0.1
# Pixels whose colour amounts to less than this (in units of the palette colour on the
# plain background) are too faint to start an object; they may still be one's edge.
_MIN_AMOUNT = 0.25
# A component whose covered pixels lie further than this (RMS, channels in [0, 1]) from their
# mean offset from the colour's ray is noise, not an object: measured at most 0.07 for the
# data set's objects, flat or shaded, and 0.12-0.2 (1% below 0.135) for blobs of noise.
_MAX_SCATTER = 0.12
# An object's extent is read from its coverage clipped here: above the plateau only shading
# and noise, which would otherwise lift the plateau of its profile more than its edges.
_MAX_PROFILE = 1.05
# Coverage is left unclipped (up to this) where it is summed, so that noise averages out.
_MAX_COVERAGE = 1.5
# Images detected at once: bounds the memory of the per-pixel, per-colour arrays.
_CHUNK = 256


@typing.final
@dataclass(frozen=True)
class Detection:
    """One object found in an image.

    **Arguments:**

    - `shape`: one of `SHAPES`, or `None` when the component fits none of them (a blob, two
      touching objects).
    - `color`: a key of `COLORS`.
    - `center`: centre of the bounding box `(x, y)` in pixels (the data set's `center`).
    - `box`: `(left, top, right, bottom)` in pixels. Each side is measured from the
      object's coverage profile along that axis (the most coverage per column or row): its
      mass over its plateau, which anti-aliasing and blur leave unchanged. Curved and
      pointed ends reach their full extent in no whole pixel, so circles and triangles
      come out up to about 1.2 px smaller than the data set's `size`.
    - `area`: covered area in pixels (partly covered pixels count in part).
    - `fill`: `area` over the box's area.
    - `offset`: how far the centre of mass lies below the box's centre, over its height.
    """

    shape: str | None
    color: str
    center: tuple[float, float]
    box: tuple[float, float, float, float]
    area: float
    fill: float
    offset: float


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def all_prompts(category: str) -> list[str]:
    """Every distinct caption that the `shapes` data set writes in a GenEval category.

    **Arguments:**

    - `category`: one of `CATEGORIES`.

    **Returns:**

    The captions, in a fixed order (3 for `single_object`, 21 `colors`, 6 `two_object`,
    9 `counting`, 24 `position`, 252 `color_attr`).
    """
    pairs = list(itertools.permutations(SHAPES, 2))
    if category == "single_object":
        return [_article(s) for s in SHAPES]
    if category == "colors":
        return [_article(f"{c} {s}") for s in SHAPES for c in COLORS]
    if category == "two_object":
        return [f"{_article(a)} and {_article(b)}" for a, b in pairs]
    if category == "counting":
        return [f"{word} {PLURALS[s]}" for s in SHAPES for word in NUMBERS.values()]
    if category == "position":
        return [f"{_article(a)} {r} {_article(b)}" for a, b in pairs for r in RELATIONS]
    if category == "color_attr":
        return [
            f"{_article(f'{ca} {a}')} and {_article(f'{cb} {b}')}"
            for a, b in pairs
            for ca, cb in itertools.permutations(COLORS, 2)
        ]
    raise ValueError(f"unknown category {category!r}; categories are {CATEGORIES}.")


def _shift(array: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """`out[..., y, x] = array[..., y + dy, x + dx]`, `fill` outside the image."""
    out = np.full_like(array, fill)
    h, w = array.shape[-2:]
    out[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)] = array[
        ..., max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)
    ]
    return out


_FOUR = ((0, 1), (0, -1), (1, 0), (-1, 0))
_EIGHT = _FOUR + ((1, 1), (1, -1), (-1, 1), (-1, -1))
_WINDOW = tuple((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3))


def label_components(mask: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Connected components of `mask` (4-connected), joining only pixels of the same class.

    Pure NumPy: every pixel starts with its own flat index as its label, then repeatedly
    takes the smallest label among its connected neighbours and jumps to its label's label
    (pointer jumping), which converges in a few dozen sweeps for objects of any shape.

    **Arguments:**

    - `mask`: `[..., h, w]` booleans, the pixels to label.
    - `classes`: `[..., h, w]` integers; neighbours of different classes stay apart.

    **Returns:**

    `[..., h, w]` int64 labels: `-1` outside `mask`; inside, the smallest flat index (over
    the whole array) of a pixel of the component, so equal labels mean one component.
    """
    size = mask.size
    index = np.arange(size, dtype=np.int64).reshape(mask.shape)
    labels = np.where(mask, index, size)
    joined = [
        mask & _shift(mask, dy, dx, False) & (classes == _shift(classes, dy, dx, -1))
        for dy, dx in _FOUR
    ]
    while True:
        new = labels
        for (dy, dx), link in zip(_FOUR, joined):
            new = np.where(link, np.minimum(new, _shift(labels, dy, dx, size)), new)
        flat = np.append(new.ravel(), size)
        for _ in range(4):
            flat = flat[flat]
        new = flat[:-1].reshape(mask.shape)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """Centre and length of an object along one axis from its profile (the largest coverage
    in each column, or row): the profile's mass over its plateau height, which blur and
    anti-aliasing leave unchanged."""
    plateau = np.median(profile[profile >= profile.max() / 2])
    positions = np.arange(len(profile)) + 0.5
    return float((positions * profile).sum() / profile.sum()), float(profile.sum() / plateau)


def _classify(fill: float, offset: float, aspect: float, max_distance: float) -> str | None:
    if aspect > _MAX_ASPECT:
        return None
    distances = {
        shape: np.hypot(fill - f, _OFFSET_WEIGHT * (offset - o))
        for shape, (f, o) in _PROTOTYPES.items()
    }
    shape = min(distances, key=distances.__getitem__)
    return shape if distances[shape] <= max_distance else None


@typing.final
@dataclass(frozen=True)
class ShapesEval:
    """An automatic, deterministic GenEval-style judge of generated `shapes` images.

    ```python
    judge = ShapesEval()
    prompts = judge.prompts(50, seed=0)            # 50 per category
    images = generate(prompts)                     # [n, h, w, 3] in [-1, 1]
    result = judge.score(images, prompts)
    result["overall"], result["categories"]["counting"]
    ```

    A prompt is judged as GenEval judges it: `single_object` and `two_object` need each
    named shape at least once; `counting` exactly the named number of that shape (in any
    colours); `colors` an object of that shape and colour; `color_attr` both shape-colour
    pairs; `position` both shapes, with the largest of each placed as the data set places
    them (see `relation_holds`: bounding boxes apart along the relation's axis, centres
    further apart along it than across it).

    **Arguments:**

    - `color_tolerance`: how far (RGB distance, channels in [0, 1]) a pixel may lie from
      the ray from its background through a palette colour (that colour at any
      brightness, blended with the background) and still count as that colour.
    - `min_area`: components smaller than this fraction of the image are noise. The
      smallest objects of the data set (a triangle a quarter of the image wide) cover
      about 3%.
    - `max_shape_distance`: components further than this from every shape prototype (in
      fill ratio, with the vertical mass offset weighed by 2), or more than 1.35 times as
      wide as high or high as wide, count as no shape.
    - `position_tolerance`: how far bounding boxes may overlap along a relation's axis, and
      how much further apart the centres may be across it than along it, as a fraction of
      the image side, for positions estimated from blurry pixels.
    """

    color_tolerance: float = 0.3
    min_area: float = 0.008
    max_shape_distance: float = 0.25
    position_tolerance: float = 0.015

    def prompts(self, n: int, seed: int = 0, categories: Sequence[str] = CATEGORIES) -> list[str]:
        """Evaluation prompts: `n` per category, category after category.

        Each category's distinct prompts (`all_prompts`) are shuffled by `seed` and taken in
        turn, so that every prompt of a small category occurs about equally often.

        **Arguments:**

        - `n`: prompts per category.
        - `seed`: seed of the shuffle; the same `(n, seed)` always gives the same prompts.
        - `categories`: which of `CATEGORIES` to draw from.

        **Returns:**

        A list of `n * len(categories)` captions.
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}.")
        out = []
        for category in categories:
            pool = all_prompts(category)
            rng = np.random.default_rng((seed, CATEGORIES.index(category)))
            rounds = max(1, -(-n // len(pool)))
            order = np.concatenate([rng.permutation(len(pool)) for _ in range(rounds)])
            out += [pool[int(i)] for i in order[:n]]
        return out

    def detect(self, images: Float[np.ndarray | jax.Array, "n h w 3"]) -> list[list[Detection]]:
        """Find the objects in images.

        **Arguments:**

        - `images`: `[n, h, w, 3]` with values in [-1, 1], as the data set returns them.

        **Returns:**

        For each image, its detections, largest first.
        """
        images = np.asarray(images)
        out: list[list[Detection]] = []
        for start in range(0, len(images), _CHUNK):
            out += self._detect_chunk(images[start : start + _CHUNK])
        return out

    def _detect_chunk(self, images: np.ndarray) -> list[list[Detection]]:
        pixels = (images.astype(np.float64) + 1.0) / 2.0
        n, h, w, _ = pixels.shape
        color, amount, off_ray = unmix_shaded(pixels)
        residual = np.sqrt((off_ray**2).sum(-1))
        matches = residual <= self.color_tolerance
        candidate = matches & (amount >= _MIN_AMOUNT)
        # Coverage is the amount over the object's own brightness nearby: the largest
        # amount of its colour within 2 px, where some pixel is fully covered.
        gain = np.zeros(amount.shape)
        for dy, dx in _WINDOW:
            near = _shift(candidate, dy, dx, False) & (_shift(color, dy, dx, -1) == color)
            gain = np.where(near, np.maximum(gain, _shift(amount, dy, dx, 0.0)), gain)
        coverage = np.where(gain > 0, amount / np.where(gain > 0, gain, 1.0), 0.0)
        core = candidate & (coverage >= 0.5)
        labels = label_components(core, color)
        # Partly covered edge pixels belong to the one neighbouring component of their
        # colour; between two components of one colour they belong to neither.
        lowest = np.full(labels.shape, labels.size)
        highest = np.full(labels.shape, -1)
        for dy, dx in _EIGHT:
            neighbour = _shift(labels, dy, dx, -1)
            same = (neighbour >= 0) & (_shift(color, dy, dx, -1) == color)
            lowest = np.where(same, np.minimum(lowest, neighbour), lowest)
            highest = np.where(same, np.maximum(highest, neighbour), highest)
        edge = ~core & matches & (coverage >= _MIN_EDGE_COVERAGE) & (lowest == highest)
        owner = np.where(core, labels, np.where(edge, highest, -1))
        weight = np.where(owner >= 0, np.clip(coverage, 0.0, _MAX_COVERAGE), 0.0)
        interior = core.copy()
        for dy, dx in _FOUR:
            interior &= _shift(labels, dy, dx, -1) == labels

        out: list[list[Detection]] = [[] for _ in range(n)]
        rows = np.arange(h)[:, None] + 0.5
        for image in range(n):
            ids, component = np.unique(owner[image], return_inverse=True)
            component = component.reshape(h, w)
            area = np.bincount(component.ravel(), weight[image].ravel(), len(ids))
            # Inner pixels are covered (at least 0.5), so dividing by their plateau at most
            # doubles an area: smaller components cannot reach `min_area`.
            for k in np.nonzero((ids >= 0) & (area >= self.min_area * h * w / 2))[0]:
                patch = np.where(component == k, weight[image], 0.0)
                # Shading and noise leave the largest amount nearby above a covered
                # pixel's: the object's inner pixels (their median) count as whole.
                inner = interior[image] & (component == k)
                plateau = float(np.median(patch[inner])) if inner.any() else 1.0
                # Pixels of one object scatter about one colour by noise alone; a blob of
                # noise matches a colour pixel by pixel, each its own way.
                solid = core[image] & (component == k)
                scatter = off_ray[image][solid] - off_ray[image][solid].mean(0)
                rough = np.sqrt((scatter**2).sum(-1).mean()) > _MAX_SCATTER
                patch = patch / plateau
                # Brighter than that is shading, not more of the object.
                area[k] = np.minimum(patch, 1.0).sum()
                if area[k] < self.min_area * h * w:
                    continue
                profile = np.minimum(patch, _MAX_PROFILE)
                x, width = _extent(profile.max(0))
                y, height = _extent(profile.max(1))
                patch = np.minimum(patch, 1.0)
                fill = float(area[k] / (width * height))
                offset = float(((patch * rows).sum() / area[k] - y) / height)
                aspect = max(width, height) / min(width, height)
                first = np.unravel_index(ids[k] % (h * w), (h, w))
                out[image].append(
                    Detection(
                        shape=None if rough else _classify(
                            fill, offset, aspect, self.max_shape_distance
                        ),
                        color=COLOR_NAMES[int(color[image][first])],
                        center=(x, y),
                        box=(x - width / 2, y - height / 2, x + width / 2, y + height / 2),
                        area=float(area[k]),
                        fill=fill,
                        offset=offset,
                    )
                )
        for found in out:
            found.sort(key=lambda d: -d.area)
        return out

    def check(
        self, detections: Sequence[Detection], prompt: str, image_size: int
    ) -> tuple[bool, str]:
        """Judge one image's detections against one prompt.

        **Arguments:**

        - `detections`: the image's detections, as `detect` returns them (largest first).
        - `prompt`: a caption of the `shapes` data set (see `parse_caption`).
        - `image_size`: side of the image in pixels.

        **Returns:**

        Whether the image satisfies the prompt, and why not (empty when it does).
        """
        wanted = parse_caption(prompt)
        category = wanted["category"]
        if category == "counting":
            shape = wanted["objects"][0]["shape"]
            count = len(wanted["objects"])
            found = sum(d.shape == shape for d in detections)
            if found != count:
                return False, f"{count} {PLURALS[shape]} wanted, {found} found"
            return True, ""
        required = Counter((o["shape"], o["color"]) for o in wanted["objects"])
        for (shape, color), count in required.items():
            found = [d for d in detections if d.shape == shape and color in (None, d.color)]
            if len(found) < count:
                name = f"{color} {shape}" if color else shape
                return False, f"{count - len(found)} {name} missing"
        if category == "position":
            shape_a, shape_b = (o["shape"] for o in wanted["objects"])
            a = next(d for d in detections if d.shape == shape_a)
            b = next(d for d in detections if d.shape == shape_b and d is not a)
            if not self._relation_holds(a, b, wanted["relation"], image_size):
                return False, (
                    f"the {a.shape} at {_point(a.center)} is not {wanted['relation']} "
                    f"the {b.shape} at {_point(b.center)}"
                )
        return True, ""

    def _relation_holds(self, a: Detection, b: Detection, relation: str, image_size: int) -> bool:
        # `relation_holds` on the detected boxes: apart along the axis, mostly along it
        # (both up to the tolerance, as the data set places objects on diagonals too).
        (al, at, ar, ab), (bl, bt, br, bb) = a.box, b.box
        dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
        tolerance = self.position_tolerance * image_size
        if relation == "to the left of":
            return ar <= bl + tolerance and dx > abs(dy) - tolerance
        if relation == "to the right of":
            return br <= al + tolerance and -dx > abs(dy) - tolerance
        if relation == "above":
            return ab <= bt + tolerance and dy > abs(dx) - tolerance
        if relation == "below":
            return bb <= at + tolerance and -dy > abs(dx) - tolerance
        raise ValueError(f"unknown relation {relation!r}; relations are {RELATIONS}.")

    def score(
        self, images: Float[np.ndarray | jax.Array, "n h w 3"], prompts: Sequence[str]
    ) -> dict[str, Any]:
        """Score images against the prompts they were generated from.

        **Arguments:**

        - `images`: `[n, h, w, 3]` with values in [-1, 1].
        - `prompts`: `n` captions of the `shapes` data set, `prompts[i]` for `images[i]`.

        **Returns:**

        A dict with `overall` (the mean of the per-category accuracies, as GenEval reports
        it, over the categories present), `categories` (accuracy per category),
        `intervals` (per category, the 95% Wilson interval `(low, high)` of its accuracy
        over its prompts, see `wilson_interval`), `counts` (images per category) and `details`: per image, a dict with `prompt`, `category`,
        `correct`, `reason` (why it failed) and `detections`.
        """
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
        # Parsed first, so that a prompt the judge cannot read fails before any detection.
        categories = [parse_caption(prompt)["category"] for prompt in prompts]
        details = []
        for prompt, category, found in zip(prompts, categories, self.detect(images)):
            correct, reason = self.check(found, prompt, images.shape[1])
            details.append(
                {
                    "prompt": prompt,
                    "category": category,
                    "correct": correct,
                    "reason": reason,
                    "detections": found,
                }
            )
        outcomes: dict[str, list[bool]] = {}
        for d in details:
            outcomes.setdefault(d["category"], []).append(d["correct"])
        accuracy = {c: float(np.mean(outcomes[c])) for c in CATEGORIES if c in outcomes}
        return {
            "overall": float(np.mean(list(accuracy.values()))) if accuracy else float("nan"),
            "categories": accuracy,
            "intervals": {c: wilson_interval(sum(outcomes[c]), len(outcomes[c])) for c in accuracy},
            "counts": {c: len(outcomes[c]) for c in accuracy},
            "details": details,
        }


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval of a proportion: `successes` of `trials`, at `z` standard
    errors (1.96: 95%). Unlike the normal approximation it stays inside [0, 1] and is not
    empty at 0 or `trials` successes, which a judge of a good model often scores.

    **Returns:**

    `(low, high)`; `(0.0, 1.0)` for no trials.
    """
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _point(xy: tuple[float, float]) -> str:
    return f"({xy[0]:.1f}, {xy[1]:.1f})"
