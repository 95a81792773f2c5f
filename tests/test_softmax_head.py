"""The softmax head against optax's cross-entropy; guidance and temperature semantics."""

import chex
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from fluid.heads import SoftmaxHead


@pytest.fixture
def head():
    return SoftmaxHead(8, 11, key=jr.key(0))


def test_loss_equals_optax_cross_entropy(head):
    z = jr.normal(jr.key(1), (5, 8))
    targets = jnp.array([0, 3, 10, 7, 7], jnp.int32)
    ours = jax.vmap(lambda zz, t: head.loss(zz, t, key=jr.key(0)))(z, targets)
    logits = jax.vmap(head.logits)(z)
    ref = optax.softmax_cross_entropy(logits, jax.nn.one_hot(targets, 11))
    chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=1e-5)
    # and against NumPy's log-softmax
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    np.testing.assert_allclose(ours, lse - lg[np.arange(5), np.asarray(targets)], atol=1e-5)


def test_guidance_at_scale_one_equals_conditional(head):
    z, zu = jr.normal(jr.key(1), (8,)), jr.normal(jr.key(2), (8,))
    keys = jr.split(jr.key(3), 64)
    guided = jax.vmap(lambda k: head.sample(z, zu, 1.0, 1.0, key=k))(keys)
    plain = jax.vmap(lambda k: head.sample(z, None, 1.0, 1.0, key=k))(keys)
    chex.assert_trees_all_equal(guided, plain)
    strong = jax.vmap(lambda k: head.sample(z, zu, 4.0, 1.0, key=k))(keys)
    assert (np.asarray(strong) != np.asarray(plain)).any()


def test_zero_temperature_is_greedy_and_top_k_restricts(head):
    z = jr.normal(jr.key(1), (8,))
    best = int(jnp.argmax(head.logits(z)))
    assert int(head.sample(z, None, 1.0, 0.0, key=jr.key(0))) == best
    top2 = SoftmaxHead(8, 11, top_k=2, key=jr.key(0))
    allowed = set(np.argsort(np.asarray(top2.logits(z)))[-2:].tolist())
    draws = jax.vmap(lambda k: top2.sample(z, None, 1.0, 5.0, key=k))(jr.split(jr.key(4), 200))
    assert set(np.asarray(draws).tolist()) <= allowed


def test_sampling_follows_the_softmax_distribution(head):
    z = jr.normal(jr.key(1), (8,))
    draws = np.asarray(jax.vmap(lambda k: head.sample(z, None, 1.0, 1.0, key=k))(jr.split(jr.key(5), 40000)))
    freq = np.bincount(draws, minlength=11) / len(draws)
    np.testing.assert_allclose(freq, jax.nn.softmax(head.logits(z)), atol=0.01)


def test_bad_top_k_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        SoftmaxHead(8, 11, top_k=12, key=jr.key(0))
