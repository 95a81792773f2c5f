import functools
import math
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int

from .._types import CONTINUOUS, Condition, Key, Scalar
from ..nn import DEFAULT_REMAT_POLICY, RematPolicy, dense, scan_layers, stacked_field
from . import _gaussian_diffusion as gd
from ._abstract import AbstractOutputHead

FREQUENCY_DIM = 256
MAX_PERIOD = 10000
NORM_EPS = 1e-6


# PyTorch's float32 `exp` (MKL's vector exp on CPU) rounds these two of MAR's 128
# frequencies the other way from the correctly rounded value; both lie within 0.02 ulp of a
# rounding midpoint. At t near 1000 one ulp of a frequency moves the embedding by ~5e-5, so
# matching MAR's numbers (and the frequencies its weights were trained with) needs them.
_TORCH_FREQUENCIES_256 = {12: 0.4216965, 106: 0.00048696753}


@functools.lru_cache(maxsize=None)
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
    t: Int[Array, ""], dim: int = FREQUENCY_DIM, dtype: jnp.dtype = jnp.float32
) -> Float[Array, " freq"]:
    """Sinusoidal embedding of a timestep index, cosines first (the GLIDE/DiT layout MAR's
    weights expect). The argument `t * freq` is rounded to float32 as MAR's is, whatever
    `dtype` the embedding is computed in."""
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


# One compilation per configuration (the ints are static under filter_jit) instead of one
# per parameter shape in eager mode.
@eqx.filter_jit
def _init_network(cond_dim: int, token_dim: int, width: int, depth: int, key: Key):
    """MAR's initialisation: Xavier-uniform linears with zero biases, the timestep MLP
    normal(0.02), every AdaLN modulation and the output layer zero."""
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
        _linear(width, 2 * token_dim, _zeros, key=k_final_lin),
    )


@typing.final
class DiffusionHead(AbstractOutputHead):
    """MAR's diffusion loss: a small AdaLN MLP denoises one continuous token, conditioned
    on the backbone's vector, under a cosine Gaussian diffusion (IDDPM).

    The network (MAR's `SimpleMLPAdaLN`) embeds the noisy token, adds a sinusoidal timestep
    embedding (through an MLP) to the projected condition, runs `depth` residual blocks
    (LayerNorm, AdaLN shift/scale/gate from the condition, Linear-SiLU-Linear) and outputs a
    noise prediction and IDDPM's learned-range variance values. Training draws `batch_mul`
    fresh `(t, noise)` pairs and averages MSE + variational bound over them. Sampling runs
    the process respaced to `sampling_steps` (network fed the original timestep index);
    guidance mixes the noise predictions, `temperature` scales the injected noise.

    All AdaLN layers and the output layer start at zero, so an untrained head predicts zero
    noise. The head computes in the dtype of its parameters (float32 as built) whatever the
    condition's dtype.

    **Arguments:**

    - `cond_dim`: width of the condition vector.
    - `token_dim`: channels of one continuous token.
    - `width`: width of the MLP.
    - `depth`: number of residual blocks.
    - `num_timesteps`: steps of the training diffusion.
    - `sampling_steps`: steps of the respaced sampling chain.
    - `batch_mul`: `(t, noise)` draws per position in the loss.
    - `clip_denoised`: in sampling, clip the predicted `x_0` to `[-c, c]` (IDDPM's
      `clip_denoised`, for tokens in a known range such as pixels in [-1, 1]). `None`, the
      default, samples as MAR does. Near `t = 999` the predicted `x_0` multiplies the noise
      error by about 2e4, so without clipping only a precisely trained head stays on course.
    - `noise_shift`: divide the schedule's signal-to-noise ratio by `noise_shift**2`
      (shifted cosine, `gaussian_diffusion.cosine_betas`); 1, the default, is MAR's schedule.
      For `p x p` pixel patches, `p` puts the noise where the condition matters.
    - `remat`: what the training backward pass keeps from each residual block
      (`fluid.nn.scan_layers`' `remat`); `DEFAULT_REMAT_POLICY` by default, `None` for a
      plain scan. It changes memory and speed, never values or gradients.
    - `key`: initialisation key.
    """

    token_kind: typing.ClassVar[str] = CONTINUOUS
    time_fc1: eqx.nn.Linear
    time_fc2: eqx.nn.Linear
    cond_embed: eqx.nn.Linear
    input_proj: eqx.nn.Linear
    # Residual blocks, stacked along a leading `depth` axis and run with `nn.scan_layers`.
    block_norm: eqx.nn.LayerNorm = stacked_field()
    block_fc1: eqx.nn.Linear = stacked_field()
    block_fc2: eqx.nn.Linear = stacked_field()
    block_modulation: eqx.nn.Linear = stacked_field()
    final_norm: eqx.nn.LayerNorm
    final_modulation: eqx.nn.Linear
    final_linear: eqx.nn.Linear
    cond_dim: int = eqx.field(static=True)
    token_dim: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    num_timesteps: int = eqx.field(static=True)
    sampling_steps: int = eqx.field(static=True)
    batch_mul: int = eqx.field(static=True)
    clip_denoised: float | None = eqx.field(static=True)
    noise_shift: float = eqx.field(static=True)
    remat: RematPolicy = eqx.field(static=True)

    def __init__(
        self,
        cond_dim: int,
        token_dim: int,
        width: int = 1024,
        depth: int = 3,
        num_timesteps: int = 1000,
        sampling_steps: int = 100,
        batch_mul: int = 4,
        clip_denoised: float | None = None,
        noise_shift: float = 1.0,
        remat: RematPolicy = DEFAULT_REMAT_POLICY,
        *,
        key: Key,
    ):
        if depth < 1 or batch_mul < 1:
            raise ValueError(f"depth and batch_mul must be positive; got {depth}, {batch_mul}.")
        # Fails early (and fills the cache) on an impossible respacing.
        if noise_shift <= 0:
            raise ValueError(f"noise_shift must be positive, got {noise_shift}.")
        gd.diffusion_schedule(num_timesteps, sampling_steps, float(noise_shift))
        self.cond_dim = cond_dim
        self.token_dim = token_dim
        self.width = width
        self.depth = depth
        self.num_timesteps = num_timesteps
        self.sampling_steps = sampling_steps
        self.batch_mul = batch_mul
        self.clip_denoised = None if clip_denoised is None else float(clip_denoised)
        self.noise_shift = float(noise_shift)
        self.remat = remat

        (
            self.time_fc1,
            self.time_fc2,
            self.cond_embed,
            self.input_proj,
            (self.block_norm, self.block_fc1, self.block_fc2, self.block_modulation),
            self.final_modulation,
            self.final_linear,
        ) = _init_network(cond_dim, token_dim, width, depth, key)
        self.final_norm = eqx.nn.LayerNorm(width, eps=NORM_EPS, use_weight=False, use_bias=False)

    @property
    def dtype(self) -> jnp.dtype:
        """The working precision: that of the parameters."""
        return self.input_proj.weight.dtype

    @property
    def train_schedule(self) -> gd.DiffusionSchedule:
        """The float64 constants of the training diffusion (all `num_timesteps` steps)."""
        return gd.diffusion_schedule(self.num_timesteps, None, self.noise_shift)

    @property
    def gen_schedule(self) -> gd.DiffusionSchedule:
        """The float64 constants of the sampling chain (respaced to `sampling_steps`)."""
        return gd.diffusion_schedule(self.num_timesteps, self.sampling_steps, self.noise_shift)

    def network(
        self, x: Float[Array, " token_dim"], t: Int[Array, ""], c: Condition
    ) -> Float[Array, " 2*token_dim"]:
        """The denoising MLP on one noisy token.

        **Arguments:**

        - `x`: the noisy token.
        - `t`: its timestep, an index into the ORIGINAL `num_timesteps` steps.
        - `c`: the condition vector.

        **Returns:**

        The predicted noise followed by the variance values (learned range, in [-1, 1]
        nominally).
        """
        return self._network(x, t, c, None)

    def _stacked_blocks(self) -> tuple[tuple, tuple]:
        """The residual blocks' `(norm, fc1, fc2, modulation)`, stacked along `depth`, split
        into arrays and the rest (`eqx.partition`)."""
        stacked = (self.block_norm, self.block_fc1, self.block_fc2, self.block_modulation)
        return eqx.partition(stacked, eqx.is_array)

    def _blocks(self) -> list[tuple]:
        """The residual blocks as `depth` separate `(norm, fc1, fc2, modulation)` tuples."""
        dynamic, static = self._stacked_blocks()
        return [
            eqx.combine(jax.tree.map(lambda a, i=i: a[i], dynamic), static)
            for i in range(self.depth)
        ]

    def _network(
        self, x: Float[Array, " token_dim"], t: Int[Array, ""], c: Condition,
        blocks: list[tuple] | None,
    ) -> Float[Array, " 2*token_dim"]:
        # `blocks` (from `_blocks`): the residual blocks in a Python loop over weights sliced
        # once, as sampling does outside its chain (the chain then reads its weights as they
        # are instead of slicing the stacked ones at every step: 0.95x the `mar256` random
        # order's sampling time, and raster sampling 8.6 s against 11.1 s; measured again
        # for issue 21, one scan in sampling too: raster 1.15-1.75x the time); `None`: one
        # rematerialised scan over the stacked weights, for training.
        dtype = self.dtype
        h = dense(self.input_proj, x.astype(dtype))
        temb = timestep_embedding(t, dtype=dtype)
        temb = dense(self.time_fc2, jax.nn.silu(dense(self.time_fc1, temb)))
        y = temb + dense(self.cond_embed, c.astype(dtype))
        y_act = jax.nn.silu(y)

        def block(h, params):
            norm, fc1, fc2, modulation = params
            shift, scale, gate = jnp.split(dense(modulation, y_act), 3)
            out = dense(fc2, jax.nn.silu(dense(fc1, _modulate(norm(h), shift, scale))))
            return h + gate * out

        if blocks is None:
            dynamic, static = self._stacked_blocks()
            h = scan_layers(
                lambda h, p: block(h, eqx.combine(p, static)), h, dynamic, remat=self.remat
            )
        else:
            for params in blocks:
                h = block(h, params)
        shift, scale = jnp.split(dense(self.final_modulation, y_act), 2)
        return dense(self.final_linear, _modulate(self.final_norm(h), shift, scale))

    def q_sample(
        self,
        x_start: Float[Array, " token_dim"],
        t: Int[Array, ""],
        noise: Float[Array, " token_dim"],
    ) -> Float[Array, " token_dim"]:
        """`x_start` diffused to training step `t` with the given standard-normal noise."""
        return gd.q_sample(
            self.train_schedule, x_start.astype(self.dtype), t, noise.astype(self.dtype)
        )

    def training_losses(
        self,
        x_start: Float[Array, " token_dim"],
        t: Int[Array, ""],
        noise: Float[Array, " token_dim"],
        c: Condition,
    ) -> dict[str, Scalar]:
        """MAR's loss at one `(t, noise)`.

        **Returns:**

        A dict of scalars: `mse` (mean over channels of the squared noise error), `vb` (the
        variational-bound term, noise prediction held fixed, in IDDPM's units: channel mean
        divided by log 2) and `loss = mse + vb`.
        """
        return gd.training_losses(
            self.train_schedule,
            lambda x_t, tt: self.network(x_t, tt, c),
            x_start.astype(self.dtype),
            t,
            noise.astype(self.dtype),
        )

    def p_mean_variance(
        self, x_t: Float[Array, " token_dim"], t_gen: Int[Array, ""], c: Condition
    ) -> tuple[Float[Array, " token_dim"], Float[Array, " token_dim"], Float[Array, " token_dim"]]:
        """Mean, log-variance and predicted `x_0` of one reverse step of the sampling chain.

        `t_gen` indexes the `sampling_steps` kept steps; the network is fed the original
        timestep it stands for.
        """
        s = self.gen_schedule
        t_net = jnp.asarray(s.timestep_map, jnp.int32)[t_gen]
        x_t = x_t.astype(self.dtype)
        return gd.p_mean_variance(s, self.network(x_t, t_net, c), x_t, t_gen)

    def guided_output(
        self,
        x: Float[Array, " token_dim"],
        t: Int[Array, ""],
        c: Condition,
        c_uncond: Condition,
        cfg: Float[Array, ""] | float,
    ) -> Float[Array, "2 2*token_dim"]:
        """The network on `x` under both conditions in one batched call, with the noise
        predictions mixed as `uncond + cfg * (cond - uncond)` (MAR's `forward_with_cfg`),
        computed as `cond + (cfg - 1) * (cond - uncond)` so that `cfg == 1` gives exactly the
        conditional prediction.

        **Returns:**

        Row 0 for the conditional half, row 1 for the unconditional: both carry the mixed
        noise, each its own variance values.
        """
        return self._guided_output(x, t, c, c_uncond, cfg, None)

    def _guided_output(self, x, t, c, c_uncond, cfg, blocks):
        outputs = jax.vmap(lambda cond: self._network(x, t, cond, blocks))(jnp.stack([c, c_uncond]))
        eps, rest = jnp.split(outputs, 2, axis=1)
        cfg = jnp.asarray(cfg, self.dtype)
        mixed = eps[0] + (cfg - 1) * (eps[0] - eps[1])
        return jnp.concatenate([jnp.stack([mixed, mixed]), rest], axis=1)

    def loss(self, z: Condition, target: Float[Array, " token_dim"], *, key: Key) -> Scalar:
        def one_draw(k):
            k_t, k_noise = jr.split(k)
            t = jr.randint(k_t, (), 0, self.num_timesteps)
            noise = jr.normal(k_noise, (self.token_dim,), self.dtype)
            return self.training_losses(target, t, noise, z)["loss"]

        return jnp.mean(jax.vmap(one_draw)(jr.split(key, self.batch_mul)))

    def sample(
        self,
        z: Condition,
        z_uncond: Condition | None,
        cfg: Float[Array, ""] | float,
        temperature: Float[Array, ""] | float,
        *,
        key: Key,
    ) -> Float[Array, " token_dim"]:
        s = self.gen_schedule
        timestep_map = jnp.asarray(s.timestep_map, jnp.int32)
        dtype = self.dtype
        temperature = jnp.asarray(temperature, dtype)
        k_init, k_steps = jr.split(key)
        blocks = self._blocks()  # sliced once, outside the chain (see `_network`)

        def step(i, x):
            t_gen = self.sampling_steps - 1 - i
            t_net = timestep_map[t_gen]
            if z_uncond is None:
                output = self._network(x, t_net, z, blocks)
            else:
                output = self._guided_output(x, t_net, z, z_uncond, cfg, blocks)[0]
            mean, log_variance, _ = gd.p_mean_variance(s, output, x, t_gen, self.clip_denoised)
            noise = jr.normal(jr.fold_in(k_steps, i), (self.token_dim,), dtype)
            # MAR's p_sample: the last step (t = 0) returns the mean.
            scale = jnp.where(t_gen == 0, 0.0, temperature)
            return mean + jnp.exp(0.5 * log_variance) * noise * scale

        x = jr.normal(k_init, (self.token_dim,), dtype)
        return jax.lax.fori_loop(0, self.sampling_steps, step, x)

    def num_evaluations(self) -> int:
        return self.sampling_steps
