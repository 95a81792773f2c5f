import typing

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Int

from .._types import BIDIRECTIONAL, CAUSAL, Key
from ._abstract import AbstractGenerationOrder


@typing.final
class RasterOrder(AbstractGenerationOrder):
    """Row-major order, one token per sampling step.

    With a causal backbone this is next-token prediction with teacher forcing and a KV cache
    in sampling. With a bidirectional backbone, a training example knows a prefix of uniform
    random length and predicts the rest.
    """

    supported_attention: typing.ClassVar[frozenset[str]] = frozenset({CAUSAL, BIDIRECTIONAL})
    random_permutation: typing.ClassVar[bool] = False

    def permutation(self, n: int, *, key: Key) -> Int[Array, " n"]:
        del key
        return jnp.arange(n, dtype=jnp.int32)

    def num_known(self, n: int, *, key: Key) -> Int[Array, ""]:
        return jr.randint(key, (), 0, n, dtype=jnp.int32)

    def step_counts(self, n: int, steps: int) -> tuple[int, ...]:
        del steps
        return (1,) * n
