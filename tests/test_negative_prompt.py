"""Negative prompts: guidance's unconditional half reads them in place of the empty caption."""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fluid
from fluid._errors import ConfigError
from fluid.build import build_model
from fluid.data.shapes import ShapesDataset
from fluid.presets import get_config
from fluid.recipes import make_text_tokenizer
from fluid.sample import sample_images

TEXT_LEN = 16


@pytest.fixture(scope="module")
def pipe():
    config = get_config("tiny-discrete-random", **{"model.backbone.depth": 1,
                                                   "data.fit_images": 16})
    config = dataclasses.replace(config, sample_steps=2, sample_cfg=3.0)
    text_tokenizer = make_text_tokenizer(ShapesDataset(16, size=64), config.model.text_vocab_size)
    model = build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0))
    return fluid.Pipeline(model, text_tokenizer, config)


def _sample(pipe, prompts, **kw):
    return sample_images(pipe.model, pipe.text_tokenizer, prompts, text_len=TEXT_LEN,
                         key=jr.key(3), steps=2, cfg=3.0, **kw)


def test_a_negative_prompt_is_read_where_the_empty_caption_was(pipe):
    prompts = ["a red circle", "two blue squares"]
    negative = "a green triangle"
    pushed = _sample(pipe, prompts, negative_prompts=[negative, negative])
    # The same model with the negative prompt as its empty caption, sampled without one.
    ids, mask = pipe.text_tokenizer.encode([negative], TEXT_LEN)
    swapped = eqx.tree_at(lambda m: (m.null_ids, m.null_mask), pipe.model,
                          (jnp.asarray(ids[0]), jnp.asarray(mask[0])))
    expected = sample_images(swapped, pipe.text_tokenizer, prompts, text_len=TEXT_LEN,
                             key=jr.key(3), steps=2, cfg=3.0)
    np.testing.assert_array_equal(pushed, expected)
    assert np.abs(pushed - _sample(pipe, prompts)).max() > 0.1  # it changes the images


def test_the_empty_negative_prompt_changes_nothing(pipe):
    prompts = ["a red circle", "two blue squares"]
    np.testing.assert_array_equal(_sample(pipe, prompts, negative_prompts=["", ""]),
                                  _sample(pipe, prompts))


def test_negative_prompts_are_per_prompt(pipe):
    prompts = ["a red circle", "a red circle"]
    mixed = _sample(pipe, prompts, negative_prompts=["", "a red circle"])
    plain = _sample(pipe, prompts)
    np.testing.assert_array_equal(mixed[0], plain[0])
    assert np.abs(mixed[1] - plain[1]).max() > 0.1


def test_bad_negative_prompts_are_refused_with_what_to_do(pipe):
    with pytest.raises(ConfigError, match="one negative prompt per prompt"):
        _sample(pipe, ["a red circle", "a square"], negative_prompts=["x"])
    with pytest.raises(ConfigError, match="cfg above 1"):
        sample_images(pipe.model, pipe.text_tokenizer, ["a red circle"], text_len=TEXT_LEN,
                      steps=2, cfg=1.0, negative_prompts=["a square"])
    with pytest.raises(ValueError, match="both negative_ids and negative_mask"):
        ids, mask = pipe.text_tokenizer.encode(["a red circle"], TEXT_LEN)
        pipe.model.generate(ids, mask, key=jr.key(0), steps=2, cfg=3.0, negative_ids=ids)
    with pytest.raises(ConfigError, match="one per prompt"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"])


def test_the_pipeline_takes_one_negative_prompt_for_all(pipe):
    prompts = ["a red circle", "two blue squares"]
    one = pipe(prompts, seed=3, negative_prompt="a green triangle", num_images_per_prompt=2)
    each = pipe(prompts, seed=3, negative_prompt=["a green triangle"] * 2,
                num_images_per_prompt=2)
    assert len(one) == 4
    for a, b in zip(one, each):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = pipe(prompts, seed=3, num_images_per_prompt=2)
    assert any(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() > 0
               for a, b in zip(one, plain))
