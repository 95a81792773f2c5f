import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from .._types import Key


def dropout(x: Float[Array, "*shape"], rate: float, key: Key | None) -> Float[Array, "*shape"]:
    """Inverted dropout, as torch's: each entry is zeroed with probability `rate` and the
    others are scaled by `1 / (1 - rate)`, so the expectation is unchanged.

    The identity, with nothing traced, when `key` is `None` (evaluation) or `rate` is 0:
    modules that take an optional key are deterministic without one.

    **Arguments:**

    - `x`: any array.
    - `rate`: probability of zeroing an entry, in [0, 1) (static).
    - `key`: randomness, or `None` for no dropout.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"a dropout rate must lie in [0, 1), got {rate}.")
    if key is None or rate == 0.0:
        return x
    keep = jr.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
