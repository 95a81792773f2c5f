"""The model-level fast-sampling switches of `FluidModel.generate`: a guidance interval and
the head's chain (one length, or a DiSA schedule over progress). Every switch off gives the
samples of before the switches existed."""

import dataclasses
import sys
import typing
from pathlib import Path

import chex
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid._errors import ConfigError
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
        (0.0, 1.0), (9, 3))
    assert sampling_switches(head, cfg=3.0, head_steps=np.int64(4)) == (None, 4)
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
