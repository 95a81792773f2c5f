"""The model-level fast-sampling switches of `FluidModel.generate`: a guidance interval, the
head's chain (one length, or a DiSA schedule over progress) and the reuse of the guidance
residual between refreshes (LazyMAR). Every switch off gives the samples of before the
switches existed."""

import dataclasses
import sys
import typing
from pathlib import Path

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid._errors import ConfigError
from fluid._types import BIDIRECTIONAL
from fluid.backbones import AbstractBidirectionalBackbone
from fluid.build import compose
from fluid.heads import AbstractIterativeHead
from fluid.model import sampling_switches
from fluid.presets import tiny
from fluid.sample import sample_images
from fluid.text import ClassLabelTokenizer

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from model_samples_golden import (
    SETTINGS,
    TEXT_LEN,
    VOCAB,
    golden_captions,
    golden_models,
    sample,
)

GOLDEN = Path(__file__).parent / "fixtures" / "model_samples_golden.npz"


@pytest.fixture(scope="module")
def models():
    return golden_models()


@pytest.mark.parametrize("variant", ["fluid", "continuous-raster", "discrete-random"])
def test_every_switch_off_gives_the_samples_of_before_the_switches(models, variant):
    expected = np.load(GOLDEN)[variant]
    np.testing.assert_array_equal(np.asarray(sample(models[variant])), expected)
    # A guidance interval over every step is plain guidance.
    np.testing.assert_array_equal(
        np.asarray(sample(models[variant], cfg_interval=(0.0, 1.0))), expected
    )


def test_the_heads_own_chain_given_as_head_steps_changes_nothing(models):
    expected = np.load(GOLDEN)["fluid"]
    chain = models["fluid"].head.sampling_steps
    np.testing.assert_array_equal(np.asarray(sample(models["fluid"], head_steps=chain)),
                                  expected)
    np.testing.assert_array_equal(
        np.asarray(sample(models["fluid"], head_steps=(chain, chain, chain))), expected
    )
    assert np.abs(np.asarray(sample(models["fluid"], head_steps=2)) - expected).max() > 1e-3


# -- what each step is given, watched through a head that writes it into its token -----------
@typing.final
class SpyHead(AbstractIterativeHead):
    """Writes into its token the guidance scale it was given, whether it had an
    unconditional condition, and its chain length (-1: its own)."""

    token_kind: typing.ClassVar[str] = "continuous"
    cond_dim: int = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    sampling_steps: int = eqx.field(static=True, default=7)
    progress_steps: tuple[int, ...] | None = eqx.field(static=True, default=None)

    def loss(self, z, target, *, key):
        return jnp.sum(z)

    def sample(self, z, z_uncond, cfg, temperature, *, key, steps=None):
        guided = 0.0 if z_uncond is None else 1.0
        chain = -1.0 if steps is None else float(steps)
        head = jnp.stack([jnp.asarray(cfg, jnp.float32), jnp.asarray(guided), jnp.asarray(chain)])
        return jnp.concatenate([head, jnp.zeros((self.token_dim - 3,))])

    def num_evaluations(self, steps=None):
        return self.sampling_steps if steps is None else steps


@pytest.fixture(scope="module")
def raster():
    """A raster model (position p is produced at step p, progress p / n) with the spy head."""
    config = tiny("continuous-raster").model
    null_ids = np.zeros(TEXT_LEN, np.int32)
    null_ids[0] = 1
    model = compose(config, text_vocab_size=VOCAB, null_text=(null_ids, null_ids == 1),
                    key=jr.key(0))
    return eqx.tree_at(lambda m: m.head, model,
                       SpyHead(model.head.cond_dim, model.tokenizer.token_dim))


def _spy(model, **kw):
    ids, mask = golden_captions()
    settings = {**SETTINGS, "cfg_schedule": "constant", **kw}
    out = eqx.filter_jit(
        lambda m: m.generate_tokens(ids, mask, key=jr.key(3), **settings)
    )(model)
    return np.asarray(out[..., 0]), np.asarray(out[..., 1]), np.asarray(out[..., 2])


def test_a_guidance_interval_guides_exactly_the_steps_inside_it(raster):
    n = raster.seq_len
    progress = np.arange(n) / n
    for lo, hi in [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0), (0.0, 0.0)]:
        cfg, guided, _ = _spy(raster, cfg_interval=(lo, hi))
        inside = (progress >= lo) & (progress < hi)
        for row in range(2):
            np.testing.assert_array_equal(guided[row], inside.astype(np.float32))
            np.testing.assert_array_equal(cfg[row], np.where(inside, 3.0, 1.0))


def test_head_steps_and_the_heads_schedule_set_each_tokens_chain(raster):
    n = raster.seq_len
    level = np.minimum(np.floor(np.arange(n) / n * 3), 2).astype(int)
    _, _, chain = _spy(raster)
    np.testing.assert_array_equal(chain, -1.0)  # the head's own: no `steps` passed
    _, _, chain = _spy(raster, head_steps=4)
    np.testing.assert_array_equal(chain, 4.0)
    _, _, chain = _spy(raster, head_steps=(9, 5, 2))
    np.testing.assert_array_equal(chain[0], np.array([9, 5, 2])[level])
    # A head built with a schedule (`progress_steps`) gets it without being asked.
    scheduled = eqx.tree_at(
        lambda m: m.head, raster,
        dataclasses.replace(raster.head, progress_steps=(8, 3, 2)),
    )
    _, _, chain = _spy(scheduled)
    np.testing.assert_array_equal(chain[1], np.array([8, 3, 2])[level])


def test_bad_switches_are_refused(models):
    ids, mask = golden_captions()
    with pytest.raises(ValueError, match="cfg_interval"):
        models["fluid"].generate(ids, mask, key=jr.key(0), steps=2, cfg=3.0,
                                 cfg_interval=(0.6, 0.2))
    with pytest.raises(ValueError, match="head_steps sets the chain"):
        models["discrete-random"].generate(ids, mask, key=jr.key(0), steps=2, cfg=3.0,
                                           head_steps=3)


def test_one_check_of_the_switches_for_every_entry_point(models):
    # `sampling_switches` normalises what `generate` takes (static, hashable) and refuses the
    # same settings whichever entry point asks: the model, `fluid.sample`.
    head = models["fluid"].head
    assert sampling_switches(head, cfg=3.0, cfg_interval=[0.0, 1.0], head_steps=[9, 3]) == (
        (0.0, 1.0), (9, 3), None)
    assert sampling_switches(head, cfg=3.0, head_steps=np.int64(4)) == (None, 4, None)
    ids, mask = golden_captions()
    bad = [
        ({"cfg": 1.0, "negative": True}, "cfg above 1"),
        ({"cfg": 3.0, "cfg_interval": (-0.1, 0.5)}, "0 <= lo <= hi <= 1"),
        ({"cfg": 3.0, "cfg_interval": (0.2, 1.5)}, "0 <= lo <= hi <= 1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            sampling_switches(head, **kwargs)
    softmax = models["discrete-random"]
    with pytest.raises(ConfigError, match="head_steps sets the chain.*SoftmaxHead"):
        sampling_switches(softmax.head, cfg=3.0, head_steps=3)
    with pytest.raises(ConfigError, match="head_steps sets the chain"):
        # Refused before any caption is read.
        sample_images(softmax, ClassLabelTokenizer(10), ["1"], text_len=ids.shape[1], steps=2,
                      head_steps=3)
    with pytest.raises(ConfigError, match="cfg above 1"):
        models["fluid"].generate(ids, mask, key=jr.key(0), steps=2, cfg=1.0,
                                 negative_ids=ids, negative_mask=mask)


def test_a_guidance_interval_on_the_random_order_keeps_the_sample_shape(models):
    # The random order's steps produce several positions each; the interval splits its
    # scans by guidance, and the samples stay finite and of the same shape.
    out = sample(models["fluid"], cfg_interval=(0.0, 0.5), head_steps=(6, 3))
    chex.assert_shape(out, (2, 16, 48))
    assert jnp.all(jnp.isfinite(out))


# -- guidance residual reuse (LazyMAR) --------------------------------------------------------
def test_a_residual_refreshed_every_step_is_plain_guidance(models):
    # The random order (bidirectional), and raster with a causal and a bidirectional backbone.
    for variant in ["fluid", "continuous-raster"]:
        np.testing.assert_array_equal(np.asarray(sample(models[variant], cfg_refresh=1)),
                                      np.load(GOLDEN)[variant])
    config = tiny("fluid").model
    config = dataclasses.replace(config, order=tiny("continuous-raster").model.order)
    null_ids = np.zeros(TEXT_LEN, np.int32)
    null_ids[0] = 1
    raster = compose(config, text_vocab_size=VOCAB, null_text=(null_ids, null_ids == 1),
                     key=jr.key(0))
    np.testing.assert_array_equal(np.asarray(sample(raster, cfg_refresh=1)),
                                  np.asarray(sample(raster)))
    # Reuse changes the samples, and keeps them finite.
    lazy = sample(models["fluid"], cfg_refresh=2)
    assert jnp.all(jnp.isfinite(lazy))
    assert np.abs(np.asarray(lazy) - np.load(GOLDEN)["fluid"]).max() > 1e-3


_PASSES: list[tuple[int, bool]] = []


@typing.final
class SpyBackbone(AbstractBidirectionalBackbone):
    """Reads only which positions are known (never the tokens, so that every run produces
    the same positions at the same steps): the condition at `p` is `(v * (1 + known), p,
    known, 0, ...)` with `v` the first channel of the context's first token. Each pass
    under one context is logged in `_PASSES` as `(known, unconditional)`."""

    attention: typing.ClassVar[str] = BIDIRECTIONAL
    dim: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)

    def __call__(self, x, known, context, context_mask, *, order=None):
        return self.at_positions(x, known, context, context_mask, jnp.arange(self.seq_len))

    def at_positions(self, x, known, context, context_mask, positions):
        count = jnp.sum(known).astype(jnp.float32)
        # The empty caption is the only context with a single real token.
        jax.debug.callback(lambda c, u: _PASSES.append((int(c), bool(u))), count,
                           jnp.sum(context_mask) == 1)
        v = context[0, 0].astype(jnp.float32)
        columns = [jnp.full(positions.shape, v * (1.0 + count)),
                   positions.astype(jnp.float32), jnp.full(positions.shape, count)]
        z = jnp.stack(columns, axis=1)
        return jnp.concatenate([z, jnp.zeros((positions.shape[0], self.dim - 3))], axis=1)


@typing.final
class ConditionHead(AbstractIterativeHead):
    """Writes into its token the first channel of each condition and the known count."""

    token_kind: typing.ClassVar[str] = "continuous"
    cond_dim: int = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    sampling_steps: int = eqx.field(static=True, default=1)
    progress_steps: tuple[int, ...] | None = eqx.field(static=True, default=None)

    def loss(self, z, target, *, key):
        return jnp.sum(z)

    def sample(self, z, z_uncond, cfg, temperature, *, key, steps=None):
        u = jnp.full((), jnp.nan) if z_uncond is None else z_uncond[0]
        return jnp.concatenate([jnp.stack([z[0], u, z[2]]), jnp.zeros((self.token_dim - 3,))])

    def num_evaluations(self, steps=None):
        return 1


@pytest.mark.parametrize("variant", ["fluid", "continuous-raster"])
def test_the_unconditional_pass_runs_only_at_refresh_steps(models, variant):
    model = models[variant]
    model = eqx.tree_at(
        lambda m: (m.backbone, m.head), model,
        (SpyBackbone(model.backbone.dim, model.seq_len),
         ConditionHead(model.head.cond_dim, model.tokenizer.token_dim)),
    )
    ids, mask = golden_captions()

    def run(**kw):
        _PASSES.clear()
        out = eqx.filter_jit(lambda m: m.generate_tokens(
            ids, mask, key=jr.key(3), **{**SETTINGS, "steps": 6, **kw}))(model)
        jax.effects_barrier()
        return np.asarray(out), sorted(set(_PASSES))

    plain, passes = run()
    # The steps, by the known count before each (the same in every run).
    steps = np.unique(plain[0, :, 2])
    assert passes == sorted({(int(c), u) for c in steps for u in (False, True)})
    for k, interval in [(2, None), (3, None), (2, (0.2, 1.0))]:
        lazy, passes = run(cfg_refresh=k, cfg_interval=interval)
        guided = [c for c in steps if interval is None or c / model.seq_len >= interval[0]]
        refreshed = guided[::k]
        # (An unguided step, outside the interval, runs the conditional pass alone: a
        # bidirectional backbone keeps no state per context.)
        assert passes == sorted({(int(c), False) for c in steps}
                                | {(int(c), True) for c in refreshed}), (k, interval)
        for row in range(2):
            # Every run produces the same positions with the same conditional conditions.
            np.testing.assert_array_equal(lazy[row, :, [0, 2]], plain[row, :, [0, 2]])
            for c in guided:
                at = plain[row, :, 2] == c
                last = max(r for r in refreshed if r <= c)
                # The residual of the last refresh, the same at every position.
                r = (plain[row, :, 0] - plain[row, :, 1])[plain[row, :, 2] == last][0]
                chex.assert_trees_all_close(lazy[row, at, 1], lazy[row, at, 0] - r, atol=1e-5)
                if c not in refreshed:
                    assert np.abs(lazy[row, at, 1] - plain[row, at, 1]).min() > 1e-3


def test_bad_refresh_periods_are_refused(models):
    head, backbone = models["fluid"].head, models["fluid"].backbone
    assert sampling_switches(head, cfg=3.0, cfg_refresh=np.int64(4), backbone=backbone) == (
        None, None, 4)
    # Without guidance there is no unconditional pass to skip: a no-op.
    assert sampling_switches(head, cfg=1.0, cfg_refresh=4, backbone=backbone)[2] is None
    for bad in [0, -2, True]:
        with pytest.raises(ConfigError, match="cfg_refresh .* integer >= 1"):
            sampling_switches(head, cfg=3.0, cfg_refresh=bad, backbone=backbone)
    causal = models["continuous-raster"]
    ids, mask = golden_captions()
    with pytest.raises(ConfigError, match="only a bidirectional backbone.*CausalTransformer"):
        causal.generate(ids, mask, key=jr.key(0), steps=2, cfg=3.0, cfg_refresh=2)
    with pytest.raises(ConfigError, match="cfg_refresh"):
        sample_images(causal, ClassLabelTokenizer(10), ["1"], text_len=ids.shape[1], steps=2,
                      cfg_refresh=2)


@pytest.mark.parametrize("interval", [(0.0, 0.5), (0.5, 1.0)])
def test_outside_the_interval_a_backbone_without_context_state_skips_the_unconditional_pass(
        models, monkeypatch, interval):
    # The samples are those of running both passes at every step (as a backbone with state
    # per context must), bit for bit; the unconditional pass runs at the guided steps only.
    model = models["fluid"]
    assert not model.backbone.context_state
    skipped = np.asarray(sample(model, cfg_interval=interval))
    monkeypatch.setattr(type(model.backbone), "context_state", True)
    np.testing.assert_array_equal(skipped, np.asarray(sample(model, cfg_interval=interval)))
    monkeypatch.undo()

    spied = eqx.tree_at(
        lambda m: (m.backbone, m.head), model,
        (SpyBackbone(model.backbone.dim, model.seq_len),
         ConditionHead(model.head.cond_dim, model.tokenizer.token_dim)),
    )
    ids, mask = golden_captions()

    def passes():
        _PASSES.clear()
        out = eqx.filter_jit(lambda m: m.generate_tokens(
            ids, mask, key=jr.key(3), **{**SETTINGS, "steps": 6, "cfg_interval": interval}))(
            spied)
        jax.effects_barrier()
        return np.asarray(out), sorted(set(_PASSES))

    out, seen = passes()
    steps = np.unique(out[0, :, 2])
    guided = [int(c) for c in steps if interval[0] <= c / model.seq_len < interval[1]]
    assert 0 < len(guided) < len(steps)
    assert seen == sorted({(int(c), False) for c in steps} | {(c, True) for c in guided})
    monkeypatch.setattr(SpyBackbone, "context_state", True)
    _, seen = passes()
    assert seen == sorted({(int(c), u) for c in steps for u in (False, True)})
