"""`load_image` on the files users have: every Pillow mode converted to RGB against a NumPy
expectation, transparency composited over white, the stated size limit, no Pillow
decompression-bomb warning below it, and reduced-scale JPEG decoding."""

import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

import fluid.data._files as files
from fluid.data import BadRecord, load_image

RNG = np.random.default_rng(0)
# A flat JPEG block keeps only its DC coefficient; at quality 90 its quantisation and the
# colour round trip moved a channel by at most 1 level over 50 random colours: allow 3.
JPEG_ATOL = 3 / 127.5


def unit(rgb8):
    """What `load_image` returns for 8-bit RGB values (no resizing)."""
    return np.asarray(rgb8, np.float32) / np.float32(127.5) - np.float32(1)


def mode_of(path):
    with Image.open(path) as image:
        return image.mode


def grey(levels):
    return np.repeat(np.asarray(levels)[..., None], 3, axis=-1)


def over_white(rgb, alpha):
    """Straight-alpha compositing over white, rounded to the nearest level."""
    rgb, alpha = np.asarray(rgb, np.float64), np.asarray(alpha, np.float64)[..., None] / 255
    return np.round(rgb * alpha + 255 * (1 - alpha))


def png(array, colour_type):
    """A 16-bit PNG written byte by byte (colour type 0: grey, 2: RGB), independently of
    Pillow's encoder, which cannot write 16-bit colour."""
    height, width = array.shape[:2]

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def sixteen_bit():
    """8x8 16-bit values: both extremes, the levels' midpoints and random values."""
    values = RNG.integers(0, 65536, 64)
    values[:4] = 0, 65535, 128, 32896  # 128/257 and 32896/257 lie either side of a half level
    return values.reshape(8, 8)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = sixteen_bit()
    expected = unit(grey(np.round(values / 257)))
    (tmp_path / "byte_by_byte.png").write_bytes(png(values, 0))
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "pillow.png")
    Image.fromarray(values.astype(">u2")).save(tmp_path / "big_endian.tif")
    for name, mode in (
        ("byte_by_byte.png", "I;16"),
        ("pillow.png", "I;16"),
        ("big_endian.tif", "I;16B"),
    ):
        assert mode_of(tmp_path / name) == mode
        np.testing.assert_array_equal(load_image(tmp_path / name, 8), expected, err_msg=name)


def test_32_bit_integers_are_read_on_the_16_bit_scale(tmp_path):
    values = sixteen_bit().astype(np.int32)
    values[0, :2] = -7, 70000  # out of the 16-bit range: clipped to its ends
    Image.fromarray(values).save(tmp_path / "int.tif")
    assert mode_of(tmp_path / "int.tif") == "I"
    expected = unit(grey(np.round(np.clip(values, 0, 65535) / 257)))
    np.testing.assert_array_equal(load_image(tmp_path / "int.tif", 8), expected)


def test_16_bit_colour_is_scaled_not_clipped(tmp_path):
    values = RNG.integers(0, 65536, (8, 8, 3))
    (tmp_path / "rgb16.png").write_bytes(png(values, 2))
    # Pillow decodes 16-bit colour to 8 bits by keeping the high byte, floor(v / 256), which
    # lies within one level of the exact v / 257.
    np.testing.assert_allclose(
        load_image(tmp_path / "rgb16.png", 8), unit(values / 257), atol=1 / 127.5
    )


def test_float_images_are_read_on_the_unit_scale(tmp_path):
    values = RNG.uniform(-0.25, 1.25, (8, 8)).astype(np.float32)
    values[0, :4] = 0, 1, 0.5, np.nan  # NaN reads as black
    Image.fromarray(values).save(tmp_path / "float.tif")
    assert mode_of(tmp_path / "float.tif") == "F"
    expected = unit(grey(np.round(np.clip(np.nan_to_num(values), 0, 1) * 255)))
    np.testing.assert_array_equal(load_image(tmp_path / "float.tif", 8), expected)


def palette_image():
    palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    index = RNG.integers(0, 16, (8, 8), dtype=np.uint8)
    image = Image.frombytes("P", (8, 8), index.tobytes())
    image.putpalette(palette.tobytes())
    return image, palette, index


def test_palette_images(tmp_path):
    image, palette, index = palette_image()
    image.save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(load_image(tmp_path / "opaque.png", 8), unit(palette[index]))
    # Per-entry alpha (a PNG tRNS chunk): composited over white.
    alpha = RNG.integers(0, 256, 16, dtype=np.uint8)
    alpha[:2] = 0, 255
    image.save(tmp_path / "alpha.png", transparency=alpha.tobytes())
    assert mode_of(tmp_path / "alpha.png") == "P"
    np.testing.assert_array_equal(
        load_image(tmp_path / "alpha.png", 8), unit(over_white(palette[index], alpha[index]))
    )
    # A GIF's single transparent entry shows white.
    image.save(tmp_path / "keyed.gif", transparency=3)
    assert mode_of(tmp_path / "keyed.gif") == "P"
    keyed = np.where((index == 3)[..., None], 255, palette[index])
    np.testing.assert_array_equal(load_image(tmp_path / "keyed.gif", 8), unit(keyed))


def test_alpha_is_composited_over_white(tmp_path):
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    alpha[0, :3] = 0, 255, 128
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(
        load_image(tmp_path / "rgba.png", 8), unit(over_white(rgb, alpha))
    )
    Image.merge("LA", (Image.fromarray(rgb[..., 0]), Image.fromarray(alpha))).save(
        tmp_path / "la.png"
    )
    assert mode_of(tmp_path / "la.png") == "LA"
    np.testing.assert_array_equal(
        load_image(tmp_path / "la.png", 8), unit(over_white(grey(rgb[..., 0]), alpha))
    )
    image, palette, index = palette_image()
    pa = Image.merge("PA", (image, Image.fromarray(alpha)))
    pa.putpalette(palette.tobytes())
    pa.save(tmp_path / "pa.tif")
    assert mode_of(tmp_path / "pa.tif") == "PA"
    np.testing.assert_array_equal(
        load_image(tmp_path / "pa.tif", 8), unit(over_white(palette[index], alpha))
    )


def cmyk_to_rgb(cmyk):
    """The uncalibrated conversion: each channel (1 - ink) * (1 - black)."""
    cmyk = np.asarray(cmyk, np.float64)
    return np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255)


def test_cmyk(tmp_path):
    cmyk = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.frombytes("CMYK", (8, 8), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "cmyk.tif", 8), unit(cmyk_to_rgb(cmyk)))
    # JPEG stores CMYK inverted (Adobe's convention, which Pillow reads and writes): a flat
    # colour must come back as that colour, not its negative.
    ink = (10, 200, 30, 40)
    Image.new("CMYK", (16, 16), ink).save(tmp_path / "cmyk.jpg", quality=90)
    assert mode_of(tmp_path / "cmyk.jpg") == "CMYK"
    expected = np.broadcast_to(unit(cmyk_to_rgb(ink)), (16, 16, 3))
    np.testing.assert_allclose(load_image(tmp_path / "cmyk.jpg", 16), expected, atol=JPEG_ATOL)


def test_bilevel(tmp_path):
    bits = RNG.random((8, 8)) < 0.5
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert mode_of(tmp_path / "bits.png") == "1"
    np.testing.assert_array_equal(load_image(tmp_path / "bits.png", 8), unit(grey(255 * bits)))


def test_images_above_the_limit_are_refused_undecoded(tmp_path, monkeypatch):
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "at.png")
    Image.new("RGB", (11, 10), (1, 2, 3)).save(tmp_path / "above.png")
    monkeypatch.setattr(files, "MAX_IMAGE_PIXELS", 100)
    np.testing.assert_array_equal(
        load_image(tmp_path / "at.png", 4), np.broadcast_to(unit((1, 2, 3)), (4, 4, 3))
    )

    def no_decoding(self):
        raise AssertionError("decoded an image above the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(
        BadRecord,
        match=r"above.png: 11 x 10 = 110 pixels .*limit of 100 .*"
        r"MAX_IMAGE_PIXELS",
    ):
        load_image(tmp_path / "above.png", 4)


def test_large_images_load_without_pillows_bomb_warning(tmp_path, monkeypatch):
    # Stand-ins for a 108-megapixel photo, with Pillow's threshold (about 89M pixels) scaled
    # down: 16 x 16 is above it (Pillow warns), 32 x 32 above twice it (Pillow refuses).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    Image.new("RGB", (16, 16), (9, 99, 199)).save(tmp_path / "warned.png")
    Image.new("RGB", (32, 32), (9, 99, 199)).save(tmp_path / "refused.png")
    expected = np.broadcast_to(unit((9, 99, 199)), (8, 8, 3))
    paths = [tmp_path / "warned.png", tmp_path / "refused.png"] * 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in paths[:2]:
            np.testing.assert_array_equal(load_image(path, 8), expected)
        # Decoding threads, as the loader runs them, leave Pillow's setting as they found it.
        with ThreadPoolExecutor(8) as pool:
            for image in pool.map(lambda path: load_image(path, 8), paths):
                np.testing.assert_array_equal(image, expected)
    assert Image.MAX_IMAGE_PIXELS == 200
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(tmp_path / "warned.png").close()


def test_large_jpegs_are_decoded_at_reduced_scale(tmp_path, monkeypatch):
    colours = np.array([[(200, 30, 40), (20, 180, 60)], [(30, 60, 220), (240, 230, 20)]])
    # Quadrant edges on 16-pixel boundaries, so no JPEG block or chroma sample spans two.
    quadrants = np.repeat(np.repeat(colours, 384, axis=0), 512, axis=1).astype(np.uint8)
    Image.fromarray(quadrants).save(tmp_path / "big.jpg", quality=90)
    decoded = []
    load = JpegImagePlugin.JpegImageFile.load

    def recording(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording)
    image = load_image(tmp_path / "big.jpg", 64)
    # 1024 x 768 decoded at 1/4 scale: the largest reduction leaving each side at least twice
    # the result's (the margin Pillow's own thumbnail keeps before resampling); 1/8 would not.
    assert decoded and set(decoded) == {(256, 192)}
    # Away from the quadrant edges (where bicubic blends), each quadrant keeps its colour.
    for row, rows in enumerate((slice(0, 29), slice(35, 64))):
        for column, columns in enumerate((slice(0, 29), slice(35, 64))):
            block = image[rows, columns]
            np.testing.assert_allclose(
                block, np.broadcast_to(unit(colours[row, column]), block.shape), atol=JPEG_ATOL
            )
