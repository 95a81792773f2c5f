"""Random order with a KV cache (the `arpg` backbone): the cache is exact, the condition is
causal over the permutation, and the sampling loop produces every position exactly once."""

import dataclasses
import typing

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.backbones import AbstractBackbone, ArpgTransformer, CausalTransformer
from fluid.build import abstract_model, build_model
from fluid.config import ComponentSpec
from fluid.data.shapes import ShapesDataset
from fluid.heads import AbstractOutputHead
from fluid.model import IncompatibleComponentsError
from fluid.orders import RandomOrder, cosine_step_counts
from fluid.presets import tiny
from fluid.recipes import make_text_tokenizer

SEQ, DIM, CTX = 16, 32, 5


@pytest.fixture(scope="module")
def backbone():
    return ArpgTransformer(DIM, 4, 4, SEQ, key=jr.key(0))


def _inputs():
    x = jr.normal(jr.key(1), (SEQ, DIM))
    contexts = jr.normal(jr.key(2), (2, CTX, DIM))
    masks = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)  # a caption, a shorter one
    perm = jr.permutation(jr.key(3), SEQ).astype(jnp.int32)
    return x, contexts, masks, perm


@pytest.mark.parametrize("steps", [1, 4, 7, SEQ])
def test_cached_parallel_decoding_equals_the_uncached_forward_pass_at_every_step(backbone, steps):
    # At each step, the conditions of the step's positions from the cache equal those of
    # `__call__` with the tokens of the earlier steps known, under both contexts.
    x, contexts, masks, perm = _inputs()
    decode = eqx.filter_jit(lambda b, s, t, i: b.decode(s, t, lambda v: v, i, contexts, masks))
    observe = eqx.filter_jit(lambda b, s, t, i: b.observe(s, t, lambda v: v, i, contexts, masks))
    forward = eqx.filter_jit(
        lambda b, known, c, m: b(x, known, c, m, order=perm)
    )
    state = backbone.init_decode(contexts, masks)
    tokens = jnp.zeros((SEQ, DIM))
    produced = 0
    for k in cosine_step_counts(SEQ, steps):
        idx = perm[produced : produced + k]
        z, state = decode(backbone, state, tokens, idx)
        chex.assert_shape(z, (2, k, DIM))
        known = jnp.zeros(SEQ, bool).at[perm[:produced]].set(True)
        for c in range(2):
            reference = forward(backbone, known, contexts[c], masks[c])[idx]
            chex.assert_trees_all_close(z[c], reference, atol=2e-5, rtol=2e-5)
        tokens = tokens.at[idx].set(x[idx])
        state = observe(backbone, state, tokens, idx)
        produced += k
        assert int(state.count) == produced
    assert produced == SEQ


def test_condition_depends_on_earlier_tokens_and_its_own_query_only(backbone):
    x, contexts, masks, perm = _inputs()
    every = jnp.ones(SEQ, bool)
    for j in (0, 5, SEQ - 1):
        target = perm[j]

        def z_target(b, x, target=target):  # weighted: a LayerNorm's outputs sum to a constant
            z = b(x, every, contexts[0], masks[0], order=perm)[target]
            return jnp.sum(z * jr.normal(jr.key(5), (DIM,)))

        grad_b = eqx.filter_grad(lambda b: z_target(b, x))(backbone)
        grad_x = jax.grad(lambda x: z_target(backbone, x))(x)
        reads = np.abs(np.asarray(grad_x)).sum(axis=1) > 0
        # Exactly the tokens of the earlier steps.
        expected = np.zeros(SEQ, bool)
        expected[np.asarray(perm[:j])] = True
        np.testing.assert_array_equal(reads, expected)
        # Of the position queries, its own alone.
        queries = np.abs(np.asarray(grad_b.query_embed)).sum(axis=1) > 0
        np.testing.assert_array_equal(queries, np.arange(SEQ) == int(target))
    # Reordering the steps after `j` changes nothing at or before it.
    j = 6
    tail = perm[j + 1 :][jr.permutation(jr.key(9), SEQ - j - 1)]
    other = jnp.concatenate([perm[: j + 1], tail])
    a = backbone(x, every, contexts[0], masks[0], order=perm)[perm[: j + 1]]
    b = backbone(x, every, contexts[0], masks[0], order=other)[perm[: j + 1]]
    chex.assert_trees_all_close(a, b, atol=1e-6)


def test_query_depth_is_checked():
    with pytest.raises(ValueError, match="query_depth"):
        ArpgTransformer(DIM, 1, 4, SEQ, key=jr.key(0))
    with pytest.raises(ValueError, match="query_depth"):
        ArpgTransformer(DIM, 4, 4, SEQ, query_depth=4, key=jr.key(0))


def test_weights_match_a_causal_transformer_of_the_same_depth_plus_the_queries():
    def count(m):
        return sum(a.size for a in jax.tree.leaves(eqx.filter(m, eqx.is_array)))

    arpg = ArpgTransformer(DIM, 4, 4, SEQ, key=jr.key(0))
    causal = CausalTransformer(DIM, 4, 4, SEQ, key=jr.key(0))
    # The causal transformer's output position embedding stands where the query embedding
    # is; a query block's weights equal a cross-attending block's; one more LayerNorm.
    assert count(arpg) == count(causal) + 2 * DIM


@pytest.mark.parametrize("n", range(1, 70))
def test_the_cosine_schedule_produces_every_position_for_every_step_count(n):
    for steps in range(1, n + 1):
        counts = cosine_step_counts(n, steps)
        assert len(counts) == steps and sum(counts) == n and min(counts) >= 1


# -- the sampling loop, watched through a backbone and a head that count --------------------
@typing.final
class CountingBackbone(AbstractBackbone):
    """Gives each requested position its number of earlier requests, plus one, and counts
    the positions it is told were written (`observe`)."""

    attention: typing.ClassVar[str] = "causal"
    dim: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)

    def __call__(self, x, known, context, context_mask, *, order=None):
        return jnp.zeros((self.seq_len, self.dim))

    def init_decode(self, contexts, context_masks):
        zeros = jnp.zeros((self.seq_len,), jnp.float32)
        return zeros, zeros  # requested, observed

    def decode(self, state, tokens, embed, positions, contexts, context_masks):
        requested, observed = state
        # Positions observed so far must hold a written token (the head writes >= 1).
        z = jnp.broadcast_to((requested[positions] + 1.0)[:, None], (positions.shape[0], self.dim))
        z = z.at[:, 1].set(observed[positions])
        z = jnp.broadcast_to(z, (contexts.shape[0], *z.shape))
        return z, (requested.at[positions].add(1.0), observed)

    def observe(self, state, tokens, embed, positions, contexts, context_masks):
        requested, observed = state
        return requested, observed.at[positions].add(1.0)


@typing.final
class CopyHead(AbstractOutputHead):
    token_kind: typing.ClassVar[str] = "continuous"
    cond_dim: int = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)

    def loss(self, z, target, *, key):
        return jnp.sum(z)

    def sample(self, z, z_uncond, cfg, temperature, *, key):
        return z[: self.token_dim]

    def num_evaluations(self):
        return 1


@pytest.fixture(scope="module")
def counting_model():
    source = ShapesDataset(16, size=32)
    text_tokenizer = make_text_tokenizer(source, 64)
    config = dataclasses.replace(tiny("continuous-arpg").model, width=64)
    model = build_model(config, text_tokenizer=text_tokenizer, key=jr.key(0))
    model = eqx.tree_at(lambda m: m.backbone, model, CountingBackbone(64, SEQ))
    model = eqx.tree_at(lambda m: m.head, model, CopyHead(64, model.tokenizer.token_dim))
    ids, mask = text_tokenizer.encode(["a red circle", "two blue squares"], 16)
    return model, jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8, 11, SEQ])
def test_sampling_produces_every_position_exactly_once(counting_model, steps):
    # RandAR's issue 14 was positions never generated. Each token's first channel is how
    # often its position was requested (1: once), its second how often it had been
    # observed before it was requested (0: never).
    model, ids, mask = counting_model
    tokens = eqx.filter_jit(
        lambda m, i, mk: m.generate_tokens(i, mk, key=jr.key(0), steps=steps, cfg=2.0,
                                           cfg_schedule="linear", temperature=1.0)
    )(model, ids, mask)
    np.testing.assert_array_equal(tokens[..., 0], 1.0)
    np.testing.assert_array_equal(tokens[..., 1], 0.0)


# -- the composition -----------------------------------------------------------------------
def test_random_order_drives_a_causal_backbone_one_position_per_step_and_refuses_more():
    config = dataclasses.replace(
        tiny("fluid").model,
        backbone=ComponentSpec(name="causal", kwargs={"depth": 1, "num_heads": 2}),
    )
    model = abstract_model(config)  # random order + causal: RandAR-like teacher forcing
    assert isinstance(model.order, RandomOrder) and model.backbone.attention == "causal"
    model._check_steps(model.seq_len)  # one position per step: fine
    with pytest.raises(IncompatibleComponentsError) as info:
        model._check_steps(4)
    message = str(info.value)
    assert "arpg" in message and "bidirectional" in message and f"steps={SEQ}" in message
