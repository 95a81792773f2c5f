"""MAR inside `FluidModel`: MAR's own numbers (the `mar_tiny` fixture) through the model's
training and sampling code (`loss_terms`, `training_conditions`, the sampling driver), MAR's
guidance schedule at every step, dropout and the encoder's bound in training, the `mar-*`
presets' parameter counts, MAR's weight-decay rule, and a tiny class-conditional model that
learns its classes.

Spies stand in for a part only where MAR's fixture fixes what the part would draw (the
head's timesteps and noise) or what earlier sampling steps produced (the known tokens of the
step the fixture records); everything else is the model's own code.
"""

import dataclasses
import json
import math
import typing
from pathlib import Path

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import perturbed
from jaxtyping import Array, Float, Int

from fluid._paths import named_leaves
from fluid.backbones import AbstractBidirectionalBackbone, MaskedAutoencoder
from fluid.build import abstract_model, compose, count_params, mar_model
from fluid.config import from_dict, to_dict
from fluid.heads import AbstractOutputHead, DiffusionHead
from fluid.model import FluidModel, TokenEmbedding
from fluid.orders import AbstractGenerationOrder, RandomOrder, cosine_step_counts
from fluid.presets import MAR_SIZES, get_config
from fluid.text import ClassLabelEncoder, ClassLabelTokenizer, TextAligner
from fluid.tokenizers import MAR_KL16, KLTokenizer, PatchTokenizer
from fluid.train import ModelLossTerms, Trainer, decay_mask

FIXTURE = Path(__file__).parent / "fixtures" / "mar_tiny.npz"
TOL = {"atol": 1e-5, "rtol": 1e-5}
N, STEPS, STEP, CFG = 16, 8, 5, 3.0  # the fixture's sampling step: step 5 of 8, guidance 3


# -- spies --------------------------------------------------------------------------------------
@typing.final
class GivenOrder(AbstractGenerationOrder):
    """A given permutation (an array: another one needs no recompilation), a fixed known count
    in training, and the random order's sampling steps."""

    supported_attention: typing.ClassVar[frozenset[str]] = frozenset({"bidirectional"})
    random_permutation: typing.ClassVar[bool] = False
    perm: Int[Array, " n"]
    known: int = eqx.field(static=True, default=0)

    def permutation(self, n, *, key):
        del key
        return self.perm

    def num_known(self, n, *, key):
        del key
        return jnp.asarray(self.known, jnp.int32)

    def step_counts(self, n, steps):
        return cosine_step_counts(n, steps)


@typing.final
class FixedDrawsHead(AbstractOutputHead):
    """The diffusion head's loss at the fixture's timesteps and noises: the draws of the row
    whose target token this is (every target of the fixture differs), averaged over the
    draws as `DiffusionHead.loss` averages its own."""

    token_kind: typing.ClassVar[str] = "continuous"
    inner: DiffusionHead
    targets: Float[Array, "rows token_dim"]
    t: Int[Array, "rows draws"]
    noise: Float[Array, "rows draws token_dim"]

    @property
    def cond_dim(self):
        return self.inner.cond_dim

    def loss(self, z, target, *, key):
        del key
        row = jnp.argmin(jnp.max(jnp.abs(self.targets - target[None]), axis=1))
        losses = jax.vmap(lambda t, e: self.inner.training_losses(target, t, e, z)["loss"])(
            self.t[row], self.noise[row])
        return jnp.mean(losses)

    def sample(self, z, z_uncond, cfg, temperature, *, key):
        return self.inner.sample(z, z_uncond, cfg, temperature, key=key)

    def num_evaluations(self):
        return self.inner.num_evaluations()


@typing.final
class TeacherForced(AbstractBidirectionalBackbone):
    """The `mae` backbone reading given tokens at the known positions: the tokens MAR had
    produced before the step the fixture records, whatever the head sampled there."""

    attention: typing.ClassVar[str] = "bidirectional"
    inner: MaskedAutoencoder
    x_known: Float[Array, "seq dim"]

    @property
    def dim(self):
        return self.inner.dim

    @property
    def seq_len(self):
        return self.inner.seq_len

    def __call__(self, x, known, context, context_mask, *, order=None):
        return self.inner(x, known, context, context_mask, order=order)

    def at_positions(self, x, known, context, context_mask, positions):
        x = jnp.where(known[:, None], self.x_known, x)
        return self.inner.at_positions(x, known, context, context_mask, positions)


def _nearest(table, v):
    """The row of `table` nearest `v`, and by how much `v` misses the tolerance there."""
    miss = jnp.max(jnp.abs(table - v[None]) - TOL["rtol"] * jnp.abs(table), axis=1)
    row = jnp.argmin(miss)
    return row.astype(jnp.float32), miss[row]


@typing.final
class ProbeHead(AbstractOutputHead):
    """Writes, as the token it samples: the guidance scale, and for each half the fixture
    row its condition matches and by how much it misses the tolerance."""

    token_kind: typing.ClassVar[str] = "continuous"
    cond_dim: int = eqx.field(static=True)
    z_cond: Float[Array, "seq dim"]
    z_uncond: Float[Array, "seq dim"]

    def loss(self, z, target, *, key):
        del key
        return jnp.sum(z) * 0.0 + jnp.sum(target) * 0.0

    def sample(self, z, z_uncond, cfg, temperature, *, key):
        del temperature, key
        row_c, miss_c = _nearest(self.z_cond, z)
        row_u, miss_u = _nearest(self.z_uncond, z_uncond)
        values = jnp.stack([jnp.asarray(cfg, jnp.float32), row_c, miss_c, row_u, miss_u])
        return jnp.zeros((8,), jnp.float32).at[:5].set(values)

    def num_evaluations(self):
        return 1


# -- MAR's fixture through FluidModel ------------------------------------------------------------
@pytest.fixture(scope="module")
def mar():
    data = np.load(FIXTURE)
    config = json.loads(FIXTURE.with_suffix(".json").read_text())["mar_config"]
    weights = {k.removeprefix("w/"): data[k] for k in data.files if k.startswith("w/")}
    # MAR's tokens here: 4 x 4 latents of 8 channels (64 px at stride 16). The tokenizer is
    # never run (batches hold tokens); only its token shape must be MAR's.
    tokenizer = KLTokenizer(image_size=16, block_out_channels=(8, 8, 8), layers_per_block=1,
                            norm_num_groups=4, latent_channels=8, key=jr.key(0))
    model = mar_model(weights, num_heads=config["encoder_num_heads"],
                      batch_mul=config["diffusion_batch_mul"], tokenizer=tokenizer,
                      caption_dropout=0.0, source=str(FIXTURE))
    io = {k: data[k] for k in data.files if not k.startswith(("w/", "vae/"))}
    return model, weights, io


def captions(labels, text_len=2):
    return ClassLabelTokenizer(10).encode([str(int(label)) for label in labels], text_len)


def batch_of(tokens, caption_ids, caption_mask, i):
    return {"tokens": jnp.asarray(tokens[i:i + 1]), "text_ids": jnp.asarray(caption_ids[i:i + 1]),
            "text_mask": jnp.asarray(caption_mask[i:i + 1])}


def mar_perm(order):
    # MAR masks the first `mask_len` positions of its order, so it produces its order from the
    # end: fluid's permutation is MAR's order reversed.
    return jnp.asarray(np.asarray(order)[::-1].copy(), jnp.int32)


@eqx.filter_jit
def conditions(model, batch, keys):
    return model.training_conditions(batch, keys=keys, dropout=False)


@eqx.filter_jit
def terms(model, batch, keys):
    return model.loss_terms(batch, keys=keys, dropout=False)


def test_mar_model_is_mars_composition(mar):
    model, _, _ = mar
    assert isinstance(model, FluidModel) and isinstance(model.order, RandomOrder)
    assert model.order.mask_schedule == "mar" and model.caption_dropout == 0.0
    assert model.aligner.identity and model.token_embedding.norm is None
    assert isinstance(model.text_encoder, ClassLabelEncoder) and model.text_encoder.num_classes == 10
    np.testing.assert_array_equal(model.null_ids, [10, 10])
    np.testing.assert_array_equal(model.null_mask, [True, False])
    # Every weight of MAR's state dict is in the model, and nothing else is trained.
    _, weights, _ = mar
    mar_count = sum(int(np.prod(w.shape)) for w in weights.values())
    assert count_params(model) - count_params(model.tokenizer) == mar_count
    # A tokenizer whose tokens are not the checkpoint's is refused, naming both.
    with pytest.raises(ValueError, match="16 continuous tokens of 8 channels.*48"):
        mar_model(weights, num_heads=4, tokenizer=PatchTokenizer(16, 4))


def test_mar_parity_conditions_through_the_training_path(mar):
    # MAR's forward_mae_encoder / forward_mae_decoder: z at every position, for the class
    # labels and for the fake (unconditional) class, with the fixture's 5 known positions.
    model, _, io = mar
    keys = jr.split(jr.key(0), 1)
    cond, uncond = captions(io["labels"]), ClassLabelTokenizer(10).encode([""] * 3, 2)
    for i in range(3):
        m = eqx.tree_at(lambda m: m.order, model, GivenOrder(mar_perm(io["orders"][i]), known=5))
        for (ids, mask), want in ((cond, io["z"]), (uncond, io["z_uncond"])):
            z, targets = conditions(m, batch_of(io["tokens"], ids, mask, i), keys)
            np.testing.assert_array_equal(targets[0], io["mask"][i] == 1)
            chex.assert_trees_all_close(z[0], want[i], **TOL)


def test_mar_parity_loss_through_loss_terms(mar):
    # MAR's forward_loss at the fixture's timesteps and noises (2 draws per position): the
    # mean over masked rows is sum(total) / sum(count) of loss_terms.
    model, _, io = mar
    bsz, mul = io["z"].shape[0], 2
    rows = io["loss_t"].shape[0]
    assert rows == mul * bsz * N
    # MAR's rows: draw-major, then example, then position.
    t = io["loss_t"].reshape(mul, bsz * N).T
    noise = io["loss_noise"].reshape(mul, bsz * N, -1).transpose(1, 0, 2)
    targets = io["tokens"].reshape(bsz * N, -1)
    head = FixedDrawsHead(model.head, jnp.asarray(targets), jnp.asarray(t, jnp.int32),
                          jnp.asarray(noise))
    ids, mask = captions(io["labels"])
    keys = jr.split(jr.key(1), 1)
    totals, counts = [], []
    for i in range(bsz):
        m = eqx.tree_at(lambda m: (m.order, m.head), model,
                        (GivenOrder(mar_perm(io["orders"][i]), known=5), head))
        total, count = terms(m, batch_of(io["tokens"], ids, mask, i), keys)
        totals.append(total[0])
        counts.append(count[0])
        per_row = io["loss_per_row"].reshape(mul, bsz, N)[:, i]
        want = per_row.mean(0)[io["mask"][i] == 1].sum()
        chex.assert_trees_all_close(total[0], jnp.asarray(want, jnp.float32), **TOL)
    assert counts == [11.0] * bsz
    loss = sum(totals) / sum(counts)
    chex.assert_trees_all_close(loss, jnp.asarray(io["loss"], jnp.float32), **TOL)


def test_mar_parity_sampling_step_through_the_driver(mar):
    # MAR's sample_tokens at step 5 of 8 with cfg 3 (linear), through `generate_tokens`: the
    # positions produced, the conditions of both halves there, the guidance scale. The
    # backbone reads MAR's tokens at the known positions (what MAR had produced before).
    model, _, io = mar
    counts = cosine_step_counts(N, STEPS)
    produced, k = sum(counts[:STEP]), counts[STEP]
    np.testing.assert_array_equal(io["step_mask"].sum(-1), N - produced)
    ids, mask = captions(io["labels"])
    run = eqx.filter_jit(lambda m, i, mk: m.generate_tokens(
        i, mk, key=jr.key(2), steps=STEPS, cfg=CFG, cfg_schedule="linear", temperature=1.0))
    for i in range(3):
        perm = mar_perm(io["orders"][i])
        x_known = model.token_embedding(jnp.asarray(io["step_tokens"][i]))
        spied = eqx.tree_at(
            lambda m: (m.order, m.backbone, m.head), model,
            (GivenOrder(perm), TeacherForced(model.backbone, x_known),
             ProbeHead(model.backbone.dim, jnp.asarray(io["step_z_both"][i]),
                       jnp.asarray(io["step_z_both"][3 + i]))),
        )
        tokens = np.asarray(run(spied, jnp.asarray(ids[i:i + 1]), jnp.asarray(mask[i:i + 1]))[0])
        positions = np.asarray(perm[produced:produced + k])
        np.testing.assert_array_equal(np.sort(positions), np.flatnonzero(io["step_to_pred"][i]))
        # The known positions at the step are those the permutation produced before it.
        np.testing.assert_array_equal(np.flatnonzero(io["step_mask"][i] == 0),
                                      np.sort(np.asarray(perm[:produced])))
        step = tokens[positions]
        np.testing.assert_allclose(step[:, 0], float(io["step_cfg"]), rtol=1e-6)
        np.testing.assert_array_equal(step[:, 1], positions)  # conditional half
        np.testing.assert_array_equal(step[:, 3], positions)  # unconditional half
        assert step[:, 2].max() <= TOL["atol"] and step[:, 4].max() <= TOL["atol"], step


def test_mar_parity_step_conditions_at_every_position(mar):
    # The conditions of both halves at every position at that step, through the training
    # path with the step's known positions.
    model, _, io = mar
    produced = sum(cosine_step_counts(N, STEPS)[:STEP])
    keys = jr.split(jr.key(3), 1)
    cond, uncond = captions(io["labels"]), ClassLabelTokenizer(10).encode([""] * 3, 2)
    for i in range(3):
        m = eqx.tree_at(lambda m: m.order, model,
                        GivenOrder(mar_perm(io["orders"][i]), known=produced))
        for (ids, mask), row in ((cond, i), (uncond, 3 + i)):
            z, _ = conditions(m, batch_of(io["step_tokens"], ids, mask, i), keys)
            chex.assert_trees_all_close(z[0], io["step_z_both"][row], **TOL)


# -- MAR's guidance schedule at every step -------------------------------------------------------
def mar_sample_schedule(n: int, num_iter: int, cfg: float) -> list[tuple[int, np.float32]]:
    """MAR's `sample_tokens` (models/mar.py) in NumPy, for one example: per step, how many
    positions it produces and its linear guidance scale (float32, as MAR's torch code)."""
    order = np.arange(n)  # the counts and scales do not depend on the order
    mask = np.ones(n, np.float32)
    out = []
    for step in range(num_iter):
        mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = np.float32(np.floor(n * mask_ratio))
        mask_len = np.maximum(np.float32(1), np.minimum(np.sum(mask) - 1, mask_len))
        mask_next = np.zeros(n, bool)
        mask_next[order[: int(mask_len)]] = True
        if step >= num_iter - 1:
            to_pred = mask.astype(bool)
        else:
            to_pred = np.logical_xor(mask.astype(bool), mask_next)
        mask = mask_next.astype(np.float32)
        cfg_iter = np.float32(1) + np.float32(cfg - 1) * (np.float32(n) - mask_len) / np.float32(n)
        out.append((int(to_pred.sum()), np.float32(cfg_iter)))
    return out


@typing.final
class KnownCountBackbone(AbstractBidirectionalBackbone):
    """Conditions that say what the backbone was given: how many positions were known and
    the sum of `p + 1` over the known positions `p`."""

    attention: typing.ClassVar[str] = "bidirectional"
    dim: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)

    def __call__(self, x, known, context, context_mask, *, order=None):
        return jnp.zeros((self.seq_len, self.dim), x.dtype)

    def at_positions(self, x, known, context, context_mask, positions):
        weights = known.astype(jnp.float32)
        row = jnp.zeros((self.dim,), jnp.float32).at[0].set(jnp.sum(weights))
        row = row.at[1].set(jnp.sum(weights * jnp.arange(1, self.seq_len + 1.0)))
        return jnp.broadcast_to(row, (positions.shape[0], self.dim))


@typing.final
class ScaleHead(AbstractOutputHead):
    """Samples a token holding the guidance scale and its condition's first two entries."""

    token_kind: typing.ClassVar[str] = "continuous"
    cond_dim: int = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)

    def loss(self, z, target, *, key):
        del key
        return jnp.sum(z) * 0.0 + jnp.sum(target) * 0.0

    def sample(self, z, z_uncond, cfg, temperature, *, key):
        del z_uncond, temperature, key
        values = jnp.stack([jnp.asarray(cfg, jnp.float32), z[0], z[1]])
        return jnp.zeros((self.token_dim,), jnp.float32).at[:3].set(values)

    def num_evaluations(self):
        return 1


def schedule_model(image_size: int, patch_size: int) -> FluidModel:
    tokenizer = PatchTokenizer(image_size, patch_size)
    n, dim = tokenizer.seq_len, 8
    labels = ClassLabelEncoder(3, dim, key=jr.key(0))
    null_ids, null_mask = ClassLabelTokenizer(3).encode([""], 2)
    return FluidModel(
        tokenizer=tokenizer, text_encoder=labels,
        aligner=TextAligner(dim, dim, 0, 1, identity=True, key=jr.key(1)),
        token_embedding=TokenEmbedding("continuous", tokenizer.token_dim, None, dim,
                                       normalize=False, key=jr.key(2)),
        backbone=KnownCountBackbone(dim, n), head=ScaleHead(dim, tokenizer.token_dim),
        order=RandomOrder(), null_text=(null_ids[0], null_mask[0]),
    )


@pytest.mark.parametrize("image_size,patch_size,steps,cfg", [
    (16, 4, 8, 3.0),  # 16 tokens, the fixture's schedule
    (16, 4, 16, 2.0),  # one token per step
    (32, 4, 7, 2.9),  # 64 tokens
    (64, 4, 64, 3.2),  # MAR's 256 tokens and 64 steps
    (64, 4, 256, 3.0),  # MAR's 256 steps in evaluation
    (32, 4, 1, 4.0),  # everything at once
])
def test_every_steps_guidance_and_counts_are_mars(image_size, patch_size, steps, cfg):
    model = schedule_model(image_size, patch_size)
    n = model.seq_len
    ids, mask = ClassLabelTokenizer(3).encode(["0", "2"], 2)
    tokens = eqx.filter_jit(lambda m, i, mk: m.generate_tokens(
        i, mk, key=jr.key(4), steps=steps, cfg=cfg, cfg_schedule="linear", temperature=1.0,
    ))(model, jnp.asarray(ids), jnp.asarray(mask))
    want = mar_sample_schedule(n, steps, cfg)
    assert sum(count for count, _ in want) == n
    for example in np.asarray(tokens):
        scale, known, known_sum = example[:, 0], example[:, 1].astype(int), example[:, 2]
        # Steps in order of how many positions were known when they ran.
        starts = np.unique(known)
        got_counts = [int(np.sum(known == s)) for s in starts]
        assert got_counts == [count for count, _ in want]
        before = np.zeros(n, bool)
        for s, (_, want_scale) in zip(starts, want, strict=True):
            at_step = known == s
            assert s == before.sum()
            # The backbone read exactly the positions of the earlier steps.
            np.testing.assert_array_equal(known_sum[at_step], np.sum(np.flatnonzero(before) + 1))
            np.testing.assert_array_equal(scale[at_step], want_scale)
            before |= at_step
        # The last step is MAR's clamped count: never the full scale unless one token.
        assert want[-1][1] == np.float32(1 + (cfg - 1) * (n - 1) / n) < cfg


def test_guidance_at_scale_one_and_constant_are_unchanged():
    model = schedule_model(16, 4)
    ids, mask = ClassLabelTokenizer(3).encode(["1"], 2)
    for cfg, schedule, want in ((1.0, "linear", 1.0), (2.5, "constant", 2.5)):
        tokens = model.generate_tokens(jnp.asarray(ids), jnp.asarray(mask), key=jr.key(5),
                                       steps=5, cfg=cfg, cfg_schedule=schedule, temperature=1.0)
        np.testing.assert_array_equal(np.asarray(tokens)[0, :, 0], want)


# -- training: dropout and the encoder's bound ------------------------------------------------------
def tiny_mar_model(**backbone):
    """tiny-mar's model at 16 px (16 tokens), its head moved off its zero start;
    `backbone`: spec kwargs."""
    config = get_config("tiny-mar", **{"model.tokenizer.kwargs.image_size": 16}).model
    spec = config.backbone
    config = dataclasses.replace(
        config, backbone=dataclasses.replace(spec, kwargs={**spec.kwargs, **backbone}))
    null_ids, null_mask = ClassLabelTokenizer(10).encode([""], config.text_len)
    model = compose(config, text_vocab_size=11, null_text=(null_ids[0], null_mask[0]),
                    key=jr.key(0))
    assert model.seq_len == 16
    return eqx.tree_at(lambda m: m.head, model, perturbed(model.head, jr.key(1), 0.05))


def class_batch(bsz, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, bsz)
    ids, mask = captions(labels)
    return {"image": jnp.asarray(rng.uniform(-1, 1, (bsz, 16, 16, 3)), jnp.float32),
            "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}


def test_training_bound_follows_the_order_and_changes_nothing():
    model = tiny_mar_model()
    n = model.seq_len
    bound = model.order.max_num_known(n)
    assert bound == n - math.ceil(0.7 * n) == 4
    batch = class_batch(48)
    keys = jr.split(jr.key(2), 48)
    z, targets = conditions(model, batch, keys)
    known = n - jnp.sum(targets, axis=1).astype(jnp.int32)
    # Draws reach the bound and never pass it (the backbone raises if they did).
    assert int(known.max()) == bound and int(known.min()) >= 0
    unbounded = eqx.filter_jit(lambda m, b, k, c: m.training_conditions(
        b, keys=k, num_known=c, dropout=False))
    z_full, targets_full = unbounded(model, batch, keys, known)
    chex.assert_trees_all_equal(targets_full, targets)
    chex.assert_trees_all_close(z, z_full, **TOL)
    # The loss as well, dropout on: the same draws with the bound as with all slots.
    total, count = eqx.filter_jit(lambda m, b, k: m.loss_terms(b, keys=k))(model, batch, keys)
    assert bool(jnp.all(jnp.isfinite(total))) and float(count.min()) >= n - bound

    def flops(f, *args):
        params, static = eqx.partition(model, eqx.is_array)
        return jax.jit(lambda p, *a: f(eqx.combine(p, static), *a)).lower(
            params, *args).cost_analysis()["flops"]

    bounded_flops = flops(lambda m, b, k: m.training_conditions(b, keys=k, dropout=False),
                          batch, keys)
    full_flops = flops(lambda m, b, k, c: m.training_conditions(b, keys=k, num_known=c,
                                                                dropout=False),
                       batch, keys, known)
    assert bounded_flops < 0.85 * full_flops


def test_validation_counts_past_the_bound_use_every_slot():
    model = tiny_mar_model()
    batch = class_batch(2)
    total, count = eqx.filter_jit(lambda m, b, k, c: m.loss_terms(
        b, keys=k, num_known=c, dropout=False))(model, batch, jr.split(jr.key(3), 2),
                                               jnp.asarray([15, 9], jnp.int32))
    np.testing.assert_array_equal(count, [1.0, 7.0])
    assert bool(jnp.all(jnp.isfinite(total)))


def test_dropout_runs_in_training_only_for_a_backbone_that_takes_a_key():
    model = tiny_mar_model()
    batch, keys = class_batch(4), jr.split(jr.key(4), 4)
    with_dropout = eqx.filter_jit(lambda m, b, k: m.training_conditions(b, keys=k))
    a, targets = with_dropout(model, batch, keys)
    again, _ = with_dropout(model, batch, keys)
    chex.assert_trees_all_equal(a, again)  # the keys decide it
    off, targets_off = conditions(model, batch, keys)
    chex.assert_trees_all_equal(targets, targets_off)  # same draws otherwise
    assert float(jnp.abs(a - off).max()) > 1e-3
    # With the backbone's rates at zero the key changes nothing.
    quiet = tiny_mar_model(attn_dropout=0.0, proj_dropout=0.0)
    chex.assert_trees_all_close(with_dropout(quiet, batch, keys)[0],
                                conditions(quiet, batch, keys)[0], **TOL)


def test_a_backbone_without_a_key_trains_the_same_program():
    # tiny-fluid's bidirectional transformer takes no key: `dropout` changes nothing, not
    # even the traced program.
    config = get_config("tiny-fluid").model
    null_text = (np.ones(config.text_len, np.int32), np.arange(config.text_len) < 1)
    model = eqx.filter_eval_shape(lambda k: compose(config, text_vocab_size=64,
                                                    null_text=null_text, key=k), jr.key(0))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "text_ids": jnp.zeros((2, 16), jnp.int32),
             "text_mask": jnp.ones((2, 16), bool)}

    def program(dropout):
        return str(jax.make_jaxpr(lambda p, b, k: eqx.combine(p, static).loss_terms(
            b, keys=k, dropout=dropout))(params, batch, jr.split(jr.key(0), 2)))

    assert program(True) == program(False)


# -- presets -----------------------------------------------------------------------------------
# MAR's own counts (its trainable parameters, printed by main_mar.py; the VAE apart).
MAR_COUNTS = {"base": 207_924_768, "large": 478_326_304, "huge": 942_403_104}


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_mar_presets_have_mars_parameter_counts(size):
    config = get_config(f"mar-{size}")
    model = abstract_model(config.model)
    # The KL-16 autoencoder is frozen and outside MAR's count, as MAR's VAE is.
    assert count_params(model) - count_params(model.tokenizer) == MAR_COUNTS[size]
    width, depth, heads, head_width, head_depth, cfg = {
        "base": (768, 12, 12, 1024, 6, 2.9), "large": (1024, 16, 16, 1280, 8, 3.0),
        "huge": (1280, 20, 16, 1536, 12, 3.2)}[size]
    assert MAR_SIZES[size] == (width, depth, heads, head_width, head_depth, cfg)
    b = model.backbone
    assert isinstance(b, MaskedAutoencoder)
    assert (b.dim, b.encoder.depth, b.decoder.depth, b.encoder.num_heads, b.buffer_size) == (
        width, depth, depth, heads, 64)
    assert (b.encoder.layers.attn_dropout, b.encoder.layers.proj_dropout) == (0.1, 0.1)
    assert (model.head.width, model.head.depth, model.head.batch_mul) == (head_width, head_depth, 4)
    assert (model.tokenizer.token_dim, model.tokenizer.grid, model.tokenizer.patch_size) == (
        16, (16, 16), 1)
    assert model.tokenizer.scaling_factor == 0.2325
    assert model.text_encoder.num_classes == 1000 and model.caption_dropout == 0.1
    assert model.aligner.identity and model.token_embedding.norm is None
    assert isinstance(model.order, RandomOrder) and model.order.mask_schedule == "mar"
    assert config.optim.decay_rules == "mar" and config.optim.weight_decay == 0.02
    assert (config.optim.learning_rate, config.batch_size, config.sample_cfg) == (8e-4, 2048, cfg)
    spec = config.model.tokenizer
    assert spec.name == "kl" and {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in spec.kwargs.items()} == MAR_KL16
    assert from_dict(type(config), to_dict(config)) == config


# -- MAR's weight decay -----------------------------------------------------------------------------
# tiny-mar's leaves that MAR's rule decays: all but the head, the biases and the norms; the
# class, fake-class, position and mask embeddings included (MAR's `class_emb`, `fake_latent`,
# `*_pos_embed_learned`, `mask_token`), as are the token map (`z_proj`) and the decoder's input
# map (`decoder_embed`).
_BLOCKS = [f"backbone.{tower}.layers.{layer}.weight" for tower in ("encoder", "decoder")
           for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
TINY_MAR_DECAYED = {
    "text_encoder.class_embed", "text_encoder.fake_embed", "token_embedding.layer.weight",
    "backbone.encoder_pos_embed", "backbone.mask_embed", "backbone.decoder_pos_embed",
    "backbone.out_pos_embed", "backbone.decoder_proj.weight", *_BLOCKS,
}


def trainable_params(model):
    return eqx.filter(eqx.tree_at(lambda m: m.tokenizer, model, replace_fn=lambda t: None),
                      eqx.is_inexact_array)


def test_mar_decay_rule_on_a_tiny_mar_model():
    model = tiny_mar_model()
    params = trainable_params(model)
    mask = dict(named_leaves(decay_mask(params, "mar")))
    assert {name for name, decays in mask.items() if decays} == TINY_MAR_DECAYED
    # The default rule is unchanged: matrices outside the head, norms and embeddings
    # (the token embedding's map among them).
    fluid = dict(named_leaves(decay_mask(params)))
    assert {name for name, decays in fluid.items() if decays} == {
        "backbone.decoder_proj.weight", *_BLOCKS}
    assert get_config("tiny-mar").optim.decay_rules == "mar"


def test_mar_decay_rule_decays_what_mar_decays(mar):
    # MAR's add_weight_decay (util/misc.py) on its own state dict: no decay for 1-D
    # parameters, biases and the diffusion MLP. The same number of values is decayed in the
    # FluidModel holding those weights.
    model, weights, _ = mar
    mar_decayed = sum(int(np.prod(w.shape)) for name, w in weights.items()
                      if not (w.ndim == 1 or name.endswith(".bias") or "diffloss" in name))
    mask = decay_mask(trainable_params(model), "mar")
    ours = sum(int(np.prod(x.shape)) for (name, x), (_, d) in
               zip(named_leaves(trainable_params(model)), named_leaves(mask), strict=True)
               if d)
    assert ours == mar_decayed


# -- a tiny class-conditional model learns its classes -------------------------------------------
COLOURS = {3: (0.8, -0.8, -0.8), 7: (-0.8, -0.8, 0.8)}  # class 3 red, class 7 blue


def test_a_tiny_class_conditional_model_trains_and_samples_its_classes():
    # tiny-mar as its preset trains it, on flat images of two classes' colours, through the
    # trainer and the model's own loss (dropout on, the encoder bounded).
    config = get_config("tiny-mar")
    side = config.data.image_size
    tokenizer = ClassLabelTokenizer(10)
    null_ids, null_mask = tokenizer.encode([""], config.model.text_len)
    model = compose(config.model, text_vocab_size=tokenizer.vocab_size,
                    null_text=(null_ids[0], null_mask[0]), key=jr.key(0))
    rng = np.random.default_rng(0)

    def batches():
        while True:
            labels = rng.choice([3, 7], config.batch_size)
            ids, mask = tokenizer.encode([str(c) for c in labels], config.model.text_len)
            images = np.stack([np.broadcast_to(np.asarray(COLOURS[int(c)], np.float32),
                                               (side, side, 3)) for c in labels])
            yield {"image": images, "text_ids": ids, "text_mask": mask}

    trainer = Trainer(model, ModelLossTerms(), batches(), config=config, key=jr.key(1),
                      progress=False)
    losses = np.array([r["loss"] for r in trainer.run()])
    # The diffusion loss of a batch depends on its timesteps: medians of twenty steps.
    assert len(losses) == config.steps and np.all(np.isfinite(losses)), losses
    assert np.median(losses[-20:]) < 0.2 * np.median(losses[:20]), losses
    labels = [3, 7] * 8
    ids, mask = tokenizer.encode([str(c) for c in labels], config.model.text_len)
    images = np.asarray(eqx.filter_jit(lambda m, i, mk: m.generate(
        i, mk, key=jr.key(2), steps=config.sample_steps, cfg=config.sample_cfg))(
            trainer.model(), ids, mask))
    for label in (3, 7):
        mean = images[np.asarray(labels) == label].mean(axis=(0, 1, 2))
        own = np.abs(mean - COLOURS[label]).mean()
        other = np.abs(mean - COLOURS[10 - label]).mean()
        assert own < 0.25 * other, (label, mean)


def test_the_composition_options_are_checked_and_default_to_fluids():
    config = get_config("tiny-fluid").model
    assert (config.aligner, config.token_norm) == ("transformer", True)
    mar_config = get_config("tiny-mar")
    assert (mar_config.model.aligner, mar_config.model.token_norm) == ("identity", False)
    overridden = get_config("tiny-fluid", **{"model.aligner": "identity",
                                             "model.token_norm": "false",
                                             "optim.decay_rules": "mar"})
    assert (overridden.model.aligner, overridden.model.token_norm) == ("identity", False)
    assert overridden.optim.decay_rules == "mar"
    with pytest.raises(ValueError, match="model.aligner"):
        get_config("tiny-fluid", **{"model.aligner": "none"})
    with pytest.raises(TypeError, match="token_norm"):
        dataclasses.replace(config, token_norm=1)
    # An identity aligner passes the text on as it is: the widths must agree.
    with pytest.raises(ValueError, match="width 16 must be the backbone's, 32"):
        TextAligner(16, 32, 0, 1, identity=True, key=jr.key(0))
    aligner = TextAligner(4, 4, 0, 1, identity=True, key=jr.key(0))
    assert aligner.identity and count_params(aligner) == 0
    x, mask = jnp.arange(12.0).reshape(3, 4), jnp.asarray([True, False, True])
    chex.assert_trees_all_equal(aligner(x, mask), x.at[1].set(0.0))
    # By default a token embedding normalises, and an aligner is Fluid's blocks.
    assert TokenEmbedding("continuous", 3, None, 4, key=jr.key(0)).norm is not None
    assert not TextAligner(4, 4, 1, 1, key=jr.key(0)).identity
