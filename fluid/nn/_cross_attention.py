import typing

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float

from .._types import Key
from ._attention import HEADS_FIRST_MIN_QUERIES, dot_product_attention
from ._init import dense, linear


@typing.final
class CrossAttention(eqx.Module):
    """Multi-head attention from a sequence to a padded context (the text).

    The context's keys and values can be projected once (`project_context`) and reused,
    which the causal backbone does for every decoding step.

    **Arguments:**

    - `dim`: width of the queries and of the output; divisible by `num_heads`.
    - `context_dim`: width of the context.
    - `num_heads`: number of attention heads.
    - `heads_first_min_queries`: as `dot_product_attention`'s (the layout of the products,
      not their values).
    - `key`: initialisation key.
    """

    q: eqx.nn.Linear
    kv: eqx.nn.Linear
    proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    heads_first_min_queries: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_heads: int,
        heads_first_min_queries: int = HEADS_FIRST_MIN_QUERIES,
        *,
        key: Key,
    ):
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}.")
        k_q, k_kv, k_proj = jr.split(key, 3)
        self.q = linear(dim, dim, key=k_q)
        self.kv = linear(context_dim, 2 * dim, key=k_kv)
        self.proj = linear(dim, dim, key=k_proj)
        self.num_heads = num_heads
        self.heads_first_min_queries = heads_first_min_queries

    def project_context(
        self, context: Float[Array, "ctx context_dim"]
    ) -> tuple[Float[Array, "ctx heads head_dim"], Float[Array, "ctx heads head_dim"]]:
        """Keys and values of the context."""
        kv = dense(self.kv, context).reshape(context.shape[0], 2, self.num_heads, -1)
        return kv[:, 0], kv[:, 1]

    def attend(
        self,
        x: Float[Array, "seq dim"],
        k: Float[Array, "ctx heads head_dim"],
        v: Float[Array, "ctx heads head_dim"],
        context_mask: Bool[Array, " ctx"] | Bool[Array, "seq ctx"],
    ) -> Float[Array, "seq dim"]:
        """Attend `x` to precomputed context keys and values, skipping padding.

        `context_mask` is the same for every query (`[ctx]`) or given per query
        (`[seq, ctx]`: which entries each query may read)."""
        q = dense(self.q, x).reshape(x.shape[0], self.num_heads, -1)
        # One mask for every query is broadcast from `[1, ctx]`, as it always was: another
        # spelling of the same broadcast changed XLA's fusion and the samples' last bits.
        rows = context_mask[None, :] if context_mask.ndim == 1 else context_mask
        mask = jnp.broadcast_to(rows, (x.shape[0], k.shape[0]))
        out = dot_product_attention(
            q, k, v, mask, heads_first_min_queries=self.heads_first_min_queries
        )
        return dense(self.proj, out.reshape(x.shape))

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        context: Float[Array, "ctx context_dim"],
        context_mask: Bool[Array, " ctx"],
    ) -> Float[Array, "seq dim"]:
        """Attend `x` to the real (mask True) positions of `context`."""
        k, v = self.project_context(context)
        return self.attend(x, k, v, context_mask)
