"""The Frechet distance between Gaussians fitted to two sets of features (FID's formula).

`d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2))`, the 2-Wasserstein
distance between the Gaussians. The last trace equals `tr((S1 S2)^(1/2))` of the usual
formula (`S1 S2` is similar to the symmetric positive semi-definite `S1^(1/2) S2 S1^(1/2)`),
but is computed from two symmetric eigendecompositions in float64, which stays real and
accurate where the general matrix square root of `S1 S2` loses precision (rank-deficient or
ill-conditioned covariances), and needs no SciPy.
"""

import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jaxtyping import Float

from .._errors import ConfigError
from ..data.shapes import ShapesDataset
from ._abstract import AbstractFeatureExtractor
from ._shapes_features import ShapesFeatures

# Reference statistics of the `shapes` data set: images and seed, pinned so that numbers
# computed anywhere compare.
REFERENCE_COUNT = 2048
REFERENCE_SEED = 0
_BATCH = 256


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    mu1: Float[np.ndarray, " d"],
    sigma1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"],
    sigma2: Float[np.ndarray, "d d"],
) -> float:
    """The Frechet (2-Wasserstein) distance, squared, between two Gaussians.

    **Arguments:**

    - `mu1`, `sigma1`: mean and covariance of the first Gaussian.
    - `mu2`, `sigma2`: mean and covariance of the second.

    **Returns:**

    The squared distance (FID reports this number), computed in float64; never negative
    (rounding below zero is clipped).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"the Gaussians differ in dimension: means {mu1.shape} and {mu2.shape}, "
            f"covariances {sigma1.shape} and {sigma2.shape}."
        )
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    cross = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross
    return max(float(value), 0.0)


def required_count(dims: int, min_count: int | None = None) -> int:
    """The fewest samples `FeatureStats.from_features` accepts for `dims`-dimensional
    features: `dims + 1` (a full-rank sample covariance) unless `min_count` says otherwise,
    and never fewer than 2."""
    return max(2, dims + 1 if min_count is None else min_count)


def check_frechet_count(count: int, dims: int, name: str, min_count: int | None, what: str,
                        how: str) -> None:
    """Refuse, before any work, `count` samples (`what`: "generated samples", say) that are
    too few for the Frechet distance of `dims`-dimensional `name` features
    (`required_count`); `how` says how to get more."""
    needed = required_count(dims, min_count)
    if count < needed:
        raise ConfigError(
            f"{count} {what} are too few for the Frechet distance of {dims}-dimensional "
            f"{name} features: at least {needed} are needed; {how}, or pass min_count "
            "(--min-count) to accept fewer knowingly (the distance is then rough, dominated "
            "by the bias of a singular covariance)."
        )


@typing.final
@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a set of features, the summary the Frechet distance needs.

    Build it with `FeatureStats.from_features` (or `feature_stats` from images), keep it
    with `save` / `load` (a NumPy `.npz`, no pickle), compare two with `distance`.

    **Arguments:**

    - `mean`: `[d]` float64.
    - `cov`: `[d, d]` float64, the unbiased sample covariance.
    - `count`: how many samples it summarises.
    - `extractor`: the `name` of the feature extractor, so that statistics of different
      features are never compared; empty when unknown.
    - `seed`: the seed that picked the samples, for reference statistics of a seeded
      subset (`data_reference_stats`); `None` when not recorded.
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int
    extractor: str = ""
    seed: int | None = None

    def __post_init__(self):
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.mean.ndim != 1 or self.cov.shape != (d, d):
            raise ValueError(
                f"mean must be [d] and cov [d, d]; got {self.mean.shape} and {self.cov.shape}."
            )

    @classmethod
    def from_features(
        cls,
        features: Float[np.ndarray | jax.Array, "n d"],
        extractor: str = "",
        min_count: int | None = None,
    ) -> "FeatureStats":
        """Fit a Gaussian to features.

        **Arguments:**

        - `features`: `[n, d]`, one row per sample.
        - `extractor`: name of the extractor that produced them.
        - `min_count`: fewest samples accepted; by default `d + 1`, the fewest with which
          the sample covariance can have full rank. Fewer are allowed only when asked for,
          and never fewer than 2.

        **Returns:**

        The statistics. Raises `ValueError` for too few samples.
        """
        features = np.asarray(features, np.float64)
        n, d = features.shape
        needed = required_count(d, min_count)
        if n < needed:
            raise ValueError(
                f"{n} samples are too few for statistics of {d}-dimensional features: at "
                f"least {needed} are needed. With n <= d the sample covariance is singular "
                "and the Frechet distance is dominated by its bias; use more images (FID "
                "uses 10,000 or more), or pass min_count to accept fewer knowingly."
            )
        return cls(
            mean=features.mean(0),
            cov=np.cov(features, rowvar=False).reshape(d, d),
            count=n,
            extractor=extractor,
        )

    def distance(self, other: "FeatureStats") -> float:
        """The Frechet distance (squared, as FID reports it) between two sets of features.

        Raises `ValueError` when the statistics come from different extractors.
        """
        if self.extractor and other.extractor and self.extractor != other.extractor:
            raise ValueError(
                f"statistics of different features ({self.extractor!r} and "
                f"{other.extractor!r}) cannot be compared."
            )
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to a `.npz` file (atomically: a reader never sees half)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        with open(partial, "wb") as file:
            np.savez(
                file,
                mean=self.mean,
                cov=self.cov,
                count=np.int64(self.count),
                extractor=np.str_(self.extractor),
                **({} if self.seed is None else {"seed": np.int64(self.seed)}),
            )
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read statistics written by `save`."""
        with np.load(path, allow_pickle=False) as data:
            return cls(
                mean=data["mean"].astype(np.float64),
                cov=data["cov"].astype(np.float64),
                count=int(data["count"]),
                extractor=str(data["extractor"]),
                seed=int(data["seed"]) if "seed" in data.files else None,
            )


def feature_stats(
    extractor: AbstractFeatureExtractor,
    images: Float[np.ndarray | jax.Array, "n h w 3"],
    min_count: int | None = None,
) -> FeatureStats:
    """Statistics of the features of images (generated ones, say).

    **Arguments:**

    - `extractor`: the feature extractor.
    - `images`: `[n, h, w, 3]` with values in [-1, 1]; features are computed in batches.
    - `min_count`: as for `FeatureStats.from_features`.

    **Returns:**

    The statistics, tagged with the extractor's name.
    """
    features = np.concatenate(
        [extractor(images[i : i + _BATCH]) for i in range(0, len(images), _BATCH)]
    )
    return FeatureStats.from_features(features, extractor.name, min_count)


def cache_dir() -> Path:
    """Where fluid caches computed files: `$FLUID_CACHE`, else `$XDG_CACHE_HOME/fluid`, else
    `~/.cache/fluid`."""
    if "FLUID_CACHE" in os.environ:
        return Path(os.environ["FLUID_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fluid"


def shapes_reference_stats(
    image_size: int = 32,
    *,
    extractor: AbstractFeatureExtractor | None = None,
    count: int = REFERENCE_COUNT,
    seed: int = REFERENCE_SEED,
    path: str | os.PathLike | None = None,
    **dataset_options: Any,
) -> FeatureStats:
    """Reference statistics of the `shapes` data set, computed once and cached.

    Items `0, ..., count - 1` of `ShapesDataset(image_size, seed=seed, **dataset_options)`
    through `extractor`. The defaults pin the reference, so that distances reported
    anywhere compare.

    **Arguments:**

    - `image_size`: as for `ShapesDataset`.
    - `extractor`: `ShapesFeatures()` when `None`.
    - `count`, `seed`: which items.
    - `path`: the cache file; by default a file named after all of the arguments in
      `cache_dir()`. Read if it exists (and matches the extractor and count), else
      computed and written.
    - `dataset_options`: more arguments of `ShapesDataset` (`object_scale=1.6`, say): match
      the data the model was trained on.

    **Returns:**

    The statistics.
    """
    extractor = ShapesFeatures() if extractor is None else extractor
    if path is None:
        options = "".join(
            re.sub(r"[^A-Za-z0-9_.=,-]", "", f"-{key}={value}")
            for key, value in sorted(dataset_options.items())
        )
        path = (
            cache_dir() / f"shapes-{image_size}px-n{count}-seed{seed}{options}-{extractor.name}.npz"
        )
    path = Path(path)
    if path.exists():
        stats = FeatureStats.load(path)
        if stats.extractor == extractor.name and stats.count == count:
            return stats
    data = ShapesDataset(image_size, seed=seed, **dataset_options)
    features = []
    for start in range(0, count, _BATCH):
        stop = min(start + _BATCH, count)
        images = np.stack([data[i]["image"] for i in range(start, stop)])
        features.append(extractor(images))
    stats = FeatureStats.from_features(np.concatenate(features), extractor.name)
    stats.save(path)
    return stats
