"""Dotted names of pytree leaves: `state.params.backbone.blocks.attn.qkv.weight`.

A checkpoint stores each array under its name, and a model file's messages name the leaf
that does not fit; the trainer's regex rules (trainable, weight-decay and sharding rules,
`fluid.train._rules`) match the same names, and a tokenizer maps them to a diffusers
checkpoint's keys. One definition for all of fluid, below every layer (`fluid.run`
re-exports it).
"""

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
