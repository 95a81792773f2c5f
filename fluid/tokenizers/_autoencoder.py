"""diffusers' VAE `Encoder` and `Decoder` on ONE channels-last image, and the conversion of
their parameters to and from diffusers checkpoints (safetensors, no torch, no pickle)."""

import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from .._paths import path_name
from .._types import Key
from .._weights import StateDict, WeightError, read_config, read_folder_weights, write_safetensors
from ._vae_blocks import Conv2d, DownEncoderBlock2D, GroupNorm, MidBlock2D, UpDecoderBlock2D

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# The same blocks with a self-attention after each residual block (LDM's `attn_resolutions`).
ATTN_DOWN_BLOCK = "AttnDownEncoderBlock2D"
ATTN_UP_BLOCK = "AttnUpDecoderBlock2D"
PLAIN_BLOCKS = {"down_block_types": (DOWN_BLOCK,), "up_block_types": (UP_BLOCK,)}
ATTENTION_BLOCKS = {
    "down_block_types": (DOWN_BLOCK, ATTN_DOWN_BLOCK),
    "up_block_types": (UP_BLOCK, ATTN_UP_BLOCK),
}


def _check_channels(block_out_channels: Sequence[int], norm_num_groups: int) -> tuple[int, ...]:
    channels = tuple(int(c) for c in block_out_channels)
    if not channels:
        raise ValueError("block_out_channels must name at least one block.")
    bad = [c for c in channels if c < 1 or c % norm_num_groups]
    if norm_num_groups < 1 or bad:
        raise ValueError(
            f"norm_num_groups={norm_num_groups} must divide every entry of "
            f"block_out_channels={channels}."
        )
    return channels


@typing.final
class Encoder(eqx.Module):
    """diffusers' VAE `Encoder` (blocks `DownEncoderBlock2D` or `AttnDownEncoderBlock2D`,
    SiLU) on one image.

    A 3x3 conv to `block_out_channels[0]`, one down block per entry of `block_out_channels`
    (each but the last halving the resolution), the mid block, then GroupNorm, SiLU and a 3x3
    conv to `out_channels` (twice that when `double_z`, for a mean and a log-variance).

    **Arguments:**

    - `out_channels`: latent channels.
    - `block_out_channels`: channels of each down block.
    - `layers_per_block`: residual blocks per down block.
    - `norm_num_groups`: groups of every GroupNorm.
    - `double_z`: output `2 * out_channels` channels.
    - `mid_block_add_attention`: whether the mid block has its self-attention.
    - `in_channels`: channels of the input image.
    - `block_attention`: for each down block, whether it has self-attention
      (`AttnDownEncoderBlock2D`); `None` for none.
    - `key`: initialisation key.
    """

    conv_in: Conv2d
    down_blocks: list[DownEncoderBlock2D]
    mid_block: MidBlock2D
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(
        self,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        norm_num_groups: int,
        double_z: bool,
        mid_block_add_attention: bool = True,
        in_channels: int = 3,
        block_attention: Sequence[bool] | None = None,
        *,
        key: Key,
    ):
        channels = _check_channels(block_out_channels, norm_num_groups)
        attention = _check_attention(block_attention, len(channels))
        k_in, k_down, k_mid, k_out = jr.split(key, 4)
        self.conv_in = Conv2d(in_channels, channels[0], 3, padding=1, key=k_in)
        down_keys = jr.split(k_down, len(channels))
        self.down_blocks = [
            DownEncoderBlock2D(
                channels[max(i - 1, 0)],
                c,
                layers_per_block,
                norm_num_groups,
                add_downsample=i < len(channels) - 1,
                add_attention=attention[i],
                key=k,
            )
            for i, (c, k) in enumerate(zip(channels, down_keys))
        ]
        self.mid_block = MidBlock2D(
            channels[-1], norm_num_groups, mid_block_add_attention, key=k_mid
        )
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[-1])
        z_channels = 2 * out_channels if double_z else out_channels
        self.conv_out = Conv2d(channels[-1], z_channels, 3, padding=1, key=k_out)

    def __call__(self, image: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 z"]:
        x = self.conv_in(image)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


@typing.final
class Decoder(eqx.Module):
    """diffusers' VAE `Decoder` (blocks `UpDecoderBlock2D` or `AttnUpDecoderBlock2D`, group
    norm, SiLU) on one latent.

    A 3x3 conv to `block_out_channels[-1]`, the mid block, one up block per entry of
    `block_out_channels` in reverse (each with `layers_per_block + 1` residual blocks, each
    but the last doubling the resolution), then GroupNorm, SiLU and a 3x3 conv to
    `out_channels`.

    **Arguments:**

    - `in_channels`: latent channels.
    - `block_out_channels`: channels of each block, as the encoder's (used in reverse).
    - `layers_per_block`: as the encoder's; up blocks have one residual block more.
    - `norm_num_groups`: groups of every GroupNorm.
    - `mid_block_add_attention`: whether the mid block has its self-attention.
    - `out_channels`: channels of the output image.
    - `block_attention`: for each up block, in the decoder's order (the first works at the
      lowest resolution), whether it has self-attention (`AttnUpDecoderBlock2D`); `None` for
      none.
    - `key`: initialisation key.
    """

    conv_in: Conv2d
    mid_block: MidBlock2D
    up_blocks: list[UpDecoderBlock2D]
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(
        self,
        in_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        norm_num_groups: int,
        mid_block_add_attention: bool = True,
        out_channels: int = 3,
        block_attention: Sequence[bool] | None = None,
        *,
        key: Key,
    ):
        channels = _check_channels(block_out_channels, norm_num_groups)[::-1]
        attention = _check_attention(block_attention, len(channels))
        k_in, k_mid, k_up, k_out = jr.split(key, 4)
        self.conv_in = Conv2d(in_channels, channels[0], 3, padding=1, key=k_in)
        self.mid_block = MidBlock2D(
            channels[0], norm_num_groups, mid_block_add_attention, key=k_mid
        )
        up_keys = jr.split(k_up, len(channels))
        self.up_blocks = [
            UpDecoderBlock2D(
                channels[max(i - 1, 0)],
                c,
                layers_per_block + 1,
                norm_num_groups,
                add_upsample=i < len(channels) - 1,
                add_attention=attention[i],
                key=k,
            )
            for i, (c, k) in enumerate(zip(channels, up_keys))
        ]
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], out_channels, 3, padding=1, key=k_out)

    def __call__(self, z: Float[Array, "h w z"]) -> Float[Array, "h2 w2 cout"]:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _check_attention(block_attention: Sequence[bool] | None, blocks: int) -> tuple[bool, ...]:
    if block_attention is None:
        return (False,) * blocks
    attention = tuple(bool(a) for a in block_attention)
    if len(attention) != blocks:
        raise ValueError(
            f"block_attention={attention} must have one entry per block ({blocks})."
        )
    return attention


def block_attention(block_types: Sequence[str], attention_type: str) -> tuple[bool, ...]:
    """Which blocks of a diffusers `down_block_types`/`up_block_types` list have attention."""
    return tuple(t == attention_type for t in block_types)


def downsampling(block_out_channels: Sequence[int]) -> int:
    """How many pixels one latent cell spans in each direction: `2**(blocks - 1)`."""
    return 2 ** (len(block_out_channels) - 1)


def check_image_size(image_size: int, factor: int, what: str) -> int:
    """The latent side of `image_size`; raises unless `factor` divides it."""
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"image_size={image_size} must be a positive multiple of {factor} ({what})."
        )
    return image_size // factor


# -- diffusers configs ------------------------------------------------------------------------
def resolve(
    given: Mapping[str, Any], config: Mapping[str, Any] | None, defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Hyperparameters from constructor arguments (`None` = not given) and a checkpoint config.

    Without a config, a given argument wins over its default. With one, the config decides
    and a given argument must agree with it (a tokenizer cannot be both what the arguments
    say and what the checkpoint holds).
    """
    out = {}
    for name, value in given.items():
        if config is None:
            out[name] = defaults[name] if value is None else value
            continue
        stored = config[name]
        if value is not None and _canonical(value) != _canonical(stored):
            raise ValueError(
                f"{name}={value!r} contradicts the checkpoint's config.json ({name}="
                f"{stored!r}); leave {name} unset to take the checkpoint's value."
            )
        out[name] = stored
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def _canonical(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def read_diffusers_config(
    folder: str | os.PathLike,
    class_name: str,
    defaults: Mapping[str, Any],
    required: Mapping[str, Any],
    block_types: Mapping[str, Sequence[str]] = PLAIN_BLOCKS,
) -> dict[str, Any]:
    """A diffusers model's `config.json`, checked and completed with diffusers' defaults.

    **Arguments:**

    - `folder`: the model folder (`config.json` and `*.safetensors`).
    - `class_name`: the diffusers class the folder must hold (`"AutoencoderKL"`).
    - `defaults`: every config key the class takes, with diffusers' default (older configs
      omit keys added later).
    - `required`: keys fluid supports only at one value, with that value.
    - `block_types`: the block types fluid implements for this class, under
      `down_block_types` and `up_block_types`.

    **Raises:**

    `WeightError` for another class, a key diffusers' class does not take, a block type not
    in `block_types`, or an option fluid does not implement.
    """
    config = read_config(folder)
    source = os.path.join(os.fspath(folder), "config.json")
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise WeightError(f"{source}: holds a {found}, not a {class_name}.")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise WeightError(
            f"{source}: unknown {class_name} option(s) {unknown}; fluid implements "
            f"{sorted(defaults)}."
        )
    out = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for name, value in required.items():
        if _canonical(out[name]) != _canonical(value):
            raise WeightError(
                f"{source}: {name}={out[name]!r} is not supported; fluid implements only "
                f"{name}={value!r}."
            )
    blocks = len(out["block_out_channels"])
    for name, kinds in block_types.items():
        if len(out[name]) != blocks or any(t not in kinds for t in out[name]):
            raise WeightError(
                f"{source}: {name}={out[name]!r} is not supported; fluid implements "
                f"{blocks} blocks (one per entry of block_out_channels) of type "
                f"{' or '.join(map(repr, kinds))}."
            )
    return out


def write_diffusers_config(
    folder: str | os.PathLike, class_name: str, config: Mapping[str, Any]
) -> None:
    """Write `config.json` as diffusers' `save_pretrained` does (sorted keys, the class);
    blocks are plain `DownEncoderBlock2D`/`UpDecoderBlock2D` unless `config` names them."""
    blocks = len(config["block_out_channels"])
    full = {
        "_class_name": class_name,
        "in_channels": 3,
        "out_channels": 3,
        "act_fn": "silu",
        "down_block_types": [DOWN_BLOCK] * blocks,
        "up_block_types": [UP_BLOCK] * blocks,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(full, f, indent=2, sort_keys=True)
        f.write("\n")


# -- parameter names ---------------------------------------------------------------------------
# fluid's field path -> diffusers' parameter name, for the few fields not named as diffusers
# names them (single sub-modules that diffusers keeps in a one-element ModuleList).
_RENAMES = (
    (re.compile(r"\.downsample\."), ".downsamplers.0."),
    (re.compile(r"\.upsample\."), ".upsamplers.0."),
    (re.compile(r"\.attention\."), ".attentions.0."),
    (re.compile(r"\.to_out\."), ".to_out.0."),
)
# Older diffusers checkpoints name the mid-block attention's projections differently;
# diffusers itself converts them on load.
_LEGACY_ATTENTION = {
    "to_q.": "query.",
    "to_k.": "key.",
    "to_v.": "value.",
    "to_out.0.": "proj_attn.",
}


def diffusers_name(path: tuple, prefix: str = "") -> str:
    """The diffusers parameter name of a leaf at `path` inside a module held at `prefix`."""
    name = prefix + path_name(path)
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def _to_torch(value: np.ndarray) -> np.ndarray:
    # Only convolution kernels have four axes: HWIO here, OIHW in torch.
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def _take(state: StateDict, name: str, torch_shape: tuple[int, ...]) -> np.ndarray:
    if name not in state:
        for new, old in _LEGACY_ATTENTION.items():
            legacy = name.replace("." + new, "." + old)
            if ".attentions.0." in name and legacy != name and legacy in state:
                return state.take(legacy, torch_shape)
    return state.take(name, torch_shape)


def load_parameters(tree: Any, state: StateDict, prefix: str = "") -> Any:
    """`tree` (modules with array or `jax.ShapeDtypeStruct` leaves) with every leaf taken
    from `state` by its diffusers name, converted from torch's layout, as float32.

    No JAX computation happens beyond turning NumPy arrays into JAX arrays.
    """
    leaves, treedef = jtu.tree_flatten_with_path(tree)
    values = []
    for path, leaf in leaves:
        value = _take(state, diffusers_name(path, prefix), _torch_shape(leaf.shape))
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        values.append(jnp.asarray(np.asarray(value, np.float32)))
    return jtu.tree_unflatten(treedef, values)


def parameters_state_dict(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array leaf of `tree` under its diffusers name, in torch's layout, float32."""
    out = {}
    for path, leaf in jtu.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]:
        if leaf is None:
            continue
        out[diffusers_name(path, prefix)] = np.ascontiguousarray(
            _to_torch(np.asarray(leaf, np.float32))
        )
    return out


def abstract(build: Any, *args: Any, **kwargs: Any) -> Any:
    """The structure `build(*args, **kwargs, key=...)` would return, with
    `jax.ShapeDtypeStruct` leaves: no parameter is initialised."""
    return eqx.filter_eval_shape(lambda: build(*args, **kwargs, key=jr.key(0)))


def load_folder(
    folder: str | os.PathLike, parts: Mapping[str, Any], ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """Fill abstract `parts` (name -> module or None) from a folder's safetensors files.

    Every key of the checkpoint must be used, except those in `ignore`.
    """
    state = StateDict(read_folder_weights(folder), source=os.fspath(folder))
    out = {
        name: None if part is None else load_parameters(part, state, prefix=name + ".")
        for name, part in parts.items()
    }
    state.finish(ignore)
    return out


def save_folder(
    folder: str | os.PathLike,
    class_name: str,
    config: Mapping[str, Any],
    parts: Mapping[str, Any],
) -> None:
    """Write `parts` (name -> module or None) and `config` as a diffusers model folder."""
    os.makedirs(folder, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, part in parts.items():
        if part is not None:
            tensors.update(parameters_state_dict(part, prefix=name + "."))
    write_safetensors(os.path.join(folder, WEIGHTS_NAME), tensors, {"format": "pt"})
    write_diffusers_config(folder, class_name, config)
