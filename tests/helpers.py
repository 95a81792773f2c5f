"""Helpers shared by several test files."""

import io
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import sentencepiece as spm


def write_tiny_t5_folder(folder: Path) -> Path:
    """A Hugging Face-format T5 encoder folder of random weights (vocabulary 120) with a
    SentencePiece `spiece.model` trained on shapes captions, as `t5` specs read it."""
    from test_t5 import TINY, hf_tensors, write_folder

    from fluid.data.shapes import caption_corpus
    from fluid.text import T5TextEncoder

    t5 = T5TextEncoder(**{**TINY, "vocab_size": 120}, feed_forward_proj="gated-gelu",
                       key=jr.key(1))
    write_folder(folder, hf_tensors(t5), vocab_size=120)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus(2000)), model_writer=proto, vocab_size=100,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(proto.getvalue())
    return folder


def write_tiny_clip_folder(folder: Path, seed: int = 0) -> Path:
    """A Hugging Face `CLIPModel` folder of random weights (`test_clip`'s tiny config: 32 px
    images, 24-dimensional features) with its tiny byte-level BPE tokenizer."""
    from test_clip import random_tensors, write_folder

    return write_folder(folder, random_tensors(seed))


def perturbed(module, key, scale=0.3):
    """`module` with every float leaf moved off its initial value (zero-initialised gates
    would otherwise block gradients to the layers before them, and make outputs trivial)."""
    leaves, treedef = jtu.tree_flatten(module)
    keys = jr.split(key, len(leaves))
    out = [
        x + scale * jr.normal(k, x.shape, x.dtype) if eqx.is_inexact_array(x) else x
        for x, k in zip(leaves, keys)
    ]
    return jtu.tree_unflatten(treedef, out)


def fit_class_means(head, steps: int):
    """`head` (a continuous head) briefly trained to sample one point per class, and those
    points: the condition is a class one-hot (`head.cond_dim` classes), the target the
    class's point (uniform in [-0.8, 0.8], `jr.key(1)`) plus normal noise of 0.02; Adam at
    2e-3, `steps` steps of 128 draws (`jr.key(2)`).

    **Returns:**

    The trained head and the points, `[classes, token_dim]`.
    """
    C, D = head.cond_dim, head.token_dim
    means = jr.uniform(jr.key(1), (C, D), minval=-0.8, maxval=0.8)
    opt = optax.adam(2e-3)
    params, static = eqx.partition(head, eqx.is_inexact_array)

    @jax.jit
    def train(params, key):
        def step(carry, k):
            params, st = carry
            k1, k2, k3 = jr.split(k, 3)
            cls = jr.randint(k1, (128,), 0, C)
            z = jax.nn.one_hot(cls, C)
            x = means[cls] + 0.02 * jr.normal(k2, (128, D))

            def loss(p):
                h = eqx.combine(p, static)
                return jnp.mean(jax.vmap(lambda a, b, kk: h.loss(a, b, key=kk))(
                    z, x, jr.split(k3, 128)))

            g = jax.grad(loss)(params)
            with jax.numpy_dtype_promotion("standard"):
                u, st = opt.update(g, st)
            return (eqx.apply_updates(params, u), st), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jr.split(key, steps))
        return params

    return eqx.combine(train(params, jr.key(2)), static), means


def class_samples(head, steps: int | None = None):
    """One unguided sample of each class of a head from `fit_class_means` (`jr.key(3)`), in
    `steps` steps (the head's own by default)."""
    C = head.cond_dim
    z = jax.nn.one_hot(jnp.arange(C), C)
    keys = jr.split(jr.key(3), C)
    return eqx.filter_jit(lambda h: jax.vmap(
        lambda zz, k: h.sample(zz, None, 1.0, 1.0, key=k, steps=steps))(z, keys))(head)


def arrays(tree):
    """The array leaves of `tree` (`None` elsewhere), to compare two models' weights."""
    return eqx.filter(tree, eqx.is_array)


def trainer_params(trainer):
    """A trainer's trainable parameters, on the host."""
    return jax.device_get(eqx.filter(trainer.trainer.state.params, eqx.is_array))


def losses(history) -> np.ndarray:
    """The losses of a trainer's history (what `Trainer.run` returns)."""
    return np.array([r["loss"] for r in history])


def flip_middle(f: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of `f`, keeping its size."""
    data = bytearray(f.read_bytes())
    start = len(data) // 2 - count // 2
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    f.write_bytes(bytes(data))


# -- MAR checkpoints (LTH14/mar), as `torch.save` writes them ----------------------------
def mar_state_dict(width, depth=1, head_width=16, seq_len=4, buffer=2, token_dim=4, classes=3):
    """A MAR state dict of any width, shaped as models/mar.py builds it (random values)."""
    rng = np.random.default_rng(0)
    shapes = {"z_proj.weight": (width, token_dim), "z_proj.bias": (width,),
              "z_proj_ln.weight": (width,), "z_proj_ln.bias": (width,),
              "class_emb.weight": (classes, width), "fake_latent": (1, width),
              "encoder_pos_embed_learned": (1, buffer + seq_len, width),
              "decoder_pos_embed_learned": (1, buffer + seq_len, width),
              "diffusion_pos_embed_learned": (1, seq_len, width), "mask_token": (1, 1, width),
              "decoder_embed.weight": (width, width), "decoder_embed.bias": (width,)}
    for part in ("encoder", "decoder"):
        shapes |= {f"{part}_norm.weight": (width,), f"{part}_norm.bias": (width,)}
        for i in range(depth):
            block = f"{part}_blocks.{i}."
            shapes |= {block + "norm1.weight": (width,), block + "norm1.bias": (width,),
                       block + "attn.qkv.weight": (3 * width, width),
                       block + "attn.qkv.bias": (3 * width,),
                       block + "attn.proj.weight": (width, width),
                       block + "attn.proj.bias": (width,),
                       block + "norm2.weight": (width,), block + "norm2.bias": (width,),
                       block + "mlp.fc1.weight": (4 * width, width),
                       block + "mlp.fc1.bias": (4 * width,),
                       block + "mlp.fc2.weight": (width, 4 * width),
                       block + "mlp.fc2.bias": (width,)}
    net, w = "diffloss.net.", head_width
    shapes |= {net + "time_embed.mlp.0.weight": (w, 256), net + "time_embed.mlp.0.bias": (w,),
               net + "time_embed.mlp.2.weight": (w, w), net + "time_embed.mlp.2.bias": (w,),
               net + "cond_embed.weight": (w, width), net + "cond_embed.bias": (w,),
               net + "input_proj.weight": (w, token_dim), net + "input_proj.bias": (w,),
               net + "res_blocks.0.in_ln.weight": (w,), net + "res_blocks.0.in_ln.bias": (w,),
               net + "res_blocks.0.mlp.0.weight": (w, w), net + "res_blocks.0.mlp.0.bias": (w,),
               net + "res_blocks.0.mlp.2.weight": (w, w), net + "res_blocks.0.mlp.2.bias": (w,),
               net + "res_blocks.0.adaLN_modulation.1.weight": (3 * w, w),
               net + "res_blocks.0.adaLN_modulation.1.bias": (3 * w,),
               net + "final_layer.linear.weight": (2 * token_dim, w),
               net + "final_layer.linear.bias": (2 * token_dim,),
               net + "final_layer.adaLN_modulation.1.weight": (2 * w, w),
               net + "final_layer.adaLN_modulation.1.bias": (2 * w,)}
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def torch_state_dict(state):
    """NumPy arrays as torch tensors (torch imported here)."""
    import torch

    return {k: torch.from_numpy(v.copy()) for k, v in state.items()}


def write_mar_checkpoint(path, model, ema=None, **extra):
    """What MAR's `util/misc.py save_model` writes with `torch.save`: both state dicts (NumPy
    here; `ema=None` as MAR saves it without an EMA), an AdamW state dict, the epoch, the loss
    scaler and the run's `args`; `extra` adds entries."""
    import argparse

    import torch

    params = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in list(model.values())[:3]]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    sum(p.sum() for p in params).backward()
    optimizer.step()
    contents = {
        "model": torch_state_dict(model),
        "model_ema": None if ema is None else torch_state_dict(ema),
        "optimizer": optimizer.state_dict(),
        "epoch": 399,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
        "args": argparse.Namespace(model="mar_base", diffusion_batch_mul=2,
                                   num_sampling_steps="100", img_size=64, vae_stride=16,
                                   output_dir=Path("out")),
        **extra,
    }
    torch.save(contents, path)
    return path


def tiny_config(variant: str = "fluid"):
    """The `tiny-<variant>` preset at its smallest for sampling tests: one backbone block,
    a palette fitted to 16 images, 2 sampling steps, 1 training step."""
    import dataclasses

    from fluid.presets import get_config

    config = get_config(f"tiny-{variant}", **{"model.backbone.depth": 1, "data.fit_images": 16})
    return dataclasses.replace(config, sample_steps=2, steps=1)


def untrained_pipeline(config):
    """A `fluid.Pipeline` over `config`'s model with random weights (key 0) and a caption
    tokenizer fitted to 64 `shapes` captions."""
    import fluid
    from fluid.build import build_model
    from fluid.data.shapes import ShapesDataset
    from fluid.recipes import make_text_tokenizer

    text_tokenizer = make_text_tokenizer(ShapesDataset(16, size=64), config.model.text_vocab_size)
    model = build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0))
    return fluid.Pipeline(model, text_tokenizer, config)


def user_error(capsys, argv) -> str:
    """What `fluid ARGV` prints for a user error, checked to be one line and a hint, no
    traceback, exit status 2: the line."""
    from fluid.cli import main

    capsys.readouterr()  # what earlier commands printed (progress bars) is not this one's
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first, hint = err.strip().splitlines()
    assert first.startswith("error: ") and "--debug" in hint
    return first
