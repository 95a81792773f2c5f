"""MAR's denoising MLP (`SimpleMLPAdaLN`), shared by the diffusion and flow heads.

The heads hold the layers as their own fields (so parameter paths, checkpoint keys and
MAR's converter name them on the head) and call the functions here on an `AdaLNLayers`
view of them: one implementation of the network, no shared base class.
"""

import functools
import math
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int

from .._types import Condition, Key
from ..nn import RematPolicy, dense, scan_layers

FREQUENCY_DIM = 256
MAX_PERIOD = 10000
NORM_EPS = 1e-6


# PyTorch's float32 `exp` (MKL's vector exp on CPU) rounds these two of MAR's 128
# frequencies the other way from the correctly rounded value; both lie within 0.02 ulp of a
# rounding midpoint. At t near 1000 one ulp of a frequency moves the embedding by ~5e-5, so
# matching MAR's numbers (and the frequencies its weights were trained with) needs them.
_TORCH_FREQUENCIES_256 = {12: 0.4216965, 106: 0.00048696753}


@functools.cache
def sinusoid_frequencies(dim: int) -> np.ndarray:
    """The `dim // 2` float32 frequencies of the timestep embedding, from 1 down towards
    `1 / MAX_PERIOD`, exactly as MAR computes them in float32."""
    half = dim // 2
    exponent = np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    if dim == 256:
        for i, value in _TORCH_FREQUENCIES_256.items():
            freqs[i] = value
    freqs.setflags(write=False)
    return freqs


def timestep_embedding(
    t: Int[Array, ""] | Float[Array, ""], dim: int = FREQUENCY_DIM,
    dtype: jnp.dtype = jnp.float32,
) -> Float[Array, " freq"]:
    """Sinusoidal embedding of a timestep (an index, or a float on the same 0-1000 scale),
    cosines first (the GLIDE/DiT layout MAR's weights expect). The argument `t * freq` is
    rounded to float32 as MAR's is, whatever `dtype` the embedding is computed in."""
    args = t.astype(jnp.float32) * jnp.asarray(sinusoid_frequencies(dim))
    args = args.astype(dtype)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)])


def _linear(in_features: int, out_features: int, weight_init, *, key: Key) -> eqx.nn.Linear:
    # Only the structure of Equinox's Linear is kept: running its own random initialisation
    # would cost a compilation per shape for values that are overwritten anyway.
    linear = eqx.filter_eval_shape(eqx.nn.Linear, in_features, out_features, key=key)
    weight = weight_init(key, (out_features, in_features), jnp.float32)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias), linear, (weight, jnp.zeros((out_features,), jnp.float32))
    )


def _modulate(
    x: Float[Array, " width"], shift: Float[Array, " width"], scale: Float[Array, " width"]
) -> Float[Array, " width"]:
    return x * (1 + scale) + shift


_xavier = jax.nn.initializers.xavier_uniform()
_zeros = jax.nn.initializers.zeros


class AdaLNLayers(typing.NamedTuple):
    """The layers of the network, as a head holds them (the residual blocks' four stacked
    along a leading `depth` axis)."""

    time_fc1: eqx.nn.Linear
    time_fc2: eqx.nn.Linear
    cond_embed: eqx.nn.Linear
    input_proj: eqx.nn.Linear
    block_norm: eqx.nn.LayerNorm
    block_fc1: eqx.nn.Linear
    block_fc2: eqx.nn.Linear
    block_modulation: eqx.nn.Linear
    final_norm: eqx.nn.LayerNorm
    final_modulation: eqx.nn.Linear
    final_linear: eqx.nn.Linear


# One compilation per configuration (the ints are static under filter_jit) instead of one
# per parameter shape in eager mode.
@eqx.filter_jit
def _init_arrays(cond_dim: int, token_dim: int, width: int, depth: int, out_dim: int, key: Key):
    k_time1, k_time2, k_cond, k_input, k_blocks, k_final_mod, k_final_lin = jr.split(key, 7)
    normal = jax.nn.initializers.normal(0.02)

    def make_block(k):
        k1, k2, k3 = jr.split(k, 3)
        return (
            eqx.nn.LayerNorm(width, eps=NORM_EPS),
            _linear(width, width, _xavier, key=k1),
            _linear(width, width, _xavier, key=k2),
            _linear(width, 3 * width, _zeros, key=k3),
        )

    return (
        _linear(FREQUENCY_DIM, width, normal, key=k_time1),
        _linear(width, width, normal, key=k_time2),
        _linear(cond_dim, width, _xavier, key=k_cond),
        _linear(token_dim, width, _xavier, key=k_input),
        eqx.filter_vmap(make_block)(jr.split(k_blocks, depth)),
        _linear(width, 2 * width, _zeros, key=k_final_mod),
        _linear(width, out_dim, _zeros, key=k_final_lin),
    )


def init_adaln_mlp(
    cond_dim: int, token_dim: int, width: int, depth: int, out_dim: int, *, key: Key
) -> AdaLNLayers:
    """MAR's initialisation: Xavier-uniform linears with zero biases, the timestep MLP
    normal(0.02), every AdaLN modulation and the output layer (`width -> out_dim`) zero, so
    the untrained network outputs zero."""
    time_fc1, time_fc2, cond_embed, input_proj, blocks, final_mod, final_lin = _init_arrays(
        cond_dim, token_dim, width, depth, out_dim, key
    )
    final_norm = eqx.nn.LayerNorm(width, eps=NORM_EPS, use_weight=False, use_bias=False)
    return AdaLNLayers(time_fc1, time_fc2, cond_embed, input_proj, *blocks, final_norm,
                       final_mod, final_lin)


def init_adaln_head(
    head: eqx.Module,
    cond_dim: int,
    token_dim: int,
    width: int,
    depth: int,
    out_dim: int,
    batch_mul: int,
    noise_shift: float,
    remat: RematPolicy,
    *,
    key: Key,
) -> None:
    """Set, from a head's `__init__`, the fields every head on this network has: its sizes
    (`cond_dim`, `token_dim`, `width`, `depth`), `batch_mul`, `noise_shift`, `remat`, and
    the network's layers (`init_adaln_mlp`, outputting `out_dim`), each under its
    `AdaLNLayers` name."""
    head.cond_dim, head.token_dim, head.width, head.depth = cond_dim, token_dim, width, depth
    head.batch_mul, head.noise_shift, head.remat = batch_mul, float(noise_shift), remat
    layers = init_adaln_mlp(cond_dim, token_dim, width, depth, out_dim, key=key)
    for name, layer in zip(AdaLNLayers._fields, layers):
        setattr(head, name, layer)


def adaln_layers(head: eqx.Module) -> AdaLNLayers:
    """The `AdaLNLayers` view of the layers `init_adaln_head` set on `head`."""
    return AdaLNLayers._make(getattr(head, name) for name in AdaLNLayers._fields)


def _stacked_blocks(layers: AdaLNLayers) -> tuple[tuple, tuple]:
    """The residual blocks' `(norm, fc1, fc2, modulation)`, stacked along `depth`, split
    into arrays and the rest (`eqx.partition`)."""
    stacked = (layers.block_norm, layers.block_fc1, layers.block_fc2, layers.block_modulation)
    return eqx.partition(stacked, eqx.is_array)


def sliced_blocks(layers: AdaLNLayers, depth: int) -> list[tuple]:
    """The residual blocks as `depth` separate `(norm, fc1, fc2, modulation)` tuples: for a
    sampling chain, sliced once outside it (see `adaln_mlp`)."""
    dynamic, static = _stacked_blocks(layers)
    return [
        eqx.combine(jax.tree.map(lambda a, i=i: a[i], dynamic), static) for i in range(depth)
    ]


def adaln_mlp(
    layers: AdaLNLayers,
    x: Float[Array, " token_dim"],
    t: Int[Array, ""] | Float[Array, ""],
    c: Condition,
    *,
    blocks: list[tuple] | None,
    remat: RematPolicy,
) -> Float[Array, " out"]:
    """The network on one noisy token `x` at timestep `t` (0-1000 scale) under condition
    `c`, in the dtype of `input_proj`'s weight.

    `blocks` (from `sliced_blocks`): the residual blocks in a Python loop over weights sliced
    once, as sampling does outside its chain (the chain then reads its weights as they are
    instead of slicing the stacked ones at every step: 0.95x the `mar256` random order's
    sampling time, and raster sampling 8.6 s against 11.1 s; measured again for issue 21,
    one scan in sampling too: raster 1.15-1.75x the time); `None`: one scan over the stacked
    weights, rematerialised by `remat`, for training.
    """
    dtype = layers.input_proj.weight.dtype
    h = dense(layers.input_proj, x.astype(dtype))
    temb = timestep_embedding(t, dtype=dtype)
    temb = dense(layers.time_fc2, jax.nn.silu(dense(layers.time_fc1, temb)))
    y = temb + dense(layers.cond_embed, c.astype(dtype))
    y_act = jax.nn.silu(y)

    def block(h, params):
        norm, fc1, fc2, modulation = params
        shift, scale, gate = jnp.split(dense(modulation, y_act), 3)
        out = dense(fc2, jax.nn.silu(dense(fc1, _modulate(norm(h), shift, scale))))
        return h + gate * out

    if blocks is None:
        dynamic, static = _stacked_blocks(layers)
        h = scan_layers(lambda h, p: block(h, eqx.combine(p, static)), h, dynamic, remat=remat)
    else:
        for params in blocks:
            h = block(h, params)
    shift, scale = jnp.split(dense(layers.final_modulation, y_act), 2)
    return dense(layers.final_linear, _modulate(layers.final_norm(h), shift, scale))
