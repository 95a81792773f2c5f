"""Frechet distance: against SciPy's matrix square root, its closed forms, and a feature
extractor that tells `shapes` images from noise, wrong colours and wrong shapes."""

import jax.numpy as jnp
import numpy as np
import pytest

from fluid._weights import write_safetensors
from fluid.data.shapes import ShapesDataset, render
from fluid.eval import (
    AbstractFeatureExtractor,
    FeatureStats,
    InceptionFeatures,
    ShapesFeatures,
    feature_stats,
    frechet_distance,
    shapes_reference_stats,
)

N_IMAGES = 200  # more than the 191 features, as a full-rank covariance needs


def scipy_frechet(mu1, sigma1, mu2, sigma2):
    """The formula as pytorch-fid writes it, on SciPy's general matrix square root."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real


def random_gaussian(rng, d, rank=None):
    factor = rng.normal(size=(d, rank or 2 * d))
    return rng.normal(size=d), factor @ factor.T / factor.shape[1] + 0.01 * np.eye(d)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_matches_scipy(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        (mu1, s1), (mu2, s2) = random_gaussian(rng, d), random_gaussian(rng, d, rank=d // 2 + 1)
        expected = scipy_frechet(mu1, s1, mu2, s2)
        np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-6)
        # Symmetric, though the computation is not.
        np.testing.assert_allclose(frechet_distance(mu2, s2, mu1, s1), expected, rtol=1e-6)


def test_closed_forms():
    rng = np.random.default_rng(0)
    mu, sigma = random_gaussian(rng, 12)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    shift = rng.normal(size=12)
    np.testing.assert_allclose(frechet_distance(mu, sigma, mu + shift, sigma), shift @ shift)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 2, 12), rng.uniform(0.1, 2, 12)
    zero = np.zeros(12)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    np.testing.assert_allclose(frechet_distance(zero, np.diag(a), zero, np.diag(b)), expected)
    # A ValueError, or a TypeError from jaxtyping's shape check when it is on (as here).
    with pytest.raises((ValueError, TypeError)):
        frechet_distance(zero, np.diag(a), zero[:3], np.diag(b[:3]))


def test_stats_need_enough_samples(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 8))
    stats = FeatureStats.from_features(features, "toy")
    np.testing.assert_allclose(stats.mean, features.mean(0))
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False))
    assert stats.count == 20 and stats.distance(stats) < 1e-9
    with pytest.raises(ValueError, match="at least 9"):
        FeatureStats.from_features(features[:8], "toy")
    FeatureStats.from_features(features[:3], "toy", min_count=3)  # asked for knowingly
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(features[:1], "toy", min_count=1)

    stats.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    assert (loaded.count, loaded.extractor) == (20, "toy")
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    with pytest.raises(ValueError, match="different features"):
        stats.distance(FeatureStats(stats.mean, stats.cov, 20, "other"))


def _images(seed, image_size=32, n=N_IMAGES, **change):
    data = ShapesDataset(image_size, seed=seed)
    out = []
    for i in range(n):
        objects = [dict(obj, **change) for obj in data.describe(i)["objects"]]
        out.append(render(objects, image_size))
    return np.stack(out)


def test_shapes_features():
    extractor = ShapesFeatures()
    images = _images(0, n=8)
    features = extractor(images)
    assert features.shape == (8, 191) and features.dtype == np.float64
    assert np.isfinite(features).all()
    np.testing.assert_array_equal(features, extractor(jnp.asarray(images)))
    # Per image: batching does not change a row.
    np.testing.assert_allclose(extractor(images[3:4])[0], features[3], rtol=1e-12)
    # Resolution-independent, roughly: the same scene at 32 and 64 px.
    scene = [{"shape": "square", "color": "red", "center": (10.0, 12.0), "size": 10.0}]
    (small_f,) = extractor(render(scene, 32)[None])
    (large_f,) = extractor(render([dict(scene[0], center=(20.0, 24.0), size=20.0)], 64)[None])
    assert np.abs(small_f - large_f).max() < 0.1 * np.abs(small_f).max()


def test_shapes_features_tell_distributions_apart():
    extractor = ShapesFeatures()
    reference = feature_stats(extractor, _images(0))

    def distance(images):
        return reference.distance(feature_stats(extractor, images))

    same = distance(_images(1))
    rng = np.random.default_rng(0)
    other = _images(1)
    # Measured with 200 images: 0.48 for another seed; noise 14.5, channels swapped 3.9,
    # every object red 2.0, every object a square 3.5.
    assert distance(rng.uniform(-1, 1, other.shape).astype(np.float32)) > 10 * same
    assert distance(np.ascontiguousarray(other[..., ::-1])) > 4 * same
    assert distance(_images(1, color="red")) > 2.5 * same
    assert distance(_images(1, shape="square")) > 4 * same


def test_reference_stats_are_cached(tmp_path, monkeypatch):
    calls = []

    class CountingFeatures(AbstractFeatureExtractor):
        # Cheap features (mean colour of a 4 x 4 grid, 48 of them), and a call counter.
        name: str = "counting-grid"

        def __call__(self, images):
            calls.append(len(images))
            n, h, w, _ = images.shape
            return images.reshape(n, 4, h // 4, 4, w // 4, 3).mean((2, 4)).reshape(n, 48)

    monkeypatch.setenv("FLUID_CACHE", str(tmp_path))
    stats = shapes_reference_stats(32, extractor=CountingFeatures(), count=60, seed=3)
    assert sum(calls) == 60 and stats.count == 60
    cached = list(tmp_path.glob("*.npz"))
    assert [p.name for p in cached] == ["shapes-32px-n60-seed3-counting-grid.npz"]
    again = shapes_reference_stats(32, extractor=CountingFeatures(), count=60, seed=3)
    assert sum(calls) == 60  # read, not recomputed
    np.testing.assert_array_equal(again.cov, stats.cov)
    direct = feature_stats(CountingFeatures(), _images(3, n=60))
    np.testing.assert_allclose(stats.mean, direct.mean, rtol=1e-12)
    np.testing.assert_allclose(stats.cov, direct.cov, rtol=1e-10, atol=1e-15)
    # Other data set options are other statistics, in another file.
    scaled = shapes_reference_stats(
        32, extractor=CountingFeatures(), count=60, seed=3, object_scale=1.6
    )
    assert scaled.distance(stats) > 0
    assert (tmp_path / "shapes-32px-n60-seed3-object_scale=1.6-counting-grid.npz").exists()
    # The built-in features need more images than they have dimensions (191).
    with pytest.raises(ValueError, match="too few"):
        shapes_reference_stats(32, count=100, path=tmp_path / "small.npz")


def _toy_network(params, images):
    # Stands in for Inception: pooled colour through a linear layer, [n, 6].
    return images.mean((1, 2)) @ params["kernel"] + params["bias"][None]


def test_inception_adapter(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        InceptionFeatures()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        InceptionFeatures(_toy_network, weights=tmp_path / "missing.safetensors")
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 6)).astype(np.float32), "bias": np.ones(6, np.float32)}
    write_safetensors(tmp_path / "toy.safetensors", params)
    extractor = InceptionFeatures(
        _toy_network, weights=tmp_path / "toy.safetensors", name="toy", input_size=64
    )
    images = _images(0, n=3)
    features = extractor(images)
    assert features.shape == (3, 6) and features.dtype == np.float64
    # Bilinear resizing keeps the mean colour (up to the border), so the toy's output is
    # its linear layer on the images' mean colours.
    expected = images.mean((1, 2)) @ params["kernel"] + params["bias"]
    np.testing.assert_allclose(features, expected, atol=2e-2)
    without_weights = InceptionFeatures(lambda x: _toy_network(params, x), input_size=64)
    np.testing.assert_allclose(without_weights(images), features, rtol=1e-6)
    stats = feature_stats(extractor, np.concatenate([images] * 3), min_count=8)
    assert stats.extractor == "toy" and stats.mean.shape == (6,)
