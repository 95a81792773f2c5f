"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on linear layers: `add_lora`
wraps every `eqx.nn.Linear` of a tree in a `LoRALinear`, `merge_lora` folds them back."""

import math
import typing
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float

from .._types import Key


@typing.final
class LoRALinear(eqx.Module):
    """A linear layer plus a trainable low-rank update: `weight @ x + bias + scale * B @ A @ x`.

    It keeps the base layer's `weight` and `bias` as its own fields, so their parameter
    paths (`...attn.qkv.weight`) are those of the `eqx.nn.Linear` it replaces: weights of a
    model without adapters load into it by name, and the sharding, decay and trainable rules
    that match them still do. The adapters are `lora_a` (`rank x in`, small random) and
    `lora_b` (`out x rank`, zero), so a new adapter changes nothing until it trains.

    A stacked layer (a `TransformerStack`'s, whose arrays carry a leading depth axis) gets
    adapters with the same leading axes, and each scanned block sees its own slice.

    **Arguments:**

    - `linear`: the base layer (its arrays may have leading stacked axes).
    - `rank`: the adapters' inner dimension.
    - `alpha`: the update is scaled by `alpha / rank`.
    - `key`: the key of `lora_a`'s initialisation.
    """

    weight: Float[Array, "*stack out in"]
    bias: Float[Array, "*stack out"] | None
    lora_a: Float[Array, "*stack rank in"]
    lora_b: Float[Array, "*stack out rank"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, linear: eqx.nn.Linear, rank: int, alpha: float, *, key: Key):
        weight = linear.weight
        stack = weight.shape[:-2]
        # peft's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)).
        bound = 1.0 / math.sqrt(linear.in_features)
        self.weight = weight
        self.bias = linear.bias
        self.lora_a = jr.uniform(key, (*stack, rank, linear.in_features), weight.dtype,
                                 -bound, bound)
        self.lora_b = jnp.zeros((*stack, linear.out_features, rank), weight.dtype)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.scale = float(alpha) / rank

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-2]

    def __call__(self, x: Float[Array, "*rows in"]) -> Float[Array, "*rows out"]:
        # Rows lead in every product (as `fluid.nn.dense` computes a Linear), and the
        # update goes through the rank, never forming `B @ A`.
        y = jnp.matmul(x, self.weight.T)
        if self.bias is not None:
            y = y + self.bias.reshape((1,) * (y.ndim - 1) + self.bias.shape)
        update = jnp.matmul(jnp.matmul(x, self.lora_a.T), self.lora_b.T)
        return y + self.scale * update

    def merged(self) -> eqx.nn.Linear:
        """The `eqx.nn.Linear` computing the same map: `weight + scale * B @ A`."""
        weight = self.weight + self.scale * jnp.matmul(self.lora_b, self.lora_a)
        skeleton = eqx.filter_eval_shape(
            eqx.nn.Linear, self.in_features, self.out_features, use_bias=self.bias is not None,
            key=jr.key(0),
        )
        if self.bias is None:
            return eqx.tree_at(lambda m: m.weight, skeleton, weight)
        return eqx.tree_at(lambda m: (m.weight, m.bias), skeleton, (weight, self.bias))


def _is_linear(x) -> bool:
    return isinstance(x, eqx.nn.Linear | LoRALinear)


def _is_lora(x) -> bool:
    return isinstance(x, LoRALinear)


def add_lora(tree: Any, rank: int, alpha: float, *, key: Key) -> Any:
    """`tree` with every `eqx.nn.Linear` in it wrapped in a `LoRALinear` (layers already
    wrapped stay as they are).

    **Arguments:**

    - `tree`: a module (a backbone) or any pytree.
    - `rank`, `alpha`: as `LoRALinear`.
    - `key`: split once per layer, in the order of the tree's leaves.

    **Returns:**

    The wrapped tree: at initialisation it computes exactly what `tree` does.
    """
    leaves, treedef = jtu.tree_flatten(tree, is_leaf=_is_linear)
    keys = jr.split(key, max(len(leaves), 1))
    leaves = [
        LoRALinear(x, rank, alpha, key=k) if isinstance(x, eqx.nn.Linear) else x
        for x, k in zip(leaves, keys)
    ]
    return jtu.tree_unflatten(treedef, leaves)


def merge_lora(tree: Any) -> Any:
    """`tree` with every `LoRALinear` folded into the `eqx.nn.Linear` it computes
    (`LoRALinear.merged`): a model without adapters, for export, with the same outputs."""
    return jax.tree.map(lambda x: x.merged() if _is_lora(x) else x, tree, is_leaf=_is_lora)


def lora_mask(tree: Any) -> Any:
    """A tree of bools like `tree`: True at the adapters (`lora_a`, `lora_b`) of its
    `LoRALinear`s, False at every other leaf (a trainable filter that trains adapters alone)."""
    def mask(x):
        if not _is_lora(x):
            return False
        off = jtu.tree_map(lambda _: False, x)
        return eqx.tree_at(lambda m: (m.lora_a, m.lora_b), off, (True, True))

    return jax.tree.map(mask, tree, is_leaf=_is_lora)


def has_lora(tree: Any) -> bool:
    """Whether `tree` holds a `LoRALinear`."""
    return any(_is_lora(x) for x in jtu.tree_leaves(tree, is_leaf=_is_lora))
