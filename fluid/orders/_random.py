import functools
import math
import statistics
import typing

import jax.numpy as jnp
import jax.random as jr
import equinox as eqx
from jaxtyping import Array, Int

from .._types import BIDIRECTIONAL, CAUSAL, Key
from ._abstract import AbstractBoundedOrder

MASK_SCHEDULES = ("mar", "cosine")


@functools.lru_cache(maxsize=None)
def cosine_step_counts(n: int, steps: int) -> tuple[int, ...]:
    """MAR's cosine sampling schedule: positions produced at each of `steps` steps.

    After step `s` the number still masked is `floor(n * cos(pi/2 * (s+1)/steps))`, clamped
    so that at least one position is produced per step and one stays masked until the
    last step, which produces the rest.
    """
    if not 1 <= steps <= n:
        raise ValueError(
            f"the cosine schedule needs 1 <= steps <= n tokens; got steps={steps}, n={n}. "
            f"Use at most {n} steps."
        )
    counts = []
    remaining = n
    for s in range(steps):
        if s == steps - 1:
            after = 0
        else:
            after = max(1, min(remaining - 1, math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps))))
        counts.append(remaining - after)
        remaining = after
    return tuple(counts)


@typing.final
class RandomOrder(AbstractBoundedOrder):
    """MAR's random order: a fresh permutation per example, masked prediction.

    **Arguments:**

    - `mask_schedule`: how the masked fraction of each training example is drawn. `"mar"`: a
      normal with location 1 and scale 0.25 truncated to [0.7, 1] (mean 0.867), as MAR;
      `"cosine"`: MaskGIT's `cos(pi/2 * u)` with `u` uniform on [0, 1], as Fluid.

    In training at most `max_num_known(n)` positions are known: `n - ceil(0.7 n)` under
    `"mar"` (76 of 256), `n - 1` under `"cosine"`.

    It drives causal backbones too: teacher forcing over the example's permutation in
    training (the mask ratio is then not drawn), and at sampling the cosine schedule's
    counts, several positions per step, for a backbone that decodes them in one pass from
    a cache (`arpg`), or one per step with `steps = n` (`causal`, whose position queries
    make it RandAR-like).
    """

    supported_attention: typing.ClassVar[frozenset[str]] = frozenset({BIDIRECTIONAL, CAUSAL})
    random_permutation: typing.ClassVar[bool] = True
    mask_schedule: str = eqx.field(static=True, default="mar")

    def __check_init__(self):
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(
                f"unknown mask_schedule {self.mask_schedule!r}; choose one of {MASK_SCHEDULES}."
            )

    def permutation(self, n: int, *, key: Key) -> Int[Array, " n"]:
        return jr.permutation(key, n).astype(jnp.int32)

    def mask_ratio(self, *, key: Key) -> Array:
        """The masked fraction of one training example, in (0, 1]."""
        if self.mask_schedule == "mar":
            # Standardised bounds of [0.7, 1] under N(1, 0.25^2).
            return 1.0 + 0.25 * jr.truncated_normal(key, -1.2, 0.0)
        return jnp.cos(jnp.pi / 2 * jr.uniform(key))

    def validation_mask_ratios(self, count: int) -> tuple[float, ...]:
        """The training draw's quantiles at `(i + 0.5) / count`, in increasing order:
        `"mar"`: `1 + 0.25 * Phi^-1(Phi(-1.2) + q (Phi(0) - Phi(-1.2)))` (the normal's
        quantile within its truncation to [0.7, 1]); `"cosine"`: `sin(pi/2 * q)` (the
        quantile of `cos(pi/2 * u)`, `u` uniform)."""
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}.")
        levels = [(i + 0.5) / count for i in range(count)]
        if self.mask_schedule == "cosine":
            return tuple(math.sin(math.pi / 2 * q) for q in levels)
        normal = statistics.NormalDist()
        low, high = normal.cdf(-1.2), normal.cdf(0.0)
        return tuple(1.0 + 0.25 * normal.inv_cdf(low + q * (high - low)) for q in levels)

    @property
    def min_mask_ratio(self) -> float:
        """The smallest masked fraction `mask_ratio` draws: 0.7 (`"mar"`), 0 (`"cosine"`)."""
        return 0.7 if self.mask_schedule == "mar" else 0.0

    def max_num_known(self, n: int) -> int:
        # `num_known` masks `ceil(n * ratio)`, the ratio at least `min_mask_ratio` up to
        # float32 rounding (a few ulps): the margin keeps the bound an upper bound.
        masked = math.ceil(n * self.min_mask_ratio * (1.0 - 1e-6))
        return n - min(max(masked, 1), n)

    def num_known(self, n: int, *, key: Key) -> Int[Array, ""]:
        num_masked = jnp.ceil(n * self.mask_ratio(key=key)).astype(jnp.int32)
        return n - jnp.clip(num_masked, 1, n)

    def step_counts(self, n: int, steps: int) -> tuple[int, ...]:
        return cosine_step_counts(n, steps)
