import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import CAUSAL, Context, Key, TextMask
from ..nn import (
    DEFAULT_REMAT_POLICY,
    CrossAttention,
    KVCache,
    Mlp,
    TransformerStack,
    attention_mask,
    embedding,
    layer_norm,
    scan_layers,
    stacked_field,
)
from ._abstract import AbstractBackbone, Embed


@typing.final
class QueryBlock(eqx.Module):
    """A target-aware block: queries read a memory of produced tokens, then the text, then
    an MLP (pre-LayerNorm, `q + f(norm(q))`), and never each other.

    The queries do not attend to one another, so the output for one query is the same
    whether it is computed alone or beside others: what lets several positions be
    predicted in one pass.

    **Arguments:**

    - `dim`: width; divisible by `num_heads`.
    - `num_heads`: attention heads.
    - `mlp_ratio`: MLP inner width over `dim`.
    - `key`: initialisation key.
    """

    memory_norm: eqx.nn.LayerNorm
    memory: CrossAttention
    text_norm: eqx.nn.LayerNorm
    text: CrossAttention
    mlp_norm: eqx.nn.LayerNorm
    mlp: Mlp

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, key: Key):
        k_memory, k_text, k_mlp = jr.split(key, 3)
        self.memory_norm = layer_norm(dim)
        self.memory = CrossAttention(dim, dim, num_heads, key=k_memory)
        self.text_norm = layer_norm(dim)
        self.text = CrossAttention(dim, dim, num_heads, key=k_text)
        self.mlp_norm = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), key=k_mlp)

    def __call__(
        self,
        q: Float[Array, "k dim"],
        memory_k: Float[Array, "m heads head_dim"],
        memory_v: Float[Array, "m heads head_dim"],
        memory_mask: Bool[Array, "k m"] | Bool[Array, " m"],
        text_k: Float[Array, "ctx heads head_dim"],
        text_v: Float[Array, "ctx heads head_dim"],
        text_mask: TextMask,
    ) -> Float[Array, "k dim"]:
        """The block on `k` queries, with the memory's and the text's keys and values
        projected (`CrossAttention.project_context`); `memory_mask[q, m]` says which memory
        entries query `q` reads."""
        q = q + self.memory.attend(jax.vmap(self.memory_norm)(q), memory_k, memory_v, memory_mask)
        q = q + self.text.attend(jax.vmap(self.text_norm)(q), text_k, text_v, text_mask)
        return q + jax.vmap(self.mlp)(jax.vmap(self.mlp_norm)(q))


# One compilation per configuration, as `TransformerStack`'s blocks.
@eqx.filter_jit
def _stacked_query_blocks(depth, dim, num_heads, mlp_ratio, key):
    return eqx.filter_vmap(lambda k: QueryBlock(dim, num_heads, mlp_ratio, key=k))(
        jr.split(key, depth)
    )


class ArpgDecodeState(eqx.Module):
    """Where cached parallel decoding stands, under `c` contexts.

    - `blocks`: the content blocks' `KVCache` per context (`seq + 1` positions: the start
      and every produced token).
    - `memory_k`, `memory_v`: each query block's keys and values of the memory, per
      context, `[c, query_depth, seq + 1, heads, head_dim]`.
    - `text_k`, `text_v`: each query block's keys and values of the text, per context.
    - `count`: tokens written so far (memory entries `0..count` are filled).
    """

    blocks: KVCache
    memory_k: Float[Array, "c qdepth m heads head_dim"]
    memory_v: Float[Array, "c qdepth m heads head_dim"]
    text_k: Float[Array, "c qdepth ctx heads head_dim"]
    text_v: Float[Array, "c qdepth ctx heads head_dim"]
    count: Int[Array, ""]


@typing.final
class ArpgTransformer(AbstractBackbone):
    """A causal transformer with target-position queries, which decodes several positions
    per step from a KV cache: random order at the cost of a cached decoder (ARPG,
    arXiv 2503.10568; RandAR, arXiv 2412.01827), here for any token kind and text.

    Two passes. The *content* blocks (causal self-attention, cross-attention to the text,
    an MLP; `TransformerStack`) read the tokens in generation order `order`, each with its
    own position's embedding, shifted right by one behind a learned start embedding: entry
    `i` of their output, the *memory*, summarises the tokens produced at steps `< i`. The
    *query* blocks (`QueryBlock`) then compute the condition of step `j` from a learned
    query for the position it produces, `order[j]`, which reads the memory entries
    `0..j` (and the text), never another query.

    So `z[order[j]]` depends only on the known tokens of earlier steps and on its own
    query: query `j` reads memory entry `i <= j` when the token of step `i - 1` is known
    (unknown tokens read as zeros). In teacher-forced training every token is known; at
    sampling, the known tokens are those of the earlier steps, so the `k` positions of a
    step are predicted in one pass from them alone, exactly as `__call__` with those tokens
    known gives them (the test of the cache).

    Decoding keeps the content blocks' keys and values and each query block's projection
    of the memory in an `ArpgDecodeState`. `decode` runs only the query blocks, on the
    step's `k` queries; `observe` runs the content blocks on the `k` tokens just produced
    and appends them to the memory. Over a whole sample every token passes the content
    blocks once and every query the query blocks once: about one forward pass of the model
    (twice with guidance), whatever the number of steps.

    `depth` counts both kinds of blocks, so that a query block holding as many weights as
    a content block (16 dim^2), the weights equal a causal or bidirectional transformer's
    of the same `depth` (plus the query embedding).

    **Arguments:**

    - `dim`: width of the tokens, the context and the outputs.
    - `depth`: number of blocks, content and query together; at least 2.
    - `num_heads`: attention heads; must divide `dim`.
    - `seq_len`: number of positions.
    - `query_depth`: how many of the `depth` blocks are query blocks; `depth // 2` by
      default, at least 1 and at most `depth - 1`.
    - `mlp_ratio`: MLP inner width over `dim`.
    - `key`: initialisation key.
    """

    attention: typing.ClassVar[str] = CAUSAL
    parallel_decode: typing.ClassVar[bool] = True
    start_embed: Float[Array, " dim"]
    pos_embed: Float[Array, "seq dim"]
    query_embed: Float[Array, "seq dim"]
    blocks: TransformerStack
    memory_norm: eqx.nn.LayerNorm
    queries: QueryBlock = stacked_field()
    norm: eqx.nn.LayerNorm
    dim: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    query_depth: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        seq_len: int,
        query_depth: int | None = None,
        mlp_ratio: float = 4.0,
        *,
        key: Key,
    ):
        query_depth = depth // 2 if query_depth is None else query_depth
        if not 1 <= query_depth <= depth - 1:
            raise ValueError(
                f"the arpg backbone needs at least one content block and one query block: "
                f"depth={depth} and query_depth={query_depth} leave "
                f"{depth - query_depth} content blocks; use depth >= 2 and "
                f"1 <= query_depth <= depth - 1."
            )
        k_start, k_pos, k_query, k_blocks, k_queries = jr.split(key, 5)
        self.dim = dim
        self.seq_len = seq_len
        self.num_heads = num_heads
        self.query_depth = query_depth
        self.start_embed = embedding((dim,), key=k_start)
        self.pos_embed = embedding((seq_len, dim), key=k_pos)
        self.query_embed = embedding((seq_len, dim), key=k_query)
        self.blocks = TransformerStack(
            depth - query_depth, dim, num_heads, mlp_ratio, cross_attention=True, key=k_blocks
        )
        self.memory_norm = layer_norm(dim)
        self.queries = _stacked_query_blocks(query_depth, dim, num_heads, mlp_ratio, k_queries)
        self.norm = layer_norm(dim)

    # -- training and the uncached forward pass ----------------------------------------------
    def __call__(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        *,
        order: Int[Array, " seq"] | None = None,
    ) -> Float[Array, "seq dim"]:
        n = self.seq_len
        order = jnp.arange(n, dtype=jnp.int32) if order is None else order
        steps = jnp.arange(n)
        # Memory entry `i > 0` holds the token of step `i - 1`: query `j` reads the entries
        # `i <= j` whose token is known (and the start). Unknown tokens read as zeros.
        content = jnp.where(known[:, None], x, 0.0)[order] + self.pos_embed[order]
        h = jnp.concatenate([self.start_embed[None, :], content[:-1]])
        h = self.blocks(h, attention_mask(n, causal=True), context, context_mask)
        memory = jax.vmap(self.memory_norm)(h)
        readable = jnp.concatenate([jnp.ones((1,), bool), known[order][:-1]])
        memory_mask = (steps[None, :] <= steps[:, None]) & readable[None, :]
        params, static = eqx.partition(self.queries, eqx.is_array)

        def layer(q, p):
            block = eqx.combine(p, static)
            memory_k, memory_v = block.memory.project_context(memory)
            text_k, text_v = block.text.project_context(context)
            return block(q, memory_k, memory_v, memory_mask, text_k, text_v, context_mask)

        z = scan_layers(layer, self.query_embed[order], params, remat=DEFAULT_REMAT_POLICY)
        return jax.vmap(self.norm)(z)[jnp.argsort(order)]

    # -- cached parallel decoding ------------------------------------------------------------
    def _memory_entries(self, h: Float[Array, "k dim"]) -> tuple[Array, Array]:
        """Each query block's keys and values of new memory entries: `[qdepth, k, ...]`."""
        memory = jax.vmap(self.memory_norm)(h)
        params, static = eqx.partition(self.queries, eqx.is_array)
        return jax.vmap(lambda p: eqx.combine(p, static).memory.project_context(memory))(params)

    def init_decode(
        self, contexts: Float[Array, "c ctx dim"], context_masks: Bool[Array, "c ctx"]
    ) -> ArpgDecodeState:
        params, static = eqx.partition(self.queries, eqx.is_array)
        head_dim = self.dim // self.num_heads
        zero = jnp.zeros((), jnp.int32)

        def one(context, context_mask):
            cache = self.blocks.init_cache(self.seq_len + 1, context)
            h, cache = self.blocks.decode_chunk(self.start_embed[None, :], zero, cache,
                                                context_mask)
            new_k, new_v = self._memory_entries(h)
            shape = (self.query_depth, self.seq_len + 1, self.num_heads, head_dim)
            memory_k = jnp.zeros(shape, new_k.dtype).at[:, :1].set(new_k)
            memory_v = jnp.zeros(shape, new_v.dtype).at[:, :1].set(new_v)
            text_k, text_v = jax.vmap(
                lambda p: eqx.combine(p, static).text.project_context(context)
            )(params)
            return cache, memory_k, memory_v, text_k, text_v

        cache, memory_k, memory_v, text_k, text_v = jax.vmap(one)(contexts, context_masks)
        return ArpgDecodeState(cache, memory_k, memory_v, text_k, text_v, zero)

    def decode(
        self,
        state: ArpgDecodeState,
        tokens: Array,
        embed: Embed,
        positions: Int[Array, " k"],
        contexts: Float[Array, "c ctx dim"],
        context_masks: Bool[Array, "c ctx"],
    ) -> tuple[Float[Array, "c k dim"], ArpgDecodeState]:
        """The conditions at this step's `positions` from the memory of the tokens of the
        earlier steps: the query blocks only. The state is unchanged until `observe`."""
        del tokens, embed, contexts  # the memory holds what was produced
        visible = jnp.arange(self.seq_len + 1) <= state.count
        queries = self.query_embed[positions]
        params, static = eqx.partition(self.queries, eqx.is_array)

        def one(memory_k, memory_v, text_k, text_v, text_mask):
            def body(q, xs):
                p, mk, mv, tk, tv = xs
                return eqx.combine(p, static)(q, mk, mv, visible, tk, tv, text_mask), None

            z, _ = jax.lax.scan(body, queries, (params, memory_k, memory_v, text_k, text_v))
            return jax.vmap(self.norm)(z)

        z = jax.vmap(one)(state.memory_k, state.memory_v, state.text_k, state.text_v,
                          context_masks)
        return z, state

    def observe(
        self,
        state: ArpgDecodeState,
        tokens: Array,
        embed: Embed,
        positions: Int[Array, " k"],
        contexts: Float[Array, "c ctx dim"],
        context_masks: Bool[Array, "c ctx"],
    ) -> ArpgDecodeState:
        """Append the tokens just produced at `positions` to the memory: the content blocks
        on those `k` tokens, through their cache."""
        del contexts  # projected into the caches by `init_decode`
        x = jax.vmap(embed)(tokens[positions]) + self.pos_embed[positions]
        at = state.count + 1

        def one(cache, memory_k, memory_v, context_mask):
            h, cache = self.blocks.decode_chunk(x.astype(self.start_embed.dtype), at, cache,
                                                context_mask)
            new_k, new_v = self._memory_entries(h)
            start = (0, at, 0, 0)
            memory_k = jax.lax.dynamic_update_slice(memory_k, new_k.astype(memory_k.dtype), start)
            memory_v = jax.lax.dynamic_update_slice(memory_v, new_v.astype(memory_v.dtype), start)
            return cache, memory_k, memory_v

        cache, memory_k, memory_v = jax.vmap(one)(state.blocks, state.memory_k, state.memory_v,
                                                  context_masks)
        return ArpgDecodeState(cache, memory_k, memory_v, state.text_k, state.text_v,
                               state.count + positions.shape[0])
