"""Stacked layers declare themselves: `stacked_field` marks a field of an `eqx.Module` whose
array leaves carry a leading depth axis, and `stacked_paths` finds them in any tree.

Layers built with `eqx.filter_vmap` over keys and run with `jax.lax.scan` (`scan_layers`)
are stored as one module whose every array has a leading `depth` axis. Whoever places
arrays (the trainer's sharding) must know which leading axes are depths: it is the module
that says so, through the field's declaration, not a convention on parameter names. The
mark lives on the class (dataclass field metadata), so it adds no level to parameter paths,
changes no tree structure and follows the parameters into every tree of the same modules:
a partition, `jax.eval_shape`'s shapes, an optimiser's moments, an EMA.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

_STACKED = "fluid.stacked"

KeyPath = tuple[Any, ...]


def stacked_field(**kwargs: Any) -> Any:
    """A field whose array leaves have a leading depth axis, scanned over: the `depth`
    layers of a stack built by `eqx.filter_vmap` over keys.

    Declare the field with it, as with `eqx.field`:

    ```python
    class Tower(eqx.Module):
        blocks: Block = fluid.nn.stacked_field()
    ```

    Sharding never splits the leading axis of these arrays (see
    `fluid.train._sharding`): XLA cannot slice a sharded axis at a loop index, so a stack
    split by depth is all-gathered whole before the loop.

    **Arguments:**

    - `kwargs`: passed on to `eqx.field` (a `default`, a `converter`); `static=True` makes
      no sense here (a static field holds no arrays).

    **Returns:**

    The dataclass field.
    """
    if kwargs.get("static"):
        raise ValueError("a stacked field holds arrays; it cannot be static.")
    metadata = {**kwargs.pop("metadata", {}), _STACKED: True}
    return eqx.field(metadata=metadata, **kwargs)


def is_stacked_field(field: dataclasses.Field) -> bool:
    """Whether a dataclass field was declared with `stacked_field`."""
    return bool(field.metadata.get(_STACKED, False))


def _is_module(x: Any) -> bool:
    return isinstance(x, eqx.Module)


def _visit(prefix: KeyPath, node: Any, inside: bool, out: set[KeyPath]) -> None:
    for path, leaf in jtu.tree_flatten_with_path(node, is_leaf=_is_module)[0]:
        path = prefix + tuple(path)
        if isinstance(leaf, eqx.Module):
            # An `eqx.Module`'s key path to a field's subtree is `GetAttrKey(name)`; static
            # fields are not part of the tree.
            for field in dataclasses.fields(leaf):
                if field.metadata.get("static", False):
                    continue
                _visit(
                    path + (jtu.GetAttrKey(field.name),),
                    getattr(leaf, field.name),
                    inside or is_stacked_field(field),
                    out,
                )
        elif inside:
            out.add(path)


def stacked_paths(tree: Any) -> frozenset[KeyPath]:
    """The key paths (as `jax.tree_util.tree_flatten_with_path` gives them) of every leaf of
    `tree` under a field declared with `stacked_field`, at any depth.

    **Arguments:**

    - `tree`: any pytree: a model, a partition of one (`None` at the other leaves), its
      `jax.ShapeDtypeStruct`s, or a training state holding such trees.

    **Returns:**

    A frozen set of key paths.
    """
    out: set[KeyPath] = set()
    _visit((), tree, False, out)
    return frozenset(out)
