"""The token cache: computed once, trained from, refused when it no longer matches."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fluid.config import ComponentSpec
from fluid.presets import get_config
from fluid.recipes import CachedSource, CacheMismatchError, prepare


def _config(**data):
    config = get_config(
        "tiny-fluid", **{"model.backbone.depth": 1, "data.fit_images": 16, "steps": 3}
    )
    return dataclasses.replace(config, data=dataclasses.replace(config.data, size=40, **data))


def _losses(trainer):
    return np.array([r["loss"] for r in trainer.run()])


def test_training_from_the_cache_equals_training_from_images(tmp_path):
    config = _config()
    plain = prepare(config, progress=False)
    cached = prepare(dataclasses.replace(
        config, data=dataclasses.replace(config.data, cache=str(tmp_path / "cache"))
    ), progress=False)
    assert isinstance(cached.source, CachedSource) and len(cached.source) == 40
    np.testing.assert_allclose(_losses(cached), _losses(plain), rtol=1e-6)
    batch = next(cached.trainer.loader)
    assert "image" not in batch
    assert batch["tokens"].shape == (8, cached.model().seq_len, 48)
    # The cache holds what the tokenizer computes, image by image.
    item = plain.source[5]
    tokens = np.asarray(plain.model().tokenizer.encode(jnp.asarray(item["image"])))
    np.testing.assert_allclose(cached.source[5]["tokens"], tokens, atol=1e-6)
    assert cached.source[5]["caption"] == item["caption"]


def test_frozen_text_encoder_outputs_are_cached(tmp_path):
    config = _config(cache=str(tmp_path / "cache"))
    text = ComponentSpec(name="learned", kwargs={**config.model.text_encoder.kwargs,
                                                 "trainable": False})
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, text_encoder=text))
    plain_config = dataclasses.replace(config, data=dataclasses.replace(config.data, cache=None))
    cached = prepare(config, progress=False)
    plain = prepare(plain_config, progress=False)
    np.testing.assert_allclose(_losses(cached), _losses(plain), rtol=1e-6)
    batch = next(cached.trainer.loader)
    dim = config.model.text_encoder.kwargs["dim"]
    assert batch["text_hidden"].shape == (8, config.model.text_len, dim)


def test_a_cache_from_other_settings_is_refused(tmp_path):
    prepare(_config(cache=str(tmp_path / "cache")), progress=False)
    with pytest.raises(CacheMismatchError, match=r"data\.object_scale \(cached: 1\.0, now: 1\.5\)"):
        prepare(_config(cache=str(tmp_path / "cache"), object_scale=1.5), progress=False)


def test_unbounded_and_flipped_sources_are_not_cached(tmp_path):
    config = get_config("tiny-fluid", **{"model.backbone.depth": 1, "data.fit_images": 16,
                                         "data.cache": str(tmp_path / "c")})
    with pytest.raises(ValueError, match=r"data\.size"):
        prepare(config, progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="data.flip=false"):
        get_config("tiny-fluid", **{"data.cache": str(tmp_path / "c"), "data.flip": True})


def test_unreadable_images_are_left_out_of_the_cache(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(18):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    (folder / "7.png").write_bytes(b"not a png")
    config = get_config("tiny-fluid", **{
        "model.backbone.depth": 1, "data.fit_images": 4, "data.path": str(folder),
        "data.dataset": "folder", "data.cache": str(tmp_path / "cache"), "steps": 1,
    })
    with pytest.warns(UserWarning, match="7.png"):
        trainer = prepare(config, progress=False)
    assert len(trainer.source) == 17
    assert "a picture number 7" not in {trainer.source.caption(i) for i in range(17)}
    trainer.run()


def test_the_fingerprint_follows_a_tokenizers_settings_not_only_its_arrays():
    # Two kl tokenizers with the same weights whose latent scale differs give other tokens:
    # a cache of one must not be read for the other.
    import equinox as eqx
    import jax.random as jr

    from fluid.build import abstract_model
    from fluid.data.shapes import ShapesDataset
    from fluid.recipes import cache_fingerprint, make_text_tokenizer
    from fluid.tokenizers import KLTokenizer

    model = abstract_model(get_config("tiny-fluid").model)  # only its tokenizer is read
    assert model.text_encoder.trainable
    text_tokenizer = make_text_tokenizer(ShapesDataset(16, size=64), 64)

    def fingerprint(**kwargs):
        tokenizer = KLTokenizer(16, patch_size=2, key=jr.key(0), **kwargs)
        with_kl = eqx.tree_at(lambda m: m.tokenizer, model, tokenizer)
        return cache_fingerprint(with_kl, {"dataset": "shapes"}, text_tokenizer, 8)

    assert fingerprint() == fingerprint()
    assert fingerprint()["tokenizer"] != fingerprint(scaling_factor=0.2325)["tokenizer"]
    assert fingerprint()["tokenizer"] != fingerprint(sample_posterior=True)["tokenizer"]
