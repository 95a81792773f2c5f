"""Registries of components, one per kind, filled by built-ins and lazily by entry points.

A registry maps a short name (`"diffusion"`) to a final `eqx.Module` class. Built-ins are
registered when their package is imported. Third-party packages declare an entry point in the
kind's group (for heads, `[project.entry-points."fluid.heads"] my_flow = "my_pkg:FlowHead"`);
listing names reads only package metadata, and `get(name)` imports just that plug-in.

`SLOTS` is the one table of a model's plug-in slots: for each, the registry its
`ComponentSpec` names a class of, and the constructor arguments the builder derives from the
other parts (a spec holds only the part's own hyperparameters). The configuration checks
specs through it, the builder builds through it, and the tests read it.
"""

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from ._errors import ConfigTypeError, UserError

BUILTIN_SOURCE = "fluid-jax (built-in)"

T = TypeVar("T", bound=type)


class RegistryError(Exception):
    """Base class of registry errors."""


class UnknownComponentError(RegistryError, UserError, KeyError):
    """A name that no built-in and no installed plug-in registers."""


class DuplicateComponentError(RegistryError):
    """Two sources (plug-ins, or a plug-in and a built-in) claim the same name."""


class InvalidComponentError(RegistryError, TypeError):
    """A class that cannot be a component of this kind (abstract, or the wrong base)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one registered name comes from."""

    name: str
    source: str  # distribution name, or BUILTIN_SOURCE
    target: str  # "module:attr" for entry points, the qualified class name for built-ins


def is_abstract(cls: type) -> bool:
    """True for classes that cannot be instantiated: abstract methods or abstract variables."""
    return bool(
        inspect.isabstract(cls)
        or getattr(cls, "__abstractvars__", None)
        or getattr(cls, "__abstractclassvars__", None)
    )


class Registry(Generic[T]):
    """Names to component classes of one kind.

    **Arguments:**

    - `kind`: what the components are, for messages (`"output head"`).
    - `base`: the abstract class every component of this kind subclasses.
    - `group`: the entry-point group plug-ins use (`"fluid.heads"`).
    """

    def __init__(self, kind: str, base: T, group: str):
        self.kind = kind
        self.base = base
        self.group = group
        self._builtins: dict[str, type] = {}
        self._classes: dict[str, type] = {}  # built-ins and plug-ins loaded so far
        self._plugins: dict[str, importlib.metadata.EntryPoint] | None = None
        self._plugin_sources: dict[str, list[Entry]] = {}

    # -- registration -------------------------------------------------------------------
    def register(self, name: str, cls: T | None = None) -> Callable[[T], T] | T:
        """Register `cls` under `name`; without `cls`, return a class decorator."""
        if cls is None:
            return lambda c: self.register(name, c)  # type: ignore[return-value]
        self._check_class(name, cls, source=f"{cls.__module__}.{cls.__qualname__}")
        if name in self._builtins and self._builtins[name] is not cls:
            raise DuplicateComponentError(
                f"{self.kind} name {name!r} is registered twice: by "
                f"{_qualname(self._builtins[name])} and by {_qualname(cls)}. Pick another name."
            )
        self._builtins[name] = cls
        self._classes[name] = cls
        return cls

    def _check_class(self, name: str, cls: Any, source: str) -> None:
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise InvalidComponentError(
                f"{self.kind} {name!r} from {source} is {cls!r}, which does not subclass "
                f"{self.base.__module__}.{self.base.__qualname__}; a {self.kind} must."
            )
        if is_abstract(cls):
            missing = sorted(
                set(getattr(cls, "__abstractmethods__", ()))
                | set(getattr(cls, "__abstractvars__", ()))
                | set(getattr(cls, "__abstractclassvars__", ()))
            )
            raise InvalidComponentError(
                f"{self.kind} {name!r} from {source} is abstract (it leaves {missing} "
                "unimplemented); register a final, instantiable class."
            )

    # -- discovery ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget discovered plug-ins (after installing one in a running process)."""
        self._plugins = None
        self._plugin_sources = {}
        self._classes = dict(self._builtins)

    def _discover(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._plugins is None:
            plugins: dict[str, importlib.metadata.EntryPoint] = {}
            sources: dict[str, list[Entry]] = {}
            seen: set[tuple[str, str, str]] = set()
            for ep in importlib.metadata.entry_points(group=self.group):
                dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
                marker = (ep.name, dist, ep.value)
                if marker in seen:  # the same distribution found twice on sys.path
                    continue
                seen.add(marker)
                sources.setdefault(ep.name, []).append(Entry(ep.name, dist, ep.value))
                plugins.setdefault(ep.name, ep)
            self._plugins = plugins
            self._plugin_sources = sources
        return self._plugins

    def _conflict(self, name: str) -> str | None:
        claims = list(self._plugin_sources.get(name, []))
        if name in self._builtins:
            claims.insert(0, Entry(name, BUILTIN_SOURCE, _qualname(self._builtins[name])))
        if len(claims) < 2:
            return None
        who = " and ".join(f"{c.source} ({c.target})" for c in claims)
        return (
            f"{self.kind} name {name!r} is claimed by {who}. Uninstall one of them, or rename "
            f"the plug-in's entry point in its [project.entry-points.\"{self.group}\"] table."
        )

    # -- lookup ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name, built-in and plug-in, sorted; imports no plug-in."""
        return [e.name for e in self.entries()]

    def entries(self) -> list[Entry]:
        """Every registered name with its source package; imports no plug-in."""
        plugins = self._discover()
        out = []
        for name in sorted(set(self._builtins) | set(plugins)):
            message = self._conflict(name)
            if message is not None:
                raise DuplicateComponentError(message)
            if name in self._builtins:
                out.append(Entry(name, BUILTIN_SOURCE, _qualname(self._builtins[name])))
            else:
                out.append(self._plugin_sources[name][0])
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._builtins or name in self._discover()

    def get(self, name: str) -> T:
        """The class registered as `name`, importing its plug-in on first use."""
        plugins = self._discover()
        message = self._conflict(name)
        if message is not None:
            raise DuplicateComponentError(message)
        if name in self._classes:
            return self._classes[name]  # type: ignore[return-value]
        if name not in plugins:
            known = sorted(set(self._builtins) | set(plugins))
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known)}. "
                f"Plug-ins register more through the {self.group!r} entry-point group."
            )
        ep = plugins[name]
        source = self._plugin_sources[name][0]
        cls = ep.load()
        self._check_class(name, cls, source=f"{source.source} ({source.target})")
        self._classes[name] = cls
        return cls  # type: ignore[return-value]

    def name_of(self, cls: type) -> str:
        """The name `cls` is registered under, a built-in's or a plug-in's.

        Besides the classes loaded so far, it loads only entry points that name a class of
        the same name (`"pkg:Tokenizer"` for `pkg._impl.Tokenizer`, re-exported).
        """
        for name, known in self._classes.items():
            if known is cls:
                return name
        for name, ep in self._discover().items():
            if ep.attr == cls.__qualname__ and self.get(name) is cls:
                return name
        raise InvalidComponentError(
            f"{_qualname(cls)} is not a registered {self.kind}; register it with "
            f"`register(name, cls)` or a {self.group!r} entry point."
        )

    def build(self, name: str, /, *, key: Any = None, **kwargs: Any) -> Any:
        """Instantiate `name` with `kwargs` (and `key`, when the class takes one)."""
        cls = self.get(name)
        check_kwargs(cls, kwargs, what=f"{self.kind} {name!r}")
        if "key" in inspect.signature(cls).parameters:
            return cls(**kwargs, key=key)
        return cls(**kwargs)


def check_kwargs(cls: type, kwargs: dict[str, Any], what: str) -> None:
    """Raise `ConfigTypeError` (a `TypeError`, and a `UserError` the command line prints as
    one line) when `kwargs` do not fit `cls`'s constructor, naming the valid ones."""
    params = inspect.signature(cls).parameters
    valid = [p for p in params if p != "key" and p != "self"]
    for k in kwargs:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigTypeError(
                f"{what} takes no argument {k!r}.{hint} Valid arguments: {', '.join(valid)}."
            )
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.name not in kwargs
        and p.name != "key"
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if missing:
        raise ConfigTypeError(f"{what} needs argument(s) {', '.join(missing)}.")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComponentSpec:
    """A registry name and the keyword arguments of its constructor."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __hash__(self):
        return hash((self.name, json.dumps(self.kwargs, sort_keys=True)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slot:
    """One plug-in slot of a model: the registry its spec names a class of, and the
    constructor arguments the builder derives from the other parts.

    **Arguments:**

    - `name`: the field of `fluid.config.ModelConfig` that holds the slot's spec.
    - `registry_path`: where the kind's registry lives, `"package:ATTRIBUTE"` (read through
      `registry`); imported on first use, so that the configuration, which checks specs
      through it, imports no component when it is imported.
    - `derived`: the arguments the builder fills in (a class takes those it names in its
      signature); a spec that gives one is refused.
    """

    name: str
    registry_path: str
    derived: frozenset[str] = frozenset()

    @property
    def registry(self) -> Registry:
        """The kind's registry (importing its package, and with it the built-ins)."""
        module, attribute = self.registry_path.split(":")
        return getattr(importlib.import_module(module), attribute)

    def check(self, spec: ComponentSpec) -> None:
        """Raise if `spec.name` is unknown (`UnknownComponentError`), if it gives a derived
        argument or if its kwargs do not fit the class (`ConfigTypeError`, naming the valid
        ones)."""
        cls = self.registry.get(spec.name)
        clash = sorted(self.derived & set(spec.kwargs))
        if clash:
            raise ConfigTypeError(
                f"{self.name} {spec.name!r}: {clash} are derived from the other parts; remove "
                "them from the spec."
            )
        params = inspect.signature(cls).parameters
        filled = {k: None for k in self.derived if k in params}
        check_kwargs(cls, {**spec.kwargs, **filled}, what=f"{self.name} {spec.name!r}")

    def build(self, spec: ComponentSpec, derived: Mapping[str, Any], *, key: Any = None) -> Any:
        """Instantiate `spec`'s class with its kwargs and, of `derived` (a value for every
        argument this slot derives), those its signature takes."""
        if set(derived) != self.derived:
            raise ValueError(
                f"the {self.name} slot derives {sorted(self.derived)}; got values for "
                f"{sorted(derived)}."
            )
        params = inspect.signature(self.registry.get(spec.name)).parameters
        extra = {k: v for k, v in derived.items() if k in params}
        return self.registry.build(spec.name, key=key, **spec.kwargs, **extra)


# In the order of `fluid.config.ModelConfig`'s fields (and of `fluid components`).
SLOTS: dict[str, Slot] = {
    slot.name: slot
    for slot in (
        Slot(name="tokenizer", registry_path="fluid.tokenizers:TOKENIZERS"),
        Slot(name="head", registry_path="fluid.heads:HEADS",
             derived=frozenset({"cond_dim", "token_dim", "vocab_size"})),
        Slot(name="order", registry_path="fluid.orders:ORDERS"),
        Slot(name="backbone", registry_path="fluid.backbones:BACKBONES",
             derived=frozenset({"dim", "seq_len"})),
        Slot(name="text_encoder", registry_path="fluid.text:TEXT_ENCODERS",
             derived=frozenset({"vocab_size", "max_len"})),
    )
}
