"""From MAR's checkpoints to images in one call: a tiny MAR checkpoint and a tiny LDM
autoencoder checkpoint, both written with `torch.save` and converted by `fluid convert`, then
`fluid.load(folder, vae=...)` and `fluid sample FOLDER --vae VAE --class ...`."""

import json
import shutil
from pathlib import Path

import chex
import jax.random as jr
import numpy as np
import pytest
from helpers import mar_state_dict, torch_state_dict, user_error, write_mar_checkpoint
from PIL import Image

import fluid
from fluid.build import mar_model
from fluid.cli import main
from fluid.convert import read_mar_folder
from fluid.sample import sample_images
from fluid.serve import make_server
from fluid.text import ClassLabelTokenizer
from fluid.tokenizers import KLTokenizer

torch = pytest.importorskip("torch")

HEADS = 4
# The fixture's autoencoder: 2x downsampling, 4 latent channels. The model's 16 tokens of 16
# channels are 2 x 2 patches of latents on a 4 x 4 grid, so images are 4 * 2 * 2 = 16 px.
LATENT, TOKEN_DIM, SEQ_LEN, IMAGE = 4, 16, 16, 16
# One setting for every sampling below, so that they share one compiled program.
SAMPLING = {"steps": 4, "cfg": 2.0, "temperature": 0.9, "head_steps": 10,
            "cfg_interval": (0.0, 0.5)}
CLI_SAMPLING = ["--steps", "4", "--cfg", "2", "--temperature", "0.9", "--head-steps", "10",
                "--cfg-interval", "0", "0.5"]


def _mar_weights(token_dim: int) -> dict[str, np.ndarray]:
    # MAR's shapes with small random values (at unit scale the samples overflow to NaN).
    state = mar_state_dict(32, seq_len=SEQ_LEN, token_dim=token_dim, classes=10)
    return {k: (0.05 * v).astype(np.float32) for k, v in state.items()}


def _convert_mar(root, name: str, token_dim: int) -> str:
    weights = _mar_weights(token_dim)
    ema = {k: (0.5 * v).astype(np.float32) for k, v in weights.items()}
    path = write_mar_checkpoint(root / f"{name}.pth", weights, ema)
    assert main(["convert", "mar", str(path), str(root / name), "--num-heads", str(HEADS)]) == 0
    return str(root / name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """MAR's model and its autoencoder, each converted from what `torch.save` wrote."""
    root = tmp_path_factory.mktemp("mar_sample")
    with np.load(Path(__file__).parent / "fixtures" / "mar_tiny.npz") as data:
        vae = {k.removeprefix("vae/"): data[k] for k in data.files if k.startswith("vae/")}
    torch.save({"model": torch_state_dict(vae)}, root / "kl16.ckpt")
    assert main(["convert", "ldm", str(root / "kl16.ckpt"), str(root / "vae"), "--mar"]) == 0
    return {"mar": _convert_mar(root, "mar", TOKEN_DIM), "vae": str(root / "vae"),
            "root": root}


def test_load_samples_what_mar_model_samples(folders, tmp_path):
    pipe = fluid.load(folders["mar"], vae=folders["vae"])
    # MAR's sampling defaults, class captions, and the config describes the model.
    config = pipe.config
    assert (config.sample_steps, config.sample_cfg, config.sample_temperature) == (64, 3.0, 1.0)
    assert pipe.default_cfg_schedule == "linear"
    assert isinstance(pipe.text_tokenizer, ClassLabelTokenizer)
    assert pipe.text_tokenizer.num_classes == 10
    assert pipe.model.tokenizer.image_size == IMAGE

    # The same model built directly from the weights (the EMA's, as converted), the
    # autoencoder's geometry stated here rather than derived.
    folder = read_mar_folder(folders["mar"])
    assert folder.config["weights"] == "model_ema"
    tokenizer = KLTokenizer(image_size=IMAGE, patch_size=2, path=folders["vae"])
    assert tokenizer.token_dim == TOKEN_DIM and tokenizer.latent_channels == LATENT
    direct = mar_model(folder.tensors, num_heads=HEADS, batch_mul=2, tokenizer=tokenizer)
    chex.assert_trees_all_equal(pipe.model, direct)

    classes = ["3", "7", "0"]
    key = jr.key(5)
    expected = sample_images(direct, ClassLabelTokenizer(10), classes, text_len=2, key=key,
                             **SAMPLING)
    assert np.isfinite(expected).all()
    chex.assert_shape(expected, (3, IMAGE, IMAGE, 3))
    got = sample_images(pipe.model, pipe.text_tokenizer, classes, text_len=2, key=key,
                        **SAMPLING)
    np.testing.assert_array_equal(got, expected)
    images = pipe(classes, seed=5, **SAMPLING)
    assert [im.size for im in images] == [(IMAGE, IMAGE)] * 3
    pixels = np.clip(np.round((expected + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in images]), pixels)

    # `fluid serve`'s server reads its defaults and conditioning from the pipeline.
    server = make_server(pipe, port=0)
    try:
        info = server.info()
    finally:
        server.close()
    assert info["conditioning"] == "class" and info["image_size"] == IMAGE
    assert info["defaults"]["cfg_schedule"] == "linear"

    # Saved as a pretrained folder, it loads back as the same model and settings.
    again = fluid.load(pipe.save_pretrained(tmp_path / "pretrained"))
    chex.assert_trees_all_equal(again.model, pipe.model)
    assert again.config == pipe.config


def test_cli_samples_classes(folders, tmp_path, capsys):
    out, images = tmp_path / "grid.png", tmp_path / "images"
    assert main(["sample", folders["mar"], "--vae", folders["vae"], "--class", "3",
                 "--class", "7", "--class", "0", "--out", str(out), "--images-dir", str(images),
                 "--seed", "5", *CLI_SAMPLING]) == 0
    assert "loading the MAR model" in capsys.readouterr().out
    assert out.is_file()
    written = sorted(images.iterdir())
    assert [p.name for p in written] == ["0000.png", "0001.png", "0002.png"]
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in written]
    assert all(p.shape == (IMAGE, IMAGE, 3) for p in pixels)
    # What the pipeline gives for the same seed and settings.
    pipe = fluid.load(folders["mar"], vae=folders["vae"])
    expected = pipe(["3", "7", "0"], seed=5, **SAMPLING)
    np.testing.assert_array_equal(np.stack(pixels), np.stack([np.asarray(im) for im in expected]))


def test_a_mar_folder_needs_its_autoencoder(folders, capsys):
    with pytest.raises(fluid.ConfigError, match="fluid convert ldm --mar kl16.ckpt"):
        fluid.load(folders["mar"])
    says = user_error(capsys, ["sample", folders["mar"], "--class", "3"])
    assert "fluid convert ldm --mar kl16.ckpt" in says and "--vae" in says
    with pytest.raises(fluid.MissingInputError, match="fluid convert ldm --mar"):
        fluid.load(folders["mar"], vae=folders["root"] / "nowhere")
    says = user_error(capsys, ["serve", folders["mar"]])
    assert "fluid convert ldm --mar kl16.ckpt" in says
    # vae belongs to MAR folders alone.
    with pytest.raises(fluid.ConfigError, match="vae is for a MAR model"):
        fluid.load(folders["vae"], vae=folders["vae"])
    assert "--vae is for a MAR model" in user_error(
        capsys, ["sample", folders["vae"], "--vae", folders["vae"], "--class", "3"])


def test_an_autoencoder_that_does_not_fit_is_refused(folders, tmp_path):
    # 8 channels per token from latents of 4: no patch size makes them.
    eight = _convert_mar(tmp_path, "mar8", 8)
    with pytest.raises(fluid.ConfigError, match=r"tokens of 8 channels.*latents of 4 channels"):
        fluid.load(eight, vae=folders["vae"])
    # 16 = 2 x 2 x 4 would fit, but the run says it trained on latents of 16 channels.
    trained = tmp_path / "trained16"
    shutil.copytree(folders["mar"], trained)
    config = json.loads((trained / "config.json").read_text())
    config["mar_args"]["vae_embed_dim"] = 16
    (trained / "config.json").write_text(json.dumps(config))
    with pytest.raises(fluid.ConfigError, match=r"latents of 16 channels \(its vae_embed_dim\)"):
        fluid.load(trained, vae=folders["vae"])


def test_a_class_model_refuses_text(folders, capsys):
    says = user_error(capsys, ["sample", folders["mar"], "--vae", folders["vae"],
                               "--prompt", "a goldfish"])
    assert "class-conditional model (10 classes)" in says and "--class" in says
    assert "0 to 9" in user_error(capsys, ["sample", folders["mar"], "--vae", folders["vae"],
                                           "--class", "10"])
    pipe = fluid.load(folders["mar"], vae=folders["vae"])
    with pytest.raises(fluid.ConfigError, match="class-conditional .* got 'a goldfish'"):
        pipe(["3", "a goldfish"])
    with pytest.raises(fluid.ConfigError, match="0 to 9"):
        pipe(["12"])
    # The folder holds the EMA weights; the raw ones are another conversion.
    with pytest.raises(fluid.ConfigError, match="--weights model"):
        fluid.load(folders["mar"], vae=folders["vae"], ema=False)

