import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float

from .._types import Key
from ..nn import TransformerStack, attention_mask, dense, layer_norm, linear


@typing.final
class TextAligner(eqx.Module):
    """Trainable transformer blocks that adapt a text encoder's outputs to the backbone.

    Fluid puts this between its frozen T5 and the image backbone. A linear map from the
    encoder's width, `depth` self-attention blocks that skip padding keys, and a final
    LayerNorm. Outputs at padding positions are zero.

    **Arguments:**

    - `in_dim`: width of the text encoder's outputs.
    - `dim`: width of the backbone.
    - `depth`: number of blocks (0 gives a linear map and a LayerNorm).
    - `num_heads`: attention heads; must divide `dim`.
    - `key`: initialisation key.
    """

    proj: eqx.nn.Linear
    blocks: TransformerStack
    norm: eqx.nn.LayerNorm
    in_dim: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, *, key: Key):
        k_proj, k_blocks = jr.split(key)
        self.in_dim = in_dim
        self.dim = dim
        self.proj = linear(in_dim, dim, key=k_proj)
        self.blocks = TransformerStack(depth, dim, num_heads, key=k_blocks)
        self.norm = layer_norm(dim)

    def __call__(
        self, x: Float[Array, "ctx text_dim"], mask: Bool[Array, " ctx"]
    ) -> Float[Array, "ctx dim"]:
        """The aligned context: one vector of width `dim` per text token."""
        h = dense(self.proj, x)
        h = self.blocks(h, attention_mask(x.shape[0], mask))
        return jnp.where(mask[:, None], jax.vmap(self.norm)(h), 0.0)
