"""Validation loss: deterministic, independent of the batch split, at the fixed mask ratios;
and the `num_known` hook of `FluidModel.loss_terms` it rests on."""

import dataclasses

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.build import build_model
from fluid.data.shapes import ShapesDataset
from fluid.eval import (
    MASK_RATIOS,
    NOISE_DRAWS,
    known_counts,
    validation_batches,
    validation_loss,
    validation_loss_terms,
    validation_mask_ratios,
)
from fluid.model import FluidModel
from fluid.orders import RandomOrder
from fluid.presets import tiny
from fluid.recipes import make_text_tokenizer

EXAMPLES = 12


@pytest.fixture(scope="module")
def text_tokenizer():
    return make_text_tokenizer(ShapesDataset(16), 64, n=512)


@pytest.fixture(scope="module")
def models(text_tokenizer):
    """Untrained tiny models by variant, built once for the module."""
    built = {}

    def get(variant):
        if variant not in built:
            config = tiny(variant).model
            built[variant] = build_model(config, text_tokenizer=text_tokenizer, key=jr.key(0))
        return built[variant]

    return get


@pytest.fixture(scope="module")
def held_out(text_tokenizer):
    config = tiny("fluid")
    (batch,) = validation_batches(
        config.data, text_tokenizer, text_len=config.model.text_len, count=EXAMPLES,
        batch_size=EXAMPLES,
    )
    return batch


def _split(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in batch.items()})
        start += size
    return out


# The Fluid variant carries both sources of randomness: mask ratios and diffusion noise.
def test_validation_loss_is_deterministic_and_independent_of_the_batch_split(models, held_out):
    model = models("fluid")
    first = validation_loss(model, [held_out])
    assert np.isfinite(first)
    assert validation_loss(model, [held_out]) == first
    # Computed in the same fixed-size chunks whatever the split: equal to the last bit.
    assert validation_loss(model, _split(held_out, [5, 7])) == first
    # The number depends on the keys: the same loss under another seed would mean the
    # noise were not drawn at all.
    assert validation_loss(model, [held_out], seed=1) != first


def test_fixed_mask_ratios_set_the_targets(models, held_out):
    model = models("fluid")
    n = model.seq_len
    assert known_counts(n, MASK_RATIOS) == [n - n * (i + 1) // 8 for i in range(8)]
    totals, targets = validation_loss_terms(model, [held_out], mask_ratios=MASK_RATIOS)
    masked = n - np.asarray(known_counts(n, MASK_RATIOS))
    np.testing.assert_array_equal(targets, NOISE_DRAWS * EXAMPLES * masked)
    # A ratio of 1 masks every token of every example: all are targets, in every draw.
    assert MASK_RATIOS[-1] == 1.0 and targets[-1] == NOISE_DRAWS * EXAMPLES * n
    assert np.all(totals > 0)


@pytest.mark.parametrize("schedule", ["mar", "cosine"])
def test_default_ratios_are_quantiles_of_the_orders_training_draw(schedule):
    # Checked against the draw itself: the empirical quantiles of 200,000 training draws of
    # `mask_ratio` (standard errors below 1e-3 at these levels).
    order = RandomOrder(mask_schedule=schedule)
    ratios = np.asarray(order.validation_mask_ratios(8))
    draws = np.asarray(jax.vmap(lambda k: order.mask_ratio(key=k))(jr.split(jr.key(0), 200_000)))
    np.testing.assert_allclose(ratios, np.quantile(draws, (np.arange(8) + 0.5) / 8), atol=4e-3)
    assert np.all(np.diff(ratios) > 0) and draws.min() <= ratios[0] and ratios[-1] <= 1.0
    if schedule == "mar":  # never where training does not go (at least 70% masked)
        assert ratios[0] > 0.7


def test_validation_defaults_to_the_orders_ratios(models, held_out):
    model = models("fluid")  # MAR's ratios: every default one masks at least 70%
    n = model.seq_len
    ratios = validation_mask_ratios(model)
    assert ratios == model.order.validation_mask_ratios(8) and min(ratios) > 0.7
    totals, targets = validation_loss_terms(model, [held_out])
    masked = n - np.asarray(known_counts(n, ratios))
    np.testing.assert_array_equal(targets, NOISE_DRAWS * EXAMPLES * masked)
    explicit = validation_loss_terms(model, [held_out], mask_ratios=ratios)
    np.testing.assert_array_equal(totals, explicit[0])


def test_causal_models_are_scored_teacher_forced(models, held_out):
    model = models("discrete-raster")
    _, targets = validation_loss_terms(model, [held_out], noise_draws=1)
    np.testing.assert_array_equal(targets, [EXAMPLES * model.seq_len])
    with pytest.raises(ValueError, match="bidirectional backbones"):
        model.loss_terms(
            {k: jnp.asarray(v) for k, v in held_out.items()},
            keys=jr.split(jr.key(0), EXAMPLES),
            num_known=jnp.zeros((EXAMPLES,), jnp.int32),
        )


def test_caption_dropout_is_off_in_validation(models, held_out):
    model = models("fluid")
    parts = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    null_text = (parts.pop("null_ids"), parts.pop("null_mask"))
    del parts["caption_dropout"]
    mostly_dropped = FluidModel(**parts, null_text=null_text, caption_dropout=0.9)
    assert validation_loss(mostly_dropped, [held_out]) == validation_loss(model, [held_out])


@eqx.filter_jit
def _loss_terms(model, batch, keys, num_known):
    return model.loss_terms(batch, keys=keys, num_known=num_known)


def test_num_known_replaces_the_orders_draw_and_defaults_to_it(models, held_out):
    model = models("fluid")
    batch = {k: jnp.asarray(v) for k, v in held_out.items()}
    keys = jr.split(jr.key(3), EXAMPLES)
    n = model.seq_len
    # The order's own draw, from the key `loss_terms` gives it.
    drawn = jnp.stack([model.order.num_known(n, key=jr.split(k, 4)[2]) for k in keys])
    chex.assert_trees_all_close(
        _loss_terms(model, batch, keys, drawn), _loss_terms(model, batch, keys, None)
    )
    for known, targets in [(0, n), (n - 1, 1), (n // 2, n - n // 2)]:
        _, count = _loss_terms(model, batch, keys, jnp.full((EXAMPLES,), known, jnp.int32))
        np.testing.assert_array_equal(count, np.full(EXAMPLES, targets))


def test_validation_batches_are_held_out(text_tokenizer):
    config = tiny("fluid")
    (batch,) = validation_batches(config.data, text_tokenizer, text_len=16, count=8)
    training = ShapesDataset(16, seed=config.data.seed)
    train_images = np.stack([training[i]["image"] for i in range(8)])
    assert batch["image"].shape == (8, 16, 16, 3)
    assert not any(np.array_equal(a, b) for a in batch["image"] for b in train_images)
    with pytest.raises(ValueError, match="shapes data set only"):
        validation_batches(
            dataclasses.replace(config.data, dataset="jsonl", path="x.jsonl"), text_tokenizer,
            text_len=16,
        )
