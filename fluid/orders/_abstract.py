import abc
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from .._types import CAUSAL, Key


class TrainingPositions(NamedTuple):
    """What one training example's backbone reads and what its loss counts.

    - `order`: the permutation in which positions are produced (`order[j]` is produced at
      step `j`).
    - `known`: the positions the backbone may read.
    - `targets`: the positions whose tokens the loss counts.
    """

    order: Int[Array, " n"]
    known: Bool[Array, " n"]
    targets: Bool[Array, " n"]


class AbstractGenerationOrder(eqx.Module):
    """Which positions are known and which are produced, in training and in sampling, for
    every backbone.

    An order works on ONE example of `n` token positions (row-major over the token grid).
    `supported_attention` is the set of backbone attentions it can drive (`"causal"`,
    `"bidirectional"`); `FluidModel` refuses other pairings.

    Training (`training_positions`): `permutation` orders the positions. A bidirectional
    backbone is given the first `num_known` of the permuted positions and predicts the rest.
    A causal backbone reads, for each position, every position before it in the permutation
    (teacher forcing), so every position is a target and `num_known` is not drawn.

    Sampling: `step_counts(n, steps)` says how many positions are produced at each step, in
    permutation order. It depends only on `(n, steps)`, so it is static under `jax.jit`.

    `random_permutation` says whether `permutation` reads its key: sampling splits a key off
    for the permutation only when it does, so a fixed order leaves the sampling key to the
    steps.
    """

    supported_attention: eqx.AbstractClassVar[frozenset[str]]
    random_permutation: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def permutation(self, n: int, *, key: Key) -> Int[Array, " n"]:
        """A permutation of `range(n)`: the order in which positions are produced."""

    @abc.abstractmethod
    def num_known(self, n: int, *, key: Key) -> Int[Array, ""]:
        """For training a bidirectional backbone, how many positions (a prefix of the
        permutation) are known.

        Values lie in `[0, n - 1]`, so at least one position is a target. `FluidModel` draws
        it per example, from that example's key (MAR draws one count per batch): a batch
        split into micro-batches then gives the same sums, and a batch sees a spread of
        mask ratios.
        """

    @abc.abstractmethod
    def step_counts(self, n: int, steps: int) -> tuple[int, ...]:
        """Positions produced at each sampling step: positive ints summing to `n`.

        `steps` is a request; an order may fix its own count (raster produces one token per
        step, so `len(result) == n` whatever `steps` is).
        """

    def training_positions(
        self,
        n: int,
        attention: str,
        *,
        permutation_key: Key,
        known_key: Key,
        num_known: Int[Array, ""] | None = None,
    ) -> TrainingPositions:
        """The positions a training example reads and predicts, for a backbone of the given
        attention (the rule of the class docstring, in one place).

        **Arguments:**

        - `n`: positions.
        - `attention`: the backbone's, `"causal"` or `"bidirectional"`.
        - `permutation_key`, `known_key`: the keys of `permutation` and `num_known`.
        - `num_known`: a known count in place of the order's draw (bidirectional only).
        """
        order = self.permutation(n, key=permutation_key)
        if attention == CAUSAL:
            if num_known is not None:
                raise ValueError(
                    "num_known applies to bidirectional backbones; a causal backbone sees every "
                    "earlier position (teacher forcing) and every position is a target."
                )
            every = jnp.ones((n,), bool)
            return TrainingPositions(order, every, every)
        rank = jnp.argsort(order)  # rank[i]: the step at which position i is produced
        if num_known is None:
            num_known = self.num_known(n, key=known_key)
        known = rank < num_known
        return TrainingPositions(order, known, ~known)

    def validation_mask_ratios(self, count: int) -> tuple[float, ...]:
        """`count` masked fractions in (0, 1] that stand for the training draw of
        `num_known`, for scoring a bidirectional model at fixed ratios
        (`fluid.eval.validation_loss`): the quantiles of the training distribution of the
        ratio at the midpoints `(i + 0.5) / count`, so that the mean over them is the
        midpoint rule for the training objective's expectation, and no ratio lies where
        training never goes.

        This default is the uniform distribution on (0, 1] (a known count uniform over
        `[0, n - 1]`, as `RasterOrder` draws); an order that draws otherwise says so.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}.")
        return tuple((i + 0.5) / count for i in range(count))


class AbstractBoundedOrder(AbstractGenerationOrder):
    """An order whose training draws know at most a static number of positions.

    `FluidModel` tells a backbone that takes `max_known` (the `mae` backbone) this bound in
    training, so that its encoder runs over that many slots for the known tokens instead of
    all `n`: under MAR's mask ratios (at least 70% masked) the encoder then reads under a
    third of the positions.
    """

    @abc.abstractmethod
    def max_num_known(self, n: int) -> int:
        """A static upper bound, in `[0, n - 1]`, on `num_known(n, key=...)` over every key."""
