import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import Key
from ._cache import KVCache
from ._init import per_vector
from ._scan import DEFAULT_REMAT_POLICY, RematPolicy, scan_layers
from ._stacked import stacked_field
from ._transformer import TransformerBlock


# One compilation per configuration (ints static under filter_jit): initialising eagerly
# compiles every primitive of every shape one by one, seconds per model on a 2-core CPU.
@eqx.filter_jit
def _stacked_blocks(depth, dim, num_heads, mlp_ratio, cross_attention, attn_dropout,
                    proj_dropout, key):
    def make(k):
        return TransformerBlock(dim, num_heads, mlp_ratio, cross_attention, attn_dropout,
                                proj_dropout, key=k)

    return eqx.filter_vmap(make)(jr.split(key, depth))


@typing.final
class TransformerStack(eqx.Module):
    """`depth` transformer blocks stored stacked and run with `jax.lax.scan`
    (`fluid.nn.scan_layers`, rematerialised in the backward pass by `remat`).

    Every array leaf of `layers` has a leading `depth` axis (the blocks are built by
    `eqx.filter_vmap` over keys), so the stack compiles one block, not `depth` of them;
    the field is a `fluid.nn.stacked_field`, so sharding never splits that axis.

    **Arguments:**

    - `depth`: number of blocks (may be 0: the stack is then the identity).
    - `dim`, `num_heads`, `mlp_ratio`, `cross_attention`: as `TransformerBlock`.
    - `remat`: what the backward pass keeps from each block (`scan_layers`' `remat`);
      `DEFAULT_REMAT_POLICY` by default, `None` for a plain scan. It changes memory and
      speed, never values or gradients.
    - `attn_dropout`, `proj_dropout`: as `TransformerBlock`; dropout runs only when the
      call is given a key.
    - `key`: initialisation key.
    """

    layers: TransformerBlock = stacked_field()
    depth: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    remat: RematPolicy = eqx.field(static=True)

    def __init__(
        self,
        depth: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        remat: RematPolicy = DEFAULT_REMAT_POLICY,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        *,
        key: Key,
    ):
        self.layers = _stacked_blocks(depth, dim, num_heads, mlp_ratio, cross_attention,
                                      float(attn_dropout), float(proj_dropout), key)
        self.depth = depth
        self.dim = dim
        self.num_heads = num_heads
        self.remat = remat

    @property
    def cross_attention(self) -> bool:
        return self.layers.cross is not None

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        mask: Bool[Array, "seq seq"] | None = None,
        context: Float[Array, "ctx dim"] | None = None,
        context_mask: Bool[Array, " ctx"] | None = None,
        rows: Int[Array, " rows"] | None = None,
        *,
        key: Key | None = None,
    ) -> Float[Array, "seq_or_rows dim"]:
        """Every block in turn; arguments as `TransformerBlock.__call__`.

        With `rows`, the outputs at those positions only: the last block runs its queries,
        cross-attention and MLP on `rows` alone (`TransformerBlock.__call__`), the blocks
        before it on every position, whose keys and values the last block reads.

        With a `key`, each block draws its dropout from its own part of it; without one,
        no dropout.
        """
        params, static = eqx.partition(self.layers, eqx.is_array)
        keys = None if key is None else jr.split(key, self.depth)

        def layer(h, p_k):
            p, k = p_k
            return eqx.combine(p, static)(h, mask, context, context_mask, key=k)

        if rows is None:
            return scan_layers(layer, x, (params, keys), remat=self.remat)
        if self.depth == 0:
            return x[rows]
        first = jax.tree.map(lambda a: a[:-1], (params, keys))
        x = scan_layers(layer, x, first, remat=self.remat)
        last = eqx.combine(jax.tree.map(lambda a: a[-1], params), static)
        return last(x, mask, context, context_mask, rows, key=None if keys is None else keys[-1])

    def init_cache(self, seq_len: int, context: Float[Array, "ctx dim"]) -> KVCache:
        """An empty self-attention cache for `seq_len` positions, with the context's
        cross-attention keys and values of every block projected once."""
        if not self.cross_attention:
            raise ValueError("init_cache needs a stack built with cross_attention=True.")
        params, static = eqx.partition(self.layers, eqx.is_array)
        context_k, context_v = jax.vmap(
            lambda p: eqx.combine(p, static).cross.project_context(context)
        )(params)
        shape = (self.depth, seq_len, self.num_heads, self.dim // self.num_heads)
        empty = jnp.zeros(shape, context_k.dtype)
        return KVCache(k=empty, v=empty, context_k=context_k, context_v=context_v)

    def decode(
        self,
        x: Float[Array, " dim"],
        t: Int[Array, ""],
        cache: KVCache,
        context_mask: Bool[Array, " ctx"],
    ) -> tuple[Float[Array, " dim"], KVCache]:
        """Every block at position `t` alone (causal self-attention through `cache`).

        **Returns:**

        The output at `t` and `cache` with position `t` written in every block.
        """
        # One position per block and step: products per vector (see `per_vector`).
        params, static = eqx.partition(per_vector(self.layers), eqx.is_array)

        def body(h, xs):
            p, k, v, ck, cv = xs
            h, k, v = eqx.combine(p, static).decode(h, t, k, v, ck, cv, context_mask)
            return h, (k, v)

        xs = (params, cache.k, cache.v, cache.context_k, cache.context_v)
        x, (k, v) = jax.lax.scan(body, x, xs)
        return x, KVCache(k=k, v=v, context_k=cache.context_k, context_v=cache.context_v)

    def decode_chunk(
        self,
        x: Float[Array, "k dim"],
        t: Int[Array, ""],
        cache: KVCache,
        context_mask: Bool[Array, " ctx"],
    ) -> tuple[Float[Array, "k dim"], KVCache]:
        """Every block at the `k` consecutive positions `t, ..., t + k - 1` (causal
        self-attention through `cache`; `decode` on each position in turn, in one call).

        **Returns:**

        The outputs at those positions and `cache` with them written in every block.
        """
        params, static = eqx.partition(self.layers, eqx.is_array)

        def body(h, xs):
            p, k, v, ck, cv = xs
            h, k, v = eqx.combine(p, static).decode_chunk(h, t, k, v, ck, cv, context_mask)
            return h, (k, v)

        xs = (params, cache.k, cache.v, cache.context_k, cache.context_v)
        x, (k, v) = jax.lax.scan(body, x, xs)
        return x, KVCache(k=k, v=v, context_k=cache.context_k, context_v=cache.context_v)
