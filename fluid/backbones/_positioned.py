"""The layers every backbone closes with (MAR's decoder), built in one place."""

import equinox as eqx
from jaxtyping import Array, Float

from .._types import Key
from ..nn import TransformerStack, embedding, layer_norm


def positioned_stack(
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    positions: int,
    seq_len: int,
    *,
    pos_key: Key,
    blocks_key: Key,
    out_key: Key,
    **blocks,
) -> tuple[Float[Array, "positions dim"], TransformerStack, eqx.nn.LayerNorm,
           Float[Array, "seq dim"]]:
    """MAR's decoder layers: a learned embedding of the stack's `positions` input positions,
    `depth` transformer blocks (`TransformerStack`; `blocks` are its options), the closing
    LayerNorm, and a learned embedding of the `seq_len` output positions (MAR's
    `diffusion_pos_embed_learned`), which tells the head which position it predicts.

    The three keys come from the caller's own split, so that each backbone keeps the weights
    its key has always given.
    """
    return (
        embedding((positions, dim), key=pos_key),
        TransformerStack(depth, dim, num_heads, mlp_ratio, key=blocks_key, **blocks),
        layer_norm(dim),
        embedding((seq_len, dim), key=out_key),
    )
