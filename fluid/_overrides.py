"""A config's JSON form and its dotted command-line overrides (re-exported by `fluid.config`).

Works on any tree of frozen config dataclasses: overrides walk it by field name, parse a
command-line string as the type of the field it replaces, and rebuild each dataclass on an
overridden path once, so that its own checks see only the final values.
"""

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from ._errors import ConfigError, ConfigKeyError, ConfigTypeError
from ._registry import ComponentSpec


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
