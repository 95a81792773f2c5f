import typing

import equinox as eqx
from jaxtyping import Array, Float


@typing.final
class KVCache(eqx.Module):
    """The key/value cache of a stack of causal blocks, for one example.

    An explicit pytree that goes into and comes out of each decoding step. Self-attention
    entries at positions not yet decoded hold anything (zeros at first) and are never read.

    **Fields:**

    - `k`, `v`: self-attention keys and values, written one position at a time.
    - `context_k`, `context_v`: cross-attention keys and values of the text context,
      projected once when the cache is made.
    """

    k: Float[Array, "depth seq heads head_dim"]
    v: Float[Array, "depth seq heads head_dim"]
    context_k: Float[Array, "depth ctx heads head_dim"]
    context_v: Float[Array, "depth ctx heads head_dim"]
