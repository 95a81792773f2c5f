import typing
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from .._types import CONTINUOUS, Condition, Key, Scalar
from ..nn import DEFAULT_REMAT_POLICY, RematPolicy, stacked_field
from ._abstract import AbstractIterativeHead
from ._adaln_mlp import adaln_layers, adaln_mlp, init_adaln_head, sliced_blocks
from ._steps import as_progress_steps

PREDICTIONS = ("velocity", "noise", "clean")
LOSS_SPACES = ("velocity", "prediction")
SOLVERS = ("euler", "heun")
# The network sees `1000 t`: the range of the diffusion head's timestep indices, for which
# the sinusoidal embedding's frequencies were chosen.
TIME_SCALE = 1000.0

Velocity: typing.TypeAlias = Callable[
    [Float[Array, " token_dim"], Float[Array, ""]], Float[Array, " token_dim"]
]


def shift_time(t: Float[Array, "*shape"] | np.ndarray, shift: float):
    """`t` moved towards noise so that the signal-to-noise ratio `((1 - t) / t)^2` of the
    path is divided by `shift^2`: `shift t / (1 + (shift - 1) t)` (SD3's shift); 1 keeps
    `t`."""
    if shift == 1:
        return t
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
    """The `steps + 1` float64 times of a sampling chain, from 1 (noise) to 0 (data):
    `shift_time(1 - i / steps)`."""
    return shift_time(1.0 - np.arange(steps + 1, dtype=np.float64) / steps, shift)


def to_velocity(
    prediction: str,
    output: Float[Array, " token_dim"],
    x_t: Float[Array, " token_dim"],
    t: Float[Array, ""],
    t_eps: float,
) -> Float[Array, " token_dim"]:
    """The velocity `dx_t/dt = eps - x0` of the path `x_t = (1 - t) x0 + t eps` implied by
    a network `output` predicting `prediction` at `(x_t, t)`.

    - `"velocity"`: the output itself.
    - `"noise"` (`eps`): `x0 = (x_t - t eps) / (1 - t)`, so `v = (eps - x_t) / (1 - t)`.
    - `"clean"` (`x0`): `eps = (x_t - (1 - t) x0) / t`, so `v = (x_t - x0) / t`.

    The denominators are clamped below at `t_eps` (JiT's `t_eps`), where they vanish.
    """
    if prediction == "velocity":
        return output
    if prediction == "noise":
        return (output - x_t) / jnp.maximum(1 - t, t_eps)
    return (x_t - output) / jnp.maximum(t, t_eps)


def prediction_target(
    prediction: str, x0: Float[Array, " token_dim"], eps: Float[Array, " token_dim"]
) -> Float[Array, " token_dim"]:
    """What a network predicting `prediction` should output for the pair `(x0, eps)`."""
    return {"velocity": eps - x0, "noise": eps, "clean": x0}[prediction]


def ode_solve(
    velocity: Velocity, x: Float[Array, " token_dim"], ts: Float[Array, " grid"],
    solver: str,
) -> Float[Array, " token_dim"]:
    """`x` at `ts[0]` carried to `ts[-1]` along `dx/dt = velocity(x, t)`, one step per
    interval of the grid `ts` (decreasing from noise to data in sampling).

    `"euler"`: `x + h v(x, t)`, one evaluation per step. `"heun"`: Heun's second-order step
    (the trapezoid of `v(x, t)` and `v` at the Euler point, at the next time), two
    evaluations per step, except the last step, an Euler step, as in EDM and JiT (the next
    time is 0, where a clean or noise prediction's velocity divides by a vanishing time):
    `2 * steps - 1` evaluations.
    """
    steps = ts.shape[0] - 1

    def euler(i, x):
        return x + (ts[i + 1] - ts[i]) * velocity(x, ts[i])

    def heun(i, x):
        h = ts[i + 1] - ts[i]
        v = velocity(x, ts[i])
        v_next = velocity(x + h * v, ts[i + 1])
        return x + h * (0.5 * (v + v_next))

    if solver == "euler":
        return jax.lax.fori_loop(0, steps, euler, x)
    x = jax.lax.fori_loop(0, steps - 1, heun, x)
    return euler(steps - 1, x)


@typing.final
class FlowHead(AbstractIterativeHead):
    """A flow-matching (rectified-flow) head on MAR's AdaLN MLP: the diffusion head's
    network, trained on the straight path `x_t = (1 - t) x0 + t eps` (`t = 0` data, `t = 1`
    noise; the velocity is `eps - x0`) and sampled by integrating the velocity from noise at
    `t = 1` to data at `t = 0` in a few Euler or Heun steps.

    The network (`fluid.heads.DiffusionHead`'s, outputting one token) is fed `1000 t`.
    Training draws `batch_mul` fresh `(t, eps)` pairs per position, `t` uniform (moved by
    `noise_shift`), and averages the squared error over them (`loss_space`). Guidance mixes
    the conditional and unconditional velocities, `v_c + (cfg - 1) (v_c - v_u)`, both halves
    evaluated at the same point in one batched call (the two halves start from the same
    noise, as the diffusion head's do); the mixed velocity is what a mix of the predictions
    would give, the velocity being affine in the prediction. The temperature scales the
    initial noise, `x_1 = temperature * eps`: an ODE sampler injects no other noise (MAR's
    diffusion temperature scales the injected noise, which is the only place it can act
    there).

    All AdaLN layers and the output layer start at zero, so an untrained head predicts zero.

    **Arguments:**

    - `cond_dim`: width of the condition vector.
    - `token_dim`: channels of one continuous token.
    - `width`, `depth`: the MLP's width and number of residual blocks.
    - `prediction`: what the network outputs: `"velocity"` (`eps - x0`, the default),
      `"noise"` (`eps`) or `"clean"` (`x0`, JiT's choice, Li & He, 2025, arXiv
      2511.13720); `to_velocity` converts.
    - `loss_space`: `"velocity"` (the default; JiT's loss): the squared error between the
      velocity the output implies and the true one, both through `to_velocity` (for a
      clean prediction, `|x0 - x0_hat|^2 / max(t, t_eps)^2`); `"prediction"`: the squared
      error of the output against its own target (`prediction_target`). The same for
      `prediction="velocity"`.
    - `sampling_steps`: steps of the sampling chain (at least 1); `sample(..., steps=k)`
      runs `k` instead for that call.
    - `solver`: `"euler"` or `"heun"` (the default; the last step is an Euler step, so `k`
      steps take `2k - 1` evaluations; see `ode_solve`).
    - `batch_mul`: `(t, eps)` draws per position in the loss.
    - `t_eps`: the clamp of the times that a noise or clean prediction's velocity divides
      by (`to_velocity`); JiT's 0.05 by default.
    - `noise_shift`: divide the path's signal-to-noise ratio by `noise_shift**2`, in
      training and in the sampling grid (`shift_time`); 1, the default, is the plain path.
    - `progress_steps`: a step schedule over generation progress (DiSA; see
      `AbstractIterativeHead`); `None` gives `sampling_steps` at every progress.
    - `remat`: as `DiffusionHead`'s.
    - `key`: initialisation key.
    """

    token_kind: typing.ClassVar[str] = CONTINUOUS
    time_fc1: eqx.nn.Linear
    time_fc2: eqx.nn.Linear
    cond_embed: eqx.nn.Linear
    input_proj: eqx.nn.Linear
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
    prediction: str = eqx.field(static=True)
    loss_space: str = eqx.field(static=True)
    sampling_steps: int = eqx.field(static=True)
    solver: str = eqx.field(static=True)
    batch_mul: int = eqx.field(static=True)
    t_eps: float = eqx.field(static=True)
    noise_shift: float = eqx.field(static=True)
    progress_steps: tuple[int, ...] | None = eqx.field(static=True)
    remat: RematPolicy = eqx.field(static=True)

    def __init__(
        self,
        cond_dim: int,
        token_dim: int,
        width: int = 1024,
        depth: int = 3,
        prediction: str = "velocity",
        loss_space: str = "velocity",
        sampling_steps: int = 16,
        solver: str = "heun",
        batch_mul: int = 4,
        t_eps: float = 0.05,
        noise_shift: float = 1.0,
        progress_steps: Sequence[int] | None = None,
        remat: RematPolicy = DEFAULT_REMAT_POLICY,
        *,
        key: Key,
    ):
        for name, value, allowed in (("prediction", prediction, PREDICTIONS),
                                     ("loss_space", loss_space, LOSS_SPACES),
                                     ("solver", solver, SOLVERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if depth < 1 or batch_mul < 1 or sampling_steps < 1:
            raise ValueError(f"depth, batch_mul and sampling_steps must be positive; got "
                             f"{depth}, {batch_mul}, {sampling_steps}.")
        if not 0 < t_eps < 1 or noise_shift <= 0:
            raise ValueError(f"t_eps must be in (0, 1) and noise_shift positive; got {t_eps}, "
                             f"{noise_shift}.")
        self.prediction, self.loss_space, self.solver = prediction, loss_space, solver
        self.sampling_steps, self.t_eps = sampling_steps, float(t_eps)
        self.progress_steps = as_progress_steps(progress_steps, 1)
        init_adaln_head(self, cond_dim, token_dim, width, depth, token_dim, batch_mul,
                        noise_shift, remat, key=key)

    @property
    def dtype(self) -> jnp.dtype:
        """The working precision: that of the parameters."""
        return self.input_proj.weight.dtype

    def network(
        self, x_t: Float[Array, " token_dim"], t: Float[Array, ""], c: Condition
    ) -> Float[Array, " token_dim"]:
        """The raw network output (the `prediction`) at `(x_t, t)`, `t` in [0, 1]."""
        return self._network(x_t, t, c, None)

    def _network(self, x_t, t, c, blocks):
        # `blocks`: weights sliced once outside a sampling chain, `None`: the training scan
        # (see `fluid.heads._adaln_mlp.adaln_mlp`).
        t_net = jnp.asarray(t, jnp.float32) * TIME_SCALE
        return adaln_mlp(adaln_layers(self), x_t, t_net, c, blocks=blocks, remat=self.remat)

    def velocity(
        self, x_t: Float[Array, " token_dim"], t: Float[Array, ""], c: Condition
    ) -> Float[Array, " token_dim"]:
        """The velocity the network predicts at `(x_t, t)` (`to_velocity`)."""
        return self._velocity(x_t, t, c, None)

    def _velocity(self, x_t, t, c, blocks):
        x_t = x_t.astype(self.dtype)
        t = jnp.asarray(t, self.dtype)
        out = self._network(x_t, t, c, blocks)
        return to_velocity(self.prediction, out, x_t, t, self.t_eps)

    def guided_velocity(
        self,
        x_t: Float[Array, " token_dim"],
        t: Float[Array, ""],
        c: Condition,
        c_uncond: Condition,
        cfg: Float[Array, ""] | float,
    ) -> Float[Array, " token_dim"]:
        """The velocities under both conditions in one batched call, mixed as
        `cond + (cfg - 1) * (cond - uncond)` (so that `cfg == 1` gives exactly the
        conditional velocity)."""
        return self._guided_velocity(x_t, t, c, c_uncond, cfg, None)

    def _guided_velocity(self, x_t, t, c, c_uncond, cfg, blocks):
        v = jax.vmap(lambda cond: self._velocity(x_t, t, cond, blocks))(jnp.stack([c, c_uncond]))
        return v[0] + (jnp.asarray(cfg, self.dtype) - 1) * (v[0] - v[1])

    def training_loss(
        self,
        x0: Float[Array, " token_dim"],
        t: Float[Array, ""],
        eps: Float[Array, " token_dim"],
        c: Condition,
    ) -> Scalar:
        """The loss at one `(t, eps)`: the mean over channels of the squared error in
        `loss_space`."""
        dtype = self.dtype
        x0, eps, t = x0.astype(dtype), eps.astype(dtype), jnp.asarray(t, dtype)
        x_t = (1 - t) * x0 + t * eps
        out = self.network(x_t, t, c)
        target = prediction_target(self.prediction, x0, eps)
        if self.loss_space == "velocity":
            out = to_velocity(self.prediction, out, x_t, t, self.t_eps)
            target = to_velocity(self.prediction, target, x_t, t, self.t_eps)
        return jnp.mean((out - target) ** 2)

    def loss(self, z: Condition, target: Float[Array, " token_dim"], *, key: Key) -> Scalar:
        def one_draw(k):
            k_t, k_eps = jr.split(k)
            t = shift_time(jr.uniform(k_t, (), self.dtype), self.noise_shift)
            eps = jr.normal(k_eps, (self.token_dim,), self.dtype)
            return self.training_loss(target, t, eps, z)

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
        dtype = self.dtype
        ts = jnp.asarray(time_grid(steps, self.noise_shift), dtype)
        blocks = sliced_blocks(adaln_layers(self), self.depth)  # once, outside the chain

        def velocity(x, t):
            if z_uncond is None:
                return self._velocity(x, t, z, blocks)
            return self._guided_velocity(x, t, z, z_uncond, cfg, blocks)

        x = jnp.asarray(temperature, dtype) * jr.normal(key, (self.token_dim,), dtype)
        return ode_solve(velocity, x, ts, self.solver)

    def num_evaluations(self, steps: int | None = None) -> int:
        steps = self.sampling_steps if steps is None else steps
        return steps if self.solver == "euler" else 2 * steps - 1
