import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import Key
from ._dropout import dropout
from ._init import dense, linear

# The default of `heads_first_min_queries`: from how many queries `dot_product_attention`
# moves the heads in front of the sequence (see there).
HEADS_FIRST_MIN_QUERIES = 2


def attention_mask(
    seq: int, key_mask: Bool[Array, " seq"] | None = None, causal: bool = False
) -> Bool[Array, "seq seq"] | None:
    """Which keys each query may read: `mask[q, k]`, or `None` when all may be read.

    **Arguments:**

    - `seq`: sequence length (static).
    - `key_mask`: True at keys that may be read (False at padding).
    - `causal`: if True, query `q` reads only keys `k <= q`.
    """
    mask = None
    if causal:
        idx = jnp.arange(seq)
        mask = idx[:, None] >= idx[None, :]
    if key_mask is not None:
        keys = jnp.broadcast_to(key_mask[None, :], (seq, seq))
        mask = keys if mask is None else mask & keys
    return mask


def dot_product_attention(
    q: Float[Array, "q heads head_dim"],
    k: Float[Array, "k heads head_dim"],
    v: Float[Array, "k heads head_dim"],
    mask: Bool[Array, "q k"] | None = None,
    *,
    heads_first_min_queries: int = HEADS_FIRST_MIN_QUERIES,
    dropout_rate: float = 0.0,
    key: Key | None = None,
) -> Float[Array, "q heads head_dim"]:
    """Scaled dot-product attention with a boolean mask (True = may attend).

    The softmax runs in float32 whatever the input dtype, so low-precision compute keeps
    well-normalised weights. A fully masked row attends uniformly rather than giving NaN.

    With a `key`, the attention weights are dropped out at `dropout_rate` after the softmax
    (torch's `scaled_dot_product_attention(dropout_p=...)`, timm's `attn_drop`); without
    one, nothing is dropped.

    `heads_first_min_queries` (static) chooses how the products are laid out, never their
    values: from that many queries on, the heads move in front of the sequence first (see
    below); a larger value keeps the strided `qhd,khd->hqk` form for more queries, which
    `benchmarks/remat.py --policies strided-attention` times.
    """
    # The scale on the queries, as timm does: fewer multiplications than on the logits.
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    # Several queries: the heads move in front first, so both products are plain batched
    # matrix products over contiguous `[seq, head_dim]` blocks. Left as `qhd,khd->hqk`,
    # XLA:CPU fused the strided head slices into the products and the `mar512` attention
    # forward ran at a fifth of the matmul rate; with the transposes the whole train step
    # takes 0.93x the time (`benchmarks/remat.py --policies strided-attention default`).
    # One query (cached decoding) skips them: they would copy the whole key/value cache at
    # every step.
    heads_first = q.shape[-3] >= heads_first_min_queries
    if heads_first:
        q, k, v = (jnp.swapaxes(a, -3, -2) for a in (q, k, v))
        logits = jnp.einsum("hqd,hkd->hqk", q, k)
    else:
        logits = jnp.einsum("qhd,khd->hqk", q, k)
    logits = logits.astype(jnp.float32)
    if mask is not None:
        # The most negative finite number, not -inf: exp underflows to exactly zero, so
        # masked keys contribute nothing, and a row with no valid key cannot become NaN.
        lowest = jnp.asarray(jnp.finfo(jnp.float32).min, jnp.float32)
        logits = jnp.where(mask[None], logits, lowest)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = dropout(weights, dropout_rate, key).astype(v.dtype)
    if heads_first:
        return jnp.swapaxes(jnp.einsum("hqk,hkd->hqd", weights, v), -3, -2)
    return jnp.einsum("hqk,khd->qhd", weights, v)


@typing.final
class SelfAttention(eqx.Module):
    """Multi-head self-attention with one fused query/key/value projection (as timm's ViT).

    Runs on a whole sequence with a boolean mask (`__call__`) or on one new position
    against a key/value cache (`decode`).

    **Arguments:**

    - `dim`: width; must be divisible by `num_heads`.
    - `num_heads`: number of attention heads.
    - `heads_first_min_queries`: as `dot_product_attention`'s (the layout of the products,
      not their values).
    - `key`: initialisation key.
    """

    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    heads_first_min_queries: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        heads_first_min_queries: int = HEADS_FIRST_MIN_QUERIES,
        *,
        key: Key,
    ):
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}.")
        k_qkv, k_proj = jr.split(key)
        self.qkv = linear(dim, 3 * dim, key=k_qkv)
        self.proj = linear(dim, dim, key=k_proj)
        self.num_heads = num_heads
        self.heads_first_min_queries = heads_first_min_queries

    def _split(self, qkv: Array) -> tuple[Array, Array, Array]:
        # (..., 3, heads, head_dim) order, as timm reshapes its fused projection.
        parts = qkv.reshape(*qkv.shape[:-1], 3, self.num_heads, -1)
        return parts[..., 0, :, :], parts[..., 1, :, :], parts[..., 2, :, :]

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        mask: Bool[Array, "seq seq"] | None = None,
        rows: Int[Array, " rows"] | None = None,
        *,
        dropout_rate: float = 0.0,
        key: Key | None = None,
    ) -> Float[Array, "seq_or_rows dim"]:
        """Attend every position to the positions `mask` allows (all when `None`).

        With `rows`, only those positions query (every position is still a key and a
        value), and only their outputs are returned, in the order of `rows`. With a `key`,
        the attention weights are dropped out at `dropout_rate` (`dot_product_attention`).
        """
        q, k, v = self._split(dense(self.qkv, x))
        if rows is not None:
            q = q[rows]
            mask = None if mask is None else mask[rows]
        out = dot_product_attention(
            q, k, v, mask, heads_first_min_queries=self.heads_first_min_queries,
            dropout_rate=dropout_rate, key=key,
        )
        return dense(self.proj, out.reshape(q.shape[0], x.shape[-1]))

    def decode(
        self,
        x: Float[Array, " dim"],
        t: Int[Array, ""],
        k_cache: Float[Array, "seq heads head_dim"],
        v_cache: Float[Array, "seq heads head_dim"],
    ) -> tuple[
        Float[Array, " dim"], Float[Array, "seq heads head_dim"], Float[Array, "seq heads head_dim"]
    ]:
        """Causal attention for position `t` alone.

        Writes this position's key and value into the caches at `t`, then attends to cache
        positions `<= t`; entries after `t` are never read, whatever they hold.

        **Returns:**

        The output at `t` and the updated caches.
        """
        q, k, v = self._split(dense(self.qkv, x))
        zero = jnp.zeros((), t.dtype)
        at = (t, zero, zero)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
        visible = jnp.arange(k_cache.shape[0]) <= t
        out = dot_product_attention(
            q[None], k_cache, v_cache, visible[None],
            heads_first_min_queries=self.heads_first_min_queries,
        )
        return dense(self.proj, out.reshape(x.shape)), k_cache, v_cache

    def decode_chunk(
        self,
        x: Float[Array, "k dim"],
        t: Int[Array, ""],
        k_cache: Float[Array, "seq heads head_dim"],
        v_cache: Float[Array, "seq heads head_dim"],
    ) -> tuple[
        Float[Array, "k dim"], Float[Array, "seq heads head_dim"], Float[Array, "seq heads head_dim"]
    ]:
        """Causal attention for the `k` consecutive positions `t, ..., t + k - 1` at once.

        Writes their keys and values into the caches from `t` on (`t + k` must not exceed
        the cache's length), then attends position `t + i` to cache positions `<= t + i`.
        Equal to `decode` called on each position in turn.

        **Returns:**

        The outputs at the `k` positions and the updated caches.
        """
        q, k, v = self._split(dense(self.qkv, x))
        zero = jnp.zeros((), t.dtype)
        at = (t, zero, zero)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
        rows = t + jnp.arange(x.shape[0], dtype=t.dtype)
        visible = jnp.arange(k_cache.shape[0])[None, :] <= rows[:, None]
        out = dot_product_attention(
            q, k_cache, v_cache, visible, heads_first_min_queries=self.heads_first_min_queries
        )
        return dense(self.proj, out.reshape(x.shape)), k_cache, v_cache
