import abc

import equinox as eqx
from jaxtyping import Array, Int

from .._types import Key


class AbstractGenerationOrder(eqx.Module):
    """Which positions are known and which are produced, in training and in sampling.

    An order works on ONE example of `n` token positions (row-major over the token grid).
    `supported_attention` is the set of backbone attentions it can drive (`"causal"`,
    `"bidirectional"`); `FluidModel` refuses other pairings.

    Training: `permutation` orders the positions; the first `num_known` of the permuted
    positions are given to the backbone, the rest are the targets. A causal backbone always
    sees every earlier position (teacher forcing), so with causal attention the model uses
    the permutation only and every position is a target.

    Sampling: `step_counts(n, steps)` says how many positions are produced at each step, in
    permutation order. It depends only on `(n, steps)`, so it is static under `jax.jit`.
    """

    supported_attention: eqx.AbstractClassVar[frozenset[str]]

    @abc.abstractmethod
    def permutation(self, n: int, *, key: Key) -> Int[Array, " n"]:
        """A permutation of `range(n)`: the order in which positions are produced."""

    @abc.abstractmethod
    def num_known(self, n: int, *, key: Key) -> Int[Array, ""]:
        """For training, how many positions (a prefix of the permutation) are known.

        Values lie in `[0, n - 1]`, so at least one position is a target. The model draws
        it once per batch, as MAR does, so every example in a batch masks the same count.
        """

    @abc.abstractmethod
    def step_counts(self, n: int, steps: int) -> tuple[int, ...]:
        """Positions produced at each sampling step: positive ints summing to `n`.

        `steps` is a request; an order may fix its own count (raster produces one token per
        step, so `len(result) == n` whatever `steps` is).
        """
