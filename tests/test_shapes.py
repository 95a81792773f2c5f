"""The built-in `shapes` data set: determinism, image format, captions that match the scene."""

import numpy as np
import pytest

from fluid.data.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    DEMO_PROMPTS,
    RELATIONS,
    SHAPES,
    ShapesDataset,
    caption_corpus,
    parse_caption,
    relation_holds,
    render,
)

N_PER_CATEGORY = 40


def items(category, image_size=32, n=N_PER_CATEGORY, seed=0):
    ds = ShapesDataset(image_size, seed=seed, categories=[category])
    return [ds[i] for i in range(n)]


def interior_point(obj):
    """A point at least 0.3 * size from the object's outline (circle and square centre,
    triangle incentre), so the pixel containing it is fully covered when size >= 8."""
    cx, cy = obj["center"]
    if obj["shape"] == "triangle":
        inradius = obj["size"] / (1 + np.sqrt(5))
        return cx, cy + obj["size"] / 2 - inradius
    return cx, cy


def clearly(a, b, relation):
    """Independent check of a relation: disjoint along its axis, mostly along its axis."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    ha, hb = a["size"] / 2, b["size"] / 2
    if relation == "to the left of":
        return ax + ha <= bx - hb and bx - ax > abs(by - ay)
    if relation == "to the right of":
        return bx + hb <= ax - ha and ax - bx > abs(by - ay)
    if relation == "above":
        return ay + ha <= by - hb and by - ay > abs(bx - ax)
    if relation == "below":
        return by + hb <= ay - ha and ay - by > abs(bx - ax)
    raise AssertionError(relation)


def test_deterministic_per_seed_and_index():
    a, b = ShapesDataset(32, seed=3), ShapesDataset(32, seed=3)
    for i in (0, 1, 17, 2**30 + 5):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["objects"] == y["objects"]
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    assert not np.array_equal(a[0]["image"], ShapesDataset(32, seed=4)[0]["image"])


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_image_format(image_size):
    ds = ShapesDataset(image_size)
    for i in range(12):
        item = ds[i]
        image = item["image"]
        assert image.dtype == np.float32 and image.shape == (image_size, image_size, 3)
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert item["category"] in CATEGORIES
        assert isinstance(item["caption"], str) and item["caption"]


@pytest.mark.parametrize("category", CATEGORIES)
def test_captions_match_objects(category):
    for item in items(category):
        assert item["category"] == category
        parsed = parse_caption(item["caption"])
        assert parsed["category"] == category
        objects = item["objects"]
        assert [o["shape"] for o in objects] == [p["shape"] for p in parsed["objects"]]
        for obj, want in zip(objects, parsed["objects"]):
            assert obj["shape"] in SHAPES and obj["color"] in COLORS
            if want["color"] is not None:
                assert obj["color"] == want["color"]
        if category == "counting":
            assert 2 <= len(objects) <= 4
        if category == "position":
            assert clearly(objects[0], objects[1], parsed["relation"]), item
        if category in ("two_object", "position", "color_attr"):
            assert objects[0]["shape"] != objects[1]["shape"]
        if category == "color_attr":
            assert objects[0]["color"] != objects[1]["color"]


def test_every_relation_and_count_occurs():
    relations = {parse_caption(it["caption"])["relation"] for it in items("position", n=60)}
    assert relations == {"to the left of", "to the right of", "above", "below"}
    counts = {len(it["objects"]) for it in items("counting", n=60)}
    assert counts == {2, 3, 4}


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_objects_inside_and_apart(image_size):
    ds = ShapesDataset(image_size, categories=["counting", "color_attr", "position"])
    for i in range(60):
        objects = ds[i]["objects"]
        for k, a in enumerate(objects):
            (x, y), half = a["center"], a["size"] / 2
            assert 0 <= x - half and x + half <= image_size
            assert 0 <= y - half and y + half <= image_size
            if image_size >= 32:
                assert 8 <= a["size"] <= 14 * image_size / 32
            for b in objects[k + 1 :]:
                reach = (a["size"] + b["size"]) / 2
                dx = abs(a["center"][0] - b["center"][0])
                dy = abs(a["center"][1] - b["center"][1])
                assert dx >= reach or dy >= reach, (a, b)


@pytest.mark.parametrize("image_size", [32, 64])
def test_pixels_have_named_colours(image_size):
    ds = ShapesDataset(image_size)
    for i in range(40):
        item = ds[i]
        image = (item["image"] + 1) / 2
        for obj in item["objects"]:
            x, y = interior_point(obj)
            np.testing.assert_allclose(image[int(y), int(x)], COLORS[obj["color"]], atol=1e-6)
        # The corner pixel is background unless an object reaches into it.
        near_corner = any(
            max(o["center"]) - o["size"] / 2 < 1 or min(o["center"]) - o["size"] / 2 < 1
            for o in item["objects"]
        )
        if not near_corner:
            np.testing.assert_allclose(image[0, 0], BACKGROUND, atol=1e-6)


def test_render_is_antialiased():
    obj = {"shape": "circle", "color": "red", "center": (16.0, 16.0), "size": 12.0}
    image = (render([obj], 32) + 1) / 2
    red, bg = np.asarray(COLORS["red"]), np.asarray(BACKGROUND)
    # Edge pixels are blends: neither pure colour, but on the segment between them.
    t = (image[..., 0] - bg[0]) / (red[0] - bg[0])
    blended = (t > 0.05) & (t < 0.95)
    assert blended.sum() >= 20
    np.testing.assert_allclose(image, bg + t[..., None] * (red - bg), atol=1e-5)
    # Coverage approximates the disc's area (36 pi px).
    assert abs(t.sum() - np.pi * 36) < 2.0


def test_size_and_indexing():
    assert len(ShapesDataset()) == 2**31 - 1
    ds = ShapesDataset(size=10)
    assert len(ds) == 10
    np.testing.assert_array_equal(ds[-1]["image"], ds[9]["image"])
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(TypeError):
        ds[1.5]


def test_category_weights():
    ds = ShapesDataset(categories=["colors", "counting"], category_weights=[1.0, 0.0])
    assert {ds.describe(i)["category"] for i in range(50)} == {"colors"}
    ds = ShapesDataset(categories=["colors", "counting"], category_weights=[1.0, 3.0])
    cats = [ds.describe(i)["category"] for i in range(400)]
    assert 0.65 < cats.count("counting") / len(cats) < 0.85


def test_invalid_arguments():
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(8)
    with pytest.raises(ValueError, match="categories"):
        ShapesDataset(categories=["colours"])
    with pytest.raises(ValueError, match="category_weights"):
        ShapesDataset(categories=["colors"], category_weights=[1.0, 2.0])


def test_corpus_and_demo_prompts():
    corpus = caption_corpus(600)
    words = {w for c in corpus for w in c.split()}
    expected = {"two", "three", "four", "left", "right", "above", "below"}
    assert set(SHAPES) | set(COLORS) | expected <= words
    assert len(DEMO_PROMPTS) == 8 and len(set(DEMO_PROMPTS)) == 8
    for prompt in DEMO_PROMPTS:
        parse_caption(prompt)
    with pytest.raises(ValueError):
        parse_caption("a purple elephant")


@pytest.mark.parametrize("layout", ["random", "slots"])
@pytest.mark.parametrize("image_size", [16, 32, 64])
@pytest.mark.parametrize("scale", [1.0, 1.5, 3.0])
def test_every_layout_size_and_scale_places_its_objects(layout, image_size, scale):
    ds = ShapesDataset(image_size, seed=3, object_scale=scale, layout=layout)
    for i in range(120):
        item = ds.describe(i)
        for obj in item["objects"]:
            half = obj["size"] / 2
            assert all(half <= c <= image_size - half for c in obj["center"])


def test_slots_place_objects_in_caption_order():
    ds = ShapesDataset(32, layout="slots", categories=("color_attr", "position"))
    for i in range(100):
        item = ds.describe(i)
        a, b = item["objects"]
        if item["category"] == "position":
            relation = next(r for r in RELATIONS if r in item["caption"])
            assert relation_holds(a, b, relation)
        else:  # the first named object on the left
            assert relation_holds(a, b, "to the left of")
    with pytest.raises(ValueError, match="layouts are"):
        ShapesDataset(32, layout="grid")


# -- styles ---------------------------------------------------------------------------------
# sha256 of the float32 bytes of items 0-11, computed before styles existed (commit 85c56f4):
# the flat style draws today's images bit for bit.
FLAT_DIGESTS = [
    ({"image_size": 32, "seed": 3},
     "5c7eee9e6f6d17ba7f143bdf3444df7c3c7f6b34660fd004599ab737da2a9509"),
    ({"image_size": 16, "seed": 1, "layout": "slots", "object_scale": 1.6},
     "b13f914ff1c65ed8c98dd940f755c1dd9667150c38ebb37b59d785340674af41"),
    ({"image_size": 64, "seed": 5},
     "2d1ade3cbe0848dafd1b455f60a7f9f2098e57384833775aa477273a105ccd06"),
]


@pytest.mark.parametrize("options, digest", FLAT_DIGESTS)
def test_flat_style_draws_the_images_it_drew_before_styles(options, digest):
    import hashlib

    for style in ({}, {"style": "flat"}):
        data = ShapesDataset(**options, **style)
        images = np.stack([data[i]["image"] for i in range(12)])
        assert hashlib.sha256(images.tobytes()).hexdigest() == digest


def test_shaded_style_keeps_captions_and_objects_and_is_deterministic():
    flat, shaded = ShapesDataset(32, seed=2), ShapesDataset(32, seed=2, style="shaded")
    for i in (0, 5, 2**30 + 1):
        a, b = flat[i], shaded[i]
        assert (a["caption"], a["category"], a["objects"]) == (
            b["caption"], b["category"], b["objects"]
        )
        np.testing.assert_array_equal(b["image"], ShapesDataset(32, seed=2, style="shaded")[i]["image"])
        assert b["image"].dtype == np.float32 and b["image"].shape == (32, 32, 3)
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        assert not np.array_equal(a["image"], b["image"])
    assert not np.array_equal(shaded[0]["image"], ShapesDataset(32, seed=3, style="shaded")[0]["image"])


def test_shaded_objects_vary_in_brightness_around_their_colour_on_a_textured_background():
    data = ShapesDataset(64, seed=0, style="shaded", categories=["colors"])
    ratios, spreads, backgrounds = [], [], []
    for i in range(12):
        item = data[i]
        (obj,) = item["objects"]
        pixels = (item["image"].astype(np.float64) + 1) / 2
        y, x = np.mgrid[0:64, 0:64] + 0.5
        cx, cy = interior_point(obj)
        # A disc well inside the object (a quarter of its size around an interior point).
        inside = np.hypot(x - cx, y - cy) <= obj["size"] / 8
        base = np.asarray(COLORS[obj["color"]])
        # The brightness factor, read off the colour's strongest channel (unclipped).
        channel = int(np.argmax(base)) if obj["color"] != "white" else 0
        ratio = pixels[inside][:, channel] / base[channel]
        ratios.append(ratio)
        spreads.append(np.ptp(ratio))
        far = np.all(
            [np.hypot(x - o["center"][0], y - o["center"][1]) > o["size"] for o in item["objects"]],
            axis=0,
        )
        backgrounds.append(pixels[far])
    ratios = np.concatenate(ratios)
    # Brightness 0.6-1.15 of the colour, give or take the noise (0.025 / channel value).
    assert 0.5 < ratios.min() and ratios.max() < 1.25 and ratios.min() < 0.9
    assert np.median(spreads) > 0.05  # shading within an object, not one flat colour
    background = np.concatenate(backgrounds)
    assert background.max() < 0.35 and background.std(0).min() > 0.02  # dark, not plain


def test_unknown_styles_are_refused():
    with pytest.raises(ValueError, match="unknown style 'glossy'"):
        ShapesDataset(style="glossy")
    with pytest.raises(ValueError, match="unknown style"):
        render([], 32, style="glossy")


def _round_trip(tokenizer, images):
    import jax

    return np.asarray(jax.vmap(lambda x: tokenizer.decode(tokenizer.encode(x)))(images))


def test_shaded_images_lose_to_a_palette_what_flat_ones_keep():
    # Why the style exists: a palette of 512 patches (k-means, the discrete stand-in for a
    # VQ model) gives back almost every pixel of a flat image exactly and almost none of a
    # shaded one, while pixels as continuous patches are exact on both. Measured (64 fitted
    # images, 64 held out): flat 90% of pixels within 1/255, PSNR 29 dB; shaded 0.1%, 27.7 dB.
    import jax.random as jr

    from fluid.tokenizers import PaletteTokenizer, PatchTokenizer

    for style in ("flat", "shaded"):
        data = ShapesDataset(32, seed=0, style=style)
        fit = np.stack([data[i]["image"] for i in range(64)])
        held_out = np.stack([data[10_000 + i]["image"] for i in range(64)])
        palette = PaletteTokenizer(32, 4, 512, key=jr.key(0)).fit(fit, key=jr.key(1))
        round_trip = _round_trip(palette, held_out)
        error = np.abs(round_trip - held_out).max(-1)
        exact = float((error <= 2 / 255).mean())
        psnr = 10 * np.log10(4 / np.mean((round_trip - held_out) ** 2))
        np.testing.assert_allclose(_round_trip(PatchTokenizer(32, 4), held_out), held_out, atol=1e-6)
        if style == "flat":
            flat_psnr = psnr
            assert exact >= 0.8, exact
        else:
            assert exact <= 0.05, exact
            assert psnr <= flat_psnr - 0.5, (psnr, flat_psnr)
