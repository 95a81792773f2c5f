import functools
import os
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int

from .._types import DISCRETE, Image, Key
from ._abstract import AbstractImageTokenizer
from ._patch import check_grid, check_image, patchify, unpatchify

# k-means sees at most this many patches (a random subset beyond it): enough to place 256
# codes well, small enough that fitting takes seconds on two CPU cores.
_FIT_PATCHES = 65536
_LLOYD_ITERATIONS = 20
# Distances are computed this many patches at a time, bounding memory at any data size.
_CHUNK = 4096


def _nearest(
    points: Float[Array, "n token_dim"], codebook: Float[Array, "vocab token_dim"]
) -> tuple[Int[Array, " n"], Float[Array, " n"]]:
    """Index of and squared distance to the nearest codeword, exact differences (no
    |x|^2 - 2xc + |c|^2 cancellation), so ties and near-ties resolve as a brute force does."""
    d2 = jnp.sum((points[:, None, :] - codebook[None, :, :]) ** 2, axis=-1)
    return jnp.argmin(d2, axis=-1).astype(jnp.int32), jnp.min(d2, axis=-1)


def _nearest_fast(
    points: Float[Array, "n token_dim"], codebook: Float[Array, "vocab token_dim"]
) -> tuple[Int[Array, " n"], Float[Array, " n"]]:
    """`_nearest` through one matrix product per chunk, for fitting on many patches."""
    n, dim = points.shape
    pad = -n % _CHUNK
    chunks = jnp.pad(points, ((0, pad), (0, 0))).reshape(-1, _CHUNK, dim)
    c2 = jnp.sum(codebook**2, axis=-1)

    def one(x):
        d2 = jnp.sum(x**2, axis=-1, keepdims=True) - 2 * x @ codebook.T + c2[None, :]
        return jnp.argmin(d2, axis=-1).astype(jnp.int32), jnp.maximum(jnp.min(d2, axis=-1), 0.0)

    index, dist = jax.lax.map(one, chunks)
    return index.reshape(-1)[:n], dist.reshape(-1)[:n]


def _kmeans_plus_plus(points: Float[Array, "n dim"], k: int, key: Key) -> Float[Array, "k dim"]:
    """k-means++ seeding: each new centre drawn with probability proportional to its squared
    distance to the nearest centre so far."""
    n = points.shape[0]
    first_key, rest_key = jr.split(key)
    first = points[jr.randint(first_key, (), 0, n)]
    centres = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
    d2 = jnp.sum((points - first[None, :]) ** 2, axis=-1)
    # Inverse-CDF draws from uniforms made up front keep the random-bit generator out of the
    # loop body, which halves compile time on a small CPU.
    uniforms = jr.uniform(rest_key, (k,))

    def step(i, carry):
        centres, d2 = carry
        cdf = jnp.cumsum(d2)
        # Once every point coincides with a centre (fewer distinct patches than codes) the
        # draw lands on the last point: a duplicate centre, harmless to Lloyd's iterations.
        index = jnp.searchsorted(cdf, uniforms[i] * cdf[-1], side="right", method="compare_all")
        new = points[jnp.minimum(index, n - 1)]
        d2 = jnp.minimum(d2, jnp.sum((points - new[None, :]) ** 2, axis=-1))
        return centres.at[i].set(new), d2

    centres, _ = jax.lax.fori_loop(1, k, step, (centres, d2))
    return centres


@functools.partial(jax.jit, static_argnums=(1, 2))
def _kmeans(
    points: Float[Array, "n dim"], k: int, iterations: int, key: Key
) -> Float[Array, "k dim"]:
    """Lloyd's algorithm from k-means++ seeds; a code that loses all its points is re-seeded
    at the point currently worst served, so every code stays in use."""
    n = points.shape[0]

    def step(_, centres):
        index, dist = _nearest_fast(points, centres)
        sums = jax.ops.segment_sum(points, index, num_segments=k)
        counts = jax.ops.segment_sum(jnp.ones((n,), points.dtype), index, num_segments=k)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        dead = counts == 0
        # The j-th dead code takes the j-th worst-served point.
        worst = jax.lax.top_k(dist, min(k, n))[1]
        rank = jnp.cumsum(dead.astype(jnp.int32)) - 1
        reseeded = points[worst[jnp.clip(rank, 0, min(k, n) - 1)]]
        return jnp.where(dead[:, None], reseeded, means)

    return jax.lax.fori_loop(0, iterations, step, _kmeans_plus_plus(points, k, key))


@typing.final
class PaletteTokenizer(AbstractImageTokenizer):
    """Discrete tokens without a trained autoencoder: each patch becomes the index of its
    nearest codeword in a codebook fitted by k-means to patches of the training images.

    A stand-in for a VQ model that fits in seconds: on flat-coloured data such as `shapes`
    a few hundred codewords reconstruct images closely. Build it, then `fit` it to data;
    before fitting its codebook is random.

    **Arguments:**

    - `image_size`: side of the square images in pixels.
    - `patch_size`: side of a patch in pixels; must divide `image_size`.
    - `vocab_size`: number of codewords.
    - `codebook`: `[vocab_size, patch_size**2 * 3]` codewords (channels ordered as
      `PatchTokenizer`'s); `None` for random ones until `fit`.
    - `key`: draws the random codebook (unused when `codebook` is given).
    """

    token_kind: typing.ClassVar[str] = DISCRETE
    codebook: Float[Array, "vocab token_dim"]
    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    grid: tuple[int, int] = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        vocab_size: int = 256,
        codebook: np.ndarray | Array | None = None,
        *,
        key: Key,
    ):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}.")
        self.grid = check_grid(image_size, patch_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.token_dim = patch_size * patch_size * 3
        self.vocab_size = vocab_size
        if codebook is None:
            codebook = jr.uniform(key, (vocab_size, self.token_dim), minval=-1.0, maxval=1.0)
        elif codebook.shape != (vocab_size, self.token_dim):
            raise ValueError(
                f"codebook must have shape {(vocab_size, self.token_dim)} (vocab_size, "
                f"patch_size**2 * 3), got {tuple(codebook.shape)}."
            )
        self.codebook = jnp.asarray(codebook, jnp.float32)

    def encode(self, image: Image) -> Int[Array, " seq"]:
        check_image(image, self.image_size)
        return _nearest(patchify(image, self.patch_size), self.codebook)[0]

    def decode(self, tokens: Int[Array, " seq"]) -> Image:
        patches = jnp.take(self.codebook, tokens, axis=0)
        return unpatchify(patches, self.grid, self.patch_size)

    def fit(self, images: np.ndarray, *, key: Key) -> "PaletteTokenizer":
        """Fit the codebook by k-means (k-means++ seeds, then Lloyd iterations) to the
        patches of `images`, at most 65,536 of them drawn at random."""
        images = np.asarray(images, np.float32)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or not len(images):
            raise ValueError(
                f"fit takes a non-empty batch of images [n, {expected[0]}, {expected[1]}, 3], "
                f"got shape {images.shape}."
            )
        sample_key, kmeans_key = jr.split(key)
        points = jax.vmap(patchify, in_axes=(0, None))(jnp.asarray(images), self.patch_size)
        points = points.reshape(-1, self.token_dim)
        if points.shape[0] > _FIT_PATCHES:
            points = points[jr.permutation(sample_key, points.shape[0])[:_FIT_PATCHES]]
        codebook = _kmeans(points, self.vocab_size, _LLOYD_ITERATIONS, kmeans_key)
        return eqx.tree_at(lambda t: t.codebook, self, codebook)

    def save(self, path: str | os.PathLike) -> None:
        """Write the codebook and geometry to an `.npz` file at exactly `path`."""
        with open(path, "wb") as f:
            np.savez(
                f,
                codebook=np.asarray(self.codebook),
                image_size=np.int64(self.image_size),
                patch_size=np.int64(self.patch_size),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PaletteTokenizer":
        """Read a tokenizer that `save` wrote (no pickled objects are read)."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"codebook", "image_size", "patch_size"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{os.fspath(path)!r} is not a saved PaletteTokenizer: it lacks "
                    f"{sorted(missing)} (it has {sorted(data.files)})."
                )
            codebook = data["codebook"]
            image_size, patch_size = data["image_size"], data["patch_size"]
        if image_size.shape or patch_size.shape or codebook.ndim != 2:
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved PaletteTokenizer: expected a 2-D codebook "
                f"and scalar sizes, got shapes {codebook.shape}, {image_size.shape}, "
                f"{patch_size.shape}."
            )
        return cls(
            int(image_size),
            int(patch_size),
            codebook.shape[0],
            codebook.astype(np.float32),
            key=jr.key(0),
        )
