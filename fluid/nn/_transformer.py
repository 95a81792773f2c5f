import typing

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import Key
from ._attention import SelfAttention
from ._cross_attention import CrossAttention
from ._init import layer_norm
from ._mlp import Mlp


@typing.final
class TransformerBlock(eqx.Module):
    """A pre-LayerNorm transformer block: self-attention, optional cross-attention, MLP.

    Each sub-layer reads a LayerNormed copy of the stream and adds its output back
    (`x + f(norm(x))`), as in timm's ViT block that MAR uses.

    **Arguments:**

    - `dim`: width; divisible by `num_heads`.
    - `num_heads`: attention heads (self and cross).
    - `mlp_ratio`: MLP inner width over `dim`.
    - `cross_attention`: whether the block cross-attends to a context of width `dim`.
    - `key`: initialisation key.
    """

    attn_norm: eqx.nn.LayerNorm
    attn: SelfAttention
    cross_norm: eqx.nn.LayerNorm | None
    cross: CrossAttention | None
    mlp_norm: eqx.nn.LayerNorm
    mlp: Mlp

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        *,
        key: Key,
    ):
        k_attn, k_cross, k_mlp = jr.split(key, 3)
        self.attn_norm = layer_norm(dim)
        self.attn = SelfAttention(dim, num_heads, key=k_attn)
        if cross_attention:
            self.cross_norm = layer_norm(dim)
            self.cross = CrossAttention(dim, dim, num_heads, key=k_cross)
        else:
            self.cross_norm = self.cross = None
        self.mlp_norm = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), key=k_mlp)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        mask: Bool[Array, "seq seq"] | None = None,
        context: Float[Array, "ctx dim"] | None = None,
        context_mask: Bool[Array, " ctx"] | None = None,
        rows: Int[Array, " rows"] | None = None,
    ) -> Float[Array, "seq_or_rows dim"]:
        """The block on a whole sequence; `mask[q, k]` says which keys query `q` may read.

        With `rows`, the outputs at those positions only, in their order: every position
        is read as a key and a value, but the queries, the cross-attention and the MLP run
        on `rows` alone (equal to the full output indexed by `rows`, for less work).
        """
        h = self.attn(jax.vmap(self.attn_norm)(x), mask, rows)
        x = (x if rows is None else x[rows]) + h
        if self.cross is not None:
            if context is None or context_mask is None:
                raise ValueError("a cross-attention block needs context and context_mask.")
            x = x + self.cross(jax.vmap(self.cross_norm)(x), context, context_mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.mlp_norm)(x))

    def decode(
        self,
        x: Float[Array, " dim"],
        t: Int[Array, ""],
        k_cache: Float[Array, "seq heads head_dim"],
        v_cache: Float[Array, "seq heads head_dim"],
        context_k: Float[Array, "ctx heads head_dim"] | None = None,
        context_v: Float[Array, "ctx heads head_dim"] | None = None,
        context_mask: Bool[Array, " ctx"] | None = None,
    ) -> tuple[
        Float[Array, " dim"], Float[Array, "seq heads head_dim"], Float[Array, "seq heads head_dim"]
    ]:
        """The block at position `t` alone, with causal self-attention through the cache.

        **Returns:**

        The output at `t` and the self-attention caches with position `t` written.
        """
        h, k_cache, v_cache = self.attn.decode(self.attn_norm(x), t, k_cache, v_cache)
        x = x + h
        if self.cross is not None:
            if context_k is None or context_v is None or context_mask is None:
                raise ValueError("a cross-attention block needs the context keys and values.")
            h = self.cross.attend(self.cross_norm(x)[None], context_k, context_v, context_mask)
            x = x + h[0]
        return x + self.mlp(self.mlp_norm(x)), k_cache, v_cache
