"""Initialisers shared by the transformer layers (MAR/ViT's choices), and `dense`."""

import typing
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from .._types import Key
from ._lora import LoRALinear

# MAR initialises learned embeddings (positions, mask and start tokens) as N(0, 0.02^2).
EMBED_STD = 0.02
# timm's ViT blocks, which MAR uses, build their LayerNorms with eps 1e-6.
LN_EPS = 1e-6


def linear(in_features: int, out_features: int, *, key: Key) -> eqx.nn.Linear:
    """A linear layer with xavier-uniform weights and zero biases (MAR's `_init_weights`)."""
    layer = eqx.nn.Linear(in_features, out_features, key=key)
    weight = jax.nn.initializers.xavier_uniform()(key, (out_features, in_features))
    return eqx.tree_at(
        lambda m: (m.weight, m.bias), layer, (weight, jnp.zeros((out_features,)))
    )


@typing.final
class PerVectorLinear(eqx.Module):
    """A linear layer that `dense` applies per vector, `weight @ x` (as `eqx.nn.Linear`
    computes it), instead of `x @ weight.T`; made by `per_vector`.

    **Arguments:**

    - `linear`: the layer; its `weight` and `bias` are this one's.
    """

    linear: eqx.nn.Linear

    @property
    def weight(self) -> Float[Array, "out in"]:
        return self.linear.weight

    @property
    def bias(self) -> Float[Array, " out"] | None:
        return self.linear.bias

    def __call__(self, x: Float[Array, " in"]) -> Float[Array, " out"]:
        return self.linear(x)


def _is_linear(x) -> bool:
    return isinstance(x, eqx.nn.Linear)


def _is_linear_or_wrapped(x) -> bool:  # a tree already wrapped is left as it is
    return isinstance(x, eqx.nn.Linear | PerVectorLinear)


def per_vector(tree: Any) -> Any:
    """`tree` with every `eqx.nn.Linear` in it wrapped in a `PerVectorLinear`: the same
    values, with the products that `dense` computes per vector.

    For loops that apply the same layers to a few rows many times, such as cached decoding
    (`TransformerStack.decode`) and the causal sampler: there `x @ weight.T` has XLA:CPU
    copy each weight transposed on every iteration (`mar256` raster sampling, 4 images:
    20.3 s against 12.0 s). Apply it to the modules, inside the traced function, where the
    loop is written; the stored model keeps its `eqx.nn.Linear`s.
    """
    return jax.tree.map(lambda x: PerVectorLinear(x) if _is_linear(x) else x, tree,
                        is_leaf=_is_linear_or_wrapped)


def dense(
    layer: eqx.nn.Linear | Callable[[Array], Array], x: Float[Array, "... in"]
) -> Float[Array, "... out"]:
    """`layer` applied along the last axis of `x`: for an `eqx.nn.Linear`, as
    `x @ weight.T + bias`; any other module that stands in for one (a wrapper, an adapter,
    a `PerVectorLinear`) is called on each vector, except a `LoRALinear`, which takes the
    rows whole.

    Equal to `layer(x)` (or `jax.vmap(layer)(x)`), but the product keeps the rows of `x`
    leading: `eqx.nn.Linear` computes `weight @ x`, and under `vmap` XLA:CPU then lays out
    the product as `[out, rows...]` and transposes it inside the elementwise fusions that
    read it, at a stride. Calling every linear layer of the train step this way makes the
    `mar512` step about 0.82x the time (`benchmarks/README.md`). Where per-vector products
    are faster (a decoding loop), `per_vector` wraps the layers.
    """
    if isinstance(layer, LoRALinear):
        return layer(x)
    if not isinstance(layer, eqx.nn.Linear):
        for _ in range(x.ndim - 1):
            layer = jax.vmap(layer)
        return layer(x)
    y = jnp.matmul(x, layer.weight.T)
    if layer.bias is None:
        return y
    return y + layer.bias.reshape((1,) * (y.ndim - 1) + layer.bias.shape)


def layer_norm(dim: int) -> eqx.nn.LayerNorm:
    """LayerNorm with unit scale and zero shift."""
    return eqx.nn.LayerNorm(dim, eps=LN_EPS)


def embedding(shape: tuple[int, ...], *, key: Key) -> Float[Array, "..."]:
    """A learned embedding table, normal with standard deviation 0.02."""
    return EMBED_STD * jr.normal(key, shape)
