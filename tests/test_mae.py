"""MAR's backbone (`MaskedAutoencoder`) and class labels: parity with MAR's own numbers (the
`mar_tiny` fixture) through the converter a user runs (`fluid.build.load_mar`), static shapes
under a bound on the known tokens, no leakage of unknown tokens, dropout only with a key."""

import dataclasses
import itertools
import json
from pathlib import Path

import chex
import equinox as eqx
import helpers
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid import TEXT_ENCODERS, ComponentSpec
from fluid._weights import WeightError
from fluid.backbones import MaskedAutoencoder
from fluid.build import compose, load_mar
from fluid.nn import dense, dropout
from fluid.orders import RandomOrder
from fluid.presets import tiny
from fluid.text import CAPTION_TOKENIZERS, ClassLabelTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "mar_tiny.npz"
TOL = {"atol": 1e-5, "rtol": 1e-5}
DIM, SEQ, CTX = 16, 12, 5

perturbed = eqx.filter_jit(helpers.perturbed)


@eqx.filter_jit
def call(f, *args):
    return f(*args)


# -- MAR parity -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mar():
    data = np.load(FIXTURE)
    config = json.loads(FIXTURE.with_suffix(".json").read_text())["mar_config"]
    weights = {k.removeprefix("w/"): data[k] for k in data.files if k.startswith("w/")}
    parts = load_mar(
        weights, num_heads=config["encoder_num_heads"],
        batch_mul=config["diffusion_batch_mul"], source=str(FIXTURE),
    )
    return parts, weights, {k: data[k] for k in data.files if not k.startswith(("w/", "vae/"))}


def contexts(parts, labels):
    """The class contexts of MAR's labels and of the unconditional half, through the caption
    path a user's data takes (`ClassLabelTokenizer`, then `ClassLabelEncoder`)."""
    tokenizer = ClassLabelTokenizer(parts.labels.num_classes)
    cond = tokenizer.encode([str(int(label)) for label in labels], max_len=1)
    uncond = tokenizer.encode([""] * len(labels), max_len=1)
    return [(jax.vmap(parts.labels)(*map(jnp.asarray, ids_mask)), jnp.asarray(ids_mask[1]))
            for ids_mask in (cond, uncond)]


def embed(parts):
    return lambda token: dense(parts.token_projection, token)


def test_load_mar_reads_the_sizes(mar):
    parts, _, _ = mar
    b = parts.backbone
    assert (b.dim, b.seq_len, b.buffer_size, b.max_known) == (32, 16, 4, 16)
    assert (b.encoder.depth, b.decoder.depth, b.encoder.num_heads) == (2, 2, 4)
    assert not b.cross_attention
    assert (parts.head.width, parts.head.depth, parts.head.token_dim) == (48, 2, 8)
    assert parts.head.batch_mul == 2 and parts.labels.num_classes == 10


@pytest.mark.parametrize("max_known", [5, None])
def test_mar_parity_encoder_and_conditions(mar, max_known):
    parts, _, io = mar
    b = parts.backbone
    x = jax.vmap(jax.vmap(embed(parts)))(jnp.asarray(io["tokens"]))
    known = jnp.asarray(io["mask"] == 0)
    assert int(known.sum(-1).max()) == 5  # MAR's fixture: 11 of 16 masked
    for (ctx, ctx_mask), half in zip(contexts(parts, io["labels"]), ["", "_uncond"]):
        h, positions = call(
            jax.vmap(lambda *a: b.encode(*a, max_known=max_known)), x, known, ctx, ctx_mask
        )
        slots = b.seq_len if max_known is None else max_known
        chex.assert_shape(h, (3, b.buffer_size + slots, 32))
        # The buffer, then the known positions in ascending order: MAR's row order.
        want_positions = [np.concatenate([np.arange(4), 4 + np.flatnonzero(row == 0)])
                          for row in io["mask"]]
        np.testing.assert_array_equal(positions[:, :9], np.stack(want_positions))
        chex.assert_trees_all_close(h[:, :9], io["encoder_out" + half], **TOL)
        z = call(jax.vmap(lambda *a: b(*a, max_known=max_known)), x, known, ctx, ctx_mask)
        chex.assert_trees_all_close(z, io["z" + half], **TOL)


def test_mar_parity_loss(mar):
    # MAR's forward_loss: the B * 16 positions repeated `diffusion_batch_mul` times, each
    # row with its given t and noise; the loss is the mean over masked rows.
    parts, _, io = mar
    rows = io["loss_t"].shape[0]
    mul = rows // io["z"].shape[0] // 16
    assert mul == parts.head.batch_mul == 2
    z = jnp.tile(jnp.asarray(io["z"]).reshape(-1, 32), (mul, 1))
    target = jnp.tile(jnp.asarray(io["tokens"]).reshape(-1, 8), (mul, 1))
    mask = jnp.tile(jnp.asarray(io["mask"]).reshape(-1), mul)
    losses = call(jax.vmap(parts.head.training_losses), target,
                  jnp.asarray(io["loss_t"], jnp.int32), jnp.asarray(io["loss_noise"]), z)
    chex.assert_trees_all_close(losses["loss"], io["loss_per_row"], **TOL)
    chex.assert_trees_all_close(jnp.sum(losses["loss"] * mask) / jnp.sum(mask), io["loss"], **TOL)

    # The same from the backbone's own conditions, computed from the tokens.
    x = jax.vmap(jax.vmap(embed(parts)))(jnp.asarray(io["tokens"]))
    (ctx, ctx_mask), _ = contexts(parts, io["labels"])
    ours = call(jax.vmap(parts.backbone), x, jnp.asarray(io["mask"] == 0), ctx, ctx_mask)
    losses = call(jax.vmap(parts.head.training_losses), target,
                  jnp.asarray(io["loss_t"], jnp.int32), jnp.asarray(io["loss_noise"]),
                  jnp.tile(ours.reshape(-1, 32), (mul, 1)))
    chex.assert_trees_all_close(losses["loss"], io["loss_per_row"], **TOL)


def test_mar_parity_sampling_step(mar):
    # MAR's sample_tokens at step 5 of 8 with cfg 3 (linear): positions produced, the
    # conditions of both halves at them, the guidance scale.
    parts, _, io = mar
    b, n, steps, step, cfg = parts.backbone, 16, 8, 5, 3.0
    counts = RandomOrder().step_counts(n, steps)
    produced, k = sum(counts[:step]), counts[step]
    # MAR keeps the first `mask_len` positions of its order masked, so it produces its
    # order from the end: fluid's permutation is MAR's order reversed.
    perms = jnp.asarray(io["orders"][:, ::-1], jnp.int32)
    np.testing.assert_array_equal(io["step_mask"].sum(-1), n - produced)
    (cond, cond_mask), (uncond, uncond_mask) = contexts(parts, io["labels"])
    for i in range(3):
        positions = perms[i, produced:produced + k]
        np.testing.assert_array_equal(np.sort(positions), np.flatnonzero(io["step_to_pred"][i]))
        known = jnp.asarray(io["step_mask"][i] == 0)
        np.testing.assert_array_equal(known, jnp.zeros(n, bool).at[perms[i, :produced]].set(True))
        ctxs, masks = jnp.stack([cond[i], uncond[i]]), jnp.stack([cond_mask[i], uncond_mask[i]])
        state = b.init_decode(ctxs, masks)
        chex.assert_trees_all_equal(state, jnp.zeros(n, bool))
        z, state = eqx.filter_jit(b.decode)(known, jnp.asarray(io["step_tokens"][i]),
                                            embed(parts), positions, ctxs, masks)
        chex.assert_shape(z, (2, k, 32))
        want = io["step_z_both"][[i, 3 + i]][:, np.asarray(positions)]
        chex.assert_trees_all_close(z, want, **TOL)
        chex.assert_trees_all_equal(state, known.at[positions].set(True))
    # Every position's condition, both halves (MAR computes them all at each step).
    x = jax.vmap(jax.vmap(embed(parts)))(jnp.asarray(io["step_tokens"]))
    known = jnp.asarray(io["step_mask"] == 0)
    both = jnp.concatenate([
        call(jax.vmap(b), x, known, cond, cond_mask),
        call(jax.vmap(b), x, known, uncond, uncond_mask),
    ])
    chex.assert_trees_all_close(both, io["step_z_both"], **TOL)
    # MAR's linear guidance: 1 + (cfg - 1) * (n - still masked after the step) / n.
    assert 1 + (cfg - 1) * (produced + k) / n == pytest.approx(float(io["step_cfg"]))


def test_converter_errors(mar):
    _, weights, _ = mar

    def load(w):
        return load_mar(w, num_heads=4, batch_mul=2)

    missing = {k: v for k, v in weights.items() if k != "decoder_blocks.1.attn.qkv.bias"}
    with pytest.raises(WeightError, match=r"decoder_blocks\.1\.attn\.qkv\.bias"):
        load(missing)
    bad = dict(weights, mask_token=weights["mask_token"][0])
    with pytest.raises(WeightError, match=r"mask_token.*\(1, 32\).*\(1, 1, 32\)"):
        load(bad)
    bad = dict(weights, **{"z_proj.weight": weights["z_proj.weight"].T})
    with pytest.raises(WeightError, match=r"z_proj\.weight"):
        load(bad)
    extra = dict(weights, **{"lm_head.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(WeightError, match=r"unused keys \(lm_head\.weight\)"):
        load(extra)
    # A block the decoder does not have, beyond a gap in the numbering.
    extra = dict(weights, **{"decoder_blocks.3.norm1.bias": weights["decoder_blocks.1.norm1.bias"]})
    with pytest.raises(WeightError, match=r"decoder_blocks\.3\.norm1\.bias"):
        load(extra)
    with pytest.raises(WeightError, match=r"missing key 'class_emb\.weight'"):
        load({k: v for k, v in weights.items() if not k.startswith("class_emb")})


# -- static shapes ------------------------------------------------------------------------------
def small(**kwargs):
    kwargs = {"buffer_size": 3, **kwargs}
    return perturbed(MaskedAutoencoder(DIM, 2, 2, SEQ, key=jr.key(0), **kwargs), jr.key(1), 0.05)


def inputs(num_known=5, seed=2):
    k_x, k_perm, k_ctx = jr.split(jr.key(seed), 3)
    x = jr.normal(k_x, (SEQ, DIM))
    known = jnp.zeros(SEQ, bool).at[jr.permutation(k_perm, SEQ)[:num_known]].set(True)
    context = jr.normal(k_ctx, (CTX, DIM))
    return x, known, context, jnp.arange(CTX) < 3


def test_a_bound_on_known_tokens_keeps_shapes_and_values():
    bounded, full = small(max_known=6), small()
    traces = []

    @eqx.filter_jit
    def run(b, *args):
        traces.append(None)  # runs once per compilation
        return b(*args), b.encode(*args)[0]

    for num_known in (0, 1, 4, 6):
        args = inputs(num_known)
        z, h = run(bounded, *args)
        chex.assert_shape(h, (3 + 6, DIM))
        chex.assert_trees_all_close(z, call(full, *args), **TOL)
    assert len(traces) == 1
    with pytest.raises(Exception, match="more known tokens than its 6 encoder slots"):
        run(bounded, *inputs(7))


def test_the_encoders_cost_follows_the_bound():
    def flops(b):
        params, static = eqx.partition(b, eqx.is_array)
        f = jax.jit(lambda p, *a: eqx.combine(p, static)(*a))
        return f.lower(params, *inputs()).cost_analysis()["flops"]

    full, bounded = flops(small()), flops(small(max_known=4))
    assert bounded < 0.85 * full


def test_at_positions_equals_the_full_output_at_positions():
    b = small(max_known=6)
    args = inputs(4)
    positions = jnp.asarray([7, 0, 3], jnp.int32)
    want = call(b, *args)[positions]
    chex.assert_trees_all_close(call(b.at_positions, *args, positions), want, **TOL)
    bounded = eqx.filter_jit(lambda *a: b.at_positions(*a, max_known=4))
    chex.assert_trees_all_close(bounded(*args, positions), want, **TOL)


def _class_model(**backbone):
    config = dataclasses.replace(
        tiny("fluid").model,
        backbone=ComponentSpec(name="mae", kwargs={"depth": 1, "num_heads": 2,
                                                   "buffer_size": 4, **backbone}),
        text_encoder=ComponentSpec(name="class_labels", kwargs={"num_classes": 10, "dim": 32}),
        text_len=2, text_vocab_size=11,
    )
    tokenizer = ClassLabelTokenizer(10)
    null_ids, null_mask = tokenizer.encode([""], config.text_len)
    model = compose(config, text_vocab_size=tokenizer.vocab_size,
                    null_text=(null_ids[0], null_mask[0]), key=jr.key(0))
    # The head's output layers start at zero, which would stop every gradient there.
    model = eqx.tree_at(lambda m: m.head, model, perturbed(model.head, jr.key(4), 0.05))
    return config, tokenizer, model


def test_the_sampler_bounds_the_encoder_by_the_known_count(monkeypatch):
    # Each step's encoder runs over as many slots as positions can be known before it (the
    # sampler's static counts), and the images are those of the unbounded encoder.
    _, tokenizer, model = _class_model()
    ids, mask = tokenizer.encode(["1", "7"], 2)
    counts = model.order.step_counts(model.seq_len, 6)
    unbounded = MaskedAutoencoder.decode
    bounds = []

    def spy(self, *args, max_known=None):
        bounds.append(max_known)
        return unbounded(self, *args, max_known=max_known)

    def sample(model):
        return eqx.filter_jit(lambda m, k: m.generate(ids, mask, key=k, steps=6, cfg=2.0))(
            model, jr.key(3))

    monkeypatch.setattr(MaskedAutoencoder, "decode", spy)
    bounded = sample(model)
    # Steps of equal counts share a scan, traced once: its bound is the count before its
    # last iteration. Here (1, 2, 2, 3, 4, 4) of 16: scans from 0, 1, 5 and 8 known.
    want, start = [], 0
    for size, run in itertools.groupby(counts):
        length = len(list(run))
        want.append(max(start + (length - 1) * size, 1))
        start += size * length
    assert len(want) < len(counts) and bounds == want
    monkeypatch.setattr(MaskedAutoencoder, "decode",
                        lambda self, *args, max_known=None: unbounded(self, *args))
    chex.assert_trees_all_close(bounded, sample(model), **TOL)


# -- information flow ---------------------------------------------------------------------------
@pytest.mark.parametrize("max_known", [None, 6])
@pytest.mark.parametrize("cross_attention", [False, True])
def test_conditions_never_depend_on_unknown_tokens(max_known, cross_attention):
    b = small(max_known=max_known, cross_attention=cross_attention)
    x, known, context, ctx_mask = inputs(5)
    z = call(b, x, known, context, ctx_mask)
    jac = jax.jit(jax.jacfwd(lambda xx: b(xx, known, context, ctx_mask)))(x)
    dep = jnp.sqrt(jnp.sum(jac**2, axis=(1, 3)))  # [output row, input row]
    assert float(jnp.max(jnp.where(known[None, :], 0.0, dep))) == 0.0
    assert float(jnp.min(jnp.where(known[None, :], dep, jnp.inf))) > 0.0
    # Unknown tokens are never read: any values there (NaN included) give the same output.
    changed = jnp.where(known[:, None], x, jnp.nan)
    chex.assert_trees_all_equal(call(b, changed, known, context, ctx_mask), z)


@pytest.mark.parametrize("cross_attention", [False, True])
def test_the_context_conditions_and_its_padding_does_not(cross_attention):
    b = small(cross_attention=cross_attention)
    x, known, context, ctx_mask = inputs(5)
    z = call(b, x, known, context, ctx_mask)
    padding_changed = jnp.where(ctx_mask[:, None], context, context + 10 * jr.normal(jr.key(8), context.shape))
    chex.assert_trees_all_close(call(b, x, known, padding_changed, ctx_mask), z, **TOL)
    # A random direction (a constant shift would vanish in the LayerNorms).
    real_changed = context.at[1].add(jr.normal(jr.key(9), (DIM,)))
    assert float(jnp.abs(call(b, x, known, real_changed, ctx_mask) - z).max()) > 1e-3


def test_one_context_token_fills_every_buffer_slot():
    # MAR puts its class embedding in every buffer slot: a one-token context is the same as
    # that token in the buffer, and a context of equal tokens is the same as one of them.
    b = small()
    x, known, context, _ = inputs(5)
    one = call(b, x, known, context[:1], jnp.ones((1,), bool))
    repeated = jnp.broadcast_to(context[:1], (CTX, DIM))
    chex.assert_trees_all_close(call(b, x, known, repeated, jnp.ones((CTX,), bool)), one, **TOL)


# -- dropout --------------------------------------------------------------------------------------
def test_dropout_only_with_a_key():
    b = small(max_known=6)
    args = inputs(4)
    z = call(b, *args)
    with_key = eqx.filter_jit(lambda b, args, k: b(*args, key=k))
    chex.assert_trees_all_equal(call(b, *args), z)  # no key: deterministic
    a, again = with_key(b, args, jr.key(5)), with_key(b, args, jr.key(5))
    chex.assert_trees_all_equal(a, again)
    assert float(jnp.abs(a - z).max()) > 1e-3
    assert float(jnp.abs(a - with_key(b, args, jr.key(6))).max()) > 1e-3
    off = small(max_known=6, attn_dropout=0.0, proj_dropout=0.0)
    chex.assert_trees_all_close(with_key(off, args, jr.key(5)), call(off, *args), **TOL)
    # Dropout keeps unknown tokens out too.
    x, known, context, ctx_mask = args
    changed = jnp.where(known[:, None], x, jnp.nan)
    chex.assert_trees_all_equal(with_key(b, (changed, known, context, ctx_mask), jr.key(5)), a)


def test_dropout_is_torchs_inverted_dropout():
    x = jnp.ones((20000,))
    out = jax.jit(lambda k: dropout(x, 0.1, k))(jr.key(0))
    assert set(np.unique(np.asarray(out)).tolist()) == {0.0, np.float32(1 / 0.9)}
    assert abs(float(jnp.mean(out == 0)) - 0.1) < 0.01
    assert dropout(x, 0.1, None) is x and dropout(x, 0.0, jr.key(0)) is x


@pytest.mark.parametrize("rates", [(0.5, 0.0), (0.0, 0.5)])
def test_each_dropout_is_wired(rates):
    # Attention-weight dropout alone, and projection/MLP dropout alone, each change the
    # output under a key.
    b = small(attn_dropout=rates[0], proj_dropout=rates[1])
    args = inputs(4)
    dropped = eqx.filter_jit(lambda b, k: b(*args, key=k))(b, jr.key(3))
    assert float(jnp.abs(dropped - call(b, *args)).max()) > 1e-3


def test_dropout_rates_are_marked():
    b = MaskedAutoencoder(DIM, 1, 2, SEQ, key=jr.key(0))
    assert (b.encoder.layers.attn_dropout, b.encoder.layers.proj_dropout) == (0.1, 0.1)
    assert b.decoder.layers.attn_dropout == 0.1
    with pytest.raises(ValueError, match="dropout rate"):
        MaskedAutoencoder(DIM, 1, 2, SEQ, proj_dropout=1.0, key=jr.key(0))
    with pytest.raises(ValueError, match="max_known"):
        MaskedAutoencoder(DIM, 1, 2, SEQ, max_known=SEQ + 1, key=jr.key(0))


# -- class labels ---------------------------------------------------------------------------------
def test_class_label_captions():
    tok = ClassLabelTokenizer(10)
    assert tok.vocab_size == 11
    ids, mask = tok.encode(["3", "", " 9 "], max_len=2)
    np.testing.assert_array_equal(ids, [[3, 10], [10, 10], [9, 10]])
    np.testing.assert_array_equal(mask, [[True, False], [True, False], [True, False]])
    assert tok.decode(ids) == ["3", "", "9"] and tok.decode(ids[0]) == "3"
    assert tok.pieces("7") == ["7"] and tok.pieces("") == []
    for caption in ("10", "cat", "-1"):
        with pytest.raises(ValueError, match="class number"):
            tok.encode([caption], 1)
    assert ClassLabelTokenizer.from_bytes(tok.to_bytes()).num_classes == 10
    assert CAPTION_TOKENIZERS.get("class_labels") is ClassLabelTokenizer


def test_class_label_encoder_is_registered_with_its_tokenizer():
    cls = TEXT_ENCODERS.get("class_labels")
    assert cls.caption_tokenizer({"num_classes": 7}).vocab_size == 8
    enc = cls(7, DIM, vocab_size=8, key=jr.key(0))
    h = enc(jnp.asarray([2, 7, 7]), jnp.asarray([True, True, False]))
    chex.assert_trees_all_equal(h, jnp.stack([enc.class_embed[2], enc.fake_embed,
                                              jnp.zeros(DIM)]))
    with pytest.raises(ValueError, match="num_classes \\+ 1"):
        cls(7, DIM, vocab_size=20, key=jr.key(0))


# -- in FluidModel --------------------------------------------------------------------------------
def test_a_class_conditional_model_trains_and_samples():
    # MAR's composition in the one driver: class labels as captions, the `mae` backbone with
    # MAR's training bound on known tokens (at least 70% masked: 4 of 16 known at most).
    config = dataclasses.replace(
        tiny("fluid").model,
        backbone=ComponentSpec(name="mae", kwargs={"depth": 1, "num_heads": 2,
                                                   "buffer_size": 4, "max_known": 4}),
        text_encoder=ComponentSpec(name="class_labels", kwargs={"num_classes": 10, "dim": 32}),
        text_len=2, text_vocab_size=11,
    )
    assert config.order.name == "random" and config.order.kwargs["mask_schedule"] == "mar"
    tokenizer = ClassLabelTokenizer(10)
    null_ids, null_mask = tokenizer.encode([""], config.text_len)
    model = compose(config, text_vocab_size=tokenizer.vocab_size,
                    null_text=(null_ids[0], null_mask[0]), key=jr.key(0))
    # The head's output layers start at zero, which would stop every gradient there.
    model = eqx.tree_at(lambda m: m.head, model, perturbed(model.head, jr.key(4), 0.05))
    ids, mask = tokenizer.encode(["1", "7", "3", "0"], config.text_len)
    batch = {"image": jr.uniform(jr.key(1), (4, 16, 16, 3), minval=-1.0, maxval=1.0),
             "text_ids": ids, "text_mask": mask}
    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(
        lambda m: m.loss(batch, key=jr.key(2))))(model)
    assert bool(jnp.isfinite(loss))
    assert float(jnp.abs(grads.text_encoder.class_embed).max()) > 0
    images = eqx.filter_jit(lambda m, k: m.generate(ids, mask, key=k, steps=4, cfg=2.0))(
        model, jr.key(3))
    chex.assert_shape(images, (4, 16, 16, 3))
    assert bool(jnp.all(jnp.isfinite(images)))
