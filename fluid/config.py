"""Configuration: frozen keyword-only dataclasses of JSON values, checked when built.

A plug-in slot is a `ComponentSpec(name, kwargs)` resolved through the kind's registry. The
builder supplies the arguments that follow from the other parts (the backbone's `dim` and
`seq_len`, the head's `cond_dim` and `token_dim` or `vocab_size`, the text encoder's
`vocab_size` and `max_len`), so a spec holds only the part's own hyperparameters; those are
checked against the class signature here, not mid-training.
"""

import dataclasses
import difflib
import inspect
import json
import types
import typing
from typing import Any

from ._registry import Registry, check_kwargs

# Constructor arguments that the builder derives from the other parts, per slot.
DERIVED = {
    "tokenizer": frozenset(),
    "head": frozenset({"cond_dim", "token_dim", "vocab_size"}),
    "order": frozenset(),
    "backbone": frozenset({"dim", "seq_len"}),
    "text_encoder": frozenset({"vocab_size", "max_len"}),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComponentSpec:
    """A registry name and the keyword arguments of its constructor."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __hash__(self):
        return hash((self.name, json.dumps(self.kwargs, sort_keys=True)))


def _registries() -> dict[str, Registry]:
    from .backbones import BACKBONES
    from .heads import HEADS
    from .orders import ORDERS
    from .text import TEXT_ENCODERS
    from .tokenizers import TOKENIZERS

    return {
        "tokenizer": TOKENIZERS,
        "head": HEADS,
        "order": ORDERS,
        "backbone": BACKBONES,
        "text_encoder": TEXT_ENCODERS,
    }


def check_spec(slot: str, spec: ComponentSpec) -> None:
    """Raise if `spec.name` is unknown or its kwargs do not fit the class."""
    cls = _registries()[slot].get(spec.name)
    derived = DERIVED[slot]
    clash = sorted(derived & set(spec.kwargs))
    if clash:
        raise TypeError(
            f"{slot} {spec.name!r}: {clash} are derived from the other parts; remove them "
            "from the spec."
        )
    params = inspect.signature(cls).parameters
    filled = {k: None for k in derived if k in params}
    check_kwargs(cls, {**spec.kwargs, **filled}, what=f"{slot} {spec.name!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The parts of a `FluidModel` and the sizes that tie them together."""

    tokenizer: ComponentSpec = ComponentSpec(name="patch", kwargs={"image_size": 32, "patch_size": 4})
    head: ComponentSpec = ComponentSpec(name="diffusion", kwargs={"width": 256, "depth": 3})
    order: ComponentSpec = ComponentSpec(name="random")
    backbone: ComponentSpec = ComponentSpec(
        name="bidirectional", kwargs={"depth": 4, "num_heads": 4}
    )
    text_encoder: ComponentSpec = ComponentSpec(
        name="learned", kwargs={"dim": 128, "depth": 2, "num_heads": 4}
    )
    width: int = 256
    aligner_depth: int = 1
    aligner_heads: int = 4
    text_len: int = 24
    text_vocab_size: int = 128
    caption_dropout: float = 0.1

    def __post_init__(self):
        for slot in DERIVED:
            check_spec(slot, getattr(self, slot))
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}.")


DATASETS = ("shapes", "folder", "jsonl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training images and captions come from, and how they are read.

    `dataset`: `"shapes"` (built in, procedural), `"folder"` (images with same-named `.txt`
    captions under `path`) or `"jsonl"` (a file of `{"image": ..., "caption": ...}` lines at
    `path`). Random flips are off by default: they break left/right captions.

    `cache`: a directory where the frozen tokenizer's tokens (and a frozen text encoder's
    outputs) of every record are computed once, before training, and read from then on
    (`fluid/train/_cache.py`); needs a finite source (`size` for shapes).
    """

    dataset: str = "shapes"
    path: str | None = None
    image_size: int = 32
    categories: tuple[str, ...] | None = None  # shapes only; None: every category
    object_scale: float = 1.0  # shapes only: multiplies object sizes
    layout: str = "random"  # shapes only: "random" (anywhere) or "slots" (near fixed places)
    size: int | None = None  # shapes only: number of distinct items; None = unbounded
    cache: str | None = None  # directory of precomputed tokens (built on first use)
    seed: int = 0
    shuffle: bool = True
    flip: bool = False
    workers: int = 0  # worker processes decoding images; 0 reads in the training process
    fit_images: int = 2048  # images used to fit data-fitted parts (palette codebook)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}.")
        if self.dataset != "shapes" and not self.path:
            raise ValueError(
                f"dataset {self.dataset!r} needs data.path (a folder of images with .txt "
                "captions, or a JSONL file of image/caption pairs)."
            )
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}.")
        from .data.shapes import LAYOUTS

        if self.cache and self.flip:
            raise ValueError(
                "data.cache stores the tokens of unflipped images: set data.flip=false, or "
                "leave data.cache unset to flip images as they load."
            )
        if self.size is not None and self.size < 1:
            raise ValueError(f"data.size must be positive or None, got {self.size}.")

        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown data.layout {self.layout!r}; choose one of {LAYOUTS}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with Fluid's defaults and a warm-up; MAR's gradient clipping."""

    learning_rate: float = 1e-4
    schedule: str = "constant"  # "constant" after warm-up, or "cosine"
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.02
    grad_clip: float | None = 3.0
    ema_decay: float = 0.9999

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}.")


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


TASKS = ("generate", "tokenizer")
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
            raise ValueError(
                f"tokenizer_loss.reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}."
            )
        if self.kl_weight < 0 or self.beta < 0:
            raise ValueError(
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
    """

    task: str = "generate"
    model: ModelConfig = ModelConfig()
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

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")
        if self.task == "tokenizer":
            if self.model.tokenizer.name not in TRAINABLE_TOKENIZERS:
                raise ValueError(
                    f"task='tokenizer' trains one of the tokenizers {TRAINABLE_TOKENIZERS}, not "
                    f"{self.model.tokenizer.name!r} (set model.tokenizer.name)."
                )
            if self.data.cache:
                raise ValueError("data.cache holds a frozen tokenizer's tokens; a tokenizer "
                                 "run trains on images: leave data.cache unset.")
            if self.precision == "bfloat16":
                raise ValueError("precision sets the generative model's backbone; a tokenizer "
                                 "trains in float32: use precision=auto or float32.")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum={self.grad_accum} must be >= 1 and divide "
                f"batch_size={self.batch_size}."
            )


# -- JSON and dotted overrides ------------------------------------------------------------
def to_dict(config: Any) -> Any:
    """A JSON-serialisable dict of a config (specs as {name, kwargs})."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Inverse of `to_dict`."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}.")
    return cls(**kwargs)


def _coerce(value: str, hint: Any, key: str) -> Any:
    """Parse a command-line string as the type `hint` of the field it replaces."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{key}={value!r} fits none of {hint}: {'; '.join(errors)}")
    if hint is bool:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise TypeError(f"{key} takes true or false, got {value!r}.")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise TypeError(f"{key} takes an int, got {value!r}.") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise TypeError(f"{key} takes a float, got {value!r}.") from None
    if hint is str:
        return value
    if hint is ComponentSpec:
        # `kl` (a name, no kwargs) or `{"name": "kl", "kwargs": {...}}`: a whole new part.
        try:
            spec = json.loads(value)
        except json.JSONDecodeError:
            spec = {"name": value}
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or set(spec) - {"name", "kwargs"} or "name" not in spec:
            raise TypeError(
                f'{key} takes a component name or {{"name": ..., "kwargs": {{...}}}}, got {value!r}.'
            )
        return ComponentSpec(name=spec["name"], kwargs=dict(spec.get("kwargs", {})))
    if origin is tuple:
        return tuple(v for v in value.split(",") if v)
    # dicts and anything else: JSON
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise TypeError(f"{key} takes JSON, got {value!r}.") from None


def override(config: Any, dotted: str, value: Any) -> Any:
    """`config` with the field at `dotted` (e.g. `"optim.learning_rate"`) replaced.

    A string `value` is parsed as the field's type. Into a `ComponentSpec`, `head.width=512`
    sets one kwarg and `head.name=softmax` the name. A typo names the closest valid key.
    """
    head, _, rest = dotted.partition(".")
    if isinstance(config, ComponentSpec):
        if head == "name" and not rest:
            return dataclasses.replace(config, name=str(value))
        if head == "kwargs" and rest:
            head, rest = rest, ""
        if rest:
            raise KeyError(f"component kwargs are flat; cannot set {dotted!r}.")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        return dataclasses.replace(config, kwargs={**config.kwargs, head: value})
    names = [f.name for f in dataclasses.fields(config)]
    if head not in names:
        close = difflib.get_close_matches(head, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"{type(config).__name__} has no field {head!r}.{hint} Fields: {', '.join(names)}."
        )
    current = getattr(config, head)
    if rest:
        return dataclasses.replace(config, **{head: override(current, rest, value)})
    hint = typing.get_type_hints(type(config))[head]
    if isinstance(value, str):
        value = _coerce(value, hint, dotted)
    return dataclasses.replace(config, **{head: value})
