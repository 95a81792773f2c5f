"""Training the `kl` and `vq` tokenizers with the one trainer: PSNR, saved folders,
gradient accumulation, resume and the `fluid train-tokenizer` command."""

import dataclasses
import json

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import losses as _losses
from helpers import trainer_params as _params

from fluid.build import build_objective, count_params
from fluid.cli import main
from fluid.config import TASKS as CONFIG_TASKS
from fluid.config import ComponentSpec, TokenizerLossConfig
from fluid.presets import get_config
from fluid.recipes import RECIPES, get_recipe, prepare
from fluid.tokenizers import AutoencoderObjective, KLTokenizer, VQTokenizer, psnr
from fluid.train import load_model

# tiny-tokenizer-* on 32 px shapes, 30 steps of 8 images, EMA weights: measured 13.8 dB
# (kl) and 14.4 dB (vq), from 6.3 and 5.6 dB untrained.
PSNR_AFTER = 12.0
PSNR_UNTRAINED = 9.0


def _small(**overrides):
    """tiny-tokenizer-kl at 16 px: the cheapest run that still trains every part."""
    return get_config("tiny-tokenizer-kl", **{
        "data.image_size": "16", "model.tokenizer.image_size": "16", "batch_size": "8",
        "steps": "4", **overrides,
    })


def _round_trip(tokenizer, images):
    return jax.vmap(lambda x: tokenizer.decode(tokenizer.encode(x)))(images)


def _train(kind: str, out):
    """A trained tiny tokenizer run: its trainer, its folder and its PSNR before training."""
    # One device: the mesh is exercised below (fsdp) and by the command, at a lower cost.
    trainer = prepare(get_config(f"tiny-tokenizer-{kind}"), out_dir=out, progress=False,
                      devices=jax.devices()[:1])
    untrained = trainer.evaluate()["psnr"]
    trainer.run()
    trainer.save(out)
    return kind, trainer, out, untrained


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    return _train("kl", tmp_path_factory.mktemp("kl"))


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    return _train("vq", tmp_path_factory.mktemp("vq"))


@pytest.fixture(params=["kl", "vq"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


# -- the objective and PSNR ------------------------------------------------------------------------
def test_psnr_is_ten_log10_of_four_over_the_mse():
    images = jr.uniform(jr.key(0), (3, 8, 8, 3), minval=-1.0, maxval=1.0)
    shifted = images + jnp.array([0.1, 0.2, 0.05])[:, None, None, None]
    expected = np.mean([10 * np.log10(4 / d**2) for d in (0.1, 0.2, 0.05)])
    np.testing.assert_allclose(psnr(images, shifted), expected, rtol=1e-5)
    # The same number as 8-bit PSNR of the images mapped to [0, 255].
    a, b = (np.asarray(x, np.float64) * 127.5 + 127.5 for x in (images, shifted))
    eight_bit = np.mean(10 * np.log10(255**2 / np.mean((a - b) ** 2, axis=(1, 2, 3))))
    np.testing.assert_allclose(psnr(images, shifted), eight_bit, rtol=1e-5)


def test_only_autoencoder_tokenizers_train():
    with pytest.raises(ValueError, match=r"one of the tokenizers \('kl', 'vq'\), not 'patch'"):
        get_config("tiny-fluid", task="tokenizer")
    with pytest.raises(ValueError, match="task must be one of"):
        get_config("tiny-fluid", task="tokenise")
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        TokenizerLossConfig(reconstruction="l3")


def test_every_task_name_has_its_recipe():
    # `TrainConfig` validates `task` against `fluid.config.TASKS`; a run looks the name up
    # in `fluid.recipes.RECIPES`: the two must name the same tasks.
    assert tuple(RECIPES) == CONFIG_TASKS
    assert all(get_recipe(name).name == name for name in CONFIG_TASKS)
    assert (get_recipe("generate").reads_captions, get_recipe("tokenizer").reads_captions) == (
        True, False
    )
    known = r"unknown task 'tokenise'; the tasks are \['generate', 'tokenizer'\]"
    with pytest.raises(ValueError, match=known):
        get_recipe("tokenise")


def test_parameter_count_of_a_tokenizer_preset_is_its_objectives():
    config = get_config("tokenizer-kl-32")
    tree = get_recipe("tokenizer").abstract_model(config)
    assert isinstance(tree, AutoencoderObjective)
    built = build_objective(config.model.tokenizer, config.tokenizer_loss, key=jr.key(0))
    assert count_params(tree) == count_params(built) > 0


# -- training --------------------------------------------------------------------------------------
def test_training_raises_psnr(run):
    _, trainer, out, untrained = run
    trained = trainer.evaluate()["psnr"]
    assert untrained < PSNR_UNTRAINED, untrained
    assert trained > PSNR_AFTER, trained
    # Logged every log_every steps and at the end, with the loss and the rest.
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "psnr" in m] == [15, 30]
    assert metrics[-1]["psnr"] == pytest.approx(trained)


def test_saved_folder_loads_with_the_same_reconstructions(run):
    kind, trainer, out, _ = run
    folder = out / "tokenizer"
    assert (folder / "config.json").exists()
    objective = trainer.model(ema=True)
    images = trainer.held_out_images()[:8]
    expected = objective.reconstruct(images)
    cls = {"kl": KLTokenizer, "vq": VQTokenizer}[kind]
    loaded = cls.from_pretrained(folder, image_size=32)
    # And through the registry, as a generative run's frozen tokenizer spec names it.
    spec = ComponentSpec(name=kind, kwargs={"path": str(folder), "image_size": 32})
    from_spec = build_objective(spec, TokenizerLossConfig(), key=jr.key(0))
    for tokenizer in (loaded, from_spec.autoencoder):
        chex.assert_trees_all_close(_round_trip(tokenizer, images), expected, atol=1e-5,
                                    rtol=1e-5)
    with pytest.raises(ValueError, match="trained an image tokenizer"):
        load_model(out)


def test_reconstruction_grid(run, monkeypatch):
    _, trainer, _, _ = run
    import fluid.viz

    drawn = {}
    save_grid = fluid.viz.save_grid

    def spy(images, path, **kwargs):
        drawn.update(images=np.asarray(images), **kwargs)
        return save_grid(images, path, **kwargs)

    monkeypatch.setattr(fluid.viz, "save_grid", spy)
    grid = trainer.sample_grid()
    assert grid is not None and grid.exists() and grid.stat().st_size > 1000
    # 8 held-out images above their reconstructions by the EMA tokenizer
    held_out = np.asarray(trainer.held_out_images())[:8]
    recon = np.asarray(trainer.model(ema=True).reconstruct(trainer.held_out_images()))[:8]
    assert drawn["cols"] == 8 and drawn["images"].shape == (16, *held_out.shape[1:])
    np.testing.assert_array_equal(drawn["images"][:8], held_out)
    np.testing.assert_allclose(drawn["images"][8:], recon, atol=1e-5)
    assert not np.allclose(drawn["images"][8:], held_out, atol=1e-2)  # not the input twice


# -- the trainer's guarantees, for this objective --------------------------------------------------
def test_gradient_accumulation_equals_whole_batch_on_an_fsdp_mesh():
    # SGD keeps the update linear in the gradient (see tests/test_trainer.py); the KL
    # posterior's draws come from per-example keys, so the split batch draws the same.
    fsdp = {"mesh.rules": "fsdp", "mesh.min_shard_size": "256"}
    two = jax.devices()[:2]  # as good a mesh as 8 devices for this, and cheaper on 2 cores
    whole = prepare(_small(**fsdp), progress=False, optimizer=optax.sgd(0.5), devices=two)
    assert isinstance(whole.model(), AutoencoderObjective)
    specs = [x.sharding.spec for x in jax.tree.leaves(eqx.filter(whole.trainer.state.params,
                                                                 eqx.is_array))]
    assert any("data" in spec for spec in specs), "fsdp rules left the tokenizer whole"
    loss_whole = _losses(whole.run(2))
    accum = prepare(_small(grad_accum="2", **fsdp), progress=False, optimizer=optax.sgd(0.5),
                    devices=two)
    np.testing.assert_allclose(_losses(accum.run(2)), loss_whole, rtol=1e-5)
    chex.assert_trees_all_close(_params(accum), _params(whole), atol=1e-5, rtol=1e-5)


def test_interrupted_run_resumes_with_the_same_losses(kl_run, tmp_path):
    # Against the fixture's uninterrupted run; the KL posterior's draws must resume too.
    _, trainer, _, _ = kl_run
    config = dataclasses.replace(trainer.config, checkpoint_every=2)
    one = jax.devices()[:1]
    head = _losses(prepare(config, out_dir=tmp_path, progress=False, devices=one).run(3))
    second = prepare(config, out_dir=tmp_path, progress=False, devices=one)
    assert second.step == 3
    tail = _losses(second.run(2))
    straight = _losses(trainer.history[:5])
    np.testing.assert_allclose(np.concatenate([head, tail]), straight, rtol=1e-6)


def test_train_tokenizer_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train-tokenizer", "tiny-tokenizer-vq", "--out", str(out), "steps=3",
                 "batch_size=8", "data.image_size=16", "model.tokenizer.image_size=16"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["psnr"])
    assert f"PSNR {summary['psnr']:.2f} dB" in printed
    assert str(out / "tokenizer") in printed
    assert VQTokenizer.from_pretrained(out / "tokenizer", image_size=16).vocab_size == 64
    assert main(["train-tokenizer", "tiny-fluid", "--out", str(tmp_path / "other")]) == 2
    assert "trains a generative model (use `fluid train`)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# The shapes presets, trained in full (minutes each): `python -m pytest -m slow -k presets`.
# PSNR of the EMA weights on the held-out images, measured with `fluid train-tokenizer
# <preset>` on a 2-core CPU (see `fluid.presets.tokenizer`), less 1 dB for the rounding
# of other XLA builds and optimisation levels.
PRESET_PSNR = {
    "tokenizer-kl-32": 23.2,
    "tokenizer-kl-64": 17.0,
    "tokenizer-vq-32": 21.0,
    "tokenizer-vq-64": 17.7,
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESET_PSNR))
def test_presets_reach_their_measured_psnr(preset, tmp_path):
    trainer = prepare(get_config(preset), out_dir=tmp_path, progress=False,
                      devices=jax.devices()[:1])
    trainer.run()
    trainer.save(tmp_path)
    measured = trainer.evaluate()["psnr"]
    assert measured >= PRESET_PSNR[preset] - 1.0, measured
    kind = preset.split("-")[1]
    size = get_config(preset).data.image_size
    cls = {"kl": KLTokenizer, "vq": VQTokenizer}[kind]
    loaded = cls.from_pretrained(tmp_path / "tokenizer", image_size=size)
    images = trainer.held_out_images()
    assert float(psnr(images, _round_trip(loaded, images))) == pytest.approx(measured, abs=1e-3)
