"""Presets: plain Python functions returning a `TrainConfig`, all built by the same code.

`get_config(name, **overrides)` with dotted overrides (`get_config("demo", steps=10)`,
`get_config("tiny-fluid", **{"optim.learning_rate": 1e-3})`). The four variants of the paper:

| variant | tokens | order | backbone | head |
|---|---|---|---|---|
| `fluid` | continuous (`patch`) | `random` | `bidirectional` | `diffusion` |
| `continuous-raster` | continuous (`patch`) | `raster` | `causal` | `diffusion` |
| `discrete-random` | discrete (`palette`) | `random` | `bidirectional` | `softmax` |
| `discrete-raster` | discrete (`palette`) | `raster` | `causal` | `softmax` |

`tokenizer-{kl,vq}-{32,64}` train an image tokenizer instead (`fluid train-tokenizer`).
"""

import dataclasses
from collections.abc import Callable

from ._errors import ConfigKeyError
from .config import (
    ComponentSpec,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TokenizerLossConfig,
    TrainConfig,
    apply_overrides,
)

VARIANTS = ("fluid", "continuous-raster", "discrete-random", "discrete-raster")


def _parts(variant: str, *, image_size: int, patch_size: int, vocab: int, head: dict, depth: int,
           heads: int, mask_schedule: str = "mar") -> dict:
    continuous = variant in ("fluid", "continuous-raster")
    random = variant in ("fluid", "discrete-random")
    tok = {"image_size": image_size, "patch_size": patch_size}
    return dict(
        tokenizer=ComponentSpec(name="patch", kwargs=tok)
        if continuous
        else ComponentSpec(name="palette", kwargs={**tok, "vocab_size": vocab}),
        # Patch tokens are pixels in [-1, 1]: clip the predicted x_0 there, as IDDPM does for
        # pixel-space models (MAR's latents leave it unclipped).
        head=ComponentSpec(name="diffusion", kwargs={"clip_denoised": 1.0, **head})
        if continuous
        else ComponentSpec(name="softmax"),
        order=ComponentSpec(name="random", kwargs={"mask_schedule": mask_schedule})
        if random
        else ComponentSpec(name="raster"),
        backbone=ComponentSpec(
            name="bidirectional" if random else "causal",
            kwargs={"depth": depth, "num_heads": heads},
        ),
    )


def tiny(variant: str) -> TrainConfig:
    """A tiny model of `variant` for tests: 16 px, 16 tokens, width 32; trains in seconds.

    `fluid train tiny-fluid`: the loss falls within 30 steps.
    """
    model = ModelConfig(
        **_parts(variant, image_size=16, patch_size=4, vocab=32,
                 head={"width": 32, "depth": 1, "batch_mul": 2}, depth=2, heads=2),
        text_encoder=ComponentSpec(name="learned", kwargs={"dim": 32, "depth": 1, "num_heads": 2}),
        width=32, aligner_depth=1, aligner_heads=2, text_len=16, text_vocab_size=64,
    )
    return TrainConfig(
        model=model,
        data=DataConfig(image_size=16, fit_images=256),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=5, ema_decay=0.9),
        steps=30, batch_size=8, log_every=10, sample_steps=4,
    )


def shapes(variant: str) -> TrainConfig:
    """A laptop-sized model of `variant` on 32 px `shapes` (64 tokens, width 256).

    `fluid train shapes-fluid`: a few thousand steps on a CPU give prompt-following samples.
    """
    model = ModelConfig(
        **_parts(variant, image_size=32, patch_size=4, vocab=512,
                 head={"width": 256, "depth": 3, "batch_mul": 4}, depth=6, heads=4),
        text_encoder=ComponentSpec(name="learned", kwargs={"dim": 128, "depth": 2, "num_heads": 4}),
        width=256, aligner_depth=1, aligner_heads=4, text_len=24, text_vocab_size=128,
    )
    return TrainConfig(
        model=model,
        data=DataConfig(image_size=32),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, ema_decay=0.999,
                          weight_decay=0.02),
        steps=4000, batch_size=32, log_every=25, sample_steps=16,
    )


def demo() -> TrainConfig:
    """`fluid demo`: the Fluid variant on 32 px `shapes`, sized for 15 minutes on 2 CPU cores.

    Continuous patch tokens (64 of 48 values), random order, bidirectional backbone of width
    128 and depth 4, MAR's diffusion head (2 x 128); trained on the single-object colour and
    colour-attribution captions that the demo prompts come from. Three choices make 15 CPU
    minutes enough: objects near fixed slots (`layout="slots"`: one object centred, two side
    by side in caption order), so the model need not learn where objects go; objects 1.6
    times the default size; and a noise schedule shifted by the patch side (4): a flat 4 x 4
    patch averages its noise down by 4, so at MAR's schedule the head rarely needs the
    backbone's condition, and the backbone learns slowly from it.

    Measured (2-core CPU, `fluid demo`): about 1000 steps in the 13-minute budget, final loss
    0.023; ShapesEval of 48 prompts per category: colours 0.65, colour attribution 0.27.
    """
    config = shapes("fluid")
    model = dataclasses.replace(
        config.model,
        width=128,
        backbone=ComponentSpec(name="bidirectional", kwargs={"depth": 4, "num_heads": 4}),
        head=ComponentSpec(
            name="diffusion",
            kwargs={"width": 128, "depth": 2, "batch_mul": 2, "clip_denoised": 1.0,
                    "noise_shift": 4.0},
        ),
        text_encoder=ComponentSpec(name="learned", kwargs={"dim": 128, "depth": 1, "num_heads": 4}),
    )
    return dataclasses.replace(
        config,
        model=model,
        data=DataConfig(image_size=32, categories=("colors", "color_attr"), object_scale=1.6,
                        layout="slots"),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, ema_decay=0.995),
        steps=1500,
        batch_size=32,
        sample_steps=32,
        sample_cfg=3.0,
        sample_temperature=0.8,
    )


def scale(size: str) -> TrainConfig:
    """Pod-scale presets after MAR's released sizes (256 px, 256 tokens; see DESIGN.md).

    `b`: width 768, 24 blocks, head 6x1024; `l`: 1024, 32, 8x1280; `h`: 1280, 40, 12x1536;
    `3b` and `10b` reach Fluid's largest sizes by parameter count (`fluid presets`).
    The tokenizer is the `patch` tokenizer at 16 px patches until a KL autoencoder is
    configured in its place; counts come from `fluid.build.abstract_model`.
    """
    width, depth, heads, hw, hd = {
        "b": (768, 24, 12, 1024, 6),
        "l": (1024, 32, 16, 1280, 8),
        "h": (1280, 40, 16, 1536, 12),
        # Sized by parameter count to the ends of Fluid's study (about 3B) and its largest
        # model (10.5B); the paper's exact shapes are not reproduced here.
        "3b": (2048, 44, 16, 2048, 12),
        "10b": (4096, 35, 32, 3072, 12),
    }[size]
    model = ModelConfig(
        **_parts("fluid", image_size=256, patch_size=16, vocab=0,
                 head={"width": hw, "depth": hd}, depth=depth, heads=heads,
                 mask_schedule="cosine"),
        text_encoder=ComponentSpec(name="learned", kwargs={"dim": 1024, "depth": 2, "num_heads": 16}),
        width=width, aligner_depth=2, aligner_heads=heads, text_len=128, text_vocab_size=32000,
    )
    return TrainConfig(
        model=model,
        data=DataConfig(image_size=256),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=65_000, ema_decay=0.9999),
        steps=1_000_000, batch_size=2048,
    )


def tokenizer(kind: str, image_size: int) -> TrainConfig:
    """An image tokenizer (`kl` or `vq`) trained as an autoencoder on `shapes` at
    `image_size` px (`task="tokenizer"`), sized for a few minutes on 2 CPU cores.

    Both sizes give an 8 x 8 latent grid: 4x downsampling at 32 px, 8x at 64 px (Fluid's
    factor). `kl`: 4 latent channels, L1 reconstruction and a small KL weight; use it with
    `patch_size=2` for 16 tokens of 16 values. `vq`: a 256-code codebook of 4-channel codes
    (64 discrete tokens), L2 reconstruction. PSNR (`fluid.tokenizers.psnr`, dB) of the
    EMA weights on 64 held-out images, measured on a 2-core CPU with two runs training at
    once (the 64 px ones beside the test suite, so their wall times are upper bounds):

    | preset | command | PSNR | wall time |
    |---|---|---|---|
    | `tokenizer-kl-32` | `fluid train-tokenizer tokenizer-kl-32 --out runs/kl32` | 23.2 dB | 3.6 min |
    | `tokenizer-kl-64` | `fluid train-tokenizer tokenizer-kl-64 --out runs/kl64` | 17.0 dB | 6.2 min |
    | `tokenizer-vq-32` | `fluid train-tokenizer tokenizer-vq-32 --out runs/vq32` | 21.0 dB | 3.4 min |
    | `tokenizer-vq-64` | `fluid train-tokenizer tokenizer-vq-64 --out runs/vq64` | 17.7 dB | 6.1 min |

    The trained tokenizer is the diffusers folder `<out>/tokenizer/`; a generative run uses
    it frozen with `model.tokenizer='{"name": "kl", "kwargs": {"path": "<out>/tokenizer",
    "image_size": 32, "patch_size": 2}}'`.
    """
    channels = (16, 32, 64) if image_size == 32 else (8, 16, 32, 64)
    arch = {"image_size": image_size, "block_out_channels": channels, "layers_per_block": 1,
            "norm_num_groups": 8, "latent_channels": 4}
    if kind == "kl":
        spec = ComponentSpec(name="kl", kwargs={**arch, "mid_block_add_attention": True})
        loss = TokenizerLossConfig(reconstruction="l1", kl_weight=1e-6)
    else:
        spec = ComponentSpec(name="vq", kwargs={**arch, "mid_block_add_attention": False,
                                                "num_vq_embeddings": 256})
        loss = TokenizerLossConfig(reconstruction="l2", beta=0.25)
    return TrainConfig(
        task="tokenizer",
        model=ModelConfig(tokenizer=spec),
        data=DataConfig(image_size=image_size),
        tokenizer_loss=loss,
        optim=OptimConfig(learning_rate=2e-3, schedule="cosine", warmup_steps=20,
                          weight_decay=0.0, ema_decay=0.95),
        steps=600 if image_size == 32 else 400, batch_size=8, log_every=100,
    )


def tiny_tokenizer(kind: str) -> TrainConfig:
    """A tiny `kl` or `vq` tokenizer run for tests: 32 px, 2x downsampling, 8 and 16
    channels, no attention; `fluid train-tokenizer tiny-tokenizer-kl`: 30 steps in
    seconds, 13.8 dB (`kl`) and 14.4 dB (`vq`) from 6.3 and 5.6 dB untrained
    (`tests/test_tokenizer_training.py`)."""
    config = tokenizer(kind, 32)
    arch = {"block_out_channels": (8, 16), "norm_num_groups": 4,
            "mid_block_add_attention": False}
    if kind == "vq":
        arch["num_vq_embeddings"] = 64
    spec = config.model.tokenizer
    return dataclasses.replace(
        config,
        model=dataclasses.replace(
            config.model, tokenizer=dataclasses.replace(spec, kwargs={**spec.kwargs, **arch})
        ),
        optim=OptimConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=5,
                          weight_decay=0.0, ema_decay=0.9),
        steps=30, batch_size=8, log_every=15,
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {"demo": demo}
for _v in VARIANTS:
    PRESETS[f"tiny-{_v}"] = lambda v=_v: tiny(v)
    PRESETS[f"shapes-{_v}"] = lambda v=_v: shapes(v)
for _s in ("b", "l", "h", "3b", "10b"):
    PRESETS[f"scale-{_s}"] = lambda s=_s: scale(s)
for _k in ("kl", "vq"):
    PRESETS[f"tiny-tokenizer-{_k}"] = lambda k=_k: tiny_tokenizer(k)
    for _size in (32, 64):
        PRESETS[f"tokenizer-{_k}-{_size}"] = lambda k=_k, size=_size: tokenizer(k, size)


def get_config(name: str, **overrides) -> TrainConfig:
    """The preset `name` with dotted-key overrides applied all at once, then checked once
    (`fluid.config.apply_overrides`: their order does not matter)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigKeyError(
            f"unknown preset {name!r}.{hint} Presets: {', '.join(sorted(PRESETS))}."
        )
    return apply_overrides(PRESETS[name](), overrides)
