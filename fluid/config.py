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
import math
import numbers
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from ._errors import ConfigError, ConfigKeyError, ConfigTypeError
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
        raise ConfigTypeError(
            f"{slot} {spec.name!r}: {clash} are derived from the other parts; remove them "
            "from the spec."
        )
    params = inspect.signature(cls).parameters
    filled = {k: None for k in derived if k in params}
    check_kwargs(cls, {**spec.kwargs, **filled}, what=f"{slot} {spec.name!r}")


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
        _at_least("model.width", self.width, 1)
        _at_least("model.aligner_depth", self.aligner_depth, 0, why="0: no aligner blocks")
        _at_least("model.aligner_heads", self.aligner_heads, 1)
        # `fluid.data.Loader` refuses `text_len < 2`, the caption tokenizer
        # (`train_text_tokenizer`) a vocabulary under 5 ids: refused here, before training.
        _at_least("model.text_len", self.text_len, 2, why="caption ids per example")
        _at_least("model.text_vocab_size", self.text_vocab_size, 5,
                  why="4 special ids and at least one piece")
        _fraction("model.caption_dropout", self.caption_dropout)


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
                "captions, or a JSONL file of image/caption pairs)."
            )
        _at_least("data.image_size", self.image_size, 1)
        _at_least("data.object_scale", self.object_scale, 0, integer=False, strict=True)
        _at_least("data.fit_images", self.fit_images, 1)
        _at_least("data.workers", self.workers, 0, why="0 reads in the training process")
        _number("data.seed", self.seed, integer=True)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must lie in [0, 2**32), got {self.seed}.")
        from .data import ON_CHANGE
        from .data.shapes import LAYOUTS

        _choice("data.on_change", self.on_change, ON_CHANGE)

        if self.cache and self.flip:
            raise ConfigError(
                "data.cache stores the tokens of unflipped images: set data.flip=false, or "
                "leave data.cache unset to flip images as they load."
            )
        if self.size is not None and self.size < 1:
            raise ConfigError(f"data.size must be positive or None, got {self.size}.")

        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown data.layout {self.layout!r}; choose one of {LAYOUTS}.")


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
        _number("grad_accum", self.grad_accum, integer=True)
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(
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
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}.")
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
        raise ConfigTypeError(f"{key}={value!r} fits none of {hint}: {'; '.join(errors)}")
    if hint is bool:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigTypeError(f"{key} takes true or false, got {value!r}.")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigTypeError(f"{key} takes an int, got {value!r}.") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigTypeError(f"{key} takes a float, got {value!r}.") from None
    if hint is str:
        return value
    if hint is ComponentSpec:
        # `kl` (a name, no kwargs) or `{"name": "kl", "kwargs": {...}}`: a whole new part.
        spec = _json_or_text(value)
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or set(spec) - {"name", "kwargs"} or "name" not in spec:
            raise ConfigTypeError(
                f'{key} takes a component name or {{"name": ..., "kwargs": {{...}}}}, got {value!r}.'
            )
        return ComponentSpec(name=spec["name"], kwargs=dict(spec.get("kwargs", {})))
    if origin is tuple:
        return tuple(v for v in value.split(",") if v)
    # dicts and anything else: JSON
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ConfigTypeError(f"{key} takes JSON, got {value!r}.") from None


_UNSET = object()


@dataclasses.dataclass
class _Change:
    """What one call's overrides set at a key: a new value for the key itself (applied
    first), and the changes below it (a config's fields; a spec's `name` and `kwargs`)."""

    value: Any = _UNSET
    below: dict[str, "_Change"] = dataclasses.field(default_factory=dict)

    def at(self, key: str) -> "_Change":
        return self.below.setdefault(key, _Change())


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """`config` with every dotted override (e.g. `{"optim.learning_rate": "3e-4"}`) applied
    at once, then checked once: the result does not depend on the order of the overrides, so
    `data.dataset=folder data.path=imgs/` and `grad_accum=3 batch_size=9` work in any order.

    **Arguments:**

    - `config`: a config dataclass (usually a `TrainConfig`).
    - `overrides`: `{dotted key: value}`. A string value is parsed as the type of the field it
      replaces (`"3e-4"` for a float, `"true"` for a bool, `"a,b"` for a tuple, a component
      name or `{"name": ..., "kwargs": {...}}` JSON for a `ComponentSpec`); any other value
      is taken as given.

    Into a `ComponentSpec` (say `model.head`): `model.head=softmax` replaces the whole spec;
    `model.head.width=512` (or `model.head.kwargs.width=512`) sets one kwarg, its string
    parsed as JSON where it parses (else kept a string); `model.head.kwargs={...}` replaces
    all kwargs. `model.head.name=flow` switches the class: a *different* name drops the old
    class's kwargs (they belong to it), the *same* name keeps them. Kwargs set by other
    overrides of the same call apply on top, in either order
    (`model.head.name=flow model.head.width=64` gives `flow` with `width=64` alone). Likewise
    a key's own value applies before the keys below it (`model.head=...` before
    `model.head.width`).

    **Returns:**

    A new config of the same class; every dataclass on an overridden path is rebuilt once,
    with all its new values, so its checks see only the final state.

    **Raises:**

    `KeyError` for an unknown key, naming the closest valid one, or the full dotted key of a
    field it names further down (`learning_rate` -> `optim.learning_rate`); `TypeError` for a
    value that does not parse as its field's type; the config's own errors for values out of
    range or parts that do not fit.
    """
    root = _Change()
    for dotted, value in overrides.items():
        _record(root, config, dotted.split("."), value, dotted, "")
    return _resolve(config, root, type(config))


def override(config: Any, dotted: str, value: Any) -> Any:
    """`config` with the field at `dotted` (e.g. `"optim.learning_rate"`) replaced:
    `apply_overrides(config, {dotted: value})`, which documents the parsing of `value` and
    what `model.head.name=...` does to the old component's kwargs (a different name drops
    them). A typo names the closest valid key."""
    return apply_overrides(config, {dotted: value})


def _record(change: _Change, config: Any, parts: list[str], value: Any, dotted: str,
            prefix: str) -> None:
    """Note `dotted = value` under `change`, walking `config` (a dataclass) by `parts`."""
    names = [f.name for f in dataclasses.fields(config)]
    head, rest = parts[0], parts[1:]
    if head not in names:
        raise ConfigKeyError(_unknown_key(config, parts, prefix))
    hint = typing.get_type_hints(type(config))[head]
    here = prefix + head
    node = change.at(head)
    if hint is ComponentSpec:
        _record_spec(node, rest, value, dotted)
    elif not rest:
        node.value = _field_value(value, hint, dotted)
    elif dataclasses.is_dataclass(hint):
        _record(node, getattr(config, head), rest, value, dotted, here + ".")
    else:
        raise ConfigKeyError(f"{here} is a single value with no fields; cannot set {dotted!r}.")


def _record_spec(change: _Change, rest: list[str], value: Any, dotted: str) -> None:
    if not rest:
        change.value = _field_value(value, ComponentSpec, dotted)
        return
    key, deeper = rest[0], rest[1:]
    if key == "name" and not deeper:
        change.at("name").value = str(value)
        return
    if key == "kwargs":
        if not deeper:
            change.at("kwargs").value = _kwargs_value(value, dotted)
            return
        key, deeper = deeper[0], deeper[1:]
    if deeper:
        raise ConfigKeyError(f"component kwargs are flat; cannot set {dotted!r}.")
    change.at("kwargs").at(key).value = _json_or_text(value)


def _field_value(value: Any, hint: Any, dotted: str) -> Any:
    if isinstance(value, str):
        value = _coerce(value, hint, dotted)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, Mapping):
            value = from_dict(hint, dict(value))
        if not isinstance(value, hint):
            raise ConfigTypeError(f"{dotted} takes a {hint.__name__}, got {value!r}.")
    elif isinstance(value, list):
        value = tuple(value)
    return value


def _json_or_text(value: Any) -> Any:
    """A command-line value read as JSON where it parses (`3`, `[1, 2]`, `{"a": 1}`), else
    kept as the text it is (`kl`); a value that is not text is kept."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _kwargs_value(value: Any, dotted: str) -> dict[str, Any]:
    value = _json_or_text(value)
    if not isinstance(value, Mapping):
        raise ConfigTypeError(f"{dotted} takes a JSON object of keyword arguments, got {value!r}.")
    return dict(value)


def _resolve(current: Any, change: _Change, hint: Any) -> Any:
    """`current` with `change` applied; each dataclass is rebuilt (and checked) once."""
    if hint is ComponentSpec:
        return _resolve_spec(current, change)
    if change.value is not _UNSET:
        current = change.value
    if not change.below:
        return current
    hints = typing.get_type_hints(type(current))
    updates = {k: _resolve(getattr(current, k), sub, hints[k]) for k, sub in change.below.items()}
    return dataclasses.replace(current, **updates)


def _resolve_spec(spec: ComponentSpec, change: _Change) -> ComponentSpec:
    if change.value is not _UNSET:
        spec = change.value
    name, kwargs = spec.name, dict(spec.kwargs)
    renamed = change.below.get("name")
    if renamed is not None and renamed.value != spec.name:
        # The old kwargs are the old class's arguments.
        name, kwargs = renamed.value, {}
    given = change.below.get("kwargs")
    if given is not None:
        if given.value is not _UNSET:
            kwargs = dict(given.value)
        kwargs.update({k: sub.value for k, sub in given.below.items()})
    return ComponentSpec(name=name, kwargs=kwargs)


def _paths(config: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key below `config`: fields, and a spec's `name` and current kwargs."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        path = prefix + f.name
        yield path
        if isinstance(value, ComponentSpec):
            yield f"{path}.name"
            yield from (f"{path}.{k}" for k in value.kwargs)
        elif dataclasses.is_dataclass(value):
            yield from _paths(value, path + ".")


def _unknown_key(config: Any, parts: list[str], prefix: str) -> str:
    """The message for `parts[0]`, not a field of `config`: the closest field, or the full key
    of a field of that name further down (`head.name` -> `model.head.name`)."""
    head, rest = parts[0], "".join(f".{p}" for p in parts[1:])
    names = [f.name for f in dataclasses.fields(config)]
    deeper = [p for p in _paths(config) if "." in p]

    def below(name: str) -> list[str]:
        return [f"{prefix}{p}{rest}" for p in deeper if p.rsplit(".", 1)[-1] == name]

    suggestions = below(head)
    if not suggestions:
        suggestions = difflib.get_close_matches(head, names, n=1)
    if not suggestions:
        close = difflib.get_close_matches(head, {p.rsplit(".", 1)[-1] for p in deeper}, n=1)
        suggestions = below(close[0]) if close else []
    quoted = [repr(s) for s in suggestions]
    hint = ""
    if quoted:
        listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        hint = f" Did you mean {listed}?"
    return f"{type(config).__name__} has no field {head!r}.{hint} Fields: {', '.join(names)}."
