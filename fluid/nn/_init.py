"""Initialisers shared by the transformer layers (MAR/ViT's choices), and `dense`."""

import contextlib
import contextvars
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from .._types import Key

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


_ROWS_FIRST = contextvars.ContextVar("fluid_dense_rows_first", default=True)


@contextlib.contextmanager
def vector_products():
    """While tracing inside this context, `dense` calls linear layers as `eqx.nn.Linear`
    does, `W @ x` per vector.

    For loops that apply the same layers to a few rows many times, such as cached raster
    decoding: there `x @ W.T` has XLA:CPU copy each weight transposed on every iteration
    (`mar256` raster sampling, 4 images: 20.3 s against 12.0 s).
    """
    token = _ROWS_FIRST.set(False)
    try:
        yield
    finally:
        _ROWS_FIRST.reset(token)


def dense(
    layer: eqx.nn.Linear | Callable[[Array], Array], x: Float[Array, "... in"]
) -> Float[Array, "... out"]:
    """`layer` applied along the last axis of `x`: for an `eqx.nn.Linear`, as
    `x @ weight.T + bias`; any other module that stands in for one (a wrapper, an adapter)
    is called on each vector.

    Equal to `layer(x)` (or `jax.vmap(layer)(x)`), but the product keeps the rows of `x`
    leading: `eqx.nn.Linear` computes `weight @ x`, and under `vmap` XLA:CPU then lays out
    the product as `[out, rows...]` and transposes it inside the elementwise fusions that
    read it, at a stride. Calling every linear layer of the train step this way makes the
    `mar512` step about 0.82x the time (`benchmarks/README.md`). Inside
    `vector_products()` it calls `layer` per vector instead.
    """
    if not (isinstance(layer, eqx.nn.Linear) and _ROWS_FIRST.get()):
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
