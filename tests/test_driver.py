"""The order drives every backbone: in training it decides what the backbone reads and what
the loss counts, in sampling which positions each step produces, through the same calls for
a causal and a bidirectional backbone.

The spies below are legitimate parts whose outputs say what they were given: the backbone's
condition at step `j` is the number `j` plus the sum of the embedded tokens it read, and the
head predicts its condition's first entries. The model's loss and samples are then known in
closed form for any permutation.
"""

import dataclasses
import typing

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.backbones import AbstractCausalBackbone, CausalTransformer
from fluid.build import build_model
from fluid.data.shapes import ShapesDataset
from fluid.heads import AbstractOutputHead
from fluid.model import IncompatibleComponentsError
from fluid.orders import AbstractGenerationOrder, TrainingPositions
from fluid.presets import tiny
from fluid.recipes import make_text_tokenizer

SEQ = 16  # the tiny presets' tokens
# Not raster, not its reverse: every position moves.
PERM = np.array([5, 0, 11, 2, 15, 7, 1, 12, 3, 9, 14, 4, 8, 13, 6, 10], np.int32)


@typing.final
class FixedOrder(AbstractGenerationOrder):
    """A fixed permutation, `per_step` positions per sampling step."""

    supported_attention: typing.ClassVar[frozenset[str]] = frozenset({"causal", "bidirectional"})
    random_permutation: typing.ClassVar[bool] = False
    perm: tuple[int, ...] = eqx.field(static=True, converter=lambda p: tuple(map(int, p)))
    per_step: int = eqx.field(static=True, default=1)

    def permutation(self, n, *, key):
        del key
        return jnp.asarray(self.perm, jnp.int32)

    def num_known(self, n, *, key):
        return jr.randint(key, (), 0, n, dtype=jnp.int32)

    def step_counts(self, n, steps):
        del steps
        return (self.per_step,) * (n // self.per_step)


@typing.final
class StepBackbone(AbstractCausalBackbone):
    """Causal: the condition of the position produced at step `j` is `j` plus the sum of the
    embedded tokens produced before it."""

    attention: typing.ClassVar[str] = "causal"
    dim: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)

    def __call__(self, x, known, context, context_mask, *, order=None):
        del context, context_mask
        order = jnp.arange(self.seq_len) if order is None else order
        h = jnp.where(known[:, None], x, 0.0)[order]
        before = jnp.cumsum(h, axis=0) - h  # the tokens of earlier steps
        z = before + jnp.arange(self.seq_len, dtype=x.dtype)[:, None]
        return z[jnp.argsort(order)]

    def init_cache(self, context, context_mask):
        del context_mask
        return jnp.zeros((self.dim,), context.dtype)  # the running sum

    def decode_step(self, x_prev, t, cache, context, context_mask, *, position=None):
        del context, context_mask, position
        total = jnp.where(t == 0, cache, cache + x_prev)
        return total + t.astype(total.dtype), total


@typing.final
class FirstEntriesHead(AbstractOutputHead):
    """Predicts the first `token_dim` entries of its condition; squared error."""

    token_kind: typing.ClassVar[str] = "continuous"
    cond_dim: int = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)

    def loss(self, z, target, *, key):
        del key
        return jnp.sum((z[: self.token_dim] - target) ** 2)

    def sample(self, z, z_uncond, cfg, temperature, *, key):
        del z_uncond, cfg, temperature, key
        return z[: self.token_dim]

    def num_evaluations(self):
        return 1


@pytest.fixture(scope="module")
def parts():
    source = ShapesDataset(16, size=32)
    text_tokenizer = make_text_tokenizer(source, 64)
    # Wide enough for the head to read a whole token (48 numbers) off a condition.
    config = dataclasses.replace(tiny("continuous-raster").model, width=64)
    model = build_model(config, text_tokenizer=text_tokenizer, key=jr.key(0))
    ids, mask = text_tokenizer.encode(["a red circle", "two blue squares"], 16)
    return model, jnp.asarray(ids), jnp.asarray(mask)


def with_spies(model, order):
    dim, token_dim = model.backbone.dim, model.tokenizer.token_dim
    model = eqx.tree_at(lambda m: m.backbone, model, StepBackbone(dim, SEQ))
    model = eqx.tree_at(lambda m: m.head, model, FirstEntriesHead(dim, token_dim))
    return eqx.tree_at(lambda m: m.order, model, order)


@pytest.mark.parametrize("perm", [PERM, np.arange(SEQ, dtype=np.int32)], ids=["fixed", "raster"])
def test_causal_training_targets_follow_the_permutation(parts, perm):
    model, ids, mask = parts
    spied = with_spies(model, FixedOrder(perm))
    tokens = jr.normal(jr.key(1), (2, SEQ, model.tokenizer.token_dim))
    batch = {"tokens": tokens, "text_ids": ids, "text_mask": mask}
    total, count = eqx.filter_jit(lambda m, b: m.loss_terms(b, keys=jr.split(jr.key(2), 2)))(
        spied, batch
    )
    # Closed form: position perm[j] is predicted from j and the tokens of perm[:j].
    x = np.asarray(jax.vmap(jax.vmap(model.token_embedding.embed_one))(tokens))
    token_dim = model.tokenizer.token_dim
    want = np.zeros(2)
    for b in range(2):
        for j, p in enumerate(perm):
            z = x[b, perm[:j]].sum(axis=0) + j
            want[b] += np.sum((z[:token_dim] - np.asarray(tokens[b, p])) ** 2)
    np.testing.assert_allclose(np.asarray(total), want, rtol=1e-5)
    chex.assert_trees_all_equal(count, jnp.full((2,), float(SEQ)))  # every position a target


def test_causal_sampling_produces_the_permutations_positions_in_order(parts):
    model, ids, mask = parts
    spied = with_spies(model, FixedOrder(PERM))
    tokens = eqx.filter_jit(
        lambda m, i, k: m.generate_tokens(i, k, key=jr.key(3), steps=4, cfg=1.0,
                                          cfg_schedule="linear", temperature=1.0)
    )(spied, ids, mask)
    # Replay: the token produced at step j is its condition, j plus the embedded sum of
    # the tokens produced at steps before j, positioned at PERM[j].
    embed = eqx.filter_jit(lambda t: model.token_embedding.embed_one(t))
    token_dim = model.tokenizer.token_dim
    for b in range(2):
        total = np.zeros(model.backbone.dim, np.float32)
        for j, p in enumerate(PERM):
            z = total + j
            np.testing.assert_allclose(np.asarray(tokens[b, p]), z[:token_dim], rtol=1e-5,
                                       atol=1e-5)
            total = total + np.asarray(embed(tokens[b, p]))


def test_a_causal_model_refuses_an_order_of_several_positions_per_step(parts):
    model, ids, mask = parts
    model = eqx.tree_at(lambda m: m.order, model, FixedOrder(PERM, per_step=2))
    # The model refuses before tracing, naming the backbones that can ...
    with pytest.raises(IncompatibleComponentsError,
                       match="produces up to 2 positions per step at steps=8, but the backbone "
                             "CausalTransformer decodes one position per step.*arpg, bidirectional"):
        model.generate_tokens(ids, mask, key=jr.key(0), steps=8, cfg=1.0,
                              cfg_schedule="linear", temperature=1.0)
    # ... and the backbone itself refuses a step of two positions.
    state = model.backbone.init_decode(jnp.zeros((1, 3, model.backbone.dim)),
                                       jnp.ones((1, 3), bool))
    with pytest.raises(ValueError, match="decodes one position per step, but the order "
                                         "produces 2 at a step"):
        model.backbone.decode(state, jnp.zeros((SEQ, 48)), lambda v: v[: model.backbone.dim],
                              jnp.array([0, 1]), jnp.zeros((1, 3, model.backbone.dim)),
                              jnp.ones((1, 3), bool))


def test_a_fixed_order_on_the_real_causal_backbone_decodes_as_it_trains(parts):
    # The transformer itself under a non-raster order: the driver's cached samples are
    # the tokens that its full forward pass, in that order, would predict from them.
    model, ids, mask = parts
    model = eqx.tree_at(lambda m: m.order, model, FixedOrder(PERM))
    model = eqx.tree_at(lambda m: m.head, model, FirstEntriesHead(model.backbone.dim,
                                                                  model.tokenizer.token_dim))
    assert isinstance(model.backbone, CausalTransformer)
    tokens = eqx.filter_jit(
        lambda m, i, k: m.generate_tokens(i, k, key=jr.key(3), steps=4, cfg=1.0,
                                          cfg_schedule="linear", temperature=1.0)
    )(model, ids, mask)

    @eqx.filter_jit
    def teacher_forced(m, tokens, ids, mask):
        context = m.encode_text(ids, mask)
        x = m.token_embedding(tokens)
        z = m.backbone(x, jnp.ones((SEQ,), bool), context, mask, order=jnp.asarray(PERM))
        return z[:, : m.tokenizer.token_dim]

    for b in range(2):
        chex.assert_trees_all_close(teacher_forced(model, tokens[b], ids[b], mask[b]), tokens[b],
                                    atol=1e-5, rtol=1e-5)


def test_training_positions_follow_the_attention():
    order = FixedOrder(PERM)
    causal = order.training_positions(SEQ, "causal", permutation_key=jr.key(0),
                                      known_key=jr.key(1))
    assert isinstance(causal, TrainingPositions)
    chex.assert_trees_all_equal(causal.order, jnp.asarray(PERM))
    assert bool(causal.known.all()) and bool(causal.targets.all())
    with pytest.raises(ValueError, match="num_known applies to bidirectional"):
        order.training_positions(SEQ, "causal", permutation_key=jr.key(0), known_key=jr.key(1),
                                 num_known=jnp.asarray(3))
    bidi = order.training_positions(SEQ, "bidirectional", permutation_key=jr.key(0),
                                    known_key=jr.key(1), num_known=jnp.asarray(5))
    # The first five positions of the permutation are known, the others are targets.
    want = np.zeros(SEQ, bool)
    want[PERM[:5]] = True
    chex.assert_trees_all_equal(bidi.known, jnp.asarray(want))
    chex.assert_trees_all_equal(bidi.targets, jnp.asarray(~want))


def test_the_known_count_is_drawn_per_example_from_its_own_key(parts):
    # Documented choice (AbstractGenerationOrder.num_known): each example of a bidirectional
    # model draws its own count from its own key. Examples of one batch then mask different
    # counts (one draw per batch, as MAR, would give one count), and an example's sums do
    # not depend on the batch around it (micro-batches add up to the batch).
    _, ids, mask = parts
    source = ShapesDataset(16, size=32)
    model = build_model(tiny("fluid").model, text_tokenizer=make_text_tokenizer(source, 64),
                        key=jr.key(0))
    images = jnp.asarray(np.stack([source[i]["image"] for i in range(8)]), jnp.float32)
    batch = {"image": images, "text_ids": jnp.tile(ids[:1], (8, 1)),
             "text_mask": jnp.tile(mask[:1], (8, 1))}
    keys = jr.split(jr.key(5), 8)
    terms = eqx.filter_jit(lambda m, b, k: m.loss_terms(b, keys=k))
    total, count = terms(model, batch, keys)
    assert len(np.unique(np.asarray(count))) > 1
    for i in (0, 5):
        alone = jax.tree.map(lambda x, i=i: x[i:i + 1], batch)
        total_i, count_i = terms(model, alone, keys[i:i + 1])
        assert float(count_i[0]) == float(count[i])
        np.testing.assert_allclose(float(total_i[0]), float(total[i]), rtol=1e-5)
