import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import BIDIRECTIONAL, Context, Key, TextMask
from ..nn import TransformerStack, embedding
from ._abstract import AbstractBidirectionalBackbone
from ._positioned import positioned_stack


@typing.final
class BidirectionalTransformer(AbstractBidirectionalBackbone):
    """A transformer over all positions at once, for masked (random-order) prediction.

    Unknown positions are replaced by a learned mask embedding before anything reads them
    (MaskGIT, MAR); a learned position embedding is added; every block has bidirectional
    self-attention over all positions, cross-attention to the context and an MLP; a
    LayerNorm closes the stack, and a learned per-position output embedding (MAR's
    `diffusion_pos_embed_learned`) tells the head which position it predicts.

    **Arguments:**

    - `dim`: width of the tokens, the context and the outputs.
    - `depth`: number of blocks.
    - `num_heads`: attention heads; must divide `dim`.
    - `seq_len`: number of positions.
    - `mlp_ratio`: MLP inner width over `dim`.
    - `key`: initialisation key.
    """

    attention: typing.ClassVar[str] = BIDIRECTIONAL
    mask_embed: Float[Array, " dim"]
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
        k_mask, k_pos, k_blocks, k_out = jr.split(key, 4)
        self.dim = dim
        self.seq_len = seq_len
        self.mask_embed = embedding((dim,), key=k_mask)
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
        del order  # the known positions are read the same whatever order produced them
        h = self.blocks(self._inputs(x, known), None, context, context_mask)
        return jax.vmap(self.norm)(h) + self.out_pos_embed

    def at_positions(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        positions: Int[Array, " k"],
    ) -> Float[Array, "k dim"]:
        """`self(...)[positions]` with the last block's queries, cross-attention and MLP
        run on `positions` alone (`TransformerStack` with `rows`): in 16-step sampling at
        256 positions, about a fifth fewer backbone FLOPs at depth 4."""
        h = self.blocks(self._inputs(x, known), None, context, context_mask, positions)
        return jax.vmap(self.norm)(h) + self.out_pos_embed[positions]

    def _inputs(self, x: Float[Array, "seq dim"], known: Bool[Array, " seq"]) -> Array:
        return jnp.where(known[:, None], x, self.mask_embed[None, :]) + self.pos_embed
