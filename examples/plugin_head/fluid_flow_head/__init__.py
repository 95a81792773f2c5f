"""A flow-matching output head for fluid, found through the `fluid.heads` entry point."""

import math
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from fluid import CONTINUOUS, AbstractOutputHead


def _time_embedding(t: Float[Array, ""], dim: int) -> Float[Array, " time"]:
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)])


@typing.final
class FlowMatchingHead(AbstractOutputHead):
    """Rectified-flow head: velocity regression in training, Euler integration in sampling.

    **Arguments:**

    - `cond_dim`, `token_dim`: supplied by fluid's builder from the backbone and tokenizer.
    - `width`, `depth`: the velocity MLP.
    - `sampling_steps`: Euler steps from noise to data.
    - `key`: initialisation key.
    """

    token_kind: typing.ClassVar[str] = CONTINUOUS
    net: eqx.nn.MLP
    cond_dim: int = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    time_dim: int = eqx.field(static=True)
    sampling_steps: int = eqx.field(static=True)

    def __init__(self, cond_dim: int, token_dim: int, width: int = 128, depth: int = 2,
                 sampling_steps: int = 32, *, key: PRNGKeyArray):
        self.cond_dim, self.token_dim = cond_dim, token_dim
        self.time_dim, self.sampling_steps = 64, sampling_steps
        self.net = eqx.nn.MLP(token_dim + self.time_dim + cond_dim, token_dim, width, depth,
                              activation=jax.nn.silu, key=key)

    def velocity(self, x: Float[Array, " token_dim"], t: Float[Array, ""],
                 z: Float[Array, " dim"]) -> Float[Array, " token_dim"]:
        return self.net(jnp.concatenate([x, _time_embedding(t, self.time_dim), z]))

    def loss(self, z, target, *, key):
        k_t, k_n = jr.split(key)
        t = jr.uniform(k_t)
        noise = jr.normal(k_n, target.shape)
        x_t = (1.0 - t) * target + t * noise
        return jnp.mean((self.velocity(x_t, t, z) - (noise - target)) ** 2)

    def sample(self, z, z_uncond, cfg, temperature, *, key):
        dt = 1.0 / self.sampling_steps
        x = jnp.asarray(temperature, jnp.float32) * jr.normal(key, (self.token_dim,))

        def step(i, x):
            t = 1.0 - i.astype(jnp.float32) * dt
            v = self.velocity(x, t, z)
            if z_uncond is not None:
                v_u = self.velocity(x, t, z_uncond)
                v = v + (jnp.asarray(cfg, jnp.float32) - 1) * (v - v_u)
            return x - dt * v

        return jax.lax.fori_loop(0, self.sampling_steps, step, x)

    def num_evaluations(self) -> int:
        return self.sampling_steps
