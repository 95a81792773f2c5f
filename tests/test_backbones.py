"""Semantics of the transformer layers, the two backbones, the text encoder and aligner.

Causality, no leakage of unknown tokens, cached decoding equal to the full forward pass,
padding invariance of the text path, and the usual contract checks (shapes, finite
outputs, jit equals eager, a gradient for every trainable leaf).
"""

import itertools

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

from fluid.backbones import BidirectionalTransformer, CausalTransformer, MaskedAutoencoder
from fluid.nn import (
    KVCache,
    SelfAttention,
    TransformerStack,
    attention_mask,
    dot_product_attention,
)
from fluid.text import LearnedTextEncoder, TextAligner

DIM, DEPTH, HEADS, SEQ, CTX, VOCAB, TEXT_DIM = 32, 2, 4, 16, 8, 50, 24
BACKBONE_CLASSES = [CausalTransformer, BidirectionalTransformer, MaskedAutoencoder]


@eqx.filter_jit
def call(f, *args):
    """`f(*args)` compiled; one compilation serves every module of the same structure."""
    return f(*args)


@eqx.filter_jit
def perturbed(module, key, scale=0.05):
    """`module` with every float leaf moved off its initial value (zero biases and unit
    LayerNorm scales would otherwise hide mistakes in how those leaves are used)."""
    leaves, treedef = jtu.tree_flatten(module)
    sizes = [x.size for x in leaves if eqx.is_inexact_array(x)]
    # One draw for all leaves: a random call per leaf makes compilation slow.
    flat = scale * jr.normal(key, (sum(sizes),))
    noise = iter(jnp.split(flat, list(itertools.accumulate(sizes))[:-1]))
    out = [
        x + next(noise).reshape(x.shape).astype(x.dtype) if eqx.is_inexact_array(x) else x
        for x in leaves
    ]
    return jtu.tree_unflatten(treedef, out)


def build(cls):
    return perturbed(cls(DIM, DEPTH, HEADS, SEQ, key=jr.key(0)), jr.key(100))


def inputs(seed=1):
    k_x, k_ctx = jr.split(jr.key(seed))
    x = jr.normal(k_x, (SEQ, DIM))
    known = jnp.arange(SEQ) % 3 != 1
    context = jr.normal(k_ctx, (CTX, DIM))
    ctx_mask = jnp.arange(CTX) < CTX - 3
    return x, known, context, ctx_mask


def bump(x, i):
    """`x` with row `i` moved in a random direction (a constant shift would vanish in the
    LayerNorms)."""
    return x.at[i].add(jr.normal(jr.key(99), x.shape[1:]))


def dependence(fn, x):
    """`dep[t, s]`: size of the Jacobian block of output row `t` with respect to input row `s`."""
    jac = jax.jit(jax.jacfwd(fn))(x)  # [seq dim seq dim]
    return jnp.sqrt(jnp.sum(jac**2, axis=(1, 3)))


def assert_every_leaf_gets_gradient(grads, what):
    for path, g in jtu.tree_flatten_with_path(grads)[0]:
        if g is None or g.size == 0:
            continue
        assert float(jnp.max(jnp.abs(g))) > 0, f"{what}: no gradient reaches {jtu.keystr(path)}"


# -- layers ---------------------------------------------------------------------------------
# Several queries take the heads-first layout, one query (cached decoding) the strided
# one; raising the threshold (as `benchmarks/remat.py` does) gives several queries the latter.
@pytest.mark.parametrize("num_queries,heads_first_from", [(5, None), (1, None), (5, 10**9)])
def test_attention_matches_jax_reference(num_queries, heads_first_from):
    layout = {} if heads_first_from is None else {"heads_first_min_queries": heads_first_from}
    k_q, k_k, k_v, k_m = jr.split(jr.key(0), 4)
    q = jr.normal(k_q, (num_queries, HEADS, 8))
    k = jr.normal(k_k, (7, HEADS, 8))
    v = jr.normal(k_v, (7, HEADS, 8))
    mask = jr.bernoulli(k_m, 0.6, (num_queries, 7)).at[:, 0].set(True)
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask[None], implementation="xla")
    out = dot_product_attention(q, k, v, mask, **layout)
    chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=1e-5)


def test_attention_layout_threshold_switches_the_program():
    # `benchmarks/remat.py --policies strided-attention` times one form against the other:
    # the threshold must really change what is traced.
    q = jnp.ones((5, HEADS, 8))

    def jaxpr(**layout):
        return str(jax.make_jaxpr(lambda *a: dot_product_attention(*a, **layout))(q, q, q))

    heads_first = jaxpr()
    assert jaxpr(heads_first_min_queries=10**9) != heads_first


def test_attention_mask():
    key_mask = jnp.array([True, True, False, True])
    expected = jnp.tril(jnp.ones((4, 4), bool)) & key_mask[None, :]
    chex.assert_trees_all_equal(attention_mask(4, key_mask, causal=True), expected)
    assert attention_mask(4) is None


def test_self_attention_decode_matches_full():
    attn = perturbed(SelfAttention(DIM, HEADS, key=jr.key(0)), jr.key(1))
    x = jr.normal(jr.key(2), (SEQ, DIM))
    full = attn(x, attention_mask(SEQ, causal=True))
    # Garbage in the not-yet-written entries must never be read.
    k_cache = jr.normal(jr.key(3), (SEQ, HEADS, DIM // HEADS))
    v_cache = jr.normal(jr.key(4), (SEQ, HEADS, DIM // HEADS))
    for t in range(SEQ):
        out, k_cache, v_cache = call(attn.decode, x[t], jnp.asarray(t, jnp.int32), k_cache, v_cache)
        chex.assert_trees_all_close(out, full[t], atol=1e-5, rtol=1e-5)


def test_stack_scan_equals_loop():
    stack = TransformerStack(2, DIM, HEADS, cross_attention=True, key=jr.key(0))
    stack = perturbed(stack, jr.key(1))
    x, _, context, ctx_mask = inputs()
    mask = attention_mask(SEQ, causal=True)

    @eqx.filter_jit
    def loop(stack, h):
        params, static = eqx.partition(stack.layers, eqx.is_array)
        for i in range(2):
            layer = eqx.combine(jtu.tree_map(lambda p: p[i], params), static)
            h = layer(h, mask, context, ctx_mask)
        return h

    scanned = call(stack, x, mask, context, ctx_mask)
    chex.assert_trees_all_close(scanned, loop(stack, x), atol=1e-5, rtol=1e-5)


# Unordered, with a repeat: outputs follow `rows`, whatever it holds.
ROWS = jnp.array([5, 0, 11, 5, 15])


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_stack_rows_equal_full_output_at_rows(depth, causal):
    stack = perturbed(
        TransformerStack(depth, DIM, HEADS, cross_attention=True, key=jr.key(0)), jr.key(1)
    )
    x, _, context, ctx_mask = inputs()
    mask = attention_mask(SEQ, causal=True) if causal else None
    full = call(stack, x, mask, context, ctx_mask)
    rows = call(stack, x, mask, context, ctx_mask, ROWS)
    assert rows.shape == (ROWS.shape[0], DIM)
    chex.assert_trees_all_close(rows, full[ROWS], atol=1e-5, rtol=1e-5)


def test_at_positions_equals_full_output_at_positions():
    # The bidirectional transformer runs its last block on the positions alone.
    backbone = build(BidirectionalTransformer)
    x, known, context, ctx_mask = inputs()
    full = call(backbone, x, known, context, ctx_mask)
    at = call(backbone.at_positions, x, known, context, ctx_mask, ROWS)
    chex.assert_trees_all_close(at, full[ROWS], atol=1e-5, rtol=1e-5)


def test_bidirectional_at_positions_skips_the_last_blocks_work():
    backbone = build(BidirectionalTransformer)
    x, known, context, ctx_mask = inputs()

    def flops(f, *args):
        return jax.jit(f).lower(backbone, *args).compile().cost_analysis()["flops"]

    # The same program structure both times (XLA counts a scan's body once): only how
    # many positions the last block computes differs.
    def at(positions):
        return flops(lambda b, *a: b.at_positions(*a), x, known, context, ctx_mask, positions)

    # At least the last block's MLP, on the SEQ - 1 positions one position leaves out.
    mlp = (SEQ - 1) * 2 * 2 * DIM * 4 * DIM
    assert at(ROWS[:1]) < at(jnp.arange(SEQ)) - mlp


def test_init_is_mar_like():
    b = CausalTransformer(DIM, DEPTH, HEADS, SEQ, key=jr.key(0))
    layers = b.blocks.layers
    chex.assert_trees_all_equal(layers.attn.qkv.bias, jnp.zeros((DEPTH, 3 * DIM)))
    chex.assert_trees_all_equal(layers.attn_norm.weight, jnp.ones((DEPTH, DIM)))
    limit = (6 / (DIM + 3 * DIM)) ** 0.5  # xavier-uniform over the fused [3 dim, dim] matrix
    assert float(jnp.abs(layers.attn.qkv.weight).max()) <= limit
    assert float(jnp.abs(layers.attn.qkv.weight).max()) > 0.9 * limit
    assert 0.01 < float(jnp.std(b.pos_embed)) < 0.03
    # The blocks differ: each got its own key.
    assert float(jnp.abs(layers.mlp.fc1.weight[0] - layers.mlp.fc1.weight[1]).max()) > 0


# -- backbones: information flow ------------------------------------------------------------
def test_causal_output_depends_only_on_earlier_inputs():
    b = build(CausalTransformer)
    x, _, context, ctx_mask = inputs()
    known = jnp.ones((SEQ,), bool)
    dep = dependence(lambda xx: call(b, xx, known, context, ctx_mask), x)
    future = jnp.triu(jnp.ones((SEQ, SEQ), bool))  # s >= t
    assert float(jnp.max(jnp.where(future, dep, 0.0))) == 0.0
    # ...and every earlier input is read (so the check above can fail).
    assert float(jnp.min(jnp.where(future, jnp.inf, dep))) > 0.0

    z = call(b, x, known, context, ctx_mask)
    for t in [0, 5, SEQ - 2]:
        z2 = call(b, bump(x, t), known, context, ctx_mask)
        chex.assert_trees_all_close(z2[: t + 1], z[: t + 1], atol=1e-5, rtol=0)
        assert float(jnp.abs(z2[t + 1 :] - z[t + 1 :]).max()) > 1e-3


ORDER = jnp.asarray([5, 0, 11, 2, 15, 7, 1, 12, 3, 9, 14, 4, 8, 13, 6, 10], jnp.int32)


def test_causal_output_in_an_order_depends_only_on_earlier_steps():
    b = build(CausalTransformer)
    x, _, context, ctx_mask = inputs()
    known = jnp.ones((SEQ,), bool)

    def in_order(xx):
        return call(lambda *a: b(*a, order=ORDER), xx, known, context, ctx_mask)

    dep = dependence(in_order, x)  # dep[t, s]: how much z[t] moves with x[s]
    rank = jnp.argsort(ORDER)
    later = rank[None, :] >= rank[:, None]  # s produced at or after t
    assert float(jnp.max(jnp.where(later, dep, 0.0))) == 0.0
    assert float(jnp.min(jnp.where(later, jnp.inf, dep))) > 0.0
    # Row-major order is the default.
    chex.assert_trees_all_close(
        call(lambda *a: b(*a, order=jnp.arange(SEQ)), x, known, context, ctx_mask),
        call(b, x, known, context, ctx_mask), atol=1e-6, rtol=1e-6,
    )


@pytest.mark.parametrize("cls", BACKBONE_CLASSES)
def test_decoding_equals_the_full_forward_pass_in_any_order(cls):
    # What sampling asks (`init_decode`, then `decode` step by step, two contexts at once)
    # against the full pass over what was produced before each step.
    b = build(cls)
    x, _, context, ctx_mask = inputs()
    tokens = jr.normal(jr.key(9), (SEQ, DIM))
    embed = jnp.tanh  # any per-token embedding
    contexts = jnp.stack([context, context[::-1]])
    masks = jnp.stack([ctx_mask, jnp.arange(CTX) < 3])
    counts = [1] * SEQ if cls is CausalTransformer else [1, 2, 3, 4, 6]

    @eqx.filter_jit
    def run(b, tokens):
        state = b.init_decode(contexts, masks)
        written = jnp.zeros_like(tokens)
        out, start = [], 0
        for k in counts:
            idx = ORDER[start:start + k]
            z, state = b.decode(state, written, embed, idx, contexts, masks)
            written = written.at[idx].set(tokens[idx])
            out.append(z)
            start += k
        return out

    @eqx.filter_jit
    def full(b, known, c, m):
        return b(jax.vmap(embed)(tokens), known, c, m, order=ORDER)

    start = 0
    for k, z in zip(counts, run(b, tokens)):
        chex.assert_shape(z, (2, k, DIM))
        known = jnp.zeros((SEQ,), bool).at[ORDER[:start]].set(True)
        if cls is CausalTransformer:
            known = jnp.ones((SEQ,), bool)  # it reads only earlier steps anyway
        for c in range(2):
            want = full(b, known, contexts[c], masks[c])[ORDER[start:start + k]]
            chex.assert_trees_all_close(z[c], want, atol=1e-5, rtol=1e-5)
        start += k


@pytest.mark.parametrize("cls", BACKBONE_CLASSES)
def test_unknown_positions_do_not_leak(cls):
    b = build(cls)
    x, known, context, ctx_mask = inputs()
    z = call(b, x, known, context, ctx_mask)
    dep = dependence(lambda xx: call(b, xx, known, context, ctx_mask), x)
    assert float(jnp.max(jnp.where(known[None, :], 0.0, dep))) == 0.0

    noise = jr.normal(jr.key(5), x.shape)
    changed = jnp.where(known[:, None], x, x + 10 * noise)
    chex.assert_trees_all_close(call(b, changed, known, context, ctx_mask), z, atol=1e-5, rtol=0)
    # A known position is read (the first one is invisible to the causal backbone).
    s = 2
    assert bool(known[s])
    z2 = call(b, bump(x, s), known, context, ctx_mask)
    assert float(jnp.abs(z2 - z).max()) > 1e-3


def test_bidirectional_reads_known_positions_everywhere():
    b = build(BidirectionalTransformer)
    x, known, context, ctx_mask = inputs()
    dep = dependence(lambda xx: call(b, xx, known, context, ctx_mask), x)
    assert float(jnp.min(jnp.where(known[None, :], dep, jnp.inf))) > 0.0


@pytest.mark.parametrize("cls", BACKBONE_CLASSES)
def test_context_padding_is_ignored(cls):
    b = build(cls)
    x, known, context, ctx_mask = inputs()
    z = call(b, x, known, context, ctx_mask)
    noise = jr.normal(jr.key(6), context.shape)
    padded_changed = jnp.where(ctx_mask[:, None], context, context + 10 * noise)
    chex.assert_trees_all_close(call(b, x, known, padded_changed, ctx_mask), z, atol=1e-5, rtol=0)
    real_changed = bump(context, 0)
    assert float(jnp.abs(call(b, x, known, real_changed, ctx_mask) - z).max()) > 1e-3


# -- causal backbone: cached decoding -------------------------------------------------------
@eqx.filter_jit
def decode_all(backbone, x, context, ctx_mask, garbage_key):
    cache = backbone.init_cache(context, ctx_mask)
    # Unwritten cache entries hold garbage: decoding must never read them.
    k_k, k_v, k_first = jr.split(garbage_key, 3)
    cache = KVCache(
        k=jr.normal(k_k, cache.k.shape),
        v=jr.normal(k_v, cache.v.shape),
        context_k=cache.context_k,
        context_v=cache.context_v,
    )
    # x_prev at t = 0 is ignored, so it gets garbage too.
    x_prev = jnp.concatenate([jr.normal(k_first, (1, DIM)), x[:-1]])

    def body(cache, step):
        xp, t = step
        z, cache = backbone.decode_step(xp, t, cache, context, ctx_mask)
        return cache, z

    return jax.lax.scan(body, cache, (x_prev, jnp.arange(SEQ, dtype=jnp.int32)))


def test_cached_decoding_equals_full_forward():
    b = build(CausalTransformer)
    x, _, context, ctx_mask = inputs()
    full = call(b, x, jnp.ones((SEQ,), bool), context, ctx_mask)
    cache, zs = decode_all(b, x, context, ctx_mask, jr.key(7))
    chex.assert_trees_all_close(zs, full, atol=1e-5, rtol=1e-5)
    # Every position was written with the keys and values of the real sequence.
    _, zs_again = decode_all(b, x, context, ctx_mask, jr.key(8))
    chex.assert_trees_all_close(zs_again, zs, atol=1e-5, rtol=0)
    chex.assert_shape(cache.k, (DEPTH, SEQ, HEADS, DIM // HEADS))
    chex.assert_shape(cache.context_k, (DEPTH, CTX, HEADS, DIM // HEADS))


def test_decode_step_contract():
    b = build(CausalTransformer)
    _, _, context, ctx_mask = inputs()
    cache = b.init_cache(context, ctx_mask)
    t = jnp.asarray(3, jnp.int32)
    z, cache2 = b.decode_step(jnp.zeros((DIM,)), t, cache, context, ctx_mask)
    chex.assert_shape(z, (DIM,))
    chex.assert_trees_all_equal_shapes_and_dtypes(cache, cache2)
    # Only position 3 of the self-attention cache changed.
    changed = jnp.any(cache2.k != cache.k, axis=(0, 2, 3))
    chex.assert_trees_all_equal(changed, jnp.arange(SEQ) == 3)


# -- backbones: contract --------------------------------------------------------------------
@pytest.mark.parametrize("cls", BACKBONE_CLASSES)
def test_backbone_contract(cls):
    b = cls(DIM, DEPTH, HEADS, SEQ, key=jr.key(0))
    assert b.dim == DIM and b.seq_len == SEQ
    assert b.attention == ("causal" if cls is CausalTransformer else "bidirectional")
    args = inputs()
    z = b(*args)  # eager, compared with jit below
    chex.assert_shape(z, (SEQ, DIM))
    chex.assert_type(z, jnp.float32)
    assert bool(jnp.all(jnp.isfinite(z)))
    jitted = eqx.filter_jit(lambda m, a: m(*a))(b, args)
    chex.assert_trees_all_close(jitted, z, atol=1e-5, rtol=1e-5)

    batched = [inputs(seed) for seed in (1, 2)]
    stacked = jtu.tree_map(lambda *a: jnp.stack(a), *batched)
    chex.assert_trees_all_close(
        call(jax.vmap(b), *stacked), jnp.stack([call(b, *a) for a in batched]), atol=1e-5, rtol=1e-5
    )

    b = perturbed(b, jr.key(3))
    weights = jr.normal(jr.key(4), (SEQ, DIM))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(m(*args) * weights)))(b)
    assert_every_leaf_gets_gradient(grads, cls.__name__)


# -- text encoder and aligner ---------------------------------------------------------------
def text_inputs():
    ids = jr.randint(jr.key(1), (CTX,), 0, VOCAB)
    mask = jnp.arange(CTX) < 5
    return ids, mask


def test_text_encoder_padding_invariance():
    enc = perturbed(LearnedTextEncoder(VOCAB, DIM, DEPTH, HEADS, CTX, key=jr.key(0)), jr.key(1))
    ids, mask = text_inputs()
    h = call(enc, ids, mask)
    other = jnp.where(mask, ids, (ids + 7) % VOCAB)
    chex.assert_trees_all_close(call(enc, other, mask), h, atol=1e-5, rtol=0)
    chex.assert_trees_all_equal(h[~mask], jnp.zeros((int((~mask).sum()), DIM)))
    real = ids.at[1].set((ids[1] + 1) % VOCAB)
    assert float(jnp.abs(call(enc, real, mask) - h)[mask].max()) > 1e-3


def test_text_encoder_contract():
    enc = LearnedTextEncoder(VOCAB, DIM, DEPTH, HEADS, CTX, key=jr.key(0))
    assert enc.trainable and enc.vocab_size == VOCAB and enc.dim == DIM
    ids, mask = text_inputs()
    h = enc(ids, mask)
    chex.assert_shape(h, (CTX, DIM))
    assert bool(jnp.all(jnp.isfinite(h)))
    jitted = eqx.filter_jit(lambda e: e(ids, mask))(enc)
    chex.assert_trees_all_close(jitted, h, atol=1e-5, rtol=1e-5)
    # Shorter captions than max_len use the first positions.
    chex.assert_shape(call(enc, ids[:5], mask[:5]), (5, DIM))

    enc = perturbed(enc, jr.key(2))
    weights = jr.normal(jr.key(3), (CTX, DIM))
    every_id = jnp.arange(VOCAB).reshape(-1, 5)  # each row: 5 real tokens, all ids covered

    def loss(e):
        padded = jnp.pad(every_id, ((0, 0), (0, CTX - 5)))
        out = jax.vmap(e, in_axes=(0, None))(padded, mask)
        return jnp.sum(out * weights[None]) + jnp.sum(e(ids, jnp.ones((CTX,), bool)) * weights)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(enc)
    assert_every_leaf_gets_gradient(grads, "LearnedTextEncoder")


@pytest.mark.parametrize("depth", [0, 2])
def test_aligner(depth):
    aligner = TextAligner(TEXT_DIM, DIM, depth, HEADS, key=jr.key(0))
    assert aligner.in_dim == TEXT_DIM and aligner.dim == DIM
    aligner = perturbed(aligner, jr.key(1))
    x = jr.normal(jr.key(2), (CTX, TEXT_DIM))
    _, mask = text_inputs()
    out = aligner(x, mask)
    chex.assert_shape(out, (CTX, DIM))
    assert bool(jnp.all(jnp.isfinite(out)))
    jitted = eqx.filter_jit(lambda a: a(x, mask))(aligner)
    chex.assert_trees_all_close(jitted, out, atol=1e-5, rtol=1e-5)
    changed = jnp.where(mask[:, None], x, x + 10 * jr.normal(jr.key(3), x.shape))
    chex.assert_trees_all_close(call(aligner, changed, mask), out, atol=1e-5, rtol=0)
    if depth:
        # Real positions read each other.
        assert float(jnp.abs(call(aligner, bump(x, 0), mask) - out)[1:5].max()) > 1e-3
    weights = jr.normal(jr.key(4), (CTX, DIM))
    grads = eqx.filter_jit(eqx.filter_grad(lambda a: jnp.sum(a(x, mask) * weights)))(aligner)
    assert_every_leaf_gets_gradient(grads, "TextAligner")


def test_text_path_padding_reaches_no_backbone_output():
    enc = perturbed(LearnedTextEncoder(VOCAB, TEXT_DIM, 1, 2, CTX, key=jr.key(0)), jr.key(1))
    aligner = perturbed(TextAligner(TEXT_DIM, DIM, 1, HEADS, key=jr.key(2)), jr.key(3))
    ids, mask = text_inputs()
    x, known, _, _ = inputs()
    other = jnp.where(mask, ids, (ids + 3) % VOCAB)

    @eqx.filter_jit
    def run(b, i):
        return b(x, known, aligner(enc(i, mask), mask), mask)

    # Each backbone's own handling of context padding is tested above; one suffices here.
    b = build(BidirectionalTransformer)
    chex.assert_trees_all_close(run(b, other), run(b, ids), atol=1e-5, rtol=0)
