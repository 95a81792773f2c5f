"""Contract tests, parametrised over the registries themselves (installed plug-ins included).

Each registered component is built from a tiny spec (a plug-in without one here is built
from its defaults), then checked: shapes, finite outputs, jit equals eager, the same key
gives the same output, and every trainable leaf receives a gradient.
"""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import perturbed

from fluid import (
    BACKBONES,
    BIDIRECTIONAL,
    CAUSAL,
    CONTINUOUS,
    HEADS,
    ORDERS,
    SLOTS,
    TEXT_ENCODERS,
    TOKENIZERS,
    AbstractCausalBackbone,
    ComponentSpec,
)

DIM, SEQ, CTX, TOKEN_DIM, VOCAB, TEXT_VOCAB = 16, 8, 6, 6, 10, 20

TINY = {
    "tokenizer": {
        "patch": {"image_size": 8, "patch_size": 4},
        "palette": {"image_size": 8, "patch_size": 4, "vocab_size": 5},
    },
    "head": {
        "diffusion": {"width": 16, "depth": 2, "batch_mul": 2, "sampling_steps": 10},
        "softmax": {},
        "flow": {"width": 16, "depth": 2, "batch_mul": 2, "sampling_steps": 3},
        "mlp_flow": {"width": 16, "sampling_steps": 4},  # the example plug-in
    },
    "backbone": {
        "causal": {"depth": 2, "num_heads": 2},
        "bidirectional": {"depth": 2, "num_heads": 2},
        "mae": {"depth": 2, "num_heads": 2, "buffer_size": 3, "max_known": 6,
                "cross_attention": True},
        "arpg": {"depth": 2, "num_heads": 2},
    },
    "text_encoder": {
        "learned": {"dim": DIM, "depth": 1, "num_heads": 2},
        "class_labels": {"num_classes": TEXT_VOCAB - 1, "dim": DIM},
    },
}


def _tiny(slot, name):
    return TINY.get(slot, {}).get(name, {})


def build(slot, name, derived):
    """`name` of `slot` from its tiny spec, with the arguments the builder would derive (a
    value for each one `SLOTS[slot].derived` names; the class takes those it declares)."""
    return SLOTS[slot].build(ComponentSpec(name=name, kwargs=_tiny(slot, name)), derived,
                             key=jr.key(0))


def assert_every_leaf_gets_gradient(grads, what):
    for path, g in jtu.tree_flatten_with_path(grads)[0]:
        if g is None:
            continue
        assert float(jnp.max(jnp.abs(g))) > 0, f"{what}: no gradient reaches {jtu.keystr(path)}"


# -- heads ----------------------------------------------------------------------------------
def build_head(name):
    head = build("head", name, {"cond_dim": DIM, "token_dim": TOKEN_DIM, "vocab_size": VOCAB})
    target = (
        jr.normal(jr.key(1), (TOKEN_DIM,))
        if head.token_kind == CONTINUOUS
        else jnp.asarray(3, jnp.int32)
    )
    return head, target


@pytest.mark.parametrize("name", HEADS.names())
def test_head_loss_contract(name):
    head, target = build_head(name)
    z = jr.normal(jr.key(2), (DIM,))
    loss = head.loss(z, target, key=jr.key(3))
    chex.assert_shape(loss, ())
    assert jnp.isfinite(loss)
    jitted = eqx.filter_jit(lambda h, z, t, k: h.loss(z, t, key=k))(head, z, target, jr.key(3))
    chex.assert_trees_all_close(loss, jitted, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(loss, head.loss(z, target, key=jr.key(3)))

    head = perturbed(head, jr.key(4))
    grads = eqx.filter_grad(lambda h: h.loss(z, target, key=jr.key(3)))(head)
    assert_every_leaf_gets_gradient(grads, name)
    # the loss also trains the backbone: a gradient reaches the condition vector
    assert float(jnp.abs(jax.grad(lambda zz: head.loss(zz, target, key=jr.key(3)))(z)).max()) > 0


@pytest.mark.parametrize("name", HEADS.names())
@pytest.mark.parametrize("guided", [False, True])
def test_head_sample_contract(name, guided):
    head, target = build_head(name)
    head = perturbed(head, jr.key(4), scale=0.02)  # a sampling chain stays well-conditioned
    z, zu = jr.normal(jr.key(2), (DIM,)), jr.normal(jr.key(5), (DIM,))
    uncond = zu if guided else None
    token = head.sample(z, uncond, 2.0, 1.0, key=jr.key(6))
    chex.assert_shape(token, target.shape)
    assert token.dtype == target.dtype
    assert jnp.all(jnp.isfinite(token))
    jitted = eqx.filter_jit(lambda h, k: h.sample(z, uncond, 2.0, 1.0, key=k))(head, jr.key(6))
    chex.assert_trees_all_close(token, jitted, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(token, head.sample(z, uncond, 2.0, 1.0, key=jr.key(6)))
    assert head.num_evaluations() >= 1


@pytest.mark.parametrize("name", HEADS.names())
def test_head_guidance_at_scale_one_equals_conditional(name):
    head, _ = build_head(name)
    head = perturbed(head, jr.key(4), scale=0.02)
    z, zu = jr.normal(jr.key(2), (DIM,)), jr.normal(jr.key(5), (DIM,))
    guided = head.sample(z, zu, 1.0, 1.0, key=jr.key(6))
    plain = head.sample(z, None, 1.0, 1.0, key=jr.key(6))
    chex.assert_trees_all_close(guided, plain, atol=1e-5, rtol=1e-5)


# -- tokenizers -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOKENIZERS.names())
def test_tokenizer_contract(name):
    tok = build("tokenizer", name, {})
    size = tok.image_size
    images = jr.uniform(jr.key(1), (16, size, size, 3), minval=-1.0, maxval=1.0)
    tok = tok.fit(np.asarray(images), key=jr.key(2))
    assert type(tok) is TOKENIZERS.get(name)
    tokens = tok.encode(images[0])
    if tok.token_kind == CONTINUOUS:
        chex.assert_shape(tokens, (tok.seq_len, tok.token_dim))
    else:
        chex.assert_shape(tokens, (tok.seq_len,))
        assert tok.vocab_size is not None
        assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
    chex.assert_trees_all_close(tokens, eqx.filter_jit(lambda t, x: t.encode(x))(tok, images[0]))
    image = tok.decode(tokens)
    chex.assert_shape(image, (size, size, 3))
    assert jnp.all(jnp.isfinite(image))
    chex.assert_trees_all_close(image, eqx.filter_jit(lambda t, x: t.decode(x))(tok, tokens), atol=1e-6)


# -- orders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ORDERS.names())
def test_order_contract(name):
    order = build("order", name, {})
    perm = order.permutation(SEQ, key=jr.key(1))
    assert sorted(np.asarray(perm).tolist()) == list(range(SEQ))
    chex.assert_trees_all_equal(perm, jax.jit(lambda k: order.permutation(SEQ, key=k))(jr.key(1)))
    known = order.num_known(SEQ, key=jr.key(2))
    assert 0 <= int(known) <= SEQ - 1
    chex.assert_trees_all_equal(known, order.num_known(SEQ, key=jr.key(2)))
    for steps in (1, 3, SEQ):
        counts = order.step_counts(SEQ, steps)
        assert sum(counts) == SEQ and min(counts) >= 1
        assert all(isinstance(c, int) for c in counts)
    assert order.supported_attention <= {CAUSAL, BIDIRECTIONAL}


# -- backbones ------------------------------------------------------------------------------
def backbone_inputs():
    x = jr.normal(jr.key(1), (SEQ, DIM))
    known = jnp.arange(SEQ) % 3 != 0
    context = jr.normal(jr.key(2), (CTX, DIM))
    ctx_mask = jnp.arange(CTX) < CTX - 2
    return x, known, context, ctx_mask


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_contract(name):
    backbone = build("backbone", name, {"dim": DIM, "seq_len": SEQ})
    assert backbone.dim == DIM and backbone.seq_len == SEQ
    args = backbone_inputs()
    z = backbone(*args)
    chex.assert_shape(z, (SEQ, DIM))
    assert jnp.all(jnp.isfinite(z))
    chex.assert_trees_all_close(z, eqx.filter_jit(lambda b, a: b(*a))(backbone, args), atol=1e-5, rtol=1e-5)

    backbone = perturbed(backbone, jr.key(3))
    weights = jr.normal(jr.key(4), (SEQ, DIM))
    grads = eqx.filter_grad(lambda b: jnp.sum(b(*args) * weights))(backbone)
    assert_every_leaf_gets_gradient(grads, name)

    # Sampling's calls: a step's conditions under two contexts, and a state after `decode`
    # and `observe` with the shapes and dtypes of the one before (a scan carries it).
    x, _, context, ctx_mask = args
    contexts, masks = jnp.stack([context, context]), jnp.stack([ctx_mask, ctx_mask])
    positions = jnp.array([3, 0] if backbone.parallel_decode else [3], jnp.int32)
    state = backbone.init_decode(contexts, masks)
    z, after = backbone.decode(state, x, lambda v: v, positions, contexts, masks)
    chex.assert_shape(z, (2, positions.shape[0], DIM))
    after = backbone.observe(after, x, lambda v: v, positions, contexts, masks)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, after)

    if isinstance(backbone, AbstractCausalBackbone):
        _, _, context, ctx_mask = args
        cache = backbone.init_cache(context, ctx_mask)
        zt, cache2 = backbone.decode_step(jnp.zeros((DIM,)), jnp.asarray(0, jnp.int32), cache, context, ctx_mask)
        chex.assert_shape(zt, (DIM,))
        chex.assert_trees_all_equal_shapes_and_dtypes(cache, cache2)


# -- text encoders --------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT_ENCODERS.names())
def test_text_encoder_contract(name):
    enc = build("text_encoder", name, {"vocab_size": TEXT_VOCAB, "max_len": CTX})
    ids = jr.randint(jr.key(1), (CTX,), 0, TEXT_VOCAB)
    mask = jnp.arange(CTX) < 4
    h = enc(ids, mask)
    chex.assert_shape(h, (CTX, enc.dim))
    assert jnp.all(jnp.isfinite(h))
    chex.assert_trees_all_close(h, eqx.filter_jit(lambda e, i, m: e(i, m))(enc, ids, mask), atol=1e-5, rtol=1e-5)
    if enc.trainable:
        enc = perturbed(enc, jr.key(2))
        # every id of the vocabulary appears, so every embedding row can receive a gradient
        ids_all = jnp.arange(TEXT_VOCAB)
        weights = jr.normal(jr.key(3), (CTX, enc.dim))

        def loss(e):
            total = 0.0
            for start in range(0, TEXT_VOCAB, CTX):
                chunk = jnp.roll(ids_all, -start)[:CTX]
                total = total + jnp.sum(e(chunk, jnp.ones((CTX,), bool)) * weights)
            return total + jnp.sum(e(ids, mask) * weights)

        assert_every_leaf_gets_gradient(eqx.filter_grad(loss)(enc), name)
