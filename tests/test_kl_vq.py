"""The `kl` and `vq` tokenizers, against diffusers' `AutoencoderKL` and `VQModel`.

Checkpoints are built here from tiny random configs (no download). With torch, diffusers
models with every parameter perturbed by a seeded generator (diffusers starts some layers at
zero, which would make parity trivial) are saved with `save_pretrained(safe_serialization=
True)` and loaded into fluid, and fluid-saved folders are loaded into diffusers. Without torch,
fluid-saved folders check the loader's errors and round trips.
"""

import json
import os
import shutil

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid._weights import WeightError, read_safetensors, write_safetensors
from fluid.tokenizers import (
    TOKENIZERS,
    KLTokenizer,
    VQTokenizer,
    gaussian_kl,
    kl_autoencoder_loss,
    vq_autoencoder_loss,
)
from fluid.tokenizers._autoencoder import WEIGHTS_NAME
from fluid.tokenizers._patch import patchify

ATOL = 1e-4  # float32, a composite network
SIZE = 16
BLOCKS = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "sample_size": SIZE,
}
KL_CONFIG = {**BLOCKS, "layers_per_block": 1, "scaling_factor": 0.5, "shift_factor": 0.1}
# aMUSEd's VQ-GAN layout, shrunk: no mid-block attention, codebook lookup when decoding,
# codes of their own width.
VQ_CONFIG = {
    **BLOCKS,
    "layers_per_block": 2,
    "num_vq_embeddings": 32,
    "vq_embed_dim": 6,
    "mid_block_add_attention": False,
    "lookup_from_codebook": True,
    "force_upcast": True,
}


def images(n=2, size=SIZE, seed=1):
    return jr.uniform(jr.key(seed), (n, size, size, 3), minval=-1.0, maxval=1.0)


def random_weights(cls, seed, **kwargs):
    """A `cls(**kwargs)` tokenizer with every parameter drawn from a seeded normal by NumPy:
    nothing is compiled (the random initialisation is the contract tests' business), and
    no parameter sits at a special value (a zero gate or a unit norm scale)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) == 4 else leaf.shape[-1]
        std = 1.0 / np.sqrt(fan_in) if len(leaf.shape) > 1 else 0.3
        return jnp.asarray(std * rng.normal(size=leaf.shape), jnp.float32)

    shapes = eqx.filter_eval_shape(lambda: cls(**kwargs, key=jr.key(0)))
    return jax.tree_util.tree_map(draw, shapes)


def rewrite_weights(folder, change):
    path = os.path.join(folder, WEIGHTS_NAME)
    tensors = read_safetensors(path)
    change(tensors)
    write_safetensors(path, tensors)


# -- torch side ---------------------------------------------------------------------------------
def _diffusers():
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers")


def _build(cls, config, seed):
    """A diffusers `cls(**config)` whose every parameter is seeded: the initialisation draws
    from torch's global generator, so it is seeded here (without changing the state other
    tests see), and `_randomise` perturbs it from its own generator."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(**config)
    return _randomise(model, seed)


def _randomise(model, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # codes spread as widely as the latents, so that nearest-code search is not trivial
            scale = 1.0 if "embedding" in name else 0.1
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _nchw(x):
    import torch

    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    diffusers = _diffusers()
    model = _build(diffusers.AutoencoderKL, KL_CONFIG, seed=0)
    folder = tmp_path_factory.mktemp("kl")
    model.save_pretrained(folder, safe_serialization=True)
    return model, str(folder)


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory):
    diffusers = _diffusers()
    model = _build(diffusers.VQModel, VQ_CONFIG, seed=1)
    folder = tmp_path_factory.mktemp("vq")
    model.save_pretrained(folder, safe_serialization=True)
    return model, str(folder)


def _kl_outputs(model, x, z):
    """diffusers' posterior mean and std of images `x`, and its decoding of latents `z`."""
    import torch

    with torch.no_grad():
        dist = model.encode(_nchw(x)).latent_dist
        decoded = model.decode(_nchw(z)).sample
    return _nhwc(dist.mean), _nhwc(dist.std), _nhwc(decoded)


def _vq_outputs(model, x):
    """diffusers' pre-quantisation latents, indices and decoding of the indices."""
    import torch

    with torch.no_grad():
        latents = model.encode(_nchw(x)).latents
        b, d, h, w = latents.shape
        indices = model.quantize(latents)[2][2].reshape(b, h * w)
        decoded = model.decode(indices, force_not_quantize=True, shape=(b, h, w, d)).sample
    return _nhwc(latents), indices.numpy(), _nhwc(decoded)


@eqx.filter_jit
def _fluid_kl(tok, x, z):
    """Everything the KL checks compare, in one compilation."""

    def one(image, latent):
        mean, logvar = tok.posterior(image)
        tokens = tok.encode(image)
        return mean, jnp.exp(0.5 * logvar), tok.decode_latent(latent), tokens, tok.decode(tokens)

    return jax.vmap(one)(x, z)


@eqx.filter_jit
def _fluid_vq(tok, x):
    """Everything the VQ checks compare, in one compilation."""

    def one(image):
        indices = tok.encode(image)
        codes = tok.quantize.lookup(indices).reshape(*tok.grid, tok.token_dim)
        return tok.encode_latent(image), indices, tok.decode(indices), tok.decode_latent(codes)

    return jax.vmap(one)(x)


def _max_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _check_kl(tok, model):
    """Max errors of the posterior mean and of the decoder against diffusers."""
    x = images()
    z = jr.normal(jr.key(2), (2, SIZE // 2, SIZE // 2, tok.latent_channels))
    mean, std, decoded = _kl_outputs(model, x, z)
    ours_mean, ours_std, ours_decoded, tokens, from_tokens = _fluid_kl(tok, x, z)
    chex.assert_trees_all_close(ours_mean, mean, atol=ATOL, rtol=0)
    chex.assert_trees_all_close(ours_std, std, atol=ATOL, rtol=0)
    chex.assert_trees_all_close(ours_decoded, decoded, atol=ATOL, rtol=0)
    # tokens: the mean, shifted, scaled and patched; decoding inverts that and clips
    expected = jax.vmap(patchify, in_axes=(0, None))(
        (ours_mean - tok.shift_factor) * tok.scaling_factor, tok.patch_size
    )
    chex.assert_trees_all_close(tokens, expected, atol=1e-6, rtol=0)
    _, _, decoded_mean = _kl_outputs(model, x, ours_mean)
    chex.assert_trees_all_close(from_tokens, np.clip(decoded_mean, -1, 1), atol=ATOL, rtol=0)
    return _max_error(ours_mean, mean), _max_error(ours_decoded, decoded)


def _check_vq(tok, model):
    """Agreement of the indices and max error of the decoded images against diffusers."""
    x = images(4)
    latents, indices, decoded = _vq_outputs(model, x)
    ours_latents, ours, ours_decoded, unclipped = _fluid_vq(tok, x)
    chex.assert_trees_all_close(ours_latents, latents, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(ours, indices)
    assert len(np.unique(ours)) >= 8, "codes too few to test nearest-code search"
    chex.assert_trees_all_close(ours_decoded, np.clip(decoded, -1, 1), atol=ATOL, rtol=0)
    chex.assert_trees_all_close(unclipped, decoded, atol=ATOL, rtol=0)
    return float(np.mean(np.asarray(ours) == indices)), _max_error(unclipped, decoded)


@pytest.mark.reference
def test_kl_loads_diffusers_checkpoint(kl_folder):
    model, folder = kl_folder
    tok = KLTokenizer.from_pretrained(folder, image_size=SIZE)
    assert (tok.scaling_factor, tok.shift_factor) == (0.5, 0.1)
    assert tok.quant_conv is not None and tok.decoder.mid_block.attention is not None
    mean_err, dec_err = _check_kl(tok, model)
    print(f"KL parity: encode mean {mean_err:.2e}, decode {dec_err:.2e}")


@pytest.mark.reference
def test_vq_loads_diffusers_checkpoint(vq_folder):
    model, folder = vq_folder
    tok = VQTokenizer.from_pretrained(folder, image_size=SIZE)
    assert (tok.vocab_size, tok.token_dim, tok.latent_channels) == (32, 6, 4)
    assert tok.encoder.mid_block.attention is None
    agreement, dec_err = _check_vq(tok, model)
    print(f"VQ parity: index agreement {agreement:.3f}, decode {dec_err:.2e}")


# -- fluid-saved folders (the layouts the diffusers-made checkpoints above do not cover) ---------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders fluid wrote from random tokenizers: a KL one without `quant_conv`, a VQ one
    with mid-block attention."""
    root = tmp_path_factory.mktemp("saved")
    kl = random_weights(KLTokenizer, 1, use_quant_conv=False, scaling_factor=0.3)
    vq = random_weights(VQTokenizer, 2, mid_block_add_attention=True)
    # codes where the encoder puts its latents, so that nearest-code search has choices
    latents = eqx.filter_jit(jax.vmap(lambda t, x: t.encode_latent(x), in_axes=(None, 0)))(
        vq, images(2, seed=9)).reshape(-1, vq.token_dim)
    codes = latents[np.random.default_rng(3).permutation(len(latents))[: vq.vocab_size]]
    vq = eqx.tree_at(lambda t: t.quantize.embedding.weight, vq, codes)
    kl.save_pretrained(root / "kl")
    vq.save_pretrained(root / "vq")
    return kl, str(root / "kl"), vq, str(root / "vq")


@pytest.mark.reference
def test_fluid_saved_folders_load_in_diffusers(saved):
    diffusers = _diffusers()
    kl, kl_path, vq, vq_path = saved
    model = diffusers.AutoencoderKL.from_pretrained(kl_path).eval()
    assert model.quant_conv is None and model.config.scaling_factor == 0.3
    mean_err, dec_err = _check_kl(kl, model)
    print(f"KL parity (fluid-saved): encode mean {mean_err:.2e}, decode {dec_err:.2e}")
    model = diffusers.VQModel.from_pretrained(vq_path).eval()
    assert model.config.mid_block_add_attention
    agreement, dec_err = _check_vq(vq, model)
    print(f"VQ parity (fluid-saved): index agreement {agreement:.3f}, decode {dec_err:.2e}")


def test_save_load_round_trip(saved):
    kl, kl_path, vq, vq_path = saved
    chex.assert_trees_all_equal(KLTokenizer.from_pretrained(kl_path, image_size=SIZE), kl)
    chex.assert_trees_all_equal(VQTokenizer.from_pretrained(vq_path, image_size=SIZE), vq)
    # the registry spec of a pretrained tokenizer: kwargs only, no key
    built = TOKENIZERS.build("kl", path=kl_path, image_size=32, patch_size=2)
    assert built.grid == (8, 8) and built.token_dim == 16 and built.scaling_factor == 0.3
    chex.assert_trees_all_equal(jax.tree_util.tree_leaves(built), jax.tree_util.tree_leaves(kl))
    # a scaling given explicitly overrides the checkpoint's
    assert KLTokenizer(scaling_factor=0.2, path=kl_path).scaling_factor == 0.2


def test_legacy_attention_names_load(saved, tmp_path):
    """Older diffusers checkpoints name the mid-block attention query/key/value/proj_attn."""
    kl, kl_path, _, _ = saved
    shutil.copytree(kl_path, tmp_path / "kl")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(tensors):
        for name in [n for n in tensors if ".attentions.0." in n]:
            for new, old in legacy.items():
                if f".{new}." in name:
                    tensors[name.replace(f".{new}.", f".{old}.")] = tensors.pop(name)

    rewrite_weights(tmp_path / "kl", rename)
    assert "encoder.mid_block.attentions.0.proj_attn.bias" in read_safetensors(
        tmp_path / "kl" / WEIGHTS_NAME
    )
    chex.assert_trees_all_equal(KLTokenizer.from_pretrained(tmp_path / "kl", image_size=SIZE), kl)


@pytest.mark.parametrize("which", ["missing", "misshaped", "unused"])
def test_weight_errors_name_the_key(saved, tmp_path, which):
    _, kl_path, _, _ = saved
    folder = tmp_path / "kl"
    shutil.copytree(kl_path, folder)
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    if which == "missing":
        rewrite_weights(folder, lambda t: t.pop(key))
        match = f"missing key '{key}'"
    elif which == "misshaped":
        rewrite_weights(folder, lambda t: t.update({key: t[key][:, :4]}))
        match = f"key '{key}' has shape"
    else:
        rewrite_weights(folder, lambda t: t.update({"decoder.extra.weight": t[key]}))
        match = "decoder.extra.weight"
    with pytest.raises(WeightError, match=match):
        KLTokenizer.from_pretrained(folder, image_size=SIZE)


def test_config_errors(saved, tmp_path):
    _, kl_path, _, vq_path = saved
    with pytest.raises(ValueError, match="latent_channels=8 contradicts"):
        KLTokenizer(latent_channels=8, path=kl_path)
    with pytest.raises(WeightError, match="holds a VQModel, not a AutoencoderKL"):
        KLTokenizer(path=vq_path)
    for key, value, match in [
        ("norm_type", "spatial", "norm_type='spatial' is not supported"),
        ("up_block_types", ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], "up_block_types"),
        ("act_fn", "gelu", "act_fn='gelu' is not supported"),
        ("new_option", 1, r"unknown VQModel option\(s\) \['new_option'\]"),
    ]:
        folder = tmp_path / key
        folder.mkdir()
        with open(os.path.join(vq_path, "config.json")) as f:
            config = json.load(f)
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(WeightError, match=match):
            VQTokenizer(path=folder)
    with pytest.raises(ValueError, match="multiple of 4"):
        KLTokenizer(image_size=18, patch_size=2, key=jr.key(0))
    with pytest.raises(ValueError, match="needs a key"):
        VQTokenizer()


@pytest.mark.parametrize("patch_size", [1, 2])
def test_kl_shapes_at_32(saved, patch_size):
    tok = KLTokenizer(image_size=32, patch_size=patch_size, path=saved[1])
    side = 32 // 2 // patch_size
    assert tok.grid == (side, side) and tok.token_dim == 4 * patch_size**2
    x = images(1, 32)[0]
    tokens = tok.encode(x)
    chex.assert_shape(tokens, (side * side, 4 * patch_size**2))
    image = tok.decode(tokens)
    chex.assert_shape(image, (32, 32, 3))
    assert float(jnp.max(jnp.abs(image))) <= 1.0
    # a posterior sample is the mean plus std times the key's normal draw, in token units
    mean, logvar = tok.posterior(x)
    noise = jr.normal(jr.key(5), mean.shape)
    chex.assert_trees_all_close(
        tok.sample(x, key=jr.key(5)), tok.latent_to_tokens(mean + jnp.exp(0.5 * logvar) * noise),
        atol=1e-6, rtol=0,
    )


def test_vq_shapes_at_32(saved):
    tok = VQTokenizer(image_size=32, path=saved[3])
    tokens = tok.encode(images(1, 32)[0])
    chex.assert_shape(tokens, (256,))
    assert tokens.dtype == jnp.int32 and 0 <= int(tokens.min()) and int(tokens.max()) < 32
    chex.assert_shape(tok.decode(tokens), (32, 32, 3))


def test_vq_straight_through_gradient(saved):
    _, _, vq, _ = saved
    latent = jr.normal(jr.key(6), (*vq.grid, vq.token_dim))
    weights = jr.normal(jr.key(7), (SIZE, SIZE, 3))

    def through_quantizer(t, z):
        return jnp.sum(t.decode_latent(t.quantize_latent(z)[0]) * weights)

    def decoder_only(t, z):
        return jnp.sum(t.decode_latent(z) * weights)

    @eqx.filter_jit
    def run(t, z):
        quantized, indices = t.quantize_latent(z)
        grads_t, grad_st = eqx.filter_grad(through_quantizer)(t, z), jax.grad(
            through_quantizer, argnums=1)(t, z)
        return quantized, indices, grad_st, jax.grad(decoder_only, argnums=1)(t, quantized), grads_t

    quantized, indices, grad_st, grad_at_codes, grads = run(vq, latent)
    codes = vq.quantize.lookup(indices).reshape(latent.shape)
    chex.assert_trees_all_close(quantized, codes, atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(quantized - latent))) > 0.1  # quantisation moved the latent
    # the decoder's gradient at the quantised latent reaches the latent unchanged...
    chex.assert_trees_all_close(grad_st, grad_at_codes, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(grad_st))) > 0
    # ...and none reaches the codebook through the quantiser
    assert not np.any(np.asarray(grads.quantize.embedding.weight))


# -- losses against NumPy -----------------------------------------------------------------------
def _arrays(seed, *shapes):
    """Float64 NumPy arrays for the reference, and the same values as float32 JAX arrays."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s).astype(np.float32).astype(np.float64) for s in shapes]
    return arrays, [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_kl_loss_matches_numpy(kind):
    (x, r, mean, logvar), args = _arrays(0, (8, 8, 3), (8, 8, 3), (4, 4, 2), (4, 4, 2))
    rec = np.mean(np.abs(r - x)) if kind == "l1" else np.mean((r - x) ** 2)
    kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar)
    total, parts = kl_autoencoder_loss(*args, kl_weight=0.01, reconstruction_kind=kind)
    chex.assert_trees_all_close(
        (total, parts), (rec + 0.01 * kl, {"reconstruction": rec, "kl": kl}), atol=1e-5, rtol=1e-5
    )
    chex.assert_trees_all_close(gaussian_kl(*args[2:]), kl, atol=1e-5, rtol=1e-5)
    zeros = jnp.zeros((2, 2, 1))
    chex.assert_trees_all_close(gaussian_kl(zeros, zeros), jnp.zeros(()))  # N(0, I) itself


def test_vq_loss_matches_numpy():
    (x, r, z, e), args = _arrays(1, (8, 8, 3), (8, 8, 3), (4, 4, 2), (4, 4, 2))
    rec, sq = np.mean((r - x) ** 2), np.mean((z - e) ** 2)
    total, parts = vq_autoencoder_loss(*args, beta=0.3)
    chex.assert_trees_all_close(
        (total, parts),
        (rec + sq + 0.3 * sq, {"reconstruction": rec, "codebook": sq, "commitment": sq}),
        atol=1e-5, rtol=1e-5,
    )
    # the codebook term moves only the codes, the commitment term only the latent
    grad_z, grad_e = jax.grad(lambda z, e: vq_autoencoder_loss(*args[:2], z, e, beta=0.3)[0],
                              argnums=(0, 1))(*args[2:])
    chex.assert_trees_all_close(grad_z, 0.3 * 2 * (z - e) / z.size, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(grad_e, 2 * (e - z) / z.size, atol=1e-6, rtol=1e-5)
    l1 = vq_autoencoder_loss(*args, reconstruction_kind="l1")[1]["reconstruction"]
    chex.assert_trees_all_close(l1, np.mean(np.abs(r - x)), atol=1e-6, rtol=1e-6)
