"""Parameter path names and regex rules over them (first match wins).

The same names drive the trainable mask, the weight-decay mask and, later, sharding and
checkpoint keys: `backbone.blocks.attn.qkv.weight`.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.tree_util as jtu


def path_name(path: Sequence[Any]) -> str:
    """A dotted name for a key path from `jax.tree_util.tree_flatten_with_path`."""
    parts = []
    for entry in path:
        if isinstance(entry, jtu.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jtu.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jtu.SequenceKey):
            parts.append(str(entry.idx))
        else:
            parts.append(str(entry))
    return ".".join(parts)


def named_leaves(tree: Any, is_leaf: Callable | None = None) -> list[tuple[str, Any]]:
    """`(name, leaf)` for every leaf of `tree`."""
    flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_name(p), leaf) for p, leaf in flat]


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`tree` with each leaf replaced by `fn(name, leaf)`."""
    return jtu.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def first_match(name: str, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
    """The value of the first rule whose regex matches `name` (`re.search`)."""
    for pattern, value in rules:
        if re.search(pattern, name):
            return value
    return default
