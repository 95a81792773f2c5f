"""A trained model as a folder (save_pretrained / fluid.load) and the one-line pipeline."""

import json

import helpers
import jax
import jax.random as jr
import numpy as np
import pytest
from helpers import tiny_config, untrained_pipeline
from PIL import Image

import fluid
import fluid.sample
from fluid.build import build_model
from fluid.config import to_dict
from fluid.data.shapes import ShapesDataset
from fluid.recipes import make_text_tokenizer, prepare
from fluid.run import PretrainedMismatchError, RunFolder, load_pretrained, named_leaves
from fluid.sample import sample_images


@pytest.fixture(scope="module")
def pipe():
    return untrained_pipeline(tiny_config())


def _arrays(model):
    return {k: np.asarray(v) for k, v in named_leaves(model) if isinstance(v, jax.Array)}


def test_a_pretrained_folder_round_trips_bit_for_bit(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "model", step=7)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert not any(f.endswith((".eqx", ".pkl", ".pt", ".bin")) for f in files)
    model, text_tokenizer, config = load_pretrained(folder)
    before, after = _arrays(pipe.model), _arrays(model)
    assert before.keys() == after.keys() and len(before) > 10
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        assert after[name].dtype == before[name].dtype
    assert to_dict(config) == to_dict(pipe.config)
    ids = pipe.text_tokenizer.encode(["a red circle"], 8)[0]
    np.testing.assert_array_equal(text_tokenizer.encode(["a red circle"], 8)[0], ids)
    # Plain safetensors: another reader gets every array under its dotted path.
    from safetensors.numpy import load_file

    stored = load_file(str(folder / "model.safetensors"))
    assert stored.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(stored[name], before[name], err_msg=name)
    card = (folder / "README.md").read_text()
    assert "7 steps" in card and "`random`" in card and "fluid.load" in card


def test_the_pipeline_samples_what_sample_images_does_with_the_runs_defaults(pipe):
    images = pipe(["a red circle", ""], num_images_per_prompt=2, seed=3)
    assert len(images) == 4 and all(isinstance(x, Image.Image) for x in images)
    assert images[0].size == (16, 16) and images[0].mode == "RGB"
    # The run's steps, guidance and temperature; prompts repeated in order; the seed's key.
    config = pipe.config
    expected = sample_images(
        pipe.model, pipe.text_tokenizer, ["a red circle"] * 2 + [""] * 2,
        text_len=config.model.text_len, key=jr.key(3), steps=config.sample_steps,
        cfg=config.sample_cfg, cfg_schedule="linear", temperature=config.sample_temperature,
    )
    pixels = np.clip(np.round((expected + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.stack([np.asarray(x) for x in images]), pixels)
    again = pipe("a red circle", seed=3, num_images_per_prompt=2)
    assert [np.asarray(x).tobytes() for x in again] == [np.asarray(x).tobytes()
                                                        for x in images[:2]]
    other = pipe("a red circle", seed=4, num_images_per_prompt=2)
    assert np.asarray(other[0]).tobytes() != np.asarray(images[0]).tobytes()


def test_the_pipeline_spreads_each_batch_over_every_local_device(pipe, monkeypatch):
    assert pipe.devices == tuple(jax.local_devices()) and len(pipe.devices) == 8  # conftest
    seen = []
    generate = fluid.sample._generate

    def spy(model, ids, *args):
        on = ids.sharding.num_devices if isinstance(ids, jax.Array) else 1  # numpy: default
        seen.append((ids.shape, on,
                     {leaf.sharding.num_devices for leaf in jax.tree.leaves(model)
                      if isinstance(leaf, jax.Array)}))
        return generate(model, ids, *args)

    monkeypatch.setattr(fluid.sample, "_generate", spy)
    prompts = ["a red circle", "a blue square", ""]
    config = tiny_config("discrete-random")
    text_tokenizer = make_text_tokenizer(ShapesDataset(16, size=64), config.model.text_vocab_size)
    model = build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0),
                        fit_images=np.zeros((16, 16, 16, 3), np.float32))
    model = helpers.perturbed(model, jr.key(1))  # so that the caption moves the samples
    for sampler, exact in ((pipe, False), (fluid.Pipeline(model, text_tokenizer, config), True)):
        seen.clear()
        spread = sampler.images(prompts, seed=5, cfg=3.0)
        # Three rows padded to eight, one per device, the model replicated on all; cut back.
        rows = seen[-1][0][0]
        assert spread.shape[0] == 3 and (rows, *seen[-1][1:]) == (8, 8, {8})
        alone = fluid.Pipeline(sampler.model, sampler.text_tokenizer, sampler.config,
                               devices=jax.local_devices()[:1])
        one = alone.images(prompts, seed=5, cfg=3.0)
        assert seen[-1][0][0] == 3 and seen[-1][1:] == (1, {1})
        # Each row draws with its own key as on one device: discrete tokens equal; continuous
        # ones up to the rounding of matmuls over fewer rows, through the diffusion chain.
        if exact:
            np.testing.assert_array_equal(spread, one)
        else:
            np.testing.assert_allclose(spread, one, atol=1e-3)
        assert not np.array_equal(spread[0], spread[1])


def test_raster_models_default_to_constant_guidance(pipe):
    assert pipe.default_cfg_schedule == "linear"
    config = tiny_config("discrete-raster")
    text_tokenizer = make_text_tokenizer(ShapesDataset(16, size=64), config.model.text_vocab_size)
    model = build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0),
                        fit_images=np.zeros((16, 16, 16, 3), np.float32))
    # Off its zero-initialised layers, so that the caption moves the logits and guidance acts.
    raster = fluid.Pipeline(helpers.perturbed(model, jr.key(1)), text_tokenizer, config)
    assert raster.default_cfg_schedule == "constant"
    # The default reaches the sampler: a call without a schedule draws what "constant" draws
    # and, with guidance on (cfg != 1), not what "linear" draws.
    images = [np.stack([np.asarray(x) for x in raster("a red circle", seed=2, cfg=3.0, **kw)])
              for kw in ({}, {"cfg_schedule": "constant"}, {"cfg_schedule": "linear"})]
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
    # The same default below the pipeline (`sample_images` and `FluidModel.generate`, which
    # `fluid eval`, the sweep and the trainer's previews call).
    direct = [sample_images(raster.model, text_tokenizer, ["a red circle"],
                            text_len=config.model.text_len, key=jr.key(2), steps=4, cfg=3.0, **kw)
              for kw in ({}, {"cfg_schedule": "constant"}, {"cfg_schedule": "linear"})]
    np.testing.assert_array_equal(direct[0], direct[1])
    assert not np.array_equal(direct[0], direct[2])


def test_load_reads_run_folders_and_pretrained_folders_alike(tmp_path):
    recipe = prepare(tiny_config(), out_dir=tmp_path / "run", progress=False)
    recipe.run()
    recipe.save()
    from_run = fluid.load(tmp_path / "run")
    folder = from_run.save_pretrained(tmp_path / "pretrained")
    from_folder = fluid.load(folder)
    a = from_run(["a blue square"], seed=1)
    b = from_folder(["a blue square"], seed=1)
    assert np.asarray(a[0]).tobytes() == np.asarray(b[0]).tobytes()


def test_weights_of_another_config_are_refused_by_name(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["backbone"]["kwargs"]["depth"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedMismatchError, match=r"does not fit.*another config"):
        load_pretrained(folder)


def test_a_folder_without_weights_is_not_pretrained(tmp_path):
    RunFolder(tmp_path).root.mkdir(exist_ok=True)
    with pytest.raises(fluid.MissingInputError, match="not a pretrained folder"):
        load_pretrained(tmp_path)
