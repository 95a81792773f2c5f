import typing
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int

from .._types import CONTINUOUS, Condition, Key, Scalar
from ..nn import DEFAULT_REMAT_POLICY, RematPolicy, stacked_field
from . import _gaussian_diffusion as gd
from ._abstract import AbstractIterativeHead
from ._adaln_mlp import adaln_layers, adaln_mlp, init_adaln_head, sliced_blocks
from ._steps import as_progress_steps

SAMPLERS = ("ddpm", "ddim")


@typing.final
class DiffusionHead(AbstractIterativeHead):
    """MAR's diffusion loss: a small AdaLN MLP denoises one continuous token, conditioned
    on the backbone's vector, under a cosine Gaussian diffusion (IDDPM).

    The network (MAR's `SimpleMLPAdaLN`) embeds the noisy token, adds a sinusoidal timestep
    embedding (through an MLP) to the projected condition, runs `depth` residual blocks
    (LayerNorm, AdaLN shift/scale/gate from the condition, Linear-SiLU-Linear) and outputs a
    noise prediction and IDDPM's learned-range variance values. Training draws `batch_mul`
    fresh `(t, noise)` pairs and averages MSE + variational bound over them. Sampling runs
    the process respaced to `sampling_steps` (network fed the original timestep index) with
    MAR's ancestral sampler (`sampler="ddpm"`: the posterior mean and the learned variance),
    or with DDIM on the same respaced schedule (`sampler="ddim"`); guidance mixes the noise
    predictions, `temperature` scales the injected noise (never the initial noise: at
    `eta = 0` DDIM injects none, and the temperature has no effect).

    All AdaLN layers and the output layer start at zero, so an untrained head predicts zero
    noise. The head computes in the dtype of its parameters (float32 as built) whatever the
    condition's dtype.

    **Arguments:**

    - `cond_dim`: width of the condition vector.
    - `token_dim`: channels of one continuous token.
    - `width`: width of the MLP.
    - `depth`: number of residual blocks.
    - `num_timesteps`: steps of the training diffusion.
    - `sampling_steps`: steps of the respaced sampling chain (at least 2); `sample(...,
      steps=k)` respaces to `k` instead for that call.
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
    - `sampler`: `"ddpm"` (the default, MAR's sampler: posterior mean plus the learned
      variance, temperature times its noise) or `"ddim"` (DDIM, Song et al., 2021, eq. 12,
      as IDDPM's `ddim_sample`: the learned variance is ignored, `eta` sets the noise).
      Both run the same respaced schedule and feed the network the original timesteps.
    - `eta`: DDIM's noise scale, in [0, 1]: 0 (the default) is deterministic, 1 injects the
      DDPM posterior variance of the respaced schedule. Only for `sampler="ddim"`.
    - `progress_steps`: a step schedule over generation progress (DiSA), read by
      `steps_at` (see `AbstractIterativeHead`; `fluid.heads.annealed_steps` makes one);
      `None`, the default, gives `sampling_steps` at every progress.
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
    sampler: str = eqx.field(static=True)
    eta: float = eqx.field(static=True)
    progress_steps: tuple[int, ...] | None = eqx.field(static=True)

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
        sampler: str = "ddpm",
        eta: float = 0.0,
        progress_steps: Sequence[int] | None = None,
        *,
        key: Key,
    ):
        if depth < 1 or batch_mul < 1:
            raise ValueError(f"depth and batch_mul must be positive; got {depth}, {batch_mul}.")
        # Fails early (and fills the cache) on an impossible respacing.
        if noise_shift <= 0:
            raise ValueError(f"noise_shift must be positive, got {noise_shift}.")
        gd.diffusion_schedule(num_timesteps, sampling_steps, float(noise_shift))
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
        if not 0 <= eta <= 1 or (eta != 0 and sampler != "ddim"):
            raise ValueError(f"eta must be in [0, 1] and is DDIM's only; got {eta} with "
                             f"sampler {sampler!r}.")
        self.progress_steps = as_progress_steps(progress_steps, 2)
        for steps in self.progress_steps or ():
            gd.diffusion_schedule(num_timesteps, steps, float(noise_shift))
        self.sampler = sampler
        self.eta = float(eta)
        self.num_timesteps = num_timesteps
        self.sampling_steps = sampling_steps
        self.clip_denoised = None if clip_denoised is None else float(clip_denoised)
        init_adaln_head(self, cond_dim, token_dim, width, depth, 2 * token_dim, batch_mul,
                        noise_shift, remat, key=key)

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
        return self.sampling_schedule()

    def sampling_schedule(self, steps: int | None = None) -> gd.DiffusionSchedule:
        """The float64 constants of a sampling chain respaced to `steps` (`None`:
        `sampling_steps`)."""
        steps = self.sampling_steps if steps is None else steps
        return gd.diffusion_schedule(self.num_timesteps, steps, self.noise_shift)

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

    def _blocks(self) -> list[tuple]:
        """The residual blocks as `depth` separate `(norm, fc1, fc2, modulation)` tuples."""
        return sliced_blocks(adaln_layers(self), self.depth)

    def _network(
        self, x: Float[Array, " token_dim"], t: Int[Array, ""], c: Condition,
        blocks: list[tuple] | None,
    ) -> Float[Array, " 2*token_dim"]:
        # `blocks` (from `_blocks`): weights sliced once, outside a sampling chain; `None`:
        # one rematerialised scan over the stacked weights, for training (`adaln_mlp`).
        return adaln_mlp(adaln_layers(self), x, t, c, blocks=blocks, remat=self.remat)

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
        steps: int | None = None,
    ) -> Float[Array, " token_dim"]:
        steps = self.sampling_steps if steps is None else steps
        s = self.sampling_schedule(steps)
        timestep_map = jnp.asarray(s.timestep_map, jnp.int32)
        dtype = self.dtype
        temperature = jnp.asarray(temperature, dtype)
        k_init, k_steps = jr.split(key)
        blocks = self._blocks()  # sliced once, outside the chain (see `_network`)

        def step(i, x):
            t_gen = steps - 1 - i
            t_net = timestep_map[t_gen]
            if z_uncond is None:
                output = self._network(x, t_net, z, blocks)
            else:
                output = self._guided_output(x, t_net, z, z_uncond, cfg, blocks)[0]
            mean, log_variance, pred_xstart = gd.p_mean_variance(
                s, output, x, t_gen, self.clip_denoised
            )
            if self.sampler == "ddim":
                mean, sigma = gd.ddim_step(s, x, t_gen, pred_xstart, self.eta)
                if self.eta == 0:
                    return mean
                noise = jr.normal(jr.fold_in(k_steps, i), (self.token_dim,), dtype)
                return mean + sigma * noise * temperature
            noise = jr.normal(jr.fold_in(k_steps, i), (self.token_dim,), dtype)
            # MAR's p_sample: the last step (t = 0) returns the mean.
            scale = jnp.where(t_gen == 0, 0.0, temperature)
            return mean + jnp.exp(0.5 * log_variance) * noise * scale

        x = jr.normal(k_init, (self.token_dim,), dtype)
        return jax.lax.fori_loop(0, steps, step, x)

    def num_evaluations(self, steps: int | None = None) -> int:
        return self.sampling_steps if steps is None else steps
