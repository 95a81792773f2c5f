"""The optimiser's facts against references written here: the EMA, the learning-rate schedules,
gradient clipping, the weight-decay mask and AdamW as a whole (NumPy transcriptions of the
formulas, in float64; nothing in this file asks `fluid.train._optim` for an expected value)."""

import dataclasses
import math

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

from fluid._paths import named_leaves, path_name
from fluid.build import abstract_model, compose
from fluid.config import OptimConfig, TrainConfig
from fluid.presets import VARIANTS, get_config
from fluid.text import T5TextEncoder
from fluid.recipes import trainable_mask
from fluid.train import (
    ModelLossTerms,
    Trainer,
    decay_mask,
    learning_rate_schedule,
    make_mesh,
    make_optimizer,
)
from fluid.train._optim import ema_update, global_norm

RTOL = 1e-6  # float32 results against float64 references
EPS = 1e-8  # optax.adamw's default epsilon (OptimConfig does not set it)


# -- references -------------------------------------------------------------------------------
def numpy_learning_rate(config: OptimConfig, total_steps: int, step: int) -> float:
    """MAR's `adjust_learning_rate` (min_lr 0) in steps: linear warm-up from 0, then the
    peak rate, or a half cosine from the peak to 0 at `total_steps` (and 0 after it)."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if step < warmup:
        return peak * step / warmup
    if config.schedule == "constant":
        return peak
    span = max(total_steps - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def numpy_adamw(params, grads, *, config: OptimConfig, total_steps: int, decayed):
    """AdamW as Loshchilov & Hutter and optax write it, on `{name: array}` dicts in float64:
    global-norm clipping of the whole gradient first; update `t` (from 1) uses the rate of
    step `t - 1`; decoupled decay `lr * wd * p` on the names in `decayed` only.

    **Returns:** the parameters after each update.
    """
    p = {k: np.asarray(x, np.float64) for k, x in params.items()}
    m = {k: np.zeros_like(x) for k, x in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    b1, b2 = config.b1, config.b2
    history = []
    for t, g in enumerate(grads, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        if config.grad_clip is not None:
            norm = math.sqrt(sum(np.sum(x**2) for x in g.values()))
            g = {k: x * min(1.0, config.grad_clip / norm) for k, x in g.items()}
        lr = numpy_learning_rate(config, total_steps, t - 1)
        for k, x in p.items():
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + EPS)
            if k in decayed:
                u = u + config.weight_decay * x
            p[k] = x - lr * u
        history.append(dict(p))
    return history


def run_optimizer(optimizer, params, grads):
    """The trainer's use of an optax optimiser: `update`, then `apply_updates`, per step."""

    @jax.jit
    def step(params, state, g):
        # As the trainer: optax mixes Python floats with int32 counts (strict promotion).
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optimizer.update(g, state, params)
        return eqx.apply_updates(params, updates), state

    state = optimizer.init(params)
    history = []
    for g in grads:
        params, state = step(params, state, g)
        history.append(params)
    return history


def as_dict(tree) -> dict[str, np.ndarray]:
    return {name: np.asarray(x) for name, x in named_leaves(tree)}


def away_from_zero(rng: np.random.Generator, shape) -> jax.Array:
    """float32 values of magnitude in [0.5, 1.5], so that relative tolerances hold everywhere
    and decay (`wd * p`) is never hidden by a parameter near zero."""
    sign = rng.choice([-1.0, 1.0], shape)
    return jnp.asarray(sign * rng.uniform(0.5, 1.5, shape), jnp.float32)


def assert_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0.0)


# -- EMA ---------------------------------------------------------------------------------------
def _ema_trees():
    # Partitioned parameters as the trainer holds them: None where a leaf is frozen. Positive
    # values: no cancellation, so a relative tolerance holds at every element.
    rng = np.random.default_rng(0)

    def positive(*shape):
        return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)

    ema = {"w": positive(3, 4), "b": positive(4), "frozen": None,
           "blocks": (positive(2, 3, 3), positive())}
    params = {"w": positive(3, 4), "b": positive(4), "frozen": None,
              "blocks": (ema["blocks"][0] * 1.5, jnp.float32(0.7))}
    return ema, params


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999, 0.9999])
def test_ema_update_is_the_weighted_average_leaf_by_leaf(decay):
    ema, params = _ema_trees()
    out = ema_update(ema, params, decay)
    assert jax.tree.structure(out) == jax.tree.structure(ema)
    assert out["frozen"] is None
    want = {name: decay * np.asarray(e, np.float64) + (1 - decay) * np.asarray(p, np.float64)
            for (name, e), (_, p) in zip(named_leaves(ema), named_leaves(params), strict=True)}
    got = as_dict(out)
    assert_close(got, want)
    assert all(x.dtype == np.float32 for x in got.values())


def test_ema_update_edges_are_exact():
    # Signs and scales that differ, so that `p - e` rounds.
    rng = np.random.default_rng(1)
    ema = {"w": jnp.asarray(rng.normal(size=64), jnp.float32), "frozen": None}
    params = {"w": jnp.asarray(10 * rng.normal(size=64), jnp.float32), "frozen": None}
    # Decay 1: the average never moves. Decay 0 (`OptimConfig`: "0: no averaging"): the
    # average is the parameters themselves, bit for bit, not up to rounding.
    chex.assert_trees_all_equal(ema_update(ema, params, 1.0), ema)
    chex.assert_trees_all_equal(ema_update(ema, params, 0.0), params)


class _Quadratic(eqx.Module):
    """A model with the trainer's `loss_terms` interface: per-example sums and counts."""

    w: jax.Array

    def loss_terms(self, batch, *, keys):
        del keys
        total = jnp.sum(jnp.square(batch["x"] @ self.w), axis=-1)
        return total, jnp.ones_like(total)


def test_trainer_averages_updated_parameters_at_a_fixed_decay():
    # MAR keeps a plain EMA at rate 0.9999 from step 0, of the parameters after each update;
    # no warm-up of the decay (as `min(decay, (1 + t) / (10 + t))` would be) is applied.
    decay = 0.99
    rng = np.random.default_rng(2)
    model = _Quadratic(away_from_zero(rng, (3, 2)))
    batch = {"x": np.asarray(away_from_zero(rng, (4, 3)))}
    config = TrainConfig(steps=3, batch_size=4, optim=OptimConfig(ema_decay=decay))
    trainer = Trainer(model, ModelLossTerms(), iter([batch] * 3), config=config,
                      mesh=make_mesh({"data": 1, "model": 1}, jax.devices()[:1]),
                      optimizer=optax.sgd(0.1), progress=False)
    chex.assert_trees_all_equal(trainer.state.ema.w, model.w)
    ema = np.asarray(model.w, np.float64)
    for _ in range(3):
        trainer.run(1)
        ema = decay * ema + (1 - decay) * np.asarray(trainer.state.params.w, np.float64)
        np.testing.assert_allclose(np.asarray(trainer.state.ema.w), ema, rtol=RTOL)
    # The parameters moved far enough that a wrong average could not pass.
    assert np.max(np.abs(np.asarray(trainer.state.params.w) - np.asarray(model.w))) > 0.05


# -- learning-rate schedules ---------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_learning_rate_schedule_against_the_formula(schedule, warmup):
    total, peak = 40, 3e-4
    config = OptimConfig(learning_rate=peak, schedule=schedule, warmup_steps=warmup)
    steps = np.arange(total + 5)  # 0, the warm-up boundary, the last step and beyond
    with jax.numpy_dtype_promotion("standard"):
        got = np.asarray(jax.vmap(learning_rate_schedule(config, total))(jnp.asarray(steps)))
    want = np.array([numpy_learning_rate(config, total, int(s)) for s in steps])
    # optax's cosine is float32: its argument (near pi at the end) and the cosine itself
    # round, about an ulp of the peak each (measured: up to 1.0), so 2 ulps absolute.
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=peak * 2**-22)
    assert got[0] == (0.0 if warmup else np.float32(peak))
    np.testing.assert_allclose(got[warmup], peak, rtol=RTOL)
    if warmup > 1:
        np.testing.assert_allclose(got[warmup - 1], peak * (warmup - 1) / warmup, rtol=RTOL)
    if schedule == "cosine":
        # Half the peak halfway through the decay, 0 from `total` on.
        np.testing.assert_allclose(got[warmup + (total - warmup) // 2],
                                   want[warmup + (total - warmup) // 2], rtol=RTOL)
        assert 0 < got[total - 1] < 0.01 * peak and np.all(got[total:] == 0)
    else:
        assert np.all(got[warmup:] == np.float32(peak))


# -- gradient clipping and global norm -----------------------------------------------------------
def _small_tree(rng):
    return {"a": away_from_zero(rng, (3, 4)), "b": away_from_zero(rng, (5,)),
            "c": away_from_zero(rng, ()), "frozen": None}


def test_global_norm_against_numpy():
    tree = _small_tree(np.random.default_rng(4))
    want = math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in as_dict(tree).values()))
    np.testing.assert_allclose(float(global_norm(tree)), want, rtol=RTOL)


def _grads_with_norms(norms, rng):
    """One gradient per step, of the given global norms (above and below a clip)."""
    out = []
    for norm in norms:
        g = _small_tree(rng)
        scale = np.float32(norm / math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                                for x in as_dict(g).values())))
        out.append(jax.tree.map(lambda x, scale=scale: x * scale, g))
    return out


@pytest.mark.parametrize("grad_clip", [None, 1.0, 5.0])
def test_clipping_scales_the_whole_gradient_before_adam(grad_clip):
    # Adam divides out a gradient's scale, but not the scales of several steps relative to
    # each other: norms 8, 0.5, 3 clipped at 1 or 5 give a different third update.
    config = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0,
                         grad_clip=grad_clip)
    rng = np.random.default_rng(5)
    params = _small_tree(rng)
    grads = _grads_with_norms([8.0, 0.5, 3.0], rng)
    got = run_optimizer(make_optimizer(config, 3), params, grads)
    ref = {}
    for clip in (None, 1.0, 5.0):
        ref[clip] = numpy_adamw(as_dict(params), [as_dict(g) for g in grads],
                                config=dataclasses.replace(config, grad_clip=clip),
                                total_steps=3, decayed=set())
    for a, b in ((None, 1.0), (None, 5.0), (1.0, 5.0)):  # the test can tell them apart
        assert not np.allclose(ref[a][-1]["a"], ref[b][-1]["a"], rtol=1e-4)
    for step_got, step_want in zip(got, ref[grad_clip], strict=True):
        assert_close(as_dict(step_got), step_want)


# -- weight-decay mask ----------------------------------------------------------------------------
def promised_decay(name: str, ndim: int, stacked: bool) -> bool:
    """`decay_mask`'s docstring in plain words: weight decay on matrices, except the head's
    (as MAR), norms' scales and shifts, biases and embeddings. A stacked block's leaf counts
    its ndim without the leading layer axis (a stacked norm scale is still 1-D)."""
    parts = name.split(".")
    if parts[0] == "head" or parts[-1] == "bias":
        return False
    if any("norm" in part for part in parts) or any("embed" in part for part in parts):
        return False
    return ndim - stacked >= 2


# The tiny models' decayed leaves, by name: the linear layers of the attention, cross-attention
# and MLP blocks, and the aligner's input projection.
_BLOCK = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
TINY_FLUID_DECAYED = {
    *(f"{tower}.blocks.layers.{layer}.weight"
      for tower in ("text_encoder", "aligner", "backbone") for layer in _BLOCK),
    *(f"backbone.blocks.layers.cross.{layer}.weight" for layer in ("q", "kv", "proj")),
    "aligner.proj.weight",
}


@pytest.fixture(scope="module")
def tiny_model():
    config = get_config("tiny-fluid").model
    null_text = (np.ones(config.text_len, np.int32), np.arange(config.text_len) < 1)
    return compose(config, text_vocab_size=config.text_vocab_size, null_text=null_text,
                   key=jr.key(0))


@pytest.fixture(scope="module")
def tiny_params(tiny_model):
    """tiny-fluid's trainable parameters (None elsewhere), every value moved away from 0."""
    params, _ = eqx.partition(tiny_model, trainable_mask(tiny_model))
    rng = np.random.default_rng(6)
    return jax.tree.map(lambda x: away_from_zero(rng, x.shape), params)


def test_trainable_mask_of_a_tiny_model(tiny_model):
    # Every float leaf outside the image tokenizer trains (tiny-fluid's learned text encoder
    # is trainable); no integer buffer (the empty caption) does.
    mask = dict(named_leaves(trainable_mask(tiny_model)))
    names = [name for name, _ in named_leaves(tiny_model)]
    assert {"null_ids", "null_mask"} <= set(names)
    for name, x in named_leaves(tiny_model):
        assert mask[name] == (eqx.is_inexact_array(x) and not name.startswith("tokenizer.")), name


def test_decay_mask_of_a_tiny_model(tiny_params):
    mask = as_dict(decay_mask(tiny_params))
    assert {name for name, decays in mask.items() if decays} == TINY_FLUID_DECAYED
    for name, x in named_leaves(tiny_params):
        assert bool(mask[name]) == promised_decay(name, x.ndim, ".layers." in name), name
    # Matrices that are not decayed, each for its rule.
    for name in ("head.final_linear.weight", "backbone.blocks.layers.attn_norm.weight",
                 "backbone.blocks.layers.mlp.fc1.bias", "text_encoder.token_embed.weight",
                 "backbone.pos_embed", "token_embedding.layer.weight"):
        assert dict(named_leaves(tiny_params))[name].ndim >= 2 and not mask[name], name


@pytest.mark.parametrize("variant", VARIANTS)
def test_decay_mask_keeps_its_promise_in_every_tiny_variant(variant):
    model = abstract_model(get_config(f"tiny-{variant}").model)
    mask = as_dict(decay_mask(model))
    for name, x in named_leaves(model):
        if isinstance(x, jax.ShapeDtypeStruct):
            assert bool(mask[name]) == promised_decay(name, x.ndim, ".layers." in name), name


def test_decay_mask_of_a_trainable_t5():
    # T5 stores its stacked RMS-norm scales as bare arrays (`layers.attn_norm`, 2-D with the
    # layer axis): norms all the same.
    t5 = eqx.filter_eval_shape(
        lambda k: T5TextEncoder(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                num_heads=4, trainable=True, key=k), jr.key(0))
    mask = as_dict(decay_mask({"text_encoder": t5}))
    want = {f"text_encoder.layers.{w}": True
            for w in ("q", "k", "v", "o", "wi", "wi_linear", "wo")}
    want |= {"text_encoder.layers.attn_norm": False, "text_encoder.layers.ff_norm": False,
             "text_encoder.final_norm": False, "text_encoder.embed": False,
             # A relative-position bias table: a matrix no rule names (MAR's and HF's
             # recipes decay it too).
             "text_encoder.relative_bias": True}
    assert {k: bool(v) for k, v in mask.items()} == want


# One leaf for each rule, decayed or not (all of them would only lengthen compilation).
SAMPLE = (
    "backbone.blocks.layers.attn.qkv.weight",  # a stacked matrix: decayed
    "aligner.proj.weight",  # a matrix: decayed
    "backbone.blocks.layers.attn.qkv.bias",  # a stacked bias, 2-D
    "backbone.blocks.layers.mlp_norm.weight",  # a stacked norm scale, 2-D
    "head.final_linear.weight",  # the head's matrix
    "token_embedding.layer.weight",  # the token embedding's matrix
    "backbone.pos_embed",
    "backbone.norm.weight",  # a vector
)


def test_adamw_decays_exactly_the_masked_leaves_of_a_tiny_model(tiny_params):
    config = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=None)
    params = jtu.tree_map_with_path(lambda p, x: x if path_name(p) in SAMPLE else None,
                                    tiny_params)
    assert sorted(as_dict(params)) == sorted(SAMPLE)
    rng = np.random.default_rng(7)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
             for _ in range(2)]
    got = run_optimizer(make_optimizer(config, 2), params, grads)
    want = numpy_adamw(as_dict(params), [as_dict(g) for g in grads], config=config,
                       total_steps=2, decayed=TINY_FLUID_DECAYED)
    for step_got, step_want in zip(got, want, strict=True):
        assert_close(as_dict(step_got), step_want)


# -- the whole optimiser ---------------------------------------------------------------------------
def _named_tree(rng):
    """Leaves whose names meet every rule: a stacked matrix and its bias, a stacked norm,
    a head matrix, an embedding, a plain matrix, a vector, a frozen (None) leaf."""
    shapes = {"blocks.layers.attn.qkv.weight": (2, 6, 3), "blocks.layers.attn.qkv.bias": (2, 6),
              "blocks.layers.attn_norm.weight": (2, 3), "head.fc.weight": (4, 3),
              "pos_embed": (5, 3), "proj.weight": (3, 3), "scale": (3,)}
    tree = {"blocks": {"layers": {"attn": {"qkv": {}}, "attn_norm": {}}}, "head": {"fc": {}},
            "proj": {}, "frozen": None}
    for name, shape in shapes.items():
        *path, last = name.split(".")
        node = tree
        for part in path:
            node = node[part]
        node[last] = away_from_zero(rng, shape)
    return tree


NAMED_TREE_DECAYED = {"blocks.layers.attn.qkv.weight", "proj.weight"}


@pytest.mark.parametrize("config", [
    # Fluid's betas; a warm-up (the first update has rate 0), then constant; clipped at 1.
    OptimConfig(learning_rate=1e-2, warmup_steps=2, grad_clip=1.0, weight_decay=0.1),
    # A cosine over the 3 steps, other betas, no clipping.
    OptimConfig(learning_rate=3e-2, schedule="cosine", warmup_steps=0, b1=0.8, b2=0.99,
                weight_decay=0.05, grad_clip=None),
], ids=["warmup-constant-clipped", "cosine-unclipped"])
def test_make_optimizer_equals_numpy_adamw(config):
    rng = np.random.default_rng(8)
    params = _named_tree(rng)
    assert {k for k, v in as_dict(decay_mask(params)).items() if v} == NAMED_TREE_DECAYED
    grads = [jax.tree.map(lambda x, i=i: x * np.float32(0.5**i), _named_tree(rng))  # norms fall
             for i in range(3)]
    got = run_optimizer(make_optimizer(config, 3), params, grads)
    want = numpy_adamw(as_dict(params), [as_dict(g) for g in grads], config=config,
                       total_steps=3, decayed=NAMED_TREE_DECAYED)
    for step_got, step_want in zip(got, want, strict=True):
        assert_close(as_dict(step_got), step_want)
        assert step_got["frozen"] is None


# MAR's rule (`decay_rules="mar"`, its `add_weight_decay`): everything but the head, biases and
# norms, so the embedding and the bare vector are decayed too.
NAMED_TREE_DECAYED_MAR = {"blocks.layers.attn.qkv.weight", "proj.weight", "pos_embed", "scale"}


def test_make_optimizer_with_mars_decay_rule_equals_numpy_adamw():
    config = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=None,
                         decay_rules="mar")
    rng = np.random.default_rng(9)
    params = _named_tree(rng)
    assert {k for k, v in as_dict(decay_mask(params, "mar")).items() if v} == (
        NAMED_TREE_DECAYED_MAR)
    grads = [_named_tree(rng) for _ in range(2)]
    got = run_optimizer(make_optimizer(config, 2), params, grads)
    want = numpy_adamw(as_dict(params), [as_dict(g) for g in grads], config=config,
                       total_steps=2, decayed=NAMED_TREE_DECAYED_MAR)
    for step_got, step_want in zip(got, want, strict=True):
        assert_close(as_dict(step_got), step_want)
    with pytest.raises(ValueError, match="decay_rules"):
        OptimConfig(decay_rules="timm")
