"""A whole model from pretrained parts: a `kl` tokenizer and a `t5` text encoder read from
Hugging Face-format folders (written here from random weights), trained and sampled, with
their outputs cached."""

import dataclasses

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest
from helpers import write_tiny_t5_folder
from test_t5 import TINY

from fluid.config import ComponentSpec
from fluid.presets import get_config
from fluid.recipes import CachedSource, prepare
from fluid.sample import sample_images
from fluid.text import T5CaptionTokenizer
from fluid.tokenizers import KLTokenizer
from fluid.train import load_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    vae = KLTokenizer(32, patch_size=2, key=jr.key(0))
    vae.save_pretrained(root / "vae")
    write_tiny_t5_folder(root / "t5")
    return root


def _config(folders, **data):
    config = get_config("tiny-fluid", **{"model.backbone.depth": 1, "data.fit_images": 8,
                                         "steps": 4, "model.text_len": 16})
    model = dataclasses.replace(
        config.model,
        tokenizer=ComponentSpec(name="kl", kwargs={"path": str(folders / "vae"),
                                                   "image_size": 32, "patch_size": 2}),
        text_encoder=ComponentSpec(name="t5", kwargs={"path": str(folders / "t5")}),
    )
    data = dataclasses.replace(config.data, image_size=32, size=48, **data)
    return dataclasses.replace(config, model=model, data=data)


def _arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def test_kl_and_t5_from_folders_train_sample_and_cache(folders, tmp_path):
    config = _config(folders)
    trainer = prepare(config, out_dir=tmp_path / "run", progress=False)
    model = trainer.model()
    assert isinstance(trainer.text_tokenizer, T5CaptionTokenizer)
    assert model.tokenizer.grid == (8, 8) and model.tokenizer.token_dim == 16
    frozen_before = _arrays((model.tokenizer, model.text_encoder))
    losses = [r["loss"] for r in trainer.run()]
    assert np.all(np.isfinite(losses))
    model = trainer.model()
    for a, b in zip(frozen_before, _arrays((model.tokenizer, model.text_encoder))):
        np.testing.assert_array_equal(a, b)  # pretrained parts stay frozen

    images = sample_images(model, trainer.text_tokenizer, ["a red circle", ""],
                           text_len=16, key=jr.key(0), steps=2, cfg=2.0)
    assert images.shape == (2, 32, 32, 3) and np.all(np.isfinite(np.asarray(images)))

    # A checkpoint of the run reads back with the T5 caption tokenizer.
    loaded, text_tokenizer, _ = load_model(tmp_path / "run" / "checkpoints" / "4")
    assert isinstance(text_tokenizer, T5CaptionTokenizer)
    for a, b in zip(_arrays(loaded), _arrays(model)):
        np.testing.assert_array_equal(a, b)

    # Latents and T5 outputs cached once give the same training as computing them per step.
    cached = prepare(_config(folders, cache=str(tmp_path / "cache")), progress=False)
    assert isinstance(cached.source, CachedSource)
    assert cached.source[0]["text_hidden"].shape == (16, TINY["d_model"])
    plain = prepare(config, progress=False)
    np.testing.assert_allclose([r["loss"] for r in cached.run()],
                               [r["loss"] for r in plain.run()], rtol=1e-5)
