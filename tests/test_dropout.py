"""Dropout's masks (`fluid.nn.keep_mask`): a counter-based hash in place of Threefry, so
its statistics are tested here: the rate, independence of neighbouring entries, of keys, of
keys whose words differ slightly, and uniform hashes."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.nn import dropout, keep_mask
from fluid.nn._dropout import keyed_hash

N = 1 << 20


def _within(count: float, n: int, p: float, sigmas: float = 5.0) -> bool:
    """`count` successes of `n` Bernoulli(p) trials lie within `sigmas` standard deviations."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_the_rate_is_the_drop_probability(rate):
    for seed in range(3):
        dropped = int(jnp.sum(~keep_mask(jr.key(seed), (N,), rate)))
        assert _within(dropped, N, rate), (seed, dropped / N)


def test_neighbours_are_independent():
    # Along the last axis and along the first (a stride of the row length): both dropped
    # with probability rate ** 2, not more.
    rate = 0.3
    m = ~np.asarray(keep_mask(jr.key(1), (1024, 1024), rate))
    pairs = [(m[:, :-1], m[:, 1:]), (m[:-1], m[1:]), (m[:, :-7], m[:, 7:])]
    for a, b in pairs:
        assert _within(int(np.sum(a & b)), a.size, rate**2)
        assert _within(int(np.sum(a & ~b)), a.size, rate * (1 - rate))


def test_keys_are_independent():
    # Split keys, and keys under vmap (one per example, as the train step draws them).
    rate = 0.2
    keys = jr.split(jr.key(2), 4)
    masks = ~np.asarray(jax.vmap(lambda k: keep_mask(k, (N // 4,), rate))(keys))
    for i in range(4):
        for j in range(i + 1, 4):
            assert _within(int(np.sum(masks[i] & masks[j])), N // 4, rate**2)
    assert np.array_equal(masks[0], ~np.asarray(keep_mask(keys[0], (N // 4,), rate)))


@pytest.mark.parametrize("d", [1, 2, 1000])
def test_nearby_key_words_give_unrelated_masks(d):
    # Keys whose first words differ by d: without the second word the hash of entry i + d
    # under one would be the hash of entry i under the other (a shifted copy). With it,
    # the shifted masks agree no more often than independent ones.
    k0, k1 = jnp.uint32(12345), jnp.uint32(999)
    a = np.asarray(keyed_hash(k0, k1, N)) < 2**31
    b = np.asarray(keyed_hash(k0 + jnp.uint32(d), k1 ^ jnp.uint32(1), N)) < 2**31
    agree = int(np.sum(a[d:] == b[:-d]))
    assert _within(agree, N - d, 0.5)
    # The same second word: a shifted copy, as the docstring says.
    c = np.asarray(keyed_hash(k0 + jnp.uint32(d), k1, N)) < 2**31
    assert np.array_equal(a[d:], c[:-d])


def test_hashes_are_distinct_and_uniform():
    h = np.asarray(keyed_hash(jnp.uint32(7), jnp.uint32(11), N))
    assert np.unique(h).size == N  # a bijection of the indices
    for shift in (0, 8, 16, 24):  # every byte uniform: a chi-square test, 255 dof
        counts = np.bincount((h >> shift) & 0xFF, minlength=256)
        chi2 = float(np.sum((counts - N / 256) ** 2 / (N / 256)))
        assert chi2 < 360, (shift, chi2)  # P(chi2_255 > 360) < 1e-4


def test_dropout_scales_the_kept_entries_and_is_deterministic():
    x = jnp.arange(1, 10001, dtype=jnp.float32)
    out = dropout(x, 0.25, jr.key(3))
    keep = keep_mask(jr.key(3), x.shape, 0.25)
    np.testing.assert_array_equal(out, np.where(keep, x / 0.75, 0.0))
    np.testing.assert_array_equal(out, dropout(x, 0.25, jr.key(3)))
    assert not np.array_equal(out, dropout(x, 0.25, jr.key(4)))
    # Nearly 1: the threshold stays a 32-bit integer.
    assert int(jnp.sum(keep_mask(jr.key(0), (1000,), 1 - 1e-12))) == 0
    with pytest.raises(ValueError, match="rate"):
        dropout(x, 1.0, jr.key(0))
