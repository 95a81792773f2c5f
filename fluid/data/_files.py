"""A user's own image-caption pairs: a folder of `cat.png` + `cat.txt`, or a JSONL file.

Both sources are random-access (`len`, `source[i]`), as Grain's `MapDataset.source` takes
them, and read lazily: construction only lists the pairs, so a million-image folder opens in
seconds and each worker process decodes only the items it is asked for. A record that cannot
be used (an unreadable or corrupt image, an empty caption) raises `BadRecord` when it is
read; `Loader` skips it, warning about it and counting it once, so one bad file never
stops a run.
"""

import json
import os
import threading
import typing
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float32
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The largest image `load_image` decodes, in pixels: a 108-megapixel phone photo loads, and
# the limit still bounds one decoded image's memory (about 0.8 GB as 8-bit RGB).
MAX_IMAGE_PIXELS: int = 2**28
_OPEN_LOCK = threading.Lock()
# How many offending names or lines a warning lists before it only counts the rest.
_LISTED = 10


class BadRecord(Exception):
    """A record that cannot be used: its image does not decode or its caption is empty.

    Sources raise it from `__getitem__`; `Loader` catches it, warns with `str(error)`
    (which names the file) and skips the record. Any other exception is a bug and propagates.

    **Arguments:**

    - `where`: the file (and, for JSONL records, the line) the record comes from.
    - `reason`: what is wrong with it.
    """

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class SkippedRecordWarning(UserWarning):
    """Warned once for each record, image or JSONL line that is skipped rather than used."""


def center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the short side to `image_size`, then cut the centred square (as ADM/MAR's
    `center_crop_arr` does).

    **Arguments:**

    - `image`: an RGB PIL image of any size.
    - `image_size`: side of the square result in pixels.

    **Returns:**

    A uint8 array `[image_size, image_size, 3]`.
    """
    width, height = image.size
    scale = image_size / min(width, height)
    # The short side is set exactly (not rounded from a product) so the crop always fits.
    size = (
        image_size if width <= height else max(image_size, round(width * scale)),
        image_size if height < width else max(image_size, round(height * scale)),
    )
    if size != image.size:
        # Pillow's bicubic filter widens with the scale factor, so downscaling is antialiased;
        # reducing_gap first box-halves large images, the speed-up ADM gets by hand.
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def _open(path: str | os.PathLike) -> Image.Image:
    # Pillow checks sizes against its own process-wide `Image.MAX_IMAGE_PIXELS` when it opens
    # a file (a warning above about 89M pixels, an error above twice that); `load_image`
    # applies `MAX_IMAGE_PIXELS` instead, so Pillow's check is switched off for this one open
    # (it reads only the header). Not `warnings.catch_warnings`: that swaps the process-wide
    # filter list, which concurrent decoding threads would interleave and leak. The lock
    # makes every restore here put back the value from before any of them.
    with _OPEN_LOCK:
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        # Pillow's own conversion clips these at 255, which turns a 16-bit image white.
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        # round(v * 255 / 65535), in integers: no value lies on a half level.
        return _grey((values * 255 + 32767) // 65535)
    if mode == "F":
        values = np.clip(np.nan_to_num(np.asarray(image, np.float32), nan=0.0), 0.0, 1.0)
        return _grey(np.round(values * 255))
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), np.uint16)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        # round((c * a + 255 * (255 - a)) / 255) in integers: at most 255 * 255, and no
        # value lies on a half level.
        return Image.fromarray(((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))
    return image.convert("RGB")


def _grey(levels: np.ndarray) -> Image.Image:
    return Image.fromarray(levels.astype(np.uint8)).convert("RGB")


def load_image(path: str | os.PathLike, image_size: int) -> Float32[np.ndarray, "h w 3"]:
    """Decode an image file to a centre-cropped square with values in [-1, 1].

    The image is turned upright by its EXIF orientation (as photo viewers show it), converted
    to RGB, then `center_crop`ped. The conversion, by Pillow mode:

    - `RGB`, `L` (grey, replicated), `1` (black and white), `P` (palette): their colours.
    - `I;16`, `I;16B` (16-bit grey, as Pillow opens 16-bit PNGs and TIFFs) and `I` (32-bit
      integers): 0 to 65535 scaled to 0 to 255, rounded; `I` values outside are clipped.
      Pillow opens 16-bit colour PNGs as `RGB` with each value's high byte.
    - `F` (32-bit float): 0.0 to 1.0 scaled to 0 to 255, rounded; values outside are clipped
      and NaN reads as 0.
    - `CMYK`: each channel `(1 - ink) * (1 - black)`, uncalibrated (an embedded colour
      profile is not applied); JPEGs' inverted CMYK (Adobe's convention) is undone by Pillow.
    - Transparency (`RGBA`, `LA`, `PA`, a palette or colour with a transparent entry):
      composited over white, so transparent pixels are white rather than whatever colour
      the file stores under them.

    Images of more than `MAX_IMAGE_PIXELS` (2**28, about 268 megapixels) are refused before
    decoding; below that, however large, they load without Pillow's
    `DecompressionBombWarning`. JPEGs are decoded at the largest reduced scale (1/2, 1/4 or
    1/8, done in the JPEG decoder) that leaves both sides at least twice `image_size`, the
    margin Pillow's own `thumbnail` keeps before resampling.

    **Arguments:**

    - `path`: the image file; any format Pillow reads.
    - `image_size`: side of the square result in pixels.

    **Returns:**

    A float32 array `[image_size, image_size, 3]`. Raises `BadRecord` (naming the file) when
    the file is missing, truncated, not an image or above `MAX_IMAGE_PIXELS`.
    """
    try:
        image = _open(path)
    except Exception as error:
        raise _unreadable(path, error) from error
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadRecord(
                str(path),
                f"{width} x {height} = {width * height:,} pixels is above the limit of "
                f"{MAX_IMAGE_PIXELS:,} pixels (fluid.data.MAX_IMAGE_PIXELS); downscale it or "
                "leave it out",
            )
        try:
            image.draft("RGB", (2 * image_size, 2 * image_size))  # a no-op except for JPEG
            image = _to_rgb(ImageOps.exif_transpose(image))
        # Pillow reports a broken file through many types (OSError, SyntaxError, ValueError,
        # ...); the try covers only decoding and conversion, so bugs in cropping still surface.
        except Exception as error:
            raise _unreadable(path, error) from error
    return (center_crop(image, image_size).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def _unreadable(path: str | os.PathLike, error: Exception) -> BadRecord:
    return BadRecord(str(path), f"unreadable image ({type(error).__name__}: {error})")


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    return image_size


def _caption(text: str, where: str) -> str:
    caption = text.strip()
    if not caption:
        raise BadRecord(where, "empty caption")
    return caption


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


@typing.final
class FolderSource:
    """Images in a folder (searched recursively), each captioned by a same-named `.txt` file.

    `cat.png` is captioned by `cat.txt` beside it (UTF-8, surrounding whitespace stripped).
    Images are ordered by their path relative to `root`, so every process and every run
    sees the same index for the same file. Images without a caption file are left out with
    one `SkippedRecordWarning` that counts them (`missing_captions`); files whose name starts
    with `.` (such as macOS's `._cat.png` metadata) are ignored.

    **Arguments:**

    - `root`: the folder.
    - `image_size`: side of the square images returned, in pixels.

    Items are dicts: `image` (float32 `[image_size, image_size, 3]` in [-1, 1]) and
    `caption` (a non-empty str). Reading an item whose image does not decode or whose
    caption is empty raises `BadRecord`.
    """

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.root = Path(root).absolute()  # workers or a later chdir must find the files
        self.image_size = _check_size(image_size)
        expected = "expected images each with a same-named caption, like cat.png + cat.txt"
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; {expected}.")
        found = []
        # Following links lets a data set be assembled from symlinked folders.
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(Path(folder, name).relative_to(self.root).as_posix())
        found.sort()
        paired = [p for p in found if (self.root / p).with_suffix(".txt").is_file()]
        missing = sorted(set(found) - set(paired))
        self.missing_captions = len(missing)
        if not paired:
            raise ValueError(
                f"no images with .txt captions under {self.root} ({len(found)} images, none "
                f"captioned); {expected} ({', '.join(IMAGE_EXTENSIONS)})."
            )
        if missing:
            warnings.warn(
                f"{len(missing)} images under {self.root} have no .txt caption and are skipped: "
                f"{_listing(missing)}.",
                SkippedRecordWarning,
                stacklevel=2,
            )
        self.paths: tuple[str, ...] = tuple(paired)

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, index: int) -> str:
        """Item `index`'s caption, without decoding its image (`BadRecord` if unusable)."""
        path = self.root / self.paths[index]
        try:
            text = path.with_suffix(".txt").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BadRecord(str(path), f"unreadable caption file ({error})") from error
        return _caption(text, str(path))

    def __getitem__(self, index: int) -> dict[str, Any]:
        caption = self.caption(index)
        path = self.root / self.paths[index]
        return {"image": load_image(path, self.image_size), "caption": caption}


@typing.final
class JsonlSource:
    """Image-caption pairs listed in a JSONL file, one `{"image": ..., "caption": ...}` per line.

    `image` is a path, absolute or relative to the JSONL file's folder. Blank lines are
    ignored; a line that is not such an object (bad JSON, a missing key, a non-string value)
    is left out with a `SkippedRecordWarning` naming its line number, and counted
    (`skipped_lines`). Image files are only opened when their item is read.

    **Arguments:**

    - `path`: the JSONL file.
    - `image_size`: side of the square images returned, in pixels.

    Items are dicts: `image` (float32 `[image_size, image_size, 3]` in [-1, 1]) and
    `caption` (a non-empty str). Reading an item whose image is missing or does not decode,
    or whose caption is empty, raises `BadRecord`.
    """

    def __init__(self, path: str | os.PathLike, image_size: int):
        self.path = Path(path).absolute()  # workers or a later chdir must find the files
        self.image_size = _check_size(image_size)
        expected = 'expected one {"image": "cat.png", "caption": "a cat"} object per line'
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL file {self.path} does not exist; {expected}.")
        images, captions, lines, bad = [], [], [], []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    bad.append(f"line {number} (invalid JSON: {error.msg})")
                    continue
                if not isinstance(record, dict) or not all(
                    isinstance(record.get(key), str) for key in ("image", "caption")
                ):
                    bad.append(f"line {number} (needs string fields 'image' and 'caption')")
                    continue
                images.append(str(self.path.parent / record["image"]))
                captions.append(record["caption"])
                lines.append(number)
        self.skipped_lines = len(bad)
        if bad:
            warnings.warn(
                f"{len(bad)} lines of {self.path} are malformed and skipped: {_listing(bad)}.",
                SkippedRecordWarning,
                stacklevel=2,
            )
        if not images:
            raise ValueError(f"no usable records in {self.path}; {expected}.")
        self.images: tuple[str, ...] = tuple(images)
        self.captions: tuple[str, ...] = tuple(captions)
        self.lines: tuple[int, ...] = tuple(lines)

    def __len__(self) -> int:
        return len(self.images)

    def _where(self, index: int) -> str:
        return f"{self.images[index]} (line {self.lines[index]} of {self.path})"

    def caption(self, index: int) -> str:
        """Item `index`'s caption, without decoding its image (`BadRecord` if empty)."""
        return _caption(self.captions[index], self._where(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = self._where(index)
        caption = self.caption(index)
        try:
            image = load_image(self.images[index], self.image_size)
        except BadRecord as error:
            raise BadRecord(where, error.reason) from error
        return {"image": image, "caption": caption}
