"""Device meshes, and parameter sharding by regex rules over parameter path names.

A rule is `(regex, tactic)`: the first rule whose regex `re.search`es a leaf's dotted path
(`backbone.blocks.layers.attn.qkv.weight`) names the tactic that gives that leaf its
`PartitionSpec`. Component code never sees a mesh; everything about placement is here.

Tactics (see `TACTICS`):

- `"replicate"`: every device holds the whole array.
- `"fsdp"`: arrays of at least `min_size` elements are split along one dimension over the
  `"data"` axis (ZeRO-3 / fully sharded data parallelism: parameters, gradients and optimiser
  state live 1/N per data-parallel device and are all-gathered where used). The dimension is
  the largest one divisible by the size of `"data"`, the leading-most on ties; if none
  divides, the array is replicated. The `"model"` axis is left to model parallelism, so
  with a `"model"` axis larger than 1 these arrays are replicated across it. A stacked leaf
  (below) never has its leading axis split.
- `"fsdp_stacked"`: `"fsdp"` that never splits the leading axis, whether or not the leaf is
  declared stacked.

Stacked leaves are the layers a `jax.lax.scan` runs over, stored along a leading depth axis:
every leaf under a field declared with `fluid.nn.stacked_field` (`TransformerStack.layers`,
the diffusion head's `block_*`, a plug-in's own), found in the tree itself
(`fluid.nn.stacked_paths`), whatever the field is called. Splitting the depth axis looks
harmless (each scan step needs one layer anyway), but XLA's partitioner does not slice a
sharded axis at a loop index: the compiled step all-gathers the whole `[depth, ...]` stack
before the loop, in the forward and again in the backward pass, so every device holds every
layer at once and FSDP saves nothing. Split inside a layer, the all-gather is of one layer,
at each step, inside the loop. If no other dimension divides, the stack is replicated.

`RULES["fsdp"]` replicates the image tokenizer and splits everything else with `"fsdp"`.
It also gives `"fsdp_stacked"` to paths that look like stacks by name (a `layers.` not
followed by an index, a `head.block_*`), for trees that carry no declaration (plain dicts, a
plug-in that does not declare its stacks); every stack of fluid's own parts is declared.

Optimiser state and EMA mirror the parameters (optax's Adam `mu` and `nu` have the params'
structure), and their paths end with the parameter's path (`opt_state.1.0.mu.backbone...`).
Since rules are matched with `re.search`, rules written for parameters place them too; write
rules without a `^` anchor (use `(^|\\.)` for "starts a path component"). The moments are
trees of the same modules, so their stacked leaves are found as the parameters' are.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ..nn import stacked_paths
from ._rules import first_match, named_leaves, path_name

AXES = ("data", "model")
DATA_AXIS = "data"
# Below this many elements an array is replicated by the fsdp tactics: the all-gathers of
# small arrays (norms, biases) cost more in latency than their memory is worth.
DEFAULT_MIN_SIZE = 2**14

Rules = Sequence[tuple[str, str]]

# Stacks recognised by name, in trees that do not declare them (see the module docstring).
# (`layers.0.weight` is a Python list of layers, not a stack.)
_NAMED_STACKS = r"(^|\.)layers\.(?!\d)|(^|\.)head\.block_[a-z0-9_]+\."

RULES: Mapping[str, Rules] = MappingProxyType(
    {
        "replicate": ((r".*", "replicate"),),
        "fsdp": (
            # The image tokenizer is frozen (no gradients or optimiser state to split) and runs
            # on every device's share of the batch. Replicated, a tokenizer fitted to data (the
            # palette's k-means) is also computed unpartitioned under `create_sharded`, so it
            # comes out bit for bit as an unsharded build: a sharded output makes XLA split
            # the fit too, which reorders its sums and moves near-tied codewords.
            (r"(^|\.)tokenizer\.", "replicate"),
            (_NAMED_STACKS, "fsdp_stacked"),
            (r".*", "fsdp"),
        ),
    }
)


def _fsdp_spec(shape: tuple[int, ...], size: int, min_size: int, skip_leading: bool):
    if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    first = 1 if skip_leading else 0
    # sorted() is stable: among equal sizes the leading-most dimension comes first.
    for dim in sorted(range(first, len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def _replicate(shape: tuple[int, ...], mesh: Mesh, min_size: int, stacked: bool):
    del shape, mesh, min_size, stacked
    return PartitionSpec()


def _fsdp(shape: tuple[int, ...], mesh: Mesh, min_size: int, stacked: bool) -> PartitionSpec:
    return _fsdp_spec(shape, mesh.shape[DATA_AXIS], min_size, skip_leading=stacked)


def _fsdp_stacked(
    shape: tuple[int, ...], mesh: Mesh, min_size: int, stacked: bool
) -> PartitionSpec:
    del stacked
    return _fsdp_spec(shape, mesh.shape[DATA_AXIS], min_size, skip_leading=True)


# A tactic: `(shape, mesh, min_size, stacked) -> PartitionSpec`, `stacked` saying whether
# the leaf is declared stacked (its leading axis a depth).
TACTICS: Mapping[
    str, Callable[[tuple[int, ...], Mesh, int, bool], PartitionSpec]
] = MappingProxyType({"replicate": _replicate, "fsdp": _fsdp, "fsdp_stacked": _fsdp_stacked})


def make_mesh(
    shape: Mapping[str, int] = MappingProxyType({"data": -1, "model": 1}),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A device mesh with axes `("data", "model")`.

    **Arguments:**

    - `shape`: size of each axis; one of them may be `-1` for "all remaining devices", and
      an axis left out has size 1. `{"data": -1, "model": 1}` (the default) is pure data
      parallelism over every device.
    - `devices`: the devices to lay out; all of `jax.devices()` by default.

    **Returns:**

    A `jax.sharding.Mesh` whose axes are `Auto` (sharding inside `jit` is propagated by the
    compiler from the shardings of inputs and outputs).
    """
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {AXES}.")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [int(shape.get(axis, 1)) for axis in AXES]
    example = _example_shape(n)
    where = f"there are {n} devices; e.g. {example} or {{'data': -1, 'model': 1}}"
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh shape {dict(shape)}: sizes must be positive, with at most one -1; {where}."
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"mesh shape {dict(shape)}: the given sizes multiply to {known}, which does not "
                f"divide the device count; {where}."
            )
        sizes[sizes.index(-1)] = n // known
    elif known != n:
        raise ValueError(f"mesh shape {dict(shape)} needs {known} devices but {where}.")
    # Without Auto axis types, jax 0.10 builds Explicit meshes, under which `eqx.filter_shard`
    # and sharding propagation inside jit behave differently.
    return jax.make_mesh(
        tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices
    )


def _example_shape(n: int) -> dict[str, int]:
    model = 2 if n % 2 == 0 and n > 1 else 1
    return {"data": n // model, "model": model}


def _resolve(rules: str | Rules) -> Rules:
    if isinstance(rules, str):
        if rules not in RULES:
            raise KeyError(f"unknown rule set {rules!r}; the rule sets are {sorted(RULES)}.")
        rules = RULES[rules]
    rules = tuple(rules)
    for rule in rules:
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise ValueError(f"a rule is a pair (regex, tactic), got {rule!r}.")
        pattern, tactic = rule
        re.compile(pattern)
        if tactic not in TACTICS:
            raise KeyError(
                f"unknown tactic {tactic!r} in rule {rule!r}; the tactics are {sorted(TACTICS)}."
            )
    return rules


def _is_shaped(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def param_shardings(
    tree: Any, mesh: Mesh, rules: str | Rules, *, min_size: int = DEFAULT_MIN_SIZE
) -> Any:
    """The sharding of every array of `tree`, by the first rule matching its path.

    **Arguments:**

    - `tree`: a pytree of arrays or of `jax.ShapeDtypeStruct` (from `jax.eval_shape`), such
      as a model, a partition of one (`eqx.partition`, `None` at the other leaves) or a
      training state.
    - `mesh`: from `make_mesh`.
    - `rules`: a rule-set name from `RULES` or a sequence of `(regex, tactic)` pairs, the
      regex `re.search`ed against the dotted path and the tactic a name from `TACTICS`. A
      leaf that no rule matches is replicated. The tactics also see whether the leaf is
      declared stacked (`fluid.nn.stacked_field`): the fsdp ones never split a stacked
      leaf's leading axis.
    - `min_size`: arrays with fewer elements are replicated by the fsdp tactics.

    **Returns:**

    `tree` with a `jax.sharding.NamedSharding` at every array leaf and `None` at every other
    leaf (`None` leaves of `tree` stay `None`).
    """
    rules = _resolve(rules)
    stacked = stacked_paths(tree)

    def one(path, leaf):
        if not _is_shaped(leaf):
            return None
        tactic = first_match(path_name(path), rules, "replicate")
        spec = TACTICS[tactic](tuple(leaf.shape), mesh, min_size, tuple(path) in stacked)
        return NamedSharding(mesh, spec)

    return jtu.tree_map_with_path(one, tree)


def state_shardings(
    abstract_state: Any, mesh: Mesh, rules: str | Rules, *, min_size: int = DEFAULT_MIN_SIZE
) -> Any:
    """The sharding of a whole training state: parameters, optimiser state, EMA, counters.

    Every array leaf is placed by the rules matched against its full path, which ends with
    the parameter's own path for per-parameter state (`opt_state.1.0.mu.backbone.norm.weight`,
    `ema.backbone.norm.weight`): unanchored rules written for parameters therefore give Adam's
    moments and the EMA the sharding of their parameter (their shapes are the parameter's, and
    the tactics depend only on shape). Scalars (step counts, the key) are replicated.

    **Arguments:**

    - `abstract_state`: the state as `jax.ShapeDtypeStruct` leaves (`jax.eval_shape` of the
      function that initialises it) or as arrays.
    - `mesh`, `rules`, `min_size`: as `param_shardings`.

    **Returns:**

    `abstract_state` with a `NamedSharding` at every array leaf, `None` elsewhere: the
    `out_shardings` that initialise the state in place and the `in_shardings` of the step.
    """
    return param_shardings(abstract_state, mesh, rules, min_size=min_size)


def describe_shardings(tree: Any, shardings: Any) -> str:
    """A table of every array of `tree`: path, shape and `PartitionSpec`, for logs.

    **Arguments:**

    - `tree`: arrays or `jax.ShapeDtypeStruct`s.
    - `shardings`: what `param_shardings` returned for `tree`.

    **Returns:**

    One line per array, aligned, then a summary line.
    """
    specs = {
        path_name(p): s.spec
        for p, s in jtu.tree_flatten_with_path(shardings)[0]
        if isinstance(s, NamedSharding)
    }
    rows = [
        (name, str(tuple(leaf.shape)), str(specs.get(name, "-")))
        for name, leaf in named_leaves(tree)
        if _is_shaped(leaf)
    ]
    header = ("path", "shape", "spec")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in [header, *rows]]
    sharded = sum(1 for spec in specs.values() if any(axis is not None for axis in spec))
    lines.append(f"{len(rows)} arrays, {sharded} sharded, {len(rows) - sharded} replicated")
    return "\n".join(lines)


def create_sharded(
    fn: Callable[[], Any], mesh: Mesh, rules: str | Rules, *, min_size: int = DEFAULT_MIN_SIZE
) -> Any:
    """Build a pytree with every array created directly in its sharding.

    `fn` is traced once to find its output's shapes (`eqx.filter_eval_shape`), the shardings
    come from the rules, and `fn` then runs under `jax.jit` with those `out_shardings`, so no
    device ever holds an unsharded copy of a large parameter. Non-array leaves (activation
    functions, Python numbers) are taken from the trace.

    `fn` must be traceable: host work that depends only on Python values is fine (a
    SentencePiece tokenizer encoding the empty caption, NumPy images baked in as
    constants), but work that needs concrete values of JAX arrays (converting one to NumPy,
    Python control flow on its values) fails to trace. Build such a tree eagerly and place
    it with `put_sharded`.

    Randomly initialised arrays equal those of an unsharded `fn()` bit for bit (random bits
    do not depend on the partitioning). Arrays computed by reductions over data (a codebook
    fitted by k-means) are partitioned like their output, which reorders floating-point sums:
    replicate them (as the `"fsdp"` rule set does for `tokenizer.`) to get the values of an
    unsharded build.

    **Arguments:**

    - `fn`: builds the tree, taking no arguments; for example
      `lambda: build_model(config.model, text_tokenizer=tok, key=key)`.
    - `mesh`, `rules`, `min_size`: as `param_shardings`.

    **Returns:**

    `fn()`, with its arrays sharded by the rules.
    """
    abstract = eqx.filter_eval_shape(fn)
    shapes, static = eqx.partition(abstract, _is_shaped)
    shardings = param_shardings(shapes, mesh, rules, min_size=min_size)
    arrays = jax.jit(lambda: eqx.filter(fn(), eqx.is_array), out_shardings=shardings)()
    return eqx.combine(arrays, static)


def put_sharded(
    tree: Any, mesh: Mesh, rules: str | Rules, *, min_size: int = DEFAULT_MIN_SIZE
) -> Any:
    """Move the arrays of an existing tree to their shardings (`jax.device_put`).

    The fallback of `create_sharded` for trees that cannot be built under `jit`, and the way
    to place a tree loaded from elsewhere; it needs the whole tree in memory first.

    **Arguments:**

    - `tree`: a pytree; its non-array leaves are kept as they are.
    - `mesh`, `rules`, `min_size`: as `param_shardings`.

    **Returns:**

    `tree` with its arrays sharded by the rules.
    """
    arrays, static = eqx.partition(tree, _is_shaped)
    placed = jax.device_put(arrays, param_shardings(arrays, mesh, rules, min_size=min_size))
    return eqx.combine(placed, static)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: the leading axis split over `"data"`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Make global arrays of a batch, split over `"data"` along the leading axis.

    Each process passes its own share of the global batch (the whole batch on one host);
    the global batch is the processes' shares stacked in process order, as
    `jax.make_array_from_process_local_data` assembles it.

    **Arguments:**

    - `batch`: name to host array, each with the same leading (batch) size; the global batch
      size must be divisible by the size of the mesh's `"data"` axis.
    - `mesh`: from `make_mesh`.

    **Returns:**

    The batch as `jax.Array`s with the sharding of `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    data = mesh.shape[DATA_AXIS]
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch[{name!r}] is a scalar; every entry needs a batch axis.")
        size = x.shape[0] * jax.process_count()
        if size % data:
            raise ValueError(
                f"batch[{name!r}] has a global batch size of {size}, which is not divisible by "
                f"the {data} devices of the mesh's 'data' axis."
            )
        out[name] = jax.make_array_from_process_local_data(sharding, x)
    return out
