import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float

from .._types import Key


def dropout(x: Float[Array, "*shape"], rate: float, key: Key | None) -> Float[Array, "*shape"]:
    """Inverted dropout, as torch's: each entry is zeroed with probability `rate` and the
    others are scaled by `1 / (1 - rate)`, so the expectation is unchanged.

    The identity, with nothing traced, when `key` is `None` (evaluation) or `rate` is 0:
    modules that take an optional key are deterministic without one. Which entries are
    zeroed is `keep_mask`'s draw.

    **Arguments:**

    - `x`: any array.
    - `rate`: probability of zeroing an entry, in [0, 1) (static).
    - `key`: randomness, or `None` for no dropout.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"a dropout rate must lie in [0, 1), got {rate}.")
    if key is None or rate == 0.0:
        return x
    keep = keep_mask(key, x.shape, rate)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def keep_mask(key: Key, shape: tuple[int, ...], rate: float) -> Bool[Array, "*shape"]:
    """Which entries dropout keeps: each independently False with probability `rate`
    (exactly `round(rate * 2**32) / 2**32`, at most `1 - 2**-32`), deterministic in `key`.

    `jax.random.bernoulli` draws each entry through the Threefry-2x32 cipher (20 rounds per
    pair of 32-bit words): on a 2-core CPU its masks cost about 40x a masking pass, and a
    quarter of the `mar256` train step went to MAR's dropout. Here the key gives two 32-bit
    words (`k0`, `k1`, one Threefry draw), and entry `i` (its index in the flattened array)
    gets `mix(mix(i + k0) ^ k1)`, where `mix` is Wellons' `lowbias32` integer hash (two
    multiply-xorshift rounds, a bijection of the 32-bit integers), compared with the rate's
    threshold: a few integer operations per entry, fused into the masking. Within one call
    the hashes are distinct (a composition of bijections of distinct indices); two keys
    whose `k0` differ by `d` give masks that are not shifted copies unless their `k1` are
    also equal. A statistical generator for dropout, not a cipher: `tests/test_dropout.py`
    checks its rate, the independence of neighbouring entries and of keys.
    """
    size = 1
    for n in shape:
        size *= n
    if size >= 2**32:
        raise ValueError(f"keep_mask draws at most 2**32 - 1 entries per key, got {size}.")
    k0, k1 = jr.bits(key, (2,), jnp.uint32)
    hashed = keyed_hash(k0, k1, size).reshape(shape)
    return hashed >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def keyed_hash(k0: Array, k1: Array, size: int) -> Array:
    """`mix(mix(i + k0) ^ k1)` for `i = 0 .. size - 1` (uint32): `keep_mask`'s draw."""
    index = jax.lax.iota(jnp.uint32, size)
    return _lowbias32(_lowbias32(index + k0) ^ k1)


def _lowbias32(x: Array) -> Array:
    """Wellons' `lowbias32` (the "hash-prospector" search): xorshift-multiply twice."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)
