import functools
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int

from .._types import BIDIRECTIONAL, Context, Key, TextMask
from ..nn import TransformerStack, attention_mask, dense, embedding, layer_norm, linear
from ._abstract import AbstractBidirectionalBackbone
from ._positioned import positioned_stack


@typing.final
class MaskedAutoencoder(AbstractBidirectionalBackbone):
    """MAR's backbone: an MAE-style encoder over the known tokens only, and a decoder over
    every position (Li et al. 2024, `models/mar.py`).

    **Encoder.** A buffer of `buffer_size` condition tokens comes first, then the known
    tokens; a learned position embedding covers buffer and sequence, then a LayerNorm
    (MAR's `z_proj_ln`), ViT blocks (qkv bias, LayerNorm eps 1e-6, exact-GELU MLP, dropout
    on the attention weights and the projections) and a final LayerNorm.

    **Decoder.** A linear map of the encoder's outputs, scattered back to their positions
    in a full-length sequence whose other positions hold a learned mask token; its own
    position embedding; blocks over buffer and every position; a LayerNorm; the buffer is
    dropped and a third, per-position embedding (MAR's `diffusion_pos_embed_learned`) added:
    one condition per position.

    **Conditioning.** Every buffer slot holds the masked mean of the context (MAR puts its
    class embedding in every slot; a one-token context, as `fluid.text.ClassLabelEncoder`
    gives, is exactly that). For text (Fluid), `cross_attention=True` also has every
    encoder and decoder block cross-attend to the whole context, padding masked out; the
    pooled caption still fills the buffer.

    **Static shapes.** The encoder runs over `buffer_size + max_known` slots whatever the
    number of known tokens: the known positions are gathered in ascending order into the
    first slots, the rest are padding, zero and masked out of attention as keys, and their
    outputs are never scattered back. Shapes depend only on `max_known`, so a jitted call
    compiles once for any number of known tokens up to it, while the encoder's cost
    follows the bound rather than the sequence: MAR trains with at least 70% masked, so
    `max_known = seq_len - ceil(0.7 * seq_len)` runs the encoder over under a third of the
    positions. More known tokens than `max_known` raise at run time (`eqx.error_if`)
    rather than being dropped silently. `None` (the default) gives `seq_len` slots, which
    always fit. `at_positions` (sampling, where up to `seq_len - 1` tokens are known) uses
    `seq_len` slots unless told otherwise; `FluidModel.generate` tells `decode` a static
    bound at each step (its step counts are static), so sampling's encoder follows the
    tokens produced so far. In
    `FluidModel`'s training the call's `max_known` comes from the order
    (`fluid.orders.AbstractBoundedOrder`; MAR's random order bounds it as above), so the
    field matters only to direct calls.

    Dropout runs only when a call is given a `key`: `FluidModel` gives one in training
    (`loss_terms`), none in sampling and validation.

    **Arguments:**

    - `dim`: width of the tokens, the context, the blocks and the outputs.
    - `depth`: encoder blocks.
    - `num_heads`: attention heads; must divide `dim`.
    - `seq_len`: number of positions.
    - `mlp_ratio`: MLP inner width over `dim`.
    - `decoder_depth`: decoder blocks; `None` is `depth` (MAR's sizes: 12+12, 16+16, 20+20).
    - `buffer_size`: condition tokens before the sequence (64 in MAR).
    - `max_known`: encoder slots for known tokens in `__call__` (see above); `None` is
      `seq_len`.
    - `cross_attention`: whether the blocks cross-attend to the context (for text).
    - `attn_dropout`, `proj_dropout`: dropout rates (0.1 and 0.1 in MAR).
    - `key`: initialisation key.
    """

    attention: typing.ClassVar[str] = BIDIRECTIONAL
    encoder_pos_embed: Float[Array, "buffer_seq dim"]
    input_norm: eqx.nn.LayerNorm
    encoder: TransformerStack
    encoder_norm: eqx.nn.LayerNorm
    decoder_proj: eqx.nn.Linear
    mask_embed: Float[Array, " dim"]
    decoder_pos_embed: Float[Array, "buffer_seq dim"]
    decoder: TransformerStack
    decoder_norm: eqx.nn.LayerNorm
    out_pos_embed: Float[Array, "seq dim"]
    dim: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    buffer_size: int = eqx.field(static=True)
    max_known: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        seq_len: int,
        mlp_ratio: float = 4.0,
        decoder_depth: int | None = None,
        buffer_size: int = 64,
        max_known: int | None = None,
        cross_attention: bool = False,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        *,
        key: Key,
    ):
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}.")
        max_known = seq_len if max_known is None else max_known
        if not 0 <= max_known <= seq_len:
            raise ValueError(f"max_known must lie in [0, seq_len={seq_len}], got {max_known}.")
        decoder_depth = depth if decoder_depth is None else decoder_depth
        k_enc_pos, k_enc, k_dec_embed, k_mask, k_dec_pos, k_dec, k_out = jr.split(key, 7)
        self.dim = dim
        self.seq_len = seq_len
        self.buffer_size = buffer_size
        self.max_known = max_known
        total = buffer_size + seq_len
        blocks = {"cross_attention": cross_attention, "attn_dropout": attn_dropout,
                  "proj_dropout": proj_dropout}
        self.encoder_pos_embed = embedding((total, dim), key=k_enc_pos)
        self.input_norm = layer_norm(dim)
        self.encoder = TransformerStack(depth, dim, num_heads, mlp_ratio, key=k_enc, **blocks)
        self.encoder_norm = layer_norm(dim)
        self.decoder_proj = linear(dim, dim, key=k_dec_embed)
        self.mask_embed = embedding((dim,), key=k_mask)
        self.decoder_pos_embed, self.decoder, self.decoder_norm, self.out_pos_embed = (
            positioned_stack(dim, decoder_depth, num_heads, mlp_ratio, total, seq_len,
                             pos_key=k_dec_pos, blocks_key=k_dec, out_key=k_out, **blocks)
        )

    @property
    def cross_attention(self) -> bool:
        return self.encoder.cross_attention

    # -- the interface --------------------------------------------------------------------
    def __call__(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        *,
        order: Int[Array, " seq"] | None = None,
        key: Key | None = None,
        max_known: int | None = None,
    ) -> Float[Array, "seq dim"]:
        """Condition vectors for every position (`AbstractBackbone.__call__`).

        `key` turns dropout on (training); `max_known` (static) overrides the number of
        encoder slots for this call.
        """
        del order  # the known positions are read the same whatever order produced them
        k_enc, k_dec = (None, None) if key is None else jr.split(key)
        slots = self.max_known if max_known is None else max_known
        h, positions = self.encode(x, known, context, context_mask, key=k_enc,
                                   max_known=slots)
        return self.decode_conditions(h, positions, context, context_mask, key=k_dec)

    def at_positions(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        positions: Int[Array, " k"],
        *,
        max_known: int | None = None,
    ) -> Float[Array, "k dim"]:
        """`self(...)[positions]`, with the decoder's last block run on `positions` alone.

        The encoder has `seq_len` slots here unless `max_known` (static) says fewer: in
        sampling the number of known tokens grows to `seq_len - 1`, and the driver's count
        at a step is traced, not static.
        """
        slots = self.seq_len if max_known is None else max_known
        h, slot_positions = self.encode(x, known, context, context_mask, max_known=slots)
        return self.decode_conditions(h, slot_positions, context, context_mask, positions)

    def decode(self, state, tokens, embed, positions, contexts, context_masks, *,
               max_known: int | None = None):
        """`AbstractBidirectionalBackbone.decode`, with the encoder over `max_known` slots
        (static): the sampler's bound on the positions known before this step (it knows
        the step counts; `FluidModel.generate` passes it), so that the encoder's cost
        follows the tokens produced so far instead of `seq_len` at every step. `None`:
        `seq_len` slots. Equal to the unbounded call whenever the bound holds (padding
        slots are never read), and an error, not a wrong result, when it does not."""
        known = state
        x = jax.vmap(embed)(tokens)
        at = functools.partial(self.at_positions, max_known=max_known)
        z = jax.vmap(at, in_axes=(None, None, 0, 0, None))(
            x, known, contexts, context_masks, positions
        )
        return z, known.at[positions].set(True)

    # -- the two halves -------------------------------------------------------------------
    def encode(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        *,
        key: Key | None = None,
        max_known: int | None = None,
    ) -> tuple[Float[Array, "slots dim"], Int[Array, " slots"]]:
        """MAR's `forward_mae_encoder`, in static shapes.

        **Returns:**

        The encoder's output over the buffer and `max_known` slots (`self.max_known` when
        `None`), after the final LayerNorm; and the index of each slot in the buffered
        sequence: `0 .. buffer_size - 1` for the buffer, then `buffer_size + p` for each
        known position `p` in ascending order, then `buffer_size + seq_len` (no position)
        for each padding slot. Rows of padding slots are not part of the result's meaning.
        """
        slots = self.max_known if max_known is None else max_known
        if not 0 <= slots <= self.seq_len:
            raise ValueError(f"max_known must lie in [0, {self.seq_len}], got {slots}.")
        b, n = self.buffer_size, self.seq_len
        (known_positions,) = jnp.nonzero(known, size=slots, fill_value=n)
        positions = jnp.concatenate([jnp.arange(b, dtype=known_positions.dtype),
                                     b + known_positions])
        valid = positions < b + n
        buffer = jnp.broadcast_to(_pooled(context, context_mask).astype(x.dtype), (b, self.dim))
        # Only known rows are gathered (padding slots read zeros), so nothing downstream can
        # depend on an unknown token.
        h = jnp.concatenate([buffer, x]).at[positions].get(mode="fill", fill_value=0)
        h = h + self.encoder_pos_embed.at[positions].get(mode="fill", fill_value=0)
        h = jax.vmap(self.input_norm)(h)
        h = self.encoder(h, attention_mask(b + slots, valid), context, context_mask, key=key)
        h = jax.vmap(self.encoder_norm)(h)
        if slots < n:
            h = eqx.error_if(
                h, jnp.sum(known) > slots,
                f"MaskedAutoencoder: more known tokens than its {slots} encoder slots "
                "(max_known); raise max_known, or leave it None for seq_len slots.",
            )
        return h, positions

    def decode_conditions(
        self,
        h: Float[Array, "slots dim"],
        positions: Int[Array, " slots"],
        context: Context,
        context_mask: TextMask,
        rows: Int[Array, " k"] | None = None,
        *,
        key: Key | None = None,
    ) -> Float[Array, "k_or_seq dim"]:
        """MAR's `forward_mae_decoder` on `encode`'s outputs: the conditions of every
        position, or of the sequence positions `rows` only (in their order, with the last
        decoder block run on those rows alone)."""
        b, n = self.buffer_size, self.seq_len
        y = dense(self.decoder_proj, h)
        full = jnp.broadcast_to(self.mask_embed.astype(y.dtype), (b + n, self.dim))
        full = full.at[positions].set(y, mode="drop") + self.decoder_pos_embed
        if rows is None:
            out = self.decoder(full, None, context, context_mask, key=key)[b:]
            return jax.vmap(self.decoder_norm)(out) + self.out_pos_embed
        out = self.decoder(full, None, context, context_mask, b + rows, key=key)
        return jax.vmap(self.decoder_norm)(out) + self.out_pos_embed[rows]


def _pooled(context: Context, context_mask: TextMask) -> Float[Array, " dim"]:
    """The mean of the real context tokens (exactly the token itself when there is one)."""
    real = jnp.where(context_mask[:, None], context, jnp.zeros((), context.dtype))
    count = jnp.sum(context_mask.astype(context.dtype))
    return jnp.sum(real, axis=0) / jnp.maximum(count, jnp.ones((), context.dtype))
