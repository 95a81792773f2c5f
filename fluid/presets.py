"""Presets: plain Python functions returning a `TrainConfig`, all built by the same code.

`get_config(name, **overrides)` with dotted overrides (`get_config("demo", steps=10)`,
`get_config("tiny-fluid", **{"optim.learning_rate": 1e-3})`). The four variants of the paper:

| variant | tokens | order | backbone | head |
|---|---|---|---|---|
| `fluid` | continuous (`patch`) | `random` | `bidirectional` | `diffusion` |
| `continuous-raster` | continuous (`patch`) | `raster` | `causal` | `diffusion` |
| `discrete-random` | discrete (`palette`) | `random` | `bidirectional` | `softmax` |
| `discrete-raster` | discrete (`palette`) | `raster` | `causal` | `softmax` |

and random order with a KV cache (the `arpg` backbone: causal, with position queries, several
positions decoded per step), for each token kind:

| variant | tokens | order | backbone | head |
|---|---|---|---|---|
| `continuous-arpg` | continuous (`patch`) | `random` | `arpg` | `diffusion` |
| `discrete-arpg` | discrete (`palette`) | `random` | `arpg` | `softmax` |

`tokenizer-{kl,vq}-{32,64}` train an image tokenizer instead (`fluid train-tokenizer`).
`mar-base`, `mar-large`, `mar-huge` are MAR's class-conditional ImageNet models, and
`tiny-mar` a CPU-sized model of the same composition.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

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
from .tokenizers import MAR_KL16

# The paper's four variants, and those that add random order with a KV cache.
VARIANTS = ("fluid", "continuous-raster", "discrete-random", "discrete-raster")
CACHED_RANDOM_VARIANTS = ("continuous-arpg", "discrete-arpg")
ALL_VARIANTS = VARIANTS + CACHED_RANDOM_VARIANTS


def _parts(variant: str, *, image_size: int, patch_size: int, vocab: int, head: dict, depth: int,
           heads: int, mask_schedule: str = "mar") -> dict:
    if variant not in ALL_VARIANTS:
        raise ConfigKeyError(f"unknown variant {variant!r}; variants are {', '.join(ALL_VARIANTS)}.")
    continuous = variant in ("fluid", "continuous-raster", "continuous-arpg")
    random = variant not in ("continuous-raster", "discrete-raster")
    cached = variant in CACHED_RANDOM_VARIANTS
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
            name="arpg" if cached else "bidirectional" if random else "causal",
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


# MAR's released sizes: width, blocks of the encoder (and of the decoder), heads, and the
# diffusion head's width and depth (LTH14/mar: `mar_base/large/huge` in models/mar.py, the
# `--diffloss_w/--diffloss_d` of its README's commands), with its guidance scale there.
MAR_SIZES = {
    "base": (768, 12, 12, 1024, 6, 2.9),
    "large": (1024, 16, 16, 1280, 8, 3.0),
    "huge": (1280, 20, 16, 1536, 12, 3.2),
}


def mar_model_config(tokenizer: ComponentSpec, *, width: int, depth: int, heads: int,
               head: dict, num_classes: int, buffer_size: int,
               decoder_depth: int | None = None, mlp_ratio: float = 4.0) -> ModelConfig:
    """MAR's composition (`fluid.build.mar_model` builds the same from MAR's weights):
    class labels as captions fed to the backbone as they are (an identity aligner), tokens
    embedded without a LayerNorm, the `mae` backbone, the diffusion head, the random order
    with MAR's mask ratios (at least 70% masked), label dropout 0.1."""
    return ModelConfig(
        tokenizer=tokenizer,
        head=ComponentSpec(name="diffusion", kwargs=head),
        order=ComponentSpec(name="random", kwargs={"mask_schedule": "mar"}),
        backbone=ComponentSpec(name="mae", kwargs={
            "depth": depth, "num_heads": heads, "buffer_size": buffer_size,
            # Only where they differ from the backbone's defaults (MAR's released sizes).
            **({} if decoder_depth in (None, depth) else {"decoder_depth": decoder_depth}),
            **({} if mlp_ratio == 4.0 else {"mlp_ratio": mlp_ratio}),
        }),
        text_encoder=ComponentSpec(name="class_labels",
                                   kwargs={"num_classes": num_classes, "dim": width}),
        width=width, aligner="identity", token_norm=False, text_len=2,
        text_vocab_size=num_classes + 1, caption_dropout=0.1,
    )


def mar(size: str) -> TrainConfig:
    """MAR-B, MAR-L or MAR-H (`size`: `base`, `large`, `huge`): class-conditional ImageNet at
    256 px (Li et al. 2024; LTH14/mar).

    Tokens of MAR's KL-16 autoencoder (`fluid.tokenizers.MAR_KL16`: 16 x 16 tokens of 16
    channels, patch 1, latents scaled by 0.2325), frozen; give its converted kl16.ckpt
    with `model.tokenizer.kwargs.path=<folder>` (`fluid.tokenizers.convert_ldm_checkpoint`),
    random weights otherwise. 1000 classes, buffer 64, MAR's encoder-decoder (`MAR_SIZES`:
    768 wide, 12 + 12 blocks, 12 heads, head 6 x 1024 for `base`; 1024, 16 + 16, 16, 8 x 1280
    for `large`; 1280, 20 + 20, 16, 12 x 1536 for `huge`), dropout 0.1, diffusion batch
    multiplier 4. Parameters as MAR counts them (its trainable ones; the autoencoder apart):
    207,924,768 / 478,326,304 / 942,403,104 (`tests/test_mar.py`).

    Training as MAR's README (800 epochs of ImageNet's 1,281,167 images at batch 2048, 625
    steps an epoch): AdamW (0.9, 0.95), learning rate 8e-4 (MAR's base rate 1e-4 times
    2048 / 256), constant after a linear warm-up of 100 epochs, weight decay 0.02 on what
    MAR decays (`optim.decay_rules="mar"`), gradient clipping at 3, EMA 0.9999, random
    flips. Sampling previews at MAR's guidance for the size (2.9 / 3.0 / 3.2, linear) and
    64 steps (MAR reports FID 2.31 / 1.78 / 1.55 at 256 steps).

    Captions are class numbers (`fluid.text.ClassLabelTokenizer`, `""` for no class):
    `fluid train mar-large data.dataset=folder data.path=<ImageNet train folder with
    "<class>" captions>`.
    """
    width, depth, heads, head_width, head_depth, cfg = MAR_SIZES[size]
    tokenizer = ComponentSpec(name="kl", kwargs={
        k: list(v) if isinstance(v, tuple) else v for k, v in MAR_KL16.items()
    })
    model = mar_model_config(tokenizer, width=width, depth=depth, heads=heads,
                       head={"width": head_width, "depth": head_depth, "batch_mul": 4},
                       num_classes=1000, buffer_size=64)
    return TrainConfig(
        model=model,
        data=DataConfig(image_size=256, flip=True),
        optim=OptimConfig(learning_rate=8e-4, warmup_steps=62_500, weight_decay=0.02,
                          grad_clip=3.0, ema_decay=0.9999, decay_rules="mar"),
        steps=500_000, batch_size=2048, sample_steps=64, sample_cfg=cfg,
        sample_temperature=1.0,
    )


def mar_converted(architecture: Mapping[str, Any], *, num_heads: int, tokenizer: ComponentSpec,
                  batch_mul: int = 4, sampling_steps: int = 100) -> TrainConfig:
    """The config that describes a MAR model converted from MAR's checkpoint (`fluid convert
    mar`; `fluid.load(folder, vae=...)` gives it to its `Pipeline`): the model `mar-base` etc.
    describe, at the sizes the weights have, with `tokenizer` (the `kl` tokenizer of MAR's
    converted kl16.ckpt).

    Sampling defaults are MAR's (`main_mar.py`): 64 steps, temperature 1, the linear guidance
    schedule; guidance at the scale MAR's README evaluates its released size with (2.9 / 3.0
    / 3.2 for MAR-B / L / H), 3.0 for any other size.

    **Arguments:**

    - `architecture`: MAR's sizes as `fluid.convert.mar_architecture` reads them from the
      weights (`MarFolder.config["architecture"]`).
    - `num_heads`, `batch_mul`, `sampling_steps`: as `fluid.build.load_mar`.
    - `tokenizer`: the image tokenizer's spec.
    """
    a = architecture
    cfg = 3.0
    for width, depth, heads, head_width, head_depth, size_cfg in MAR_SIZES.values():
        if (a["width"], a["depth"], a["decoder_depth"], num_heads, a["head_width"],
                a["head_depth"]) == (width, depth, depth, heads, head_width, head_depth):
            cfg = size_cfg
    model = mar_model_config(
        tokenizer, width=a["width"], depth=a["depth"], heads=num_heads,
        head={"width": a["head_width"], "depth": a["head_depth"], "batch_mul": batch_mul,
              "sampling_steps": sampling_steps},
        num_classes=a["num_classes"], buffer_size=a["buffer_size"],
        decoder_depth=a["decoder_depth"], mlp_ratio=float(a["mlp_ratio"]),
    )
    image_size = tokenizer.kwargs.get("image_size", 256)
    return TrainConfig(model=model, data=DataConfig(image_size=image_size), sample_steps=64,
                       sample_cfg=cfg, sample_temperature=1.0)


def tiny_mar() -> TrainConfig:
    """MAR's composition at a size for tests: 10 classes, 8 px images in 4 x 4 pixel patches
    (4 tokens of 48 values), width 32, 2 + 2 blocks, buffer 4, head 2 x 64; its 600 steps
    take about 20 seconds on a 2-core CPU after compiling.

    Pixel patches, unlike MAR's latents, average their noise down by the patch side, so at
    MAR's noise schedule the head would rarely need the class: the schedule is shifted by
    4 (`noise_shift`, as the `demo` preset), and predicted patches are clipped to [-1, 1].

    Captions are class numbers `"0"` to `"9"`: `fluid train tiny-mar data.dataset=folder
    data.path=<8 px images with such captions>`. Measured (`tests/test_mar.py`, two classes
    of flat colours): the loss falls from 1.0 to about 0.05 and samples take their class's
    colour (at 350 steps they do not yet).
    """
    model = mar_model_config(
        ComponentSpec(name="patch", kwargs={"image_size": 8, "patch_size": 4}),
        width=32, depth=2, heads=2,
        head={"width": 64, "depth": 2, "batch_mul": 2, "clip_denoised": 1.0,
              "noise_shift": 4.0},
        num_classes=10, buffer_size=4,
    )
    return TrainConfig(
        model=model,
        data=DataConfig(image_size=8),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10, ema_decay=0.9,
                          decay_rules="mar"),
        steps=600, batch_size=16, log_every=50, sample_steps=4,
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


PRESETS: dict[str, Callable[[], TrainConfig]] = {"demo": demo, "tiny-mar": tiny_mar}
for _m in MAR_SIZES:
    PRESETS[f"mar-{_m}"] = lambda m=_m: mar(m)
for _v in ALL_VARIANTS:
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
