"""Parameter path names and regex rules over them (first match wins).

The same names drive the trainable mask, the weight-decay mask, sharding and checkpoint
keys: `backbone.blocks.attn.qkv.weight` (`fluid.run.path_name`, one definition).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.tree_util as jtu

from .._paths import named_leaves as named_leaves
from .._paths import path_name as path_name


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`tree` with each leaf replaced by `fn(name, leaf)`."""
    return jtu.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def first_match(name: str, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
    """The value of the first rule whose regex matches `name` (`re.search`)."""
    for pattern, value in rules:
        if re.search(pattern, name):
            return value
    return default
