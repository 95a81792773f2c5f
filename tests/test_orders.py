"""Generation orders: the cosine schedule against its formula, permutations, known counts."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.orders import AbstractBoundedOrder, RandomOrder, RasterOrder, cosine_step_counts


def reference_masked_after(n, steps):
    """The formula of DESIGN.md, written independently: masked count after each step."""
    out, remaining = [], n
    for s in range(steps):
        target = math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps))
        after = 0 if s == steps - 1 else max(1, min(remaining - 1, target))
        out.append(after)
        remaining = after
    return out


@pytest.mark.parametrize("n,steps", [(256, 64), (64, 16), (16, 16), (64, 1), (100, 7), (256, 256)])
def test_cosine_schedule_matches_formula(n, steps):
    counts = cosine_step_counts(n, steps)
    assert len(counts) == steps and sum(counts) == n
    assert min(counts) >= 1
    masked = n - np.cumsum(counts)
    assert masked.tolist() == reference_masked_after(n, steps)


def test_paper_fact_first_13_steps_produce_one_token():
    counts = cosine_step_counts(256, 64)
    assert counts[:13] == (1,) * 13 and counts[13] > 1


def test_too_many_steps_is_an_error():
    with pytest.raises(ValueError, match="at most 16 steps"):
        cosine_step_counts(16, 17)


@pytest.mark.parametrize("order", [RandomOrder(), RandomOrder(mask_schedule="cosine"), RasterOrder()])
def test_permutation_covers_every_position_once(order):
    perm = np.asarray(order.permutation(37, key=jr.key(3)))
    assert sorted(perm.tolist()) == list(range(37))
    chex_same = np.asarray(jax.jit(lambda k: order.permutation(37, key=k))(jr.key(3)))
    np.testing.assert_array_equal(perm, chex_same)


def test_random_permutation_differs_per_key_and_raster_is_identity():
    a = np.asarray(RandomOrder().permutation(64, key=jr.key(0)))
    b = np.asarray(RandomOrder().permutation(64, key=jr.key(1)))
    assert (a != b).any()
    np.testing.assert_array_equal(RasterOrder().permutation(64, key=jr.key(5)), np.arange(64))
    assert RasterOrder().step_counts(64, 10) == (1,) * 64


def test_random_order_sampling_produces_every_position_exactly_once():
    n, steps = 64, 12
    perm = np.asarray(RandomOrder().permutation(n, key=jr.key(2)))
    produced, start = [], 0
    for k in RandomOrder().step_counts(n, steps):
        produced += perm[start : start + k].tolist()
        start += k
    assert sorted(produced) == list(range(n))


def test_mar_mask_ratio_is_a_truncated_normal_with_the_paper_mean():
    keys = jr.split(jr.key(0), 20000)
    ratios = np.asarray(jax.vmap(lambda k: RandomOrder().mask_ratio(key=k))(keys))
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    assert abs(ratios.mean() - 0.867) < 0.005  # DESIGN.md: mean 0.867


def test_cosine_mask_ratio_has_maskgit_mean():
    keys = jr.split(jr.key(0), 20000)
    ratios = np.asarray(jax.vmap(lambda k: RandomOrder(mask_schedule="cosine").mask_ratio(key=k))(keys))
    assert ratios.min() >= 0.0 and ratios.max() <= 1.0
    assert abs(ratios.mean() - 2 / math.pi) < 0.01  # E[cos(pi u / 2)] = 2 / pi


@pytest.mark.parametrize("order", [RandomOrder(), RandomOrder(mask_schedule="cosine"), RasterOrder()])
def test_num_known_leaves_at_least_one_target(order):
    keys = jr.split(jr.key(1), 2000)
    known = np.asarray(jax.vmap(lambda k: order.num_known(16, key=k))(keys))
    assert known.min() >= 0 and known.max() <= 15
    assert known.dtype == jnp.int32


def test_unknown_mask_schedule_is_refused():
    with pytest.raises(ValueError, match="mask_schedule"):
        RandomOrder(mask_schedule="linear")


@pytest.mark.parametrize("n", [4, 10, 16, 20, 64, 100, 256, 1024])
def test_the_random_orders_training_bound_holds_for_every_draw(n):
    # MAR masks at least 70%: at most n - ceil(0.7 n) known (76 of 256), reached by draws near
    # the lowest ratio; Fluid's cosine schedule bounds nothing below n - 1.
    mar, cosine = RandomOrder(), RandomOrder(mask_schedule="cosine")
    assert isinstance(mar, AbstractBoundedOrder)
    bound = mar.max_num_known(n)
    assert bound == n - math.ceil(0.7 * n - 1e-9)
    assert cosine.max_num_known(n) == n - 1
    keys = jr.split(jr.key(n), 50000)
    known = np.asarray(jax.vmap(lambda k: mar.num_known(n, key=k))(keys))
    assert known.max() <= bound
    # The lowest ratio itself (the truncated normal's lower end, rounded as the order does).
    lowest = np.float32(1.0) + np.float32(0.25) * np.nextafter(np.float32(-1.2), np.float32(0))
    assert n - min(max(math.ceil(np.float32(n) * lowest), 1), n) <= bound
    if n >= 16 and (7 * n) % 10:
        # Draws near 0.7 are common enough to reach it (where 0.7 n is a whole number, only
        # a ratio of 0.7 exactly would, and the bound keeps that margin).
        assert known.max() == bound
