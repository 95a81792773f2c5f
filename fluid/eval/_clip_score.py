"""CLIP on generated images: CLIPScore (image-caption agreement) and CLIP features for the
Frechet distance."""

import os
import typing
from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Float

from ._abstract import AbstractFeatureExtractor
from ._clip import CLIPEncoder

_BATCH = 64


def _batches(count: int, batch_size: int) -> tuple[int, list[tuple[int, int]]]:
    """The rows of each call and their `(start, stop)`: every call gets the same number of
    rows (the last padded), so one compilation serves any count."""
    size = max(1, min(batch_size, count))
    return size, [(start, min(start + size, count)) for start in range(0, count, size)]


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
    missing = size - rows.shape[0]
    if missing == 0:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], missing, axis=0)])


def clip_scores(
    clip: CLIPEncoder,
    images: Float[np.ndarray | jax.Array, "n h w 3"],
    captions: Sequence[str],
    *,
    batch_size: int = _BATCH,
) -> Float[np.ndarray, " n"]:
    """`100 * cos(image features, caption features)` of each image and its caption.

    **Arguments:**

    - `clip`: the CLIP, with its tokenizer (`CLIPEncoder.from_pretrained` of a folder with
      the tokenizer files).
    - `images`: `[n, h, w, 3]` in [-1, 1], any size (`CLIPEncoder.preprocess`).
    - `captions`: `n` captions, tokenized to the text tower's length (longer ones are
      truncated, keeping their end-of-text token).
    - `batch_size`: images and captions per call of the towers.

    **Returns:**

    float64 `[n]`, in [-100, 100].
    """
    images = np.asarray(images, np.float32)
    captions = list(captions)
    if images.ndim != 4 or len(captions) != images.shape[0]:
        raise ValueError(f"one caption per image: {len(captions)} captions for images of "
                         f"shape {images.shape}.")
    ids, mask = clip.tokenize(captions)
    size, batches = _batches(len(captions), batch_size)
    out = []
    for start, stop in batches:
        image = np.asarray(clip.image_features(_pad(images[start:stop], size)), np.float64)
        text = np.asarray(clip.text_features(_pad(ids[start:stop], size),
                                             _pad(mask[start:stop], size)), np.float64)
        image = image / np.linalg.norm(image, axis=-1, keepdims=True)
        text = text / np.linalg.norm(text, axis=-1, keepdims=True)
        out.append(100.0 * np.sum(image * text, axis=-1)[: stop - start])
    return np.concatenate(out) if out else np.zeros((0,), np.float64)


def clip_score(
    clip: CLIPEncoder,
    images: Float[np.ndarray | jax.Array, "n h w 3"],
    captions: Sequence[str],
    *,
    batch_size: int = _BATCH,
) -> float:
    """CLIPScore as `torchmetrics` computes it: `max(mean(100 * cos), 0)` over the pairs.

    `torchmetrics`' documentation writes the score of a pair as `max(100 * cos, 0)`, but its
    code clips the mean; the two differ only when some pair has a negative cosine (then
    `np.maximum(clip_scores(...), 0).mean()` is the documented form). Pass images and
    captions in the same order. See `clip_scores` for the arguments.
    """
    scores = clip_scores(clip, images, captions, batch_size=batch_size)
    if scores.size == 0:
        raise ValueError("CLIPScore of no images.")
    return max(float(scores.mean()), 0.0)


@typing.final
class CLIPFeatures(AbstractFeatureExtractor):
    """CLIP image features (the projected embeddings, `get_image_features`) for the Frechet
    distance: FD on CLIP features ("FID-CLIP", clean-fid's `clip_vit_b_32` model) when
    given OpenAI's ViT-B/32.

    **Arguments:**

    - `clip`: a `CLIPEncoder`, or the folder to load one from.
    - `normalize`: scale each feature vector to unit length (the cosine geometry that
      CLIPScore uses) instead of the raw projections.
    - `name`: names the features (see `AbstractFeatureExtractor`); by default
      `clip-<digest of the folder's config and weights>` (with `-normalized`), so that
      statistics of other weights are never compared with these.
    - `batch_size`: images per call of the vision tower (fewer if fewer are given; the
      last batch is padded, so one compilation serves any count).
    """

    clip: CLIPEncoder
    normalize: bool = eqx.field(static=True)
    name: str = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)

    def __init__(
        self,
        clip: CLIPEncoder | str | os.PathLike,
        *,
        normalize: bool = False,
        name: str | None = None,
        batch_size: int = _BATCH,
    ):
        if not isinstance(clip, CLIPEncoder):
            clip = CLIPEncoder.from_pretrained(clip)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.clip = clip
        self.normalize = normalize
        suffix = "-normalized" if normalize else ""
        self.name = f"clip-{clip.fingerprint}{suffix}" if name is None else name
        self.batch_size = batch_size

    def __call__(
        self, images: Float[np.ndarray | jax.Array, "n h w 3"]
    ) -> Float[np.ndarray, "n d"]:
        """CLIP features of a batch of images in [-1, 1], `[n, projection_dim]` float64."""
        images = np.asarray(images, np.float32)
        size, batches = _batches(images.shape[0], self.batch_size)
        out = [
            np.asarray(self.clip.image_features(_pad(images[start:stop], size)),
                       np.float64)[: stop - start]
            for start, stop in batches
        ]
        features = (np.concatenate(out) if out
                    else np.zeros((0, self.clip.projection_dim), np.float64))
        if self.normalize:
            features = features / np.linalg.norm(features, axis=-1, keepdims=True)
        return features
