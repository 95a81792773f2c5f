"""MAR's KL autoencoder (LDM layout) in the `kl` tokenizer: conversion, parity, sampling.

The reference is `fixtures/mar_tiny.npz` (described by `mar_tiny.json`): MAR's own
models/vae.py on a tiny random configuration, its state dict under `vae/` in LDM's names, the
posterior of images and the decoding of latents. Every check here goes through
`convert_ldm_checkpoint`, the path a user runs on MAR's kl16.ckpt: LDM-layout file in, diffusers
folder out, `KLTokenizer(path=folder)`. Without torch the file is an LDM-layout safetensors
file; with torch, `.ckpt`/`.pth` files written here by `torch.save`, nested as MAR's and
Stable Diffusion's are.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid._weights import WeightError, read_safetensors, write_safetensors
from fluid.tokenizers import (
    MAR_KL16,
    MAR_SCALING_FACTOR,
    TOKENIZERS,
    KLTokenizer,
    convert_ldm_checkpoint,
    ldm_to_diffusers,
)
from fluid.tokenizers._autoencoder import WEIGHTS_NAME

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-5
SAMPLES = 4096


def _fixture():
    with np.load(FIXTURES / "mar_tiny.npz") as data:
        return {k: data[k] for k in data.files if k.startswith("vae")}


def _vae_config():
    return json.loads((FIXTURES / "mar_tiny.json").read_text())["vae_config"]


def _arch(config):
    """`KLTokenizer` arguments for an LDM `ddconfig`, from LDM's rules (not from the
    checkpoint's keys): level i has `ch * ch_mult[i]` channels and works at
    `resolution / 2**i`; a level whose resolution is in `attn_resolutions` has attention in
    the encoder and (as LDM's decoder is built from the same config) in the decoder."""
    mult = config["ch_mult"]
    attention = [config["resolution"] // 2**i in config["attn_resolutions"]
                 for i in range(len(mult))]
    return {
        "image_size": config["resolution"],
        "block_out_channels": tuple(config["ch"] * m for m in mult),
        "layers_per_block": config["num_res_blocks"],
        "norm_num_groups": 32,  # LDM's Normalize
        "latent_channels": config["embed_dim"],
        "mid_block_add_attention": True,
        "down_block_types": tuple(
            "AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention),
        "up_block_types": tuple(
            "AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attention[::-1]),
    }


def _ldm_state(fixture):
    return {k.removeprefix("vae/"): v for k, v in fixture.items() if k.startswith("vae/")}


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _max_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def fixture():
    return _fixture()


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    """The fixture's state dict as an LDM-layout safetensors file, converted."""
    root = tmp_path_factory.mktemp("mar_vae")
    write_safetensors(root / "kl16.safetensors", _ldm_state(fixture))
    result = convert_ldm_checkpoint(
        root / "kl16.safetensors", root / "kl16", scaling_factor=MAR_SCALING_FACTOR,
        sample_size=_vae_config()["resolution"])
    return result


@pytest.fixture(scope="module")
def tok(converted):
    return KLTokenizer(**_arch(_vae_config()), scaling_factor=MAR_SCALING_FACTOR,
                       path=converted.folder)


@eqx.filter_jit
def _everything(tok, images, latents):
    def one(image, latent):
        mean, logvar = tok.posterior(image)
        tokens = tok.encode(image)
        return mean, logvar, tok.decode_latent(latent), tokens, tok.decode(tokens)

    return jax.vmap(one)(images, latents)


# -- conversion and parity -----------------------------------------------------------------------
def test_conversion_reads_the_architecture(converted, fixture):
    arch = _arch(_vae_config())
    config = converted.config
    assert config["block_out_channels"] == list(arch["block_out_channels"])
    assert config["layers_per_block"] == arch["layers_per_block"]
    assert config["latent_channels"] == arch["latent_channels"]
    assert config["down_block_types"] == list(arch["down_block_types"])
    assert config["up_block_types"] == list(arch["up_block_types"])
    assert config["mid_block_add_attention"] and config["use_quant_conv"]
    assert config["scaling_factor"] == MAR_SCALING_FACTOR == 0.2325
    assert converted.prefix == "" and converted.ignored == ()
    # every LDM tensor is in the folder, once, under its diffusers name
    written = read_safetensors(Path(converted.folder) / WEIGHTS_NAME)
    assert len(written) == len(_ldm_state(fixture))
    assert set(written) == set(ldm_to_diffusers(_ldm_state(fixture)))
    np.testing.assert_array_equal(
        written["decoder.up_blocks.0.attentions.2.to_out.0.weight"],
        fixture["vae/decoder.up.1.attn.2.proj_out.weight"][:, :, 0, 0])
    np.testing.assert_array_equal(
        written["encoder.down_blocks.1.resnets.0.conv_shortcut.bias"],
        fixture["vae/encoder.down.1.block.0.nin_shortcut.bias"])


def test_parity_with_mar(tok, fixture):
    """Posterior mean and log-variance of images, decoding of latents: MAR's numbers."""
    assert tok.encoder.down_blocks[0].attentions is None
    assert len(tok.encoder.down_blocks[1].attentions) == 2
    assert len(tok.decoder.up_blocks[0].attentions) == 3
    assert tok.decoder.up_blocks[1].attentions is None
    images = _nhwc(fixture["vae_image_nchw"])
    latents = _nhwc(fixture["vae_latent_nchw"])
    mean, logvar, decoded, tokens, from_tokens = _everything(tok, images, latents)
    errors = {
        "mean": _max_error(mean, _nhwc(fixture["vae_mean"])),
        "logvar": _max_error(logvar, _nhwc(fixture["vae_logvar"])),
        "decoded": _max_error(decoded, _nhwc(fixture["vae_decoded_nchw"])),
    }
    print("MAR VAE parity (max abs):", {k: f"{v:.2e}" for k, v in errors.items()})
    chex.assert_trees_all_close(mean, _nhwc(fixture["vae_mean"]), atol=TOL, rtol=0)
    chex.assert_trees_all_close(logvar, _nhwc(fixture["vae_logvar"]), atol=TOL, rtol=0)
    chex.assert_trees_all_close(decoded, _nhwc(fixture["vae_decoded_nchw"]), atol=TOL, rtol=0)
    # MAR's tokens: the mean times 0.2325, one latent cell each; decoding divides it out
    b, h, w, c = mean.shape
    chex.assert_trees_all_close(
        tokens, (mean * MAR_SCALING_FACTOR).reshape(b, h * w, c), atol=1e-6, rtol=0)
    again = _everything(tok, images, mean)[2]
    chex.assert_trees_all_close(from_tokens, jnp.clip(again, -1, 1), atol=TOL, rtol=0)


def test_mar_preset():
    assert MAR_KL16["scaling_factor"] == MAR_SCALING_FACTOR == 0.2325
    shape = eqx.filter_eval_shape(lambda: KLTokenizer(**MAR_KL16, key=jr.key(0)))
    # 256 px at 16x: 256 tokens of 16 channels, attention in the encoder's last level only
    assert shape.grid == (16, 16) and shape.token_dim == 16 and shape.patch_size == 1
    assert [b.attentions is not None for b in shape.encoder.down_blocks] == [False] * 4 + [True]
    assert shape.encoder.mid_block.attention is not None
    assert shape.decoder.mid_block.attention is not None
    assert not shape.sample_posterior


def test_preset_refuses_another_architecture(converted):
    with pytest.raises(ValueError, match="block_out_channels=.* contradicts"):
        KLTokenizer(**MAR_KL16, path=converted.folder)


def test_registry_spec_and_round_trip(converted, tok, tmp_path):
    """The converted folder as a run's tokenizer spec (kwargs only), and saved again."""
    built = TOKENIZERS.build("kl", path=converted.folder, image_size=32)
    assert built.scaling_factor == MAR_SCALING_FACTOR and built.grid == (16, 16)
    assert built.up_block_types == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    chex.assert_trees_all_equal(built, tok)
    tok.save_pretrained(tmp_path / "again")
    chex.assert_trees_all_equal(KLTokenizer.from_pretrained(tmp_path / "again", image_size=32),
                                tok)


def test_random_init_with_attention_blocks(tmp_path):
    kwargs = {"block_out_channels": (8, 16), "norm_num_groups": 4,
              "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
              "up_block_types": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")}
    tok = KLTokenizer(**kwargs, key=jr.key(0))
    assert tok.encoder.down_blocks[1].attentions is not None
    tok.save_pretrained(tmp_path / "kl")
    config = json.loads((tmp_path / "kl" / "config.json").read_text())
    assert config["down_block_types"] == list(kwargs["down_block_types"])
    chex.assert_trees_all_equal(KLTokenizer(path=tmp_path / "kl"), tok)
    with pytest.raises(ValueError, match="up_block_types"):
        KLTokenizer(up_block_types=("UpDecoderBlock2D",), key=jr.key(0))
    with pytest.raises(ValueError, match="down_block_types"):
        KLTokenizer(down_block_types=("CrossAttnDownBlock2D",) * 2, key=jr.key(0))


def test_exclude_builds_mar_codes_decoder(fixture, tmp_path):
    """MAR's code builds its decoder without level attention and loads with strict=False;
    `exclude` leaves such keys out the same way."""
    write_safetensors(tmp_path / "vae.safetensors", _ldm_state(fixture))
    result = convert_ldm_checkpoint(
        tmp_path / "vae.safetensors", tmp_path / "out", scaling_factor=MAR_SCALING_FACTOR,
        exclude=[r"decoder\.up\.\d+\.attn\."])
    assert result.config["up_block_types"] == ["UpDecoderBlock2D"] * 2
    assert result.config["down_block_types"][1] == "AttnDownEncoderBlock2D"
    # three attention blocks of ten tensors (norm, q, k, v, proj_out; weights and biases)
    assert len(result.ignored) == 3 * 10 and all(".attn." in k for k in result.ignored)
    assert KLTokenizer(image_size=32, path=result.folder).decoder.up_blocks[0].attentions is None


# -- errors --------------------------------------------------------------------------------------
def test_foreign_and_truncated_files(fixture, tmp_path):
    page = tmp_path / "kl16.ckpt"
    page.write_text("<!DOCTYPE html><html><body>Dropbox</body></html>")
    with pytest.raises(WeightError, match="not a torch checkpoint.*web page"):
        convert_ldm_checkpoint(page, tmp_path / "a", scaling_factor=1.0)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightError, match="empty"):
        convert_ldm_checkpoint(tmp_path / "empty.pth", tmp_path / "a", scaling_factor=1.0)
    with pytest.raises(WeightError, match="no such file"):
        convert_ldm_checkpoint(tmp_path / "absent.ckpt", tmp_path / "a", scaling_factor=1.0)
    state = _ldm_state(fixture)
    write_safetensors(tmp_path / "vae.safetensors", state)
    data = (tmp_path / "vae.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match="truncated"):
        convert_ldm_checkpoint(tmp_path / "cut.safetensors", tmp_path / "a", scaling_factor=1.0)
    # another model's weights
    write_safetensors(tmp_path / "resnet.safetensors",
                      {"conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
                       "fc.bias": np.zeros(10, np.float32)})
    with pytest.raises(WeightError, match="holds no LDM autoencoder.*conv1.weight"):
        convert_ldm_checkpoint(tmp_path / "resnet.safetensors", tmp_path / "a",
                               scaling_factor=1.0)
    # an LDM-like layout fluid does not implement: fused qkv projections
    fused = {k: v for k, v in state.items() if ".attn_1.q." not in k}
    fused["encoder.mid.attn_1.qkv.weight"] = np.zeros((192, 64, 1, 1), np.float32)
    write_safetensors(tmp_path / "fused.safetensors", fused)
    with pytest.raises(WeightError, match=r"not parameters of LDM's AutoencoderKL.*attn_1\.qkv"):
        convert_ldm_checkpoint(tmp_path / "fused.safetensors", tmp_path / "a", scaling_factor=1.0)
    # a file already in diffusers' layout
    write_safetensors(tmp_path / "diffusers.safetensors", ldm_to_diffusers(state))
    with pytest.raises(WeightError, match="in diffusers' layout already"):
        convert_ldm_checkpoint(tmp_path / "diffusers.safetensors", tmp_path / "a",
                               scaling_factor=1.0)
    # a part missing: the check-load names the key, and nothing is left behind
    partial = {k: v for k, v in state.items() if k != "decoder.up.0.block.1.conv2.bias"}
    write_safetensors(tmp_path / "partial.safetensors", partial)
    with pytest.raises(WeightError, match=r"missing key 'decoder\.up_blocks\.1\.resnets\.1"):
        convert_ldm_checkpoint(tmp_path / "partial.safetensors", tmp_path / "a",
                               scaling_factor=1.0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("a")]
    # a folder in the way
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_ldm_checkpoint(tmp_path / "vae.safetensors", tmp_path / "full",
                               scaling_factor=1.0)


# -- torch files ---------------------------------------------------------------------------------
def _torch():
    return pytest.importorskip("torch")


def _torch_state(state, prefix=""):
    torch = _torch()
    return {prefix + k: torch.from_numpy(v.copy()) for k, v in state.items()}


def test_torch_checkpoints_convert_and_load_without_torch(fixture, converted, tmp_path):
    torch = _torch()
    state = _ldm_state(fixture)
    # MAR's: {"model": state dict} (its training checkpoints add "args", a Namespace)
    torch.save({"model": _torch_state(state), "args": argparse.Namespace(vae_embed_dim=16)},
               tmp_path / "kl16.ckpt")
    mar = convert_ldm_checkpoint(tmp_path / "kl16.ckpt", tmp_path / "mar",
                                 scaling_factor=MAR_SCALING_FACTOR, sample_size=32)
    # Stable Diffusion's / Lightning's: {"state_dict": {"first_stage_model.<name>": ...,
    # other models' keys}, training state}, and LDM's autoencoder training adds loss.*
    lightning = {
        "state_dict": {**_torch_state(state, "first_stage_model."),
                       "model.diffusion_model.out.0.weight": torch.ones(4),
                       "first_stage_model.loss.logvar": torch.zeros(())},
        "global_step": 7,
        "callbacks": {"ModelCheckpoint": argparse.Namespace(best_model_path="x")},
    }
    torch.save(lightning, tmp_path / "sd.pth")
    sd = convert_ldm_checkpoint(tmp_path / "sd.pth", tmp_path / "sd",
                                scaling_factor=MAR_SCALING_FACTOR, sample_size=32)
    assert sd.prefix == "first_stage_model."
    assert sd.ignored == ("first_stage_model.loss.logvar", "model.diffusion_model.out.0.weight")
    # the same folder as from the safetensors file, byte for byte
    reference = Path(converted.folder)
    for result in (mar, sd):
        assert result.config == converted.config
        for name in ("config.json", WEIGHTS_NAME):
            assert (Path(result.folder) / name).read_bytes() == (reference / name).read_bytes()
    # the folder loads in a process where torch cannot be imported
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, jax\n"
        "from fluid.tokenizers import KLTokenizer\n"
        f"tok = KLTokenizer(image_size=32, path={mar.folder!r})\n"
        "leaves = jax.tree_util.tree_leaves(tok)\n"
        "print(len(leaves), sum(float(np.abs(np.asarray(x)).sum()) for x in leaves))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr
    tok = KLTokenizer(image_size=32, path=mar.folder)
    leaves = jax.tree_util.tree_leaves(tok)
    n, total = out.stdout.split()
    assert int(n) == len(leaves)
    assert float(total) == sum(float(np.abs(np.asarray(x)).sum()) for x in leaves)


def test_torch_file_errors(fixture, tmp_path):
    torch = _torch()
    state = _ldm_state(fixture)
    torch.save({"model": _torch_state(state)}, tmp_path / "kl16.ckpt")
    data = (tmp_path / "kl16.ckpt").read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        (tmp_path / "cut.ckpt").write_bytes(data[:cut])
        with pytest.raises(WeightError, match="truncated"):
            convert_ldm_checkpoint(tmp_path / "cut.ckpt", tmp_path / "a", scaling_factor=1.0)
    # foreign: another model's state dict; a bare tensor; no tensors at all
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 7, 7)}}, tmp_path / "resnet.pth")
    with pytest.raises(WeightError, match="holds no LDM autoencoder.*conv1.weight"):
        convert_ldm_checkpoint(tmp_path / "resnet.pth", tmp_path / "a", scaling_factor=1.0)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightError, match="no state dict.*a Tensor"):
        convert_ldm_checkpoint(tmp_path / "tensor.pth", tmp_path / "a", scaling_factor=1.0)
    torch.save({"epoch": 3, "state_dict": {"step": 1}}, tmp_path / "empty.pth")
    with pytest.raises(WeightError, match=r"no state dict .* at \['state_dict'\]"):
        convert_ldm_checkpoint(tmp_path / "empty.pth", tmp_path / "a", scaling_factor=1.0)
    # bytes that are neither torch's zip nor a pickle
    (tmp_path / "noise.pth").write_bytes(bytes(range(7, 64)))
    with pytest.raises(WeightError, match="not a torch checkpoint"):
        convert_ldm_checkpoint(tmp_path / "noise.pth", tmp_path / "a", scaling_factor=1.0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("a")]


@pytest.mark.reference
def test_converted_folder_matches_mar_in_diffusers(converted, fixture):
    """diffusers reads the converted folder as an `AutoencoderKL` with attention blocks and
    computes MAR's numbers too: the folder is a diffusers folder, not only fluid's."""
    torch = _torch()
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL.from_pretrained(converted.folder).eval()
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(fixture["vae_image_nchw"])).latent_dist
        decoded = model.decode(torch.from_numpy(fixture["vae_latent_nchw"])).sample
    chex.assert_trees_all_close(dist.mean.numpy(), fixture["vae_mean"], atol=TOL, rtol=0)
    chex.assert_trees_all_close(dist.logvar.numpy(), fixture["vae_logvar"], atol=TOL, rtol=0)
    chex.assert_trees_all_close(decoded.numpy(), fixture["vae_decoded_nchw"], atol=TOL, rtol=0)


# -- posterior samples ---------------------------------------------------------------------------
def test_default_encode_is_the_mean_bitwise(tok, fixture):
    """Without `sample_posterior`, tokens are the posterior mean's exactly as before the
    option existed (`latent_to_tokens(posterior(x)[0])`), a key changes nothing."""
    assert not tok.sample_posterior
    images = _nhwc(fixture["vae_image_nchw"])
    before = eqx.filter_jit(
        jax.vmap(lambda t, i: t.latent_to_tokens(t.posterior(i)[0]), in_axes=(None, 0))
    )(tok, images)
    chex.assert_trees_all_equal(jax.vmap(tok.encode)(images), before)
    keyed = jax.vmap(lambda i, k: tok.encode(i, key=k))(images, jr.split(jr.key(3), 2))
    chex.assert_trees_all_equal(keyed, before)


def test_posterior_samples(converted, fixture):
    tok = KLTokenizer(image_size=32, path=converted.folder, sample_posterior=True)
    image = _nhwc(fixture["vae_image_nchw"])[0]
    with pytest.raises(ValueError, match="needs a key"):
        tok.encode(image)

    @eqx.filter_jit
    def run(t, x, keys):
        mean, logvar = t.posterior(x)
        samples = jax.vmap(lambda k: t.encode(x, key=k))(keys)
        cached = t.tokens_from_posterior(mean, logvar, key=keys[0])
        return mean, logvar, samples, cached

    keys = jr.split(jr.key(11), SAMPLES)
    mean, logvar, samples, cached = run(tok, image, keys)
    # a draw is the reparameterised sample for its key, scaled as MAR scales it
    noise = jr.normal(keys[0], mean.shape)
    expected = (mean + jnp.exp(0.5 * logvar) * noise) * MAR_SCALING_FACTOR
    chex.assert_trees_all_close(samples[0], expected.reshape(-1, 4), atol=1e-6, rtol=0)
    chex.assert_trees_all_close(cached, samples[0], atol=1e-6, rtol=0)
    assert float(jnp.min(jnp.abs(samples[0] - samples[1]))) > 0
    # their average is the mean's tokens, their spread the posterior's std: within 6 standard
    # errors in every one of the 1024 cells (the largest of 1024 normal draws is about 3.3)
    target = (mean * MAR_SCALING_FACTOR).reshape(-1, 4)
    std = (jnp.exp(0.5 * logvar) * MAR_SCALING_FACTOR).reshape(-1, 4)
    assert float(jnp.max(jnp.abs(samples.mean(0) - target) / std)) < 6 / np.sqrt(SAMPLES)
    ratio = samples.std(0) / std
    assert float(jnp.max(jnp.abs(ratio - 1))) < 6 * np.sqrt(0.5 / SAMPLES)
