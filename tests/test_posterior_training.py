"""Training on posterior samples of a KL tokenizer, as MAR does: a cache of the moments of
each image and its flip, and a fresh draw per example and step from the step's key."""

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import tiny_config, untrained_pipeline

from fluid.config import ComponentSpec
from fluid.presets import get_config
from fluid.recipes import CachedSource, CacheMismatchError, make_source, prepare
from fluid.tokenizers import (
    AbstractImageTokenizer,
    KLTokenizer,
    PatchTokenizer,
    draw_posterior_tokens,
)


def _config(tmp_path=None, *, sample_posterior=True, flip=None, steps=3, **changes):
    """A tiny posterior run (flips on, MAR's two views, unless `flip=False`)."""
    config = get_config("tiny-fluid", **{"model.backbone.depth": 1, "data.fit_images": 8,
                                         "steps": steps})
    kwargs = {"image_size": 16, "patch_size": 2, "scaling_factor": 0.2325,
              "sample_posterior": sample_posterior}
    model = dataclasses.replace(config.model, tokenizer=ComponentSpec(name="kl", kwargs=kwargs))
    cache = None if tmp_path is None else str(tmp_path / "cache")
    flip = sample_posterior if flip is None else flip
    data = dataclasses.replace(config.data, image_size=16, size=16, cache=cache, flip=flip)
    return dataclasses.replace(config, model=model, data=data, **changes)


def _losses(records):
    return np.array([r["loss"] for r in records])


def test_the_cache_holds_the_posterior_of_each_image_and_its_flip(tmp_path):
    config = _config(tmp_path)
    run = prepare(config, progress=False)
    assert isinstance(run.source, CachedSource) and len(run.source) == 16
    assert run.source.fingerprint["posterior"]
    assert not (tmp_path / "cache" / "tokens.npy").exists()
    tokenizer = run.model().tokenizer
    source = make_source(config.data)
    images = jnp.asarray(np.stack([source[i]["image"] for i in range(16)]))
    # The pair is the posterior of the image and of its flip, each alone.
    pair = tokenizer.posterior_pair(images[5])
    for j, x in enumerate((images[5], images[5][:, ::-1])):
        np.testing.assert_allclose(pair[j], jnp.stack(tokenizer.posterior(x)), atol=1e-6)
    # The cache holds the pairs of its images, computed (as it is) in a batch of 64 padded
    # with the first image: a batch rounds its convolutions apart from an image alone.
    padded = jnp.concatenate([images, jnp.broadcast_to(images[:1], (48, 16, 16, 3))])
    pairs = jax.jit(jax.vmap(tokenizer.posterior_pair))(padded)
    for i in (0, 5, 15):
        record = run.source[i]["posterior"]
        assert record.shape == (2, 2, 8, 8, 4)  # 4x the floats of the mean's tokens
        np.testing.assert_allclose(record, pairs[i], atol=1e-6)
    batch = next(run.trainer.loader)
    assert "tokens" not in batch and batch["posterior"].shape == (8, 2, 2, 8, 8, 4)
    # A step's tokens are draws from the batch's moments with its examples' keys.
    model = run.model()
    keys = jr.split(jr.key(7), 8)
    tokens = model._training_inputs(batch, keys)[0]
    for i in (0, 3):
        expected = draw_posterior_tokens(model.tokenizer, jnp.asarray(batch["posterior"][i]),
                                         jr.fold_in(keys[i], 5))
        np.testing.assert_allclose(tokens[i], expected, atol=1e-6)
    # Without a cache, the draw comes from the tokenizer's posterior of the image as loaded.
    tokens = model._training_inputs({"image": images[:2], "text_ids": batch["text_ids"][:2],
                                     "text_mask": batch["text_mask"][:2]}, keys[:2])[0]
    for i in range(2):
        expected = model.tokenizer.sample(images[i], key=jr.fold_in(keys[i], 5))
        np.testing.assert_allclose(tokens[i], expected, atol=1e-6)
    # The other kind of run refuses this cache, and says to rebuild it.
    with pytest.raises(CacheMismatchError, match="holds the posterior moments.*delete it to "
                                                 "rebuild"):
        prepare(_config(tmp_path, sample_posterior=False), progress=False)
    # So does a posterior run without flips: its cache holds one view of each image.
    with pytest.raises(CacheMismatchError, match="of its horizontal flip, but this run "
                                                 "trains on the posterior moments of each "
                                                 "image \\("):
        prepare(_config(tmp_path, flip=False), progress=False)


def test_without_flips_the_cache_holds_the_image_alone(tmp_path):
    run = prepare(_config(tmp_path, flip=False), progress=False)
    tokenizer = run.model().tokenizer
    source = make_source(run.config.data)
    images = jnp.asarray(np.stack([source[i]["image"] for i in range(16)]))
    padded = jnp.concatenate([images, jnp.broadcast_to(images[:1], (48, 16, 16, 3))])
    pairs = jax.jit(jax.vmap(tokenizer.posterior_pair))(padded)
    record = run.source[3]["posterior"]
    assert record.shape == (1, 2, 8, 8, 4)  # twice the floats of the mean's tokens
    np.testing.assert_allclose(record[0], pairs[3, 0], atol=1e-6)
    # Every draw is of the image itself, never of its flip.
    key = jr.key(3)
    np.testing.assert_allclose(draw_posterior_tokens(tokenizer, jnp.asarray(record), key),
                               draw_posterior_tokens(tokenizer, pairs[3, :1], key), atol=1e-6)


def test_a_cache_with_flips_needs_a_posterior_run(tmp_path):
    with pytest.raises(ValueError, match="data.flip=false.*sample_posterior=true"):
        get_config("tiny-fluid", **{"data.cache": str(tmp_path / "c"), "data.flip": True})
    config = _config(tmp_path, flip=True)  # a posterior run: its cache holds both views
    assert config.data.flip and config.data.cache


def test_a_draw_is_mean_plus_std_times_eps_of_the_picked_entry():
    tokenizer = KLTokenizer(16, patch_size=2, scaling_factor=0.2325, shift_factor=0.1,
                            sample_posterior=True, key=jr.key(0))
    moments = np.asarray(jr.normal(jr.key(1), (2, 2, 8, 8, 4)))
    for seed in range(4):
        key = jr.key(seed)
        k_pick, k_eps = jr.split(key)
        pick = int(jr.randint(k_pick, (), 0, 2))
        eps = np.asarray(jr.normal(k_eps, (8, 8, 4)))
        mean, logvar = moments[pick]
        latent = (mean + np.exp(0.5 * logvar) * eps - 0.1) * 0.2325
        # patchify: 2x2 patches, channels over patch rows, patch columns, latent channels
        expected = latent.reshape(4, 2, 4, 2, 4).transpose(0, 2, 1, 3, 4).reshape(16, 16)
        got = draw_posterior_tokens(tokenizer, jnp.asarray(moments), key)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_draws_average_the_two_means_with_the_posteriors_spread():
    tokenizer = KLTokenizer(16, patch_size=1, sample_posterior=True, key=jr.key(0))
    n = 4000
    keys = jr.split(jr.key(3), n)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(2, 8, 8, 4))
    logvars = rng.uniform(-2, 1, size=(2, 8, 8, 4))
    moments = jnp.asarray(np.stack([means, logvars], axis=1), jnp.float32)
    draws = np.asarray(jax.vmap(lambda k: draw_posterior_tokens(tokenizer, moments, k))(keys))
    draws = draws.reshape(n, 8, 8, 4)
    # A mixture of the two Gaussians with weights 1/2: its mean and variance.
    mix_mean = means.mean(0)
    var = np.exp(logvars)
    mix_var = var.mean(0) + ((means[0] - means[1]) / 2) ** 2
    # 6 standard errors: no element of 256 strays so far by chance (p < 1e-6 overall).
    np.testing.assert_array_less(np.abs(draws.mean(0) - mix_mean), 6 * np.sqrt(mix_var / n))
    # With one entry twice, the draws are that Gaussian: their variance over the posterior's
    # has standard error sqrt(2 / (n - 1)).
    same = jnp.stack([moments[0], moments[0]])
    draws = np.asarray(jax.vmap(lambda k: draw_posterior_tokens(tokenizer, same, k))(keys))
    ratio = draws.reshape(n, 8, 8, 4).var(0, ddof=1) / var[0]
    np.testing.assert_array_less(np.abs(ratio - 1), 6 * np.sqrt(2 / (n - 1)))
    # Far apart means: the entry is picked half the time.
    apart = moments.at[:, 0].set(jnp.asarray([-20.0, 20.0])[:, None, None, None])
    picks = np.asarray(jax.vmap(lambda k: draw_posterior_tokens(tokenizer, apart, k))(keys))
    assert abs((picks.mean(axis=(1, 2)) > 0).mean() - 0.5) < 6 * np.sqrt(0.25 / n)


def test_with_the_option_off_the_cache_holds_tokens_and_trains_as_from_images(tmp_path):
    off = _config(tmp_path, sample_posterior=False)
    cached = prepare(off, progress=False)
    assert set(cached.source.fingerprint) == {"version", "data", "tokenizer", "text"}
    assert (tmp_path / "cache" / "tokens.npy").exists()
    plain = prepare(_config(sample_posterior=False), progress=False)
    image = jnp.asarray(plain.source[2]["image"])
    np.testing.assert_allclose(cached.source[2]["tokens"],
                               cached.model().tokenizer.encode(image), atol=1e-6)
    np.testing.assert_allclose(_losses(cached.run()), _losses(plain.run()), rtol=1e-6)
    # A run that samples the posterior refuses this cache, and says to rebuild it.
    with pytest.raises(CacheMismatchError, match="holds tokens.*delete it to rebuild"):
        prepare(_config(tmp_path), progress=False)


def test_a_posterior_run_trains_and_resumes_exactly(tmp_path):
    config = _config(tmp_path, steps=24, checkpoint_every=8)
    straight = _losses(prepare(config, progress=False).run())
    assert np.isfinite(straight).all()
    assert straight[-6:].mean() < straight[:6].mean()
    first = prepare(config, out_dir=tmp_path / "run", progress=False)
    head = _losses(first.run(10))
    second = prepare(config, out_dir=tmp_path / "run", progress=False)
    assert second.step == 10
    tail = _losses(second.run())
    np.testing.assert_allclose(np.concatenate([head, tail]), straight, rtol=1e-6)


class WobblyPatches(AbstractImageTokenizer):
    """A plug-in tokenizer with a posterior that is no KL autoencoder: an image's patch
    tokens are the mean of a Gaussian of fixed spread; its moments are the mean and the
    log-variance of each view, `[views, 2, seq, token_dim]`."""

    patches: PatchTokenizer
    log_var: float = eqx.field(static=True, default=-3.0)
    token_kind: ClassVar[str] = "continuous"

    @property
    def image_size(self):
        return self.patches.image_size

    @property
    def grid(self):
        return self.patches.grid

    @property
    def token_dim(self):
        return self.patches.token_dim

    @property
    def vocab_size(self):
        return None

    @property
    def samples_posterior(self):
        return True

    def encode(self, image):
        return self.patches.encode(image)

    def decode(self, tokens):
        return self.patches.decode(tokens)

    def fit(self, images, *, key):
        return self

    def mean_tokens(self, image):
        return self.patches.encode(image)

    def sample_tokens(self, image, *, key):
        mean = self.patches.encode(image)
        return mean + jnp.exp(self.log_var / 2) * jr.normal(key, mean.shape)

    def posterior_moments(self, image, views):
        images = [image, image[:, ::-1]][:views]
        return jnp.stack([jnp.stack([m, jnp.full_like(m, self.log_var)])
                          for m in map(self.patches.encode, images)])

    def draw_tokens(self, moments, *, key):
        pick, eps = jr.split(key)
        mean, log_var = moments[jr.randint(pick, (), 0, moments.shape[0])]
        return mean + jnp.exp(log_var / 2) * jr.normal(eps, mean.shape)


def test_a_plug_in_tokenizer_with_a_posterior_trains_on_its_own_draws():
    # The model asks the tokenizer (its interface), never its class: a tokenizer fluid has
    # never heard of trains on draws from its cached moments and from its images.
    pipe = untrained_pipeline(tiny_config())
    assert not pipe.model.samples_posterior
    tokenizer = WobblyPatches(pipe.model.tokenizer)
    model = eqx.tree_at(lambda m: m.tokenizer, pipe.model, tokenizer)
    assert model.samples_posterior
    images = jr.uniform(jr.key(0), (3, 16, 16, 3), minval=-1.0, maxval=1.0)
    ids, mask = pipe.text_tokenizer.encode(["a red circle"] * 3, pipe.config.model.text_len)
    keys = jr.split(jr.key(7), 3)
    moments = jax.vmap(lambda x: tokenizer.posterior_moments(x, 2))(images)
    cached = model._training_inputs({"posterior": moments, "text_ids": ids, "text_mask": mask},
                                    keys)[0]
    loaded = model._training_inputs({"image": images, "text_ids": ids, "text_mask": mask},
                                    keys)[0]
    for i in range(3):
        draw_key = jr.fold_in(keys[i], 5)
        np.testing.assert_array_equal(cached[i], tokenizer.draw_tokens(moments[i], key=draw_key))
        np.testing.assert_array_equal(loaded[i], tokenizer.sample_tokens(images[i], key=draw_key))
    # Draws, not the mean; validation (no keys) takes the mean.
    assert not np.allclose(cached, jax.vmap(tokenizer.mean_tokens)(images))
    np.testing.assert_array_equal(model.encode_images(images),
                                  jax.vmap(tokenizer.mean_tokens)(images))
    # A tokenizer without a posterior says what one needs.
    with pytest.raises(NotImplementedError, match="PatchTokenizer does not sample a posterior.*"
                                                  "draw_tokens"):
        pipe.model.tokenizer.draw_tokens(moments[0], key=keys[0])
