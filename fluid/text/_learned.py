import typing
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from .._types import Key, TextIds, TextMask
from ..nn import TransformerStack, attention_mask, embedding, layer_norm
from ._abstract import AbstractTextEncoder
from ._caption_tokenizer import AbstractCaptionTokenizer


@typing.final
class LearnedTextEncoder(AbstractTextEncoder):
    """A small transformer encoder trained from scratch with the rest of the model.

    Token embedding plus a learned position embedding, `depth` bidirectional blocks whose
    self-attention skips padding keys, and a final LayerNorm. Outputs at padding positions
    are zero, so nothing downstream can read padding through them either.

    **Arguments:**

    - `vocab_size`: size of the text vocabulary (the tokenizer's).
    - `dim`: width.
    - `depth`: number of blocks.
    - `num_heads`: attention heads; must divide `dim`.
    - `max_len`: longest caption, in tokens.
    - `trainable`: `False` freezes it at its initialisation (an ablation; its outputs can
      then be cached like a pretrained encoder's).
    - `key`: initialisation key.
    """

    token_embed: eqx.nn.Embedding
    pos_embed: Float[Array, "max_len dim"]
    blocks: TransformerStack
    norm: eqx.nn.LayerNorm
    vocab_size: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    max_len: int = eqx.field(static=True)
    trainable: bool = eqx.field(static=True, default=True)

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        max_len: int,
        trainable: bool = True,
        *,
        key: Key,
    ):
        k_tok, k_pos, k_blocks = jr.split(key, 3)
        self.trainable = trainable
        self.vocab_size = vocab_size
        self.dim = dim
        self.max_len = max_len
        self.token_embed = eqx.nn.Embedding(weight=embedding((vocab_size, dim), key=k_tok))
        self.pos_embed = embedding((max_len, dim), key=k_pos)
        self.blocks = TransformerStack(depth, dim, num_heads, key=k_blocks)
        self.norm = layer_norm(dim)

    @classmethod
    def caption_tokenizer(cls, kwargs: Mapping[str, Any]) -> AbstractCaptionTokenizer | None:
        return None  # any vocabulary: one is trained on the captions

    def __call__(self, ids: TextIds, mask: TextMask) -> Float[Array, "ctx text_dim"]:
        ctx = ids.shape[0]
        if ctx > self.max_len:
            raise ValueError(f"caption of {ctx} tokens exceeds max_len={self.max_len}.")
        h = jax.vmap(self.token_embed)(ids) + self.pos_embed[:ctx]
        h = self.blocks(h, attention_mask(ctx, mask))
        return jnp.where(mask[:, None], jax.vmap(self.norm)(h), 0.0)
