"""Convolutional building blocks of diffusers' VAE `Encoder`/`Decoder`, on ONE channels-last image.

Field names follow diffusers' parameter names, so a parameter's path in these modules is its
name in a diffusers checkpoint up to a few fixed renames (see `_autoencoder.diffusers_name`).
Convolution kernels are stored `[kh, kw, in, out]` (HWIO); torch stores them `[out, in, kh, kw]`.
"""

import math
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from .._types import Key

# diffusers builds every GroupNorm of its VAE encoder and decoder with this epsilon.
NORM_EPS = 1e-6


@typing.final
class Conv2d(eqx.Module):
    """A 2-D convolution over a channels-last image `[h, w, in_channels]`.

    Initialised as torch's `nn.Conv2d` (weights and bias uniform in +-1/sqrt(fan_in)).

    **Arguments:**

    - `in_channels`, `out_channels`: channels of the input and output.
    - `kernel_size`: side of the square kernel.
    - `stride`: step of the kernel in both directions.
    - `padding`: zeros added on every side of the input.
    - `key`: initialisation key.
    """

    weight: Float[Array, "kh kw cin cout"]
    bias: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        key: Key,
    ):
        w_key, b_key = jr.split(key)
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = jr.uniform(w_key, shape, minval=-bound, maxval=bound)
        self.bias = jr.uniform(b_key, (out_channels,), minval=-bound, maxval=bound)
        self.stride = stride
        self.padding = padding

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x[None],
            self.weight.astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[0]
        return y + self.bias.astype(y.dtype)[None, None, :]


@typing.final
class GroupNorm(eqx.Module):
    """Group normalisation of a channels-last image, statistics in float32 (as torch's
    `nn.GroupNorm`: biased variance over the spatial positions and the group's channels).

    **Arguments:**

    - `groups`: number of channel groups; must divide `channels`.
    - `channels`: number of channels.
    """

    weight: Float[Array, " c"]
    bias: Float[Array, " c"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, groups: int, channels: int, eps: float = NORM_EPS):
        if groups < 1 or channels % groups:
            raise ValueError(
                f"norm_num_groups={groups} must divide every channel count; got {channels}."
            )
        self.weight = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))
        self.groups = groups
        self.eps = eps

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(0, 1, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(0, 1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        out = g.reshape(h, w, c) * self.weight[None, None, :] + self.bias[None, None, :]
        return out.astype(x.dtype)


@typing.final
class ResnetBlock2D(eqx.Module):
    """GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU, 3x3 conv, plus the input (through a 1x1
    conv when the channel count changes): diffusers' `ResnetBlock2D` without a time embedding.

    **Arguments:**

    - `in_channels`, `out_channels`: channels of the input and output.
    - `groups`: groups of both GroupNorms.
    - `key`: initialisation key.
    """

    norm1: GroupNorm
    conv1: Conv2d
    norm2: GroupNorm
    conv2: Conv2d
    conv_shortcut: Conv2d | None

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, key: Key):
        k1, k2, k_short = jr.split(key, 3)
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, key=k1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, key=k2)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, key=k_short)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h w cout"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


@typing.final
class Downsample2D(eqx.Module):
    """Halve the resolution: pad one row at the bottom and one column at the right, then a
    stride-2 3x3 convolution without padding (diffusers' encoder, `downsample_padding=0`).

    **Arguments:**

    - `channels`: channels of the input and output.
    - `key`: initialisation key.
    """

    conv: Conv2d

    def __init__(self, channels: int, *, key: Key):
        self.conv = Conv2d(channels, channels, 3, stride=2, key=key)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
        return self.conv(jnp.pad(x, ((0, 1), (0, 1), (0, 0))))


@typing.final
class Upsample2D(eqx.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution.

    **Arguments:**

    - `channels`: channels of the input and output.
    - `key`: initialisation key.
    """

    conv: Conv2d

    def __init__(self, channels: int, *, key: Key):
        self.conv = Conv2d(channels, channels, 3, padding=1, key=key)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1))


@typing.final
class SpatialSelfAttention(eqx.Module):
    """Single-head self-attention over the positions of an image, with a GroupNorm before it
    and the input added after it (the attention of diffusers' VAE mid block and attention
    blocks, and of LDM's `AttnBlock`, whose 1x1 convolutions are these linear maps).

    **Arguments:**

    - `channels`: channels of the image (the width of the one head).
    - `groups`: groups of the GroupNorm.
    - `key`: initialisation key.
    """

    group_norm: GroupNorm
    to_q: eqx.nn.Linear
    to_k: eqx.nn.Linear
    to_v: eqx.nn.Linear
    to_out: eqx.nn.Linear

    def __init__(self, channels: int, groups: int, *, key: Key):
        kq, kk, kv, ko = jr.split(key, 4)
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = eqx.nn.Linear(channels, channels, key=kq)
        self.to_k = eqx.nn.Linear(channels, channels, key=kk)
        self.to_v = eqx.nn.Linear(channels, channels, key=kv)
        self.to_out = eqx.nn.Linear(channels, channels, key=ko)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        h, w, c = x.shape
        tokens = self.group_norm(x).reshape(h * w, c)
        q = jax.vmap(self.to_q)(tokens)
        k = jax.vmap(self.to_k)(tokens)
        v = jax.vmap(self.to_v)(tokens)
        logits = (q @ k.T).astype(jnp.float32) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jax.vmap(self.to_out)(weights @ v)
        return x + out.reshape(h, w, c)


@typing.final
class MidBlock2D(eqx.Module):
    """A residual block, the optional spatial self-attention, a residual block: diffusers'
    `UNetMidBlock2D` with one layer and no time embedding.

    **Arguments:**

    - `channels`: channels of the input and output.
    - `groups`: groups of every GroupNorm.
    - `add_attention`: whether the attention is there (`mid_block_add_attention`).
    - `key`: initialisation key.
    """

    resnets: tuple[ResnetBlock2D, ResnetBlock2D]
    attention: SpatialSelfAttention | None

    def __init__(self, channels: int, groups: int, add_attention: bool, *, key: Key):
        k0, k_attn, k1 = jr.split(key, 3)
        self.resnets = (
            ResnetBlock2D(channels, channels, groups, key=k0),
            ResnetBlock2D(channels, channels, groups, key=k1),
        )
        self.attention = (
            SpatialSelfAttention(channels, groups, key=k_attn) if add_attention else None
        )

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


@typing.final
class DownEncoderBlock2D(eqx.Module):
    """`num_layers` residual blocks, each followed by a spatial self-attention when
    `add_attention`, then (except in the last block) a `Downsample2D`: diffusers'
    `DownEncoderBlock2D`, or its `AttnDownEncoderBlock2D` with attention (the layout of LDM's
    encoder levels listed in `attn_resolutions`).

    **Arguments:**

    - `in_channels`, `out_channels`: channels of the input and output (the first residual
      block changes the channel count).
    - `num_layers`: residual blocks (`layers_per_block`).
    - `groups`: groups of every GroupNorm.
    - `add_downsample`: whether the block halves the resolution.
    - `add_attention`: whether each residual block is followed by a self-attention.
    - `key`: initialisation key.
    """

    resnets: list[ResnetBlock2D]
    attentions: list[SpatialSelfAttention] | None
    downsample: Downsample2D | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        add_attention: bool = False,
        *,
        key: Key,
    ):
        keys = jr.split(key, num_layers + 1)
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, key=k)
            for i, k in enumerate(keys[:-1])
        ]
        self.attentions = _attentions(out_channels, groups, num_layers, add_attention, key)
        self.downsample = Downsample2D(out_channels, key=keys[-1]) if add_downsample else None

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        x = _residual_stack(self.resnets, self.attentions, x)
        return x if self.downsample is None else self.downsample(x)


@typing.final
class UpDecoderBlock2D(eqx.Module):
    """`num_layers` residual blocks, each followed by a spatial self-attention when
    `add_attention`, then (except in the last block) an `Upsample2D`: diffusers'
    `UpDecoderBlock2D`, or its `AttnUpDecoderBlock2D` with attention.

    **Arguments:**

    - `in_channels`, `out_channels`: channels of the input and output (the first residual
      block changes the channel count).
    - `num_layers`: residual blocks (`layers_per_block + 1` in the decoder).
    - `groups`: groups of every GroupNorm.
    - `add_upsample`: whether the block doubles the resolution.
    - `add_attention`: whether each residual block is followed by a self-attention.
    - `key`: initialisation key.
    """

    resnets: list[ResnetBlock2D]
    attentions: list[SpatialSelfAttention] | None
    upsample: Upsample2D | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        add_attention: bool = False,
        *,
        key: Key,
    ):
        keys = jr.split(key, num_layers + 1)
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, key=k)
            for i, k in enumerate(keys[:-1])
        ]
        self.attentions = _attentions(out_channels, groups, num_layers, add_attention, key)
        self.upsample = Upsample2D(out_channels, key=keys[-1]) if add_upsample else None

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        x = _residual_stack(self.resnets, self.attentions, x)
        return x if self.upsample is None else self.upsample(x)


def _attentions(
    channels: int, groups: int, num_layers: int, add_attention: bool, key: Key
) -> list[SpatialSelfAttention] | None:
    """One self-attention per residual block, or `None`. Their keys come from a key folded
    off the block's own, so blocks without attention initialise exactly as before."""
    if not add_attention:
        return None
    keys = jr.split(jr.fold_in(key, 1), num_layers)
    return [SpatialSelfAttention(channels, groups, key=k) for k in keys]


def _residual_stack(
    resnets: list[ResnetBlock2D],
    attentions: list[SpatialSelfAttention] | None,
    x: Float[Array, "h w cin"],
) -> Float[Array, "h w cout"]:
    for i, resnet in enumerate(resnets):
        x = resnet(x)
        if attentions is not None:
            x = attentions[i](x)
    return x
