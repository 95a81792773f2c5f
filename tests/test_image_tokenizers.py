"""The `patch` and `palette` image tokenizers: layout, exact inverses, k-means, save/load."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.data.shapes import ShapesDataset
from fluid.tokenizers import PaletteTokenizer, PatchTokenizer

# Measured: a 256-code palette over 4 px patches, fitted on 256 shapes images at 32 px,
# reconstructs 64 held-out images at 27.3-27.4 dB over fitting keys (27.7 dB fitted on 2048,
# the trainer's default). The bound leaves 2 dB of margin.
MIN_PSNR_DB = 25.0


def psnr(a, b):
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak range 2)."""
    return 10 * np.log10(4.0 / np.mean((np.asarray(a) - np.asarray(b)) ** 2))


def random_images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def shapes_images():
    ds = ShapesDataset(32, seed=1)
    return np.stack([ds[i]["image"] for i in range(320)])


@pytest.fixture(scope="module")
def fitted(shapes_images):
    tok = PaletteTokenizer(32, 4, 256, key=jr.key(0))
    return tok.fit(shapes_images[:256], key=jr.key(1))


@eqx.filter_jit
def reconstruct(tok, images):
    return jax.vmap(lambda x: tok.decode(tok.encode(x)))(images)


# -- patch ----------------------------------------------------------------------------------
def test_patch_layout_and_round_trip():
    tok = PatchTokenizer(32, 4)
    assert tok.token_kind == "continuous" and tok.vocab_size is None
    assert tok.grid == (8, 8) and tok.seq_len == 64 and tok.token_dim == 48
    image = jnp.asarray(random_images(1, 32)[0])
    tokens = tok.encode(image)
    chex.assert_shape(tokens, (64, 48))
    # Row-major over the grid; within a token: patch rows, patch columns, RGB.
    chex.assert_trees_all_equal(tokens[0], image[:4, :4].reshape(-1))
    chex.assert_trees_all_equal(tokens[1], image[:4, 4:8].reshape(-1))
    chex.assert_trees_all_equal(tokens[8], image[4:8, :4].reshape(-1))
    chex.assert_trees_all_equal(tok.decode(tokens), image)
    chex.assert_trees_all_equal(eqx.filter_jit(lambda t, x: t.encode(x))(tok, image), tokens)


def test_patch_scale_and_fit():
    tok = PatchTokenizer(16, 2, scale=0.5)
    image = jnp.asarray(random_images(1, 16)[0])
    chex.assert_trees_all_close(tok.encode(image), PatchTokenizer(16, 2).encode(image) * 0.5)
    chex.assert_trees_all_close(tok.decode(tok.encode(image)), image, atol=1e-6)
    assert tok.fit(random_images(2, 16), key=jr.key(0)) is tok


def test_patch_decode_clips_to_image_range():
    tok = PatchTokenizer(8, 4)
    image = tok.decode(jnp.full((4, 48), 3.0))
    chex.assert_trees_all_equal(image, jnp.ones((8, 8, 3)))


def test_invalid_geometry():
    with pytest.raises(ValueError, match="divide"):
        PatchTokenizer(30, 4)
    with pytest.raises(ValueError, match="divide"):
        PaletteTokenizer(32, 5, key=jr.key(0))
    with pytest.raises(ValueError, match="shape"):
        PatchTokenizer(32, 4).encode(jnp.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="shape"):
        PaletteTokenizer(32, 4, 8, key=jr.key(0)).encode(jnp.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match="codebook"):
        PaletteTokenizer(8, 4, 8, codebook=np.zeros((8, 12)), key=jr.key(0))


# -- palette --------------------------------------------------------------------------------
def test_palette_reconstructs_shapes(fitted, shapes_images):
    held_out = jnp.asarray(shapes_images[256:])
    assert psnr(reconstruct(fitted, held_out), held_out) >= MIN_PSNR_DB
    # An unfitted (random) codebook is far worse: the fit is what does the work.
    random = PaletteTokenizer(32, 4, 256, key=jr.key(0))
    assert psnr(reconstruct(random, held_out), held_out) < 10


def test_palette_codes_are_nearest_codewords(fitted, shapes_images):
    image = jnp.asarray(shapes_images[260])
    codes = fitted.encode(image)
    assert codes.dtype == jnp.int32 and codes.shape == (64,)
    assert 0 <= int(codes.min()) and int(codes.max()) < 256
    patches = shapes_images[260].reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 48)
    codebook = np.asarray(fitted.codebook, np.float64)
    dist = ((patches[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(codes), dist.argmin(-1))
    recon = fitted.decode(codes)
    expected = codebook[dist.argmin(-1)].reshape(8, 8, 4, 4, 3).transpose(0, 2, 1, 3, 4)
    np.testing.assert_allclose(np.asarray(recon), expected.reshape(32, 32, 3), atol=1e-6)


def test_palette_fit_is_a_deterministic_kmeans_fixed_point():
    images = random_images(64, 8, seed=3)
    tok = PaletteTokenizer(8, 4, 6, key=jr.key(0))
    fitted = tok.fit(images, key=jr.key(1))
    assert type(fitted) is PaletteTokenizer and fitted is not tok
    assert not np.array_equal(fitted.codebook, tok.codebook)  # `fit` leaves `tok` as it was
    chex.assert_trees_all_equal(tok.fit(images, key=jr.key(1)).codebook, fitted.codebook)
    # Lloyd has converged when each codeword is the mean of the patches nearest to it.
    patches = images.reshape(64, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 48)
    codebook = np.asarray(fitted.codebook, np.float64)
    nearest = ((patches[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(-1)
    assert len(np.unique(nearest)) == 6
    means = np.stack([patches[nearest == j].mean(0) for j in range(6)])
    np.testing.assert_allclose(codebook, means, atol=1e-4)
    with pytest.raises(ValueError, match="batch of images"):
        fitted.fit(random_images(2, 16), key=jr.key(0))


def test_palette_fit_with_fewer_distinct_patches_than_codes():
    # Two distinct patches for six codes (shapes as in the test above, so no new compile).
    images = np.full((64, 8, 8, 3), 0.25, np.float32)
    images[::2, :4, :4] = -0.5
    fitted = PaletteTokenizer(8, 4, 6, key=jr.key(0)).fit(images, key=jr.key(1))
    assert np.all(np.isfinite(np.asarray(fitted.codebook)))
    chex.assert_trees_all_close(reconstruct(fitted, jnp.asarray(images[:2])), images[:2])


def test_palette_jit_equals_eager(fitted, shapes_images):
    image = jnp.asarray(shapes_images[270])
    codes = fitted.encode(image)
    chex.assert_trees_all_equal(eqx.filter_jit(lambda t, x: t.encode(x))(fitted, image), codes)
    chex.assert_trees_all_close(
        eqx.filter_jit(lambda t, c: t.decode(c))(fitted, codes), fitted.decode(codes)
    )


def test_palette_save_load(fitted, shapes_images, tmp_path):
    path = tmp_path / "palette"  # no suffix: the file is written at exactly this path
    fitted.save(path)
    loaded = PaletteTokenizer.load(path)
    assert (loaded.image_size, loaded.patch_size, loaded.vocab_size) == (32, 4, 256)
    chex.assert_trees_all_equal(loaded.codebook, fitted.codebook)
    images = jnp.asarray(shapes_images[280:288])
    chex.assert_trees_all_equal(jax.vmap(loaded.encode)(images), jax.vmap(fitted.encode)(images))


def test_palette_load_rejects_other_files(tmp_path):
    wrong_keys = tmp_path / "wrong_keys.npz"
    np.savez(wrong_keys, weights=np.zeros((4, 48)))
    with pytest.raises(ValueError, match="lacks"):
        PaletteTokenizer.load(wrong_keys)
    wrong_shape = tmp_path / "wrong_shape.npz"
    np.savez(wrong_shape, codebook=np.zeros((4, 12)), image_size=32, patch_size=4)
    with pytest.raises(ValueError, match="codebook must have shape"):
        PaletteTokenizer.load(wrong_shape)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, codebook=np.array([None], object), image_size=32, patch_size=4)
    with pytest.raises(ValueError):
        PaletteTokenizer.load(pickled)
