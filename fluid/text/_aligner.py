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
    - `identity`: no parameters at all: the context is the encoder's outputs as they are
      (padding zeroed), `in_dim == dim`. MAR's class embedding goes straight into the
      backbone's buffer, so its compositions use this (`ModelConfig.aligner`).
    - `key`: initialisation key.
    """

    proj: eqx.nn.Linear | None
    blocks: TransformerStack | None
    norm: eqx.nn.LayerNorm | None
    in_dim: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int,
                 identity: bool = False, *, key: Key):
        self.in_dim = in_dim
        self.dim = dim
        if identity:
            if in_dim != dim:
                raise ValueError(
                    f"an identity aligner passes the text encoder's outputs on as they are: "
                    f"their width {in_dim} must be the backbone's, {dim}."
                )
            self.proj = self.blocks = self.norm = None
            return
        k_proj, k_blocks = jr.split(key)
        self.proj = linear(in_dim, dim, key=k_proj)
        self.blocks = TransformerStack(depth, dim, num_heads, key=k_blocks)
        self.norm = layer_norm(dim)

    @property
    def identity(self) -> bool:
        return self.proj is None

    def __call__(
        self, x: Float[Array, "ctx text_dim"], mask: Bool[Array, " ctx"]
    ) -> Float[Array, "ctx dim"]:
        """The aligned context: one vector of width `dim` per text token."""
        if self.proj is None or self.blocks is None or self.norm is None:
            return jnp.where(mask[:, None], x, jnp.zeros((), x.dtype))
        h = dense(self.proj, x)
        h = self.blocks(h, attention_mask(x.shape[0], mask))
        return jnp.where(mask[:, None], jax.vmap(self.norm)(h), 0.0)
