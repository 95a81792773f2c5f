import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import CAUSAL, Context, Key, TextMask
from ..nn import KVCache, TransformerStack, attention_mask, embedding
from ._abstract import AbstractCausalBackbone
from ._positioned import positioned_stack


@typing.final
class CausalTransformer(AbstractCausalBackbone):
    """A decoder-only transformer with causal self-attention and cross-attention to text.

    The tokens are read in generation order (`order`, row-major by default) and shifted
    right by one behind a learned start embedding, so the condition at step `j` is
    computed from the tokens produced before it only; unknown positions read as zeros. At
    step `j` a learned embedding of the position it produces, `order[j]`, is added to the
    input (a position query, which lets any order drive the same weights; in row-major
    order it is MAR's absolute position embedding), and a second one to the output (MAR's
    `diffusion_pos_embed_learned`) so the head sees which position it predicts. Every block
    has causal self-attention, cross-attention to the context and an MLP; a LayerNorm
    closes the stack.

    Incremental decoding uses a `fluid.nn.KVCache`: self-attention keys and values of
    shape `[depth, seq_len, heads, head_dim]`, written at step `t` by `decode_step`, and
    the context's cross-attention keys and values, projected once by `init_cache`.

    **Arguments:**

    - `dim`: width of the tokens, the context and the outputs.
    - `depth`: number of blocks.
    - `num_heads`: attention heads; must divide `dim`.
    - `seq_len`: number of positions.
    - `mlp_ratio`: MLP inner width over `dim`.
    - `key`: initialisation key.
    """

    attention: typing.ClassVar[str] = CAUSAL
    start_embed: Float[Array, " dim"]
    pos_embed: Float[Array, "seq dim"]
    blocks: TransformerStack
    norm: eqx.nn.LayerNorm
    out_pos_embed: Float[Array, "seq dim"]
    dim: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        seq_len: int,
        mlp_ratio: float = 4.0,
        *,
        key: Key,
    ):
        # Five keys, as when a mask embedding was drawn second: the same key builds the
        # same weights as before it was dropped (the model never masks a causal input).
        k_start, _, k_pos, k_blocks, k_out = jr.split(key, 5)
        self.dim = dim
        self.seq_len = seq_len
        self.start_embed = embedding((dim,), key=k_start)
        self.pos_embed, self.blocks, self.norm, self.out_pos_embed = positioned_stack(
            dim, depth, num_heads, mlp_ratio, seq_len, seq_len, pos_key=k_pos,
            blocks_key=k_blocks, out_key=k_out, cross_attention=True,
        )

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        *,
        order: Int[Array, " seq"] | None = None,
    ) -> Float[Array, "seq dim"]:
        h = jnp.where(known[:, None], x, 0.0)
        pos_embed, out_pos_embed = self.pos_embed, self.out_pos_embed
        if order is not None:  # into generation order, and back at the end
            h, pos_embed, out_pos_embed = h[order], pos_embed[order], out_pos_embed[order]
        h = jnp.concatenate([self.start_embed[None, :], h[:-1]]) + pos_embed
        h = self.blocks(h, attention_mask(self.seq_len, causal=True), context, context_mask)
        z = jax.vmap(self.norm)(h) + out_pos_embed
        return z if order is None else z[jnp.argsort(order)]

    def init_cache(self, context: Context, context_mask: TextMask) -> KVCache:
        del context_mask  # padding is masked at every step instead
        return self.blocks.init_cache(self.seq_len, context)

    def decode_step(
        self,
        x_prev: Float[Array, " dim"],
        t: Int[Array, ""],
        cache: KVCache,
        context: Context,
        context_mask: TextMask,
        *,
        position: Int[Array, ""] | None = None,
    ) -> tuple[Float[Array, " dim"], KVCache]:
        del context  # its keys and values were projected into the cache by `init_cache`
        position = t if position is None else position
        h = jnp.where(t == 0, self.start_embed, x_prev)
        h = h + jax.lax.dynamic_index_in_dim(self.pos_embed, position, keepdims=False)
        h, cache = self.blocks.decode(h, t, cache, context_mask)
        out_pos = jax.lax.dynamic_index_in_dim(self.out_pos_embed, position, keepdims=False)
        return self.norm(h) + out_pos, cache
