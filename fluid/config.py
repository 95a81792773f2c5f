"""Configuration: frozen keyword-only dataclasses of JSON values, checked when built.

A plug-in slot is a `ComponentSpec(name, kwargs)` resolved through the kind's registry. The
builder supplies the arguments that follow from the other parts (`fluid.SLOTS` names them: the
backbone's `dim` and `seq_len`, the head's `cond_dim` and `token_dim` or `vocab_size`, the text
encoder's `vocab_size` and `max_len`), so a spec holds only the part's own hyperparameters;
those are checked against the class signature when a `ModelConfig` is built, not mid-training.

This module imports no component: `ModelConfig` checks its specs through `fluid.SLOTS`, which
imports a kind's package when a spec of that kind is first checked. The JSON form and the
dotted overrides live in `fluid._overrides` and are re-exported here.
"""

import dataclasses
import math
import numbers
from typing import Any

from ._errors import ConfigError, ConfigTypeError
from ._overrides import apply_overrides, from_dict, override, to_dict
from ._registry import SLOTS, ComponentSpec

__all__ = [
    "ALIGNERS",
    "DATASETS",
    "DECAY_RULES",
    "FREEZABLE",
    "LAYOUTS",
    "ON_CHANGE",
    "PRECISIONS",
    "STYLES",
    "TASKS",
    "TRAINABLE_TOKENIZERS",
    "ComponentSpec",
    "DataConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "TokenizerLossConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "override",
    "to_dict",
]


# -- value checks: each names the dotted key as typed on the command line -----------------
def _number(key: str, value: Any, *, integer: bool) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigTypeError(f"{key} takes {'an int' if integer else 'a float'}, got {value!r}.")
    if not integer and not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}.")


# `int | float`: the tests' beartype hook refuses an int for a bare `float`.
def _at_least(key: str, value: Any, low: int | float, *, integer: bool = True,  # noqa: PYI041
              strict: bool = False, why: str = "") -> None:
    """Raise unless `value >= low` (`> low` when `strict`)."""
    _number(key, value, integer=integer)
    if value < low or (strict and value == low):
        note = f" ({why})" if why else ""
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low}, got {value!r}{note}.")


def _fraction(key: str, value: Any, *, why: str = "") -> None:
    """Raise unless `0 <= value < 1`."""
    _number(key, value, integer=False)
    if not 0 <= value < 1:
        note = f" ({why})" if why else ""
        raise ConfigError(f"{key} must lie in [0, 1), got {value!r}{note}.")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}.")


# What sits between the text encoder and the backbone (`ModelConfig.aligner`): Fluid's
# transformer blocks (`fluid.text.TextAligner`), or nothing (MAR's class embedding).
ALIGNERS = ("transformer", "identity")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The parts of a `FluidModel` and the sizes that tie them together.

    `aligner`: `"transformer"` (a linear map, `aligner_depth` blocks and a LayerNorm, as
    Fluid) or `"identity"` (the text encoder's outputs as they are; its width must be
    `width`), as MAR feeds its class embedding to the backbone. `token_norm`: whether a
    LayerNorm follows the token embedding; MAR normalises after adding positions instead
    (the `mae` backbone's), so its compositions set it False.
    """

    # A `ComponentSpec` is frozen: one shared default is safe (ruff cannot tell, the class
    # being defined in another module).
    tokenizer: ComponentSpec = ComponentSpec(  # noqa: RUF009
        name="patch", kwargs={"image_size": 32, "patch_size": 4}
    )
    head: ComponentSpec = ComponentSpec(  # noqa: RUF009
        name="diffusion", kwargs={"width": 256, "depth": 3}
    )
    order: ComponentSpec = ComponentSpec(name="random")  # noqa: RUF009
    backbone: ComponentSpec = ComponentSpec(  # noqa: RUF009
        name="bidirectional", kwargs={"depth": 4, "num_heads": 4}
    )
    text_encoder: ComponentSpec = ComponentSpec(  # noqa: RUF009
        name="learned", kwargs={"dim": 128, "depth": 2, "num_heads": 4}
    )
    width: int = 256
    aligner_depth: int = 1
    aligner_heads: int = 4
    text_len: int = 24
    text_vocab_size: int = 128
    caption_dropout: float = 0.1
    aligner: str = "transformer"
    token_norm: bool = True
    lora_rank: int = 0
    lora_alpha: float | None = None

    def __post_init__(self):
        # The config's one hook into the components: an unknown name or a kwarg the class
        # does not take is refused here, when the config is built (`Slot.check` imports the
        # kind's package on first use).
        for slot in SLOTS.values():
            slot.check(getattr(self, slot.name))
        _at_least("model.width", self.width, 1)
        _at_least("model.aligner_depth", self.aligner_depth, 0, why="0: no aligner blocks")
        _at_least("model.aligner_heads", self.aligner_heads, 1)
        # `fluid.data.Loader` refuses `text_len < 2`, the caption tokenizer
        # (`train_text_tokenizer`) a vocabulary under 5 ids: refused here, before training.
        _at_least("model.text_len", self.text_len, 2, why="caption ids per example")
        _at_least("model.text_vocab_size", self.text_vocab_size, 5,
                  why="4 special ids and at least one piece")
        _fraction("model.caption_dropout", self.caption_dropout)
        _choice("model.aligner", self.aligner, ALIGNERS)
        if not isinstance(self.token_norm, bool):
            raise ConfigTypeError(f"model.token_norm takes true or false, got {self.token_norm!r}.")
        _at_least("model.lora_rank", self.lora_rank, 0, why="0: no adapters")
        if self.lora_alpha is not None:
            _at_least("model.lora_alpha", self.lora_alpha, 0, integer=False, strict=True,
                      why="or None: scale 1")


DATASETS = ("shapes", "folder", "jsonl", "imagefolder")
# What a resumed loader does with a saved state from another data stream (`data.on_change`,
# `fluid.data.Loader(on_change=...)`): refuse it, or start the new stream from its beginning.
ON_CHANGE = ("error", "restart")
# Where the built-in data set places its objects (`data.layout`, `ShapesDataset(layout=...)`).
# Both live here, the lowest layer, so that checking a config imports no data code.
LAYOUTS = ("random", "slots")
# How the built-in data set draws its objects (`data.style`, `ShapesDataset(style=...)`): flat
# colours on a plain background, or shaded ones on a textured background.
STYLES = ("flat", "shaded")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training images and captions come from, and how they are read.

    `dataset`: `"shapes"` (built in, procedural), `"folder"` (images with same-named `.txt`
    captions under `path`), `"jsonl"` (a file of `{"image": ..., "caption": ...}` lines at
    `path`) or `"imagefolder"` (`path/<class name>/*.png`, torchvision's layout: captions are
    the class ids, for the `class_labels` text encoder). Random flips are off by default:
    they break left/right captions.

    `cache`: a directory where the frozen tokenizer's tokens (and a frozen text encoder's
    outputs) of every record are computed once, before training, and read from then on
    (`fluid/recipes/_cache.py`); needs a finite source (`size` for shapes). With a `kl`
    tokenizer that samples its posterior (`sample_posterior=True`), it holds instead the
    posterior moments of each image (twice the floats of its tokens) and, with `flip`, of
    its horizontal flip too (four times, MAR's cache), and training draws fresh tokens from
    them every step, picking the image or its flip at random with `flip` (docs/mar.md).
    Without that, `cache` and `flip` do not go together (the run's config refuses them).

    `on_change`: what a resumed run does when its data source changed since the checkpoint
    (a different number of records, seed, ...): `"error"` refuses with an explanation,
    `"restart"` continues training the restored model on the current data from the start of
    its order.
    """

    dataset: str = "shapes"
    path: str | None = None
    image_size: int = 32
    categories: tuple[str, ...] | None = None  # shapes only; None: every category
    object_scale: float = 1.0  # shapes only: multiplies object sizes
    layout: str = "random"  # shapes only: "random" (anywhere) or "slots" (near fixed places)
    style: str = "flat"  # shapes only: "flat" colours or "shaded" (gradients, soft edges, noise)
    size: int | None = None  # shapes only: number of distinct items; None = unbounded
    cache: str | None = None  # directory of precomputed tokens (built on first use)
    seed: int = 0
    shuffle: bool = True
    flip: bool = False
    workers: int = 0  # worker processes decoding images; 0 reads in the training process
    fit_images: int = 2048  # images used to fit data-fitted parts (palette codebook)
    on_change: str = "error"  # on resuming with a changed source: "error" or "restart"

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}.")
        if self.dataset != "shapes" and not self.path:
            raise ConfigError(
                f"dataset {self.dataset!r} needs data.path (a folder of images with .txt "
                "captions, a JSONL file of image/caption pairs, or a folder of class folders)."
            )
        _at_least("data.image_size", self.image_size, 1)
        _at_least("data.object_scale", self.object_scale, 0, integer=False, strict=True)
        _at_least("data.fit_images", self.fit_images, 1)
        _at_least("data.workers", self.workers, 0, why="0 reads in the training process")
        _number("data.seed", self.seed, integer=True)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must lie in [0, 2**32), got {self.seed}.")
        _choice("data.on_change", self.on_change, ON_CHANGE)

        if self.size is not None and self.size < 1:
            raise ConfigError(f"data.size must be positive or None, got {self.size}.")

        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown data.layout {self.layout!r}; choose one of {LAYOUTS}.")
        if self.style not in STYLES:
            raise ConfigError(f"unknown data.style {self.style!r}; choose one of {STYLES}.")


# Which parameters weight decay applies to (`OptimConfig.decay_rules`,
# `fluid.train.decay_mask`).
DECAY_RULES = ("fluid", "mar")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with Fluid's defaults and a warm-up; MAR's gradient clipping.

    `decay_rules`: which parameters are decayed (`fluid.train.decay_mask`): `"fluid"`,
    matrices other than the head's, norms' and embeddings'; `"mar"`, MAR's
    `add_weight_decay`: all but the head (its diffusion MLP), biases and norms, so the
    learned position, mask and class embeddings are decayed.
    """

    learning_rate: float = 1e-4
    schedule: str = "constant"  # "constant" after warm-up, or "cosine"
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.02
    grad_clip: float | None = 3.0
    ema_decay: float = 0.9999
    decay_rules: str = "fluid"

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}."
            )
        _at_least("optim.learning_rate", self.learning_rate, 0, integer=False, strict=True)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _fraction("optim.b1", self.b1)
        _fraction("optim.b2", self.b2)
        _at_least("optim.weight_decay", self.weight_decay, 0, integer=False)
        if self.grad_clip is not None:
            _at_least("optim.grad_clip", self.grad_clip, 0, integer=False, strict=True,
                      why="or None: no clipping")
        _fraction("optim.ema_decay", self.ema_decay, why="0: no averaging")
        _choice("optim.decay_rules", self.decay_rules, DECAY_RULES)


PRECISIONS = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Devices and parameter placement (see `fluid.train.make_mesh`, `fluid.train.RULES`).

    `data`, `model`: mesh axis sizes, -1 meaning the rest of the devices. `rules`: a rule set
    (`"replicate"`, `"fsdp"`); `min_shard_size`: arrays with fewer elements stay replicated.
    """

    data: int = -1
    model: int = 1
    rules: str = "replicate"
    min_shard_size: int = 2**14

    def __post_init__(self):
        for axis in ("data", "model"):
            size = getattr(self, axis)
            _number(f"mesh.{axis}", size, integer=True)
            if size != -1 and size < 1:
                raise ConfigError(
                    f"mesh.{axis} must be -1 (the remaining devices) or >= 1, got {size}."
                )
        if self.data == -1 and self.model == -1:
            raise ConfigError("at most one of mesh.data and mesh.model may be -1.")
        _at_least("mesh.min_shard_size", self.min_shard_size, 0)


TASKS = ("generate", "tokenizer")
# The parts of a `FluidModel` that `TrainConfig.freeze` may name (the image tokenizer is
# always frozen).
FREEZABLE = ("text_encoder", "aligner", "token_embedding", "backbone", "head")
# Image tokenizers `task="tokenizer"` can train: the autoencoders, through their losses in
# `fluid.tokenizers` (`patch` has nothing to train; `palette` is fitted by k-means).
TRAINABLE_TOKENIZERS = ("kl", "vq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerLossConfig:
    """The loss of a tokenizer run (`TrainConfig(task="tokenizer")`, see
    `fluid.tokenizers.AutoencoderObjective`).

    `reconstruction`: `"l1"` or `"l2"`, a mean over pixels. `kl_weight`: weight of the KL
    posterior's divergence to the standard normal (`kl` only). `beta`: weight of the VQ
    commitment term (`vq` only; the codebook term has weight 1).
    """

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    beta: float = 0.25

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ConfigError(
                f"tokenizer_loss.reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}."
            )
        if self.kl_weight < 0 or self.beta < 0:
            raise ConfigError(
                f"tokenizer_loss weights must be >= 0, got kl_weight={self.kl_weight}, "
                f"beta={self.beta}."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole training run.

    `grad_accum`: micro-batches per step (the batch is split, gradients summed: the same
    update as the whole batch at once). `precision`: `"bfloat16"` computes the backbone in
    bfloat16 with float32 master weights (head and loss stay float32); `"auto"` picks
    bfloat16 on accelerators and float32 on CPU, where it measures faster.
    `checkpoint_every`: steps between checkpoints (0: only at the end), the last
    `keep_checkpoints` kept; `sample_every`: steps between sample grids (0: none).

    `task`: `"generate"` trains the `FluidModel` that `model` describes; `"tokenizer"` trains
    the image tokenizer `model.tokenizer` alone (one of `TRAINABLE_TOKENIZERS`) as an
    autoencoder with the loss `tokenizer_loss`, and the rest of `model` is ignored.

    Fine-tuning: `init_from` starts a fresh run from trained weights (a run folder, one of
    its checkpoints, a saved or a pretrained folder; their EMA weights): the model `model`
    describes is built, then every array whose dotted path the source has is copied, with
    its shape and dtype or the run is refused; arrays the source lacks (new adapters, a new
    part) keep their initialisation. With `init_strict` (the default), source arrays the new
    model has no place for are refused too; `init_strict=false` drops them. A resumed run
    continues from its checkpoint and reads no source. `freeze`: parts of the model
    (`FREEZABLE`) that do not train.
    """

    task: str = "generate"
    # A factory, not a shared default: checking a `ModelConfig`'s specs imports the component
    # packages, which importing this module must not.
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    precision: str = "auto"
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    sample_every: int = 0
    sample_steps: int = 16
    sample_cfg: float = 3.0
    sample_temperature: float = 1.0
    tokenizer_loss: TokenizerLossConfig = TokenizerLossConfig()
    init_from: str | None = None
    init_strict: bool = True
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.data.cache and self.data.flip
                and not self.model.tokenizer.kwargs.get("sample_posterior")):
            raise ConfigError(
                "data.cache stores the tokens of unflipped images: set data.flip=false, leave "
                "data.cache unset to flip images as they load, or sample the tokenizer's "
                "posterior (a kl tokenizer's sample_posterior=true: its cache holds the "
                "moments of each image and of its flip, as MAR's does)."
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}.")
        _at_least("steps", self.steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("seed", self.seed, 0)
        # The trainer logs every `log_every` steps and at the end; 0 would read as "never"
        # (as `checkpoint_every=0` does) but could only mean every step.
        _at_least("log_every", self.log_every, 1, why="steps between log lines")
        _at_least("checkpoint_every", self.checkpoint_every, 0, why="0: only at the end")
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("sample_every", self.sample_every, 0, why="0: no sample grids")
        _at_least("sample_steps", self.sample_steps, 1)
        _at_least("sample_cfg", self.sample_cfg, 0, integer=False,
                  why="1: the conditional model, 0: the unconditional one")
        _at_least("sample_temperature", self.sample_temperature, 0, integer=False,
                  why="0: the most likely token, or no injected noise")
        if self.task == "tokenizer":
            if self.model.tokenizer.name not in TRAINABLE_TOKENIZERS:
                raise ConfigError(
                    f"task='tokenizer' trains one of the tokenizers {TRAINABLE_TOKENIZERS}, not "
                    f"{self.model.tokenizer.name!r} (set model.tokenizer.name)."
                )
            if self.data.cache:
                raise ConfigError("data.cache holds a frozen tokenizer's tokens; a tokenizer "
                                  "run trains on images: leave data.cache unset.")
            if self.precision == "bfloat16":
                raise ConfigError("precision sets the generative model's backbone; a tokenizer "
                                  "trains in float32: use precision=auto or float32.")
        if not isinstance(self.init_strict, bool):
            raise ConfigTypeError(f"init_strict takes true or false, got {self.init_strict!r}.")
        if self.init_from is not None and self.task != "generate":
            raise ConfigError("init_from starts a generative model from trained weights; a "
                              "tokenizer run reads them with model.tokenizer.path.")
        for part in self.freeze:
            _choice("freeze", part, FREEZABLE)
        _number("grad_accum", self.grad_accum, integer=True)
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(
                f"grad_accum={self.grad_accum} must be >= 1 and divide "
                f"batch_size={self.batch_size}."
            )
