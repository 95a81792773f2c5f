"""Weights of MAR's encoder-decoder (LTH14/mar, `models/mar.py`) into a `MaskedAutoencoder`."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._weights import StateDict, WeightError
from ._mae import MaskedAutoencoder

# timm's ViT `Block` names (MAR's blocks) -> the leaf of a `fluid.nn.TransformerBlock`.
# Torch's `Linear.weight` is `[out, in]`, as Equinox's, and timm's fused qkv is laid out
# `(3, heads, head_dim)` as `fluid.nn.SelfAttention` splits it: no transposes.
_BLOCK: dict[str, Callable] = {
    "norm1.weight": lambda b: b.attn_norm.weight,
    "norm1.bias": lambda b: b.attn_norm.bias,
    "attn.qkv.weight": lambda b: b.attn.qkv.weight,
    "attn.qkv.bias": lambda b: b.attn.qkv.bias,
    "attn.proj.weight": lambda b: b.attn.proj.weight,
    "attn.proj.bias": lambda b: b.attn.proj.bias,
    "norm2.weight": lambda b: b.mlp_norm.weight,
    "norm2.bias": lambda b: b.mlp_norm.bias,
    "mlp.fc1.weight": lambda b: b.mlp.fc1.weight,
    "mlp.fc1.bias": lambda b: b.mlp.fc1.bias,
    "mlp.fc2.weight": lambda b: b.mlp.fc2.weight,
    "mlp.fc2.bias": lambda b: b.mlp.fc2.bias,
}

# MAR name -> (the backbone's leaf, how many leading unit axes MAR's tensor has).
_TOP: dict[str, tuple[Callable, int]] = {
    "encoder_pos_embed_learned": (lambda m: m.encoder_pos_embed, 1),
    "z_proj_ln.weight": (lambda m: m.input_norm.weight, 0),
    "z_proj_ln.bias": (lambda m: m.input_norm.bias, 0),
    "encoder_norm.weight": (lambda m: m.encoder_norm.weight, 0),
    "encoder_norm.bias": (lambda m: m.encoder_norm.bias, 0),
    "decoder_embed.weight": (lambda m: m.decoder_proj.weight, 0),
    "decoder_embed.bias": (lambda m: m.decoder_proj.bias, 0),
    "mask_token": (lambda m: m.mask_embed, 2),
    "decoder_pos_embed_learned": (lambda m: m.decoder_pos_embed, 1),
    "decoder_norm.weight": (lambda m: m.decoder_norm.weight, 0),
    "decoder_norm.bias": (lambda m: m.decoder_norm.bias, 0),
    "diffusion_pos_embed_learned": (lambda m: m.out_pos_embed, 1),
}

_STACKS: dict[str, Callable] = {
    "encoder_blocks": lambda m: m.encoder,
    "decoder_blocks": lambda m: m.decoder,
}


def load_mar_backbone(
    backbone: MaskedAutoencoder, state: StateDict, prefix: str = ""
) -> MaskedAutoencoder:
    """`backbone` with every parameter replaced by MAR's (`encoder_blocks.*`,
    `encoder_pos_embed_learned`, `z_proj_ln`, `mask_token`, `decoder_*`,
    `diffusion_pos_embed_learned`).

    The backbone's sizes must be the checkpoint's; its values are not read (an
    `eqx.filter_eval_shape` skeleton will do). Keys are taken from `state`, so that
    `state.finish()` reports what no part loaded; MAR's other parameters (`z_proj`,
    `class_emb`, `fake_latent`, `diffloss.*`) belong to other parts and are left there.

    **Arguments:**

    - `backbone`: a `MaskedAutoencoder` of the checkpoint's sizes, without cross-attention
      (MAR has none).
    - `state`: MAR's state dict (`checkpoint["model"]` or `["model_ema"]`, as NumPy).
    - `prefix`: prepended to every MAR name.

    **Returns:**

    The loaded backbone, in float32.

    **Raises:**

    `fluid._weights.WeightError` naming a missing or mis-shaped key, or a block beyond the
    backbone's depth.
    """
    if backbone.cross_attention:
        raise WeightError(
            "MAR's blocks have no cross-attention; load its weights into a MaskedAutoencoder "
            "built with cross_attention=False."
        )
    wheres, values = [], []
    for name, (where, units) in _TOP.items():
        leaf = where(backbone)
        value = state.take(prefix + name, (1,) * units + tuple(leaf.shape))
        wheres.append(where)
        values.append(np.reshape(value, leaf.shape))
    for stack_name, stack in _STACKS.items():
        depth = stack(backbone).depth
        for param, get in _BLOCK.items():
            leaf = get(stack(backbone).layers)  # stacked: [depth, ...]
            per_block = [
                state.take(f"{prefix}{stack_name}.{i}.{param}", tuple(leaf.shape[1:]))
                for i in range(depth)
            ]
            wheres.append(lambda m, s=stack, g=get: g(s(m).layers))
            values.append(np.stack(per_block) if per_block else np.zeros(leaf.shape))
        beyond = [k for k in state.unused() if k.startswith(f"{prefix}{stack_name}.")]
        if beyond:
            raise WeightError(
                f"{state.source}: {len(beyond)} key(s) of {stack_name} beyond the backbone's "
                f"{depth} blocks, first {beyond[0]!r}; is the depth right?"
            )
    arrays = tuple(jnp.asarray(v, jnp.float32) for v in values)
    return eqx.tree_at(lambda m: tuple(w(m) for w in wheres), backbone, arrays)
