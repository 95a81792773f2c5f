"""The composed model end to end: the tiny variants train and sample; composition errors."""

import dataclasses
import typing

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.build import abstract_model, count_params
from fluid.config import ComponentSpec, ModelConfig, TrainConfig, from_dict, override, to_dict
from fluid.heads import AbstractOutputHead, SoftmaxHead
from fluid.model import FluidModel, IncompatibleComponentsError
from fluid.orders import AbstractGenerationOrder
from fluid.presets import ALL_VARIANTS, get_config, tiny
from fluid.recipes import prepare
from fluid.sample import sample_images


@pytest.fixture(scope="module")
def trained():
    """Each tiny variant trained for its preset's 30 steps (shared by the tests below)."""
    out = {}
    for variant in ALL_VARIANTS:
        trainer = prepare(tiny(variant), progress=False)
        history = trainer.run()
        out[variant] = (trainer, [r["loss"] for r in history])
    return out


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_tiny_variant_loss_falls(trained, variant):
    _, losses = trained[variant]
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_tiny_variant_generates_finite_images(trained, variant):
    trainer, _ = trained[variant]
    config = trainer.config
    images = sample_images(
        trainer.model(), trainer.text_tokenizer, ["a red circle", "two blue squares", ""],
        text_len=config.model.text_len, key=jr.key(0), steps=4, cfg=2.0,
    )
    chex.assert_shape(images, (3, 16, 16, 3))
    assert np.isfinite(images).all()


# Discrete tokens keep this end-to-end check well conditioned: a diffusion chain after 30
# training steps reaches values of 1e4, where batch-of-2 versus batch-of-1 rounding in the
# backbone shows; the heads' own guidance at scale 1 is checked exactly in test_contracts.
@pytest.mark.parametrize("variant", ["discrete-random", "discrete-raster"])
def test_guided_path_at_scale_one_equals_conditional(trained, variant):
    trainer, _ = trained[variant]
    model = trainer.model()
    ids, mask = trainer.text_tokenizer.encode(["a green triangle", "a red square"], 16)
    key = jr.key(7)
    one = model._generate_one  # one example, the guided path forced on or off

    def run(guided):
        return jax.vmap(
            lambda i, m, k: one(i, m, k, 4, guided, 1.0, "linear", 1.0)
        )(ids, mask, jr.split(key, 2))

    chex.assert_trees_all_close(run(True), run(False), atol=1e-5, rtol=1e-5)


def test_generation_depends_on_the_key_and_is_reproducible(trained):
    trainer, _ = trained["fluid"]
    kw = dict(text_len=16, steps=4, cfg=1.0)
    a = sample_images(trainer.model(), trainer.text_tokenizer, ["a red circle"], key=jr.key(1), **kw)
    b = sample_images(trainer.model(), trainer.text_tokenizer, ["a red circle"], key=jr.key(1), **kw)
    c = sample_images(trainer.model(), trainer.text_tokenizer, ["a red circle"], key=jr.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_diffusion_head_on_discrete_tokens_is_refused_with_fitting_heads():
    config = tiny("discrete-random").model
    with pytest.raises(IncompatibleComponentsError) as info:
        bad = dataclasses.replace(config, head=ComponentSpec(name="diffusion", kwargs={"width": 16}))
        abstract_model(bad)
    assert "softmax" in str(info.value) and "discrete" in str(info.value)


@typing.final
class MaskedOnlyOrder(AbstractGenerationOrder):
    """An order that drives bidirectional backbones only."""

    supported_attention: typing.ClassVar[frozenset[str]] = frozenset({"bidirectional"})
    random_permutation: typing.ClassVar[bool] = False

    def permutation(self, n, *, key):
        return jnp.arange(n, dtype=jnp.int32)

    def num_known(self, n, *, key):
        return jnp.asarray(0, jnp.int32)

    def step_counts(self, n, steps):
        return (n,)


def test_order_that_cannot_drive_the_backbone_is_refused_with_fitting_parts():
    config = dataclasses.replace(
        tiny("fluid").model,
        backbone=ComponentSpec(name="causal", kwargs={"depth": 1, "num_heads": 2}),
    )
    m = abstract_model(config)
    with pytest.raises(IncompatibleComponentsError) as info:
        FluidModel(m.tokenizer, m.text_encoder, m.aligner, m.token_embedding, m.backbone,
                   m.head, MaskedOnlyOrder(), (np.array([1]), np.array([True])))
    message = str(info.value)
    # Backbones that fit the order; orders that fit the backbone.
    assert "bidirectional" in message and "mae" in message
    assert "raster" in message and "random" in message


def test_unknown_component_in_config_fails_at_config_time():
    with pytest.raises(KeyError, match="Known output heads: .*diffusion"):
        ModelConfig(head=ComponentSpec(name="difusion"))
    with pytest.raises(TypeError, match="Did you mean 'depth'"):
        ModelConfig(backbone=ComponentSpec(name="bidirectional", kwargs={"dpeth": 2, "num_heads": 2}))
    with pytest.raises(TypeError, match="derived"):
        ModelConfig(backbone=ComponentSpec(name="bidirectional", kwargs={"dim": 8, "depth": 1, "num_heads": 2}))


def test_dotted_overrides_are_type_checked():
    config = get_config("tiny-fluid", **{"optim.learning_rate": "3e-4", "steps": "12",
                                         "model.head.width": "64", "data.categories": "colors"})
    assert config.optim.learning_rate == 3e-4 and config.steps == 12
    assert config.model.head.kwargs["width"] == 64 and config.data.categories == ("colors",)
    # a name switch drops the old part's kwargs; new ones are checked against the new class
    assert override(config, "model.head.name", "softmax").model.head.kwargs == {}
    with pytest.raises(TypeError, match="head 'softmax' takes no argument"):
        get_config("tiny-fluid", **{"model.head.width": "64", "model.head.name": "softmax"})
    with pytest.raises(TypeError, match="takes an int"):
        override(config, "steps", "many")
    with pytest.raises(KeyError, match="Did you mean 'learning_rate'"):
        override(config, "optim.learning_rat", "1")
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("tiny-fluyd")


def test_config_json_round_trip():
    config = get_config("tiny-discrete-raster")
    assert from_dict(TrainConfig, to_dict(config)) == config


def test_parameter_counts_come_from_eval_shape_without_allocating():
    counts = {name: count_params(abstract_model(get_config(name).model)) for name in ["scale-b", "scale-l", "scale-h"]}
    assert counts["scale-b"] < counts["scale-l"] < counts["scale-h"]
    # Backbone blocks with cross-attention dominate: 24 x 16 x 768^2 = 226M for scale-b.
    assert 200e6 < counts["scale-b"] < 400e6
    small = abstract_model(tiny("fluid").model)
    leaves = jax.tree_util.tree_leaves(small)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_build_fits_the_palette_codebook_to_images():
    config = tiny("discrete-random")
    trainer = prepare(config, progress=False)
    tok = trainer.model().tokenizer
    images = jnp.asarray(np.stack([trainer.source[i]["image"] for i in range(4)]))
    recon = jax.vmap(tok.decode)(jax.vmap(tok.encode)(images))
    # a fitted codebook reconstructs far better than chance (random codewords)
    assert float(jnp.mean((recon - images) ** 2)) < 0.05


class _CountingHead(AbstractOutputHead):
    """Wraps a head and counts, at run time, every token it samples."""

    inner: SoftmaxHead
    token_kind = "discrete"

    @property
    def cond_dim(self):
        return self.inner.cond_dim

    def loss(self, z, target, *, key):
        return self.inner.loss(z, target, key=key)

    def sample(self, z, z_uncond, cfg, temperature, *, key):
        # Under vmap the callback may see a batch of condition vectors: count them all.
        jax.debug.callback(lambda zz: _COUNT.append(np.asarray(zz).size // zz.shape[-1]), z)
        return self.inner.sample(z, z_uncond, cfg, temperature, key=key)

    def num_evaluations(self):
        return 1


_COUNT: list[int] = []


@pytest.mark.parametrize("variant,steps", [("discrete-random", 5), ("discrete-raster", 3)])
def test_head_samples_each_position_exactly_once(trained, variant, steps):
    trainer, _ = trained[variant]
    model = trainer.model()
    model = eqx.tree_at(lambda m: m.head, model, _CountingHead(model.head))
    ids, mask = trainer.text_tokenizer.encode(["a red circle", "a blue square"], 16)
    _COUNT.clear()
    tokens = eqx.filter_jit(
        lambda m, i, mk: m.generate_tokens(i, mk, key=jr.key(0), steps=steps, cfg=2.0,
                                           cfg_schedule="linear", temperature=1.0)
    )(model, ids, mask)
    jax.block_until_ready(tokens)
    # one head evaluation per position and image, whatever the number of steps
    assert sum(_COUNT) == 2 * model.seq_len


def test_plugin_head_from_entry_point_trains():
    # `mlp_flow` comes from examples/plugin_head through its entry point (exposed by conftest);
    # nothing here imports the plug-in's module.
    config = get_config("tiny-fluid", steps=12)
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(
            config.model, head=ComponentSpec(name="mlp_flow", kwargs={"width": 32, "sampling_steps": 4})
        ),
    )
    trainer = prepare(config, progress=False)
    assert type(trainer.model().head).__module__ == "fluid_flow_head"
    # copies: the trainer donates its state's buffers to the next step
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(trainer.model(ema=False).head)]
    losses = [r["loss"] for r in trainer.run()]
    after = jax.tree_util.tree_leaves(trainer.model(ema=False).head)
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert any(float(np.abs(a - np.asarray(b)).max()) > 0 for a, b in zip(before, after))
    images = sample_images(trainer.model(), trainer.text_tokenizer, ["a red circle"],
                           text_len=config.model.text_len, steps=4, cfg=2.0)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
