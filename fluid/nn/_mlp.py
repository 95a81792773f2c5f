import typing

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Float

from .._types import Key
from ._init import linear


@typing.final
class Mlp(eqx.Module):
    """Linear, exact (erf) GELU, Linear: the feed-forward part of a ViT block.

    **Arguments:**

    - `dim`: input and output width.
    - `hidden_dim`: inner width (`mlp_ratio * dim` in a block).
    - `key`: initialisation key.
    """

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, dim: int, hidden_dim: int, *, key: Key):
        k1, k2 = jr.split(key)
        self.fc1 = linear(dim, hidden_dim, key=k1)
        self.fc2 = linear(hidden_dim, dim, key=k2)

    def __call__(self, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        # torch's nn.GELU default (what timm and MAR use) is the erf form, not tanh.
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
