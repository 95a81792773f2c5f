import typing

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import Key
from ._attention import SelfAttention
from ._cross_attention import CrossAttention
from ._dropout import dropout
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
    - `attn_dropout`: dropout rate of the attention weights (timm's `attn_drop`).
    - `proj_dropout`: dropout rate after each sub-layer's output projection and after the
      MLP's activation (timm's `proj_drop`). Dropout runs only when the call is given a key.
    - `key`: initialisation key.
    """

    attn_norm: eqx.nn.LayerNorm
    attn: SelfAttention
    cross_norm: eqx.nn.LayerNorm | None
    cross: CrossAttention | None
    mlp_norm: eqx.nn.LayerNorm
    mlp: Mlp
    attn_dropout: float = eqx.field(static=True, default=0.0)
    proj_dropout: float = eqx.field(static=True, default=0.0)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
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
        for rate in (attn_dropout, proj_dropout):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"a dropout rate must lie in [0, 1), got {rate}.")
        self.attn_dropout = float(attn_dropout)
        self.proj_dropout = float(proj_dropout)

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
        """The block on a whole sequence; `mask[q, k]` says which keys query `q` may read.

        With `rows`, the outputs at those positions only, in their order: every position
        is read as a key and a value, but the queries, the cross-attention and the MLP run
        on `rows` alone (equal to the full output indexed by `rows`, for less work).

        With a `key`, dropout at the block's rates (timm's ViT block: the attention weights,
        each sub-layer's output and the MLP's activation); without one, none.
        """
        if key is None or (self.attn_dropout == 0.0 and self.proj_dropout == 0.0):
            k_attn = k_proj = k_cross = k_mlp = None
        else:
            k_attn, k_proj, k_cross, k_mlp = jr.split(key, 4)
        h = self.attn(jax.vmap(self.attn_norm)(x), mask, rows, dropout_rate=self.attn_dropout,
                      key=k_attn)
        x = (x if rows is None else x[rows]) + dropout(h, self.proj_dropout, k_proj)
        if self.cross is not None:
            if context is None or context_mask is None:
                raise ValueError("a cross-attention block needs context and context_mask.")
            h = self.cross(jax.vmap(self.cross_norm)(x), context, context_mask)
            x = x + dropout(h, self.proj_dropout, k_cross)
        normed = jax.vmap(self.mlp_norm)(x)
        if k_mlp is None:
            return x + jax.vmap(self.mlp)(normed)
        # One draw over the whole sequence (per-row keys cost a Threefry split per row).
        return x + self.mlp(normed, dropout_rate=self.proj_dropout, key=k_mlp)

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

    def decode_chunk(
        self,
        x: Float[Array, "k dim"],
        t: Int[Array, ""],
        k_cache: Float[Array, "seq heads head_dim"],
        v_cache: Float[Array, "seq heads head_dim"],
        context_k: Float[Array, "ctx heads head_dim"] | None = None,
        context_v: Float[Array, "ctx heads head_dim"] | None = None,
        context_mask: Bool[Array, " ctx"] | None = None,
    ) -> tuple[
        Float[Array, "k dim"], Float[Array, "seq heads head_dim"], Float[Array, "seq heads head_dim"]
    ]:
        """The block at the `k` consecutive positions `t, ..., t + k - 1` (`decode` on each
        in turn, in one call).

        **Returns:**

        The outputs at those positions and the self-attention caches with them written.
        """
        h, k_cache, v_cache = self.attn.decode_chunk(jax.vmap(self.attn_norm)(x), t, k_cache,
                                                     v_cache)
        x = x + h
        if self.cross is not None:
            if context_k is None or context_v is None or context_mask is None:
                raise ValueError("a cross-attention block needs the context keys and values.")
            x = x + self.cross.attend(jax.vmap(self.cross_norm)(x), context_k, context_v,
                                      context_mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.mlp_norm)(x)), k_cache, v_cache
