"""Gaussian diffusion as MAR uses it (after IDDPM): cosine schedule, noise prediction,
learned-range variance, loss = MSE + variational bound, even respacing for sampling; and
DDIM's step on the same (respaced) schedules.

Schedules are NumPy float64 arrays computed once per `(num_timesteps, sampling_steps)` and
cached. Traced code reads them as float32 constants (`jnp.asarray(...)[t]`), exactly as
MAR's `_extract_into_tensor` indexes a float64 array and casts the result to float32; they
are never pytree leaves of a head, so no optimiser can train or decay them.

Every function below works on ONE token: `x` is `Float[Array, " token_dim"]`, `t` a scalar
timestep index into the schedule given.
"""

import functools
import math
import typing
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

MAX_BETA = 0.999
LOG2 = math.log(2.0)


class DiffusionSchedule(typing.NamedTuple):
    """The float64 constants of one (possibly respaced) diffusion process.

    `timestep_map[i]` is the original (training) timestep of step `i`; the network is always
    fed the original index.
    """

    betas: np.ndarray
    log_betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def cosine_betas(num_timesteps: int, max_beta: float = MAX_BETA, shift: float = 1.0) -> np.ndarray:
    """IDDPM's cosine schedule: `beta_i = 1 - abar((i+1)/T) / abar(i/T)`, clipped at
    `max_beta`, with `abar(s) = cos((s + 0.008) / 1.008 * pi/2)^2`.

    `shift > 1` divides the signal-to-noise ratio at every step by `shift**2` (the shifted
    cosine schedule of Hoogeboom et al., 2023, "simple diffusion"):
    `abar_shift = abar / (abar + shift**2 * (1 - abar))`. Pixel patches need it: the `p x p`
    pixels of a flat patch average the noise down by `p`, so at the nominal schedule the
    token alone reveals itself at most noise levels and the condition is rarely needed.
    """

    def alpha_bar(s: float) -> float:
        a = math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return a / (a + shift**2 * (1 - a))

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )


def space_timesteps(num_timesteps: int, sampling_steps: int) -> tuple[int, ...]:
    """IDDPM's even spacing of one section: `sampling_steps` kept indices from 0 to
    `num_timesteps - 1`, rounded as IDDPM rounds (a running float sum, Python's `round`)."""
    if not 1 <= sampling_steps <= num_timesteps:
        raise ValueError(
            f"cannot respace {num_timesteps} steps to {sampling_steps}; need "
            f"1 <= sampling_steps <= num_timesteps."
        )
    if sampling_steps == 1:
        return (0,)
    stride = (num_timesteps - 1) / (sampling_steps - 1)
    cur, kept = 0.0, []
    for _ in range(sampling_steps):
        kept.append(round(cur))
        cur += stride
    return tuple(kept)


def _readonly(a: np.ndarray) -> np.ndarray:
    # The arrays are shared through the cache; a caller writing into one would corrupt
    # every later head.
    a = np.asarray(a)
    a.setflags(write=False)
    return a


def _schedule_from_betas(betas: np.ndarray, timestep_map: np.ndarray) -> DiffusionSchedule:
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance is 0 at t = 0; IDDPM substitutes the t = 1 value in the log.
    posterior_log_variance_clipped = np.log(
        np.append(posterior_variance[1], posterior_variance[1:])
    )
    return DiffusionSchedule(
        *map(
            _readonly,
            (
                betas,
                np.log(betas),
                alphas_cumprod,
                alphas_cumprod_prev,
                np.sqrt(alphas_cumprod),
                np.sqrt(1.0 - alphas_cumprod),
                np.sqrt(1.0 / alphas_cumprod),
                np.sqrt(1.0 / alphas_cumprod - 1),
                posterior_variance,
                posterior_log_variance_clipped,
                betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
                (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
                timestep_map.astype(np.int64),
            ),
        )
    )


@functools.lru_cache(maxsize=None)
def diffusion_schedule(
    num_timesteps: int, sampling_steps: int | None = None, shift: float = 1.0
) -> DiffusionSchedule:
    """The cosine process over `num_timesteps`, respaced to `sampling_steps` (`None`: all),
    its signal-to-noise ratio divided by `shift**2` (see `cosine_betas`).

    As in IDDPM's `SpacedDiffusion` (which MAR also uses for training, keeping every step),
    the betas are rederived from the kept cumulative products:
    `beta_i = 1 - abar[k_i] / abar[k_{i-1}]`.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}.")
    steps = num_timesteps if sampling_steps is None else sampling_steps
    # One step has no t = 1 to borrow the clipped posterior log-variance from.
    if steps < 2:
        raise ValueError(f"sampling_steps must be at least 2, got {steps}.")
    kept = np.array(space_timesteps(num_timesteps, steps), dtype=np.int64)
    base_alphas_cumprod = np.cumprod(1.0 - cosine_betas(num_timesteps, shift=shift))
    kept_cumprod = base_alphas_cumprod[kept]
    betas = 1.0 - kept_cumprod / np.append(1.0, kept_cumprod[:-1])
    return _schedule_from_betas(betas, kept)


def _at(table: np.ndarray, t: Int[Array, ""], like: Array) -> Float[Array, ""]:
    # In the working precision of `like` (float32 in a head), as MAR casts after indexing.
    return jnp.asarray(table, like.dtype)[t]


def q_sample(
    s: DiffusionSchedule,
    x_start: Float[Array, " token_dim"],
    t: Int[Array, ""],
    noise: Float[Array, " token_dim"],
) -> Float[Array, " token_dim"]:
    """A draw of `q(x_t | x_0)` with the given standard-normal `noise`."""
    return (
        _at(s.sqrt_alphas_cumprod, t, x_start) * x_start
        + _at(s.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(
    s: DiffusionSchedule,
    x_start: Float[Array, " token_dim"],
    x_t: Float[Array, " token_dim"],
    t: Int[Array, ""],
) -> tuple[Float[Array, " token_dim"], Float[Array, ""]]:
    """Mean and clipped log-variance of the true posterior `q(x_{t-1} | x_t, x_0)`."""
    coef1, coef2 = _at(s.posterior_mean_coef1, t, x_t), _at(s.posterior_mean_coef2, t, x_t)
    mean = coef1 * x_start + coef2 * x_t
    return mean, _at(s.posterior_log_variance_clipped, t, x_t)


def predict_xstart_from_eps(
    s: DiffusionSchedule,
    x_t: Float[Array, " token_dim"],
    t: Int[Array, ""],
    eps: Float[Array, " token_dim"],
) -> Float[Array, " token_dim"]:
    return (
        _at(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - _at(s.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_xstart(
    s: DiffusionSchedule,
    x_t: Float[Array, " token_dim"],
    t: Int[Array, ""],
    pred_xstart: Float[Array, " token_dim"],
) -> Float[Array, " token_dim"]:
    """The noise that takes `pred_xstart` to `x_t` at step `t` (IDDPM's
    `_predict_eps_from_xstart`)."""
    return (
        _at(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
    ) / _at(s.sqrt_recipm1_alphas_cumprod, t, x_t)


def ddim_coefficients(s: DiffusionSchedule, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """DDIM's per-step float64 constants on the schedule `s` (Song et al., 2021, eq. 12):
    `sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)` and the
    coefficient of the noise direction, `sqrt(1 - abar_prev - sigma^2)`.

    `eta = 0` is deterministic; with `eta = 1`, `sigma^2` is the DDPM posterior variance of
    `s`. Computed in float64 on the host, as the schedules are: in float32 the direction's
    `1 - abar_prev - sigma^2` (about 1e-9 at the first steps with `eta = 1`) would round
    below zero.
    """
    abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    return sigma, np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0))


def ddim_step(
    s: DiffusionSchedule,
    x_t: Float[Array, " token_dim"],
    t: Int[Array, ""],
    pred_xstart: Float[Array, " token_dim"],
    eta: float,
) -> tuple[Float[Array, " token_dim"], Float[Array, ""]]:
    """Mean and standard deviation of DDIM's step from `x_t` to `x_{t-1}` (eq. 12 of the
    DDIM paper, as IDDPM's `ddim_sample` computes it): with
    `eps = predict_eps_from_xstart(x_t, t, pred_xstart)`, the mean is
    `sqrt(abar_prev) pred_xstart + sqrt(1 - abar_prev - sigma^2) eps`
    (`ddim_coefficients`). At `t = 0`, `abar_prev = 1`: the mean is `pred_xstart`, `sigma`
    is 0."""
    sigma, direction = ddim_coefficients(s, eta)
    eps = predict_eps_from_xstart(s, x_t, t, pred_xstart)
    mean = (
        _at(np.sqrt(s.alphas_cumprod_prev), t, x_t) * pred_xstart + _at(direction, t, x_t) * eps
    )
    return mean, _at(sigma, t, x_t)


def learned_range_log_variance(
    s: DiffusionSchedule, var_values: Float[Array, " token_dim"], t: Int[Array, ""]
) -> Float[Array, " token_dim"]:
    """IDDPM's learned range: `var_values` in [-1, 1] interpolates the log-variance between
    the clipped posterior log-variance (-1) and `log beta_t` (+1)."""
    frac = (var_values + 1) / 2
    min_log = _at(s.posterior_log_variance_clipped, t, var_values)
    return frac * _at(s.log_betas, t, var_values) + (1 - frac) * min_log


def split_output(
    model_output: Float[Array, " out"],
) -> tuple[Float[Array, " token_dim"], Float[Array, " token_dim"]]:
    """The network's output as (noise prediction, variance values)."""
    eps, var_values = jnp.split(model_output, 2)
    return eps, var_values


def p_mean_variance(
    s: DiffusionSchedule,
    model_output: Float[Array, " out"],
    x_t: Float[Array, " token_dim"],
    t: Int[Array, ""],
    clip_denoised: float | None = None,
) -> tuple[Float[Array, " token_dim"], Float[Array, " token_dim"], Float[Array, " token_dim"]]:
    """Mean, log-variance and predicted `x_0` of `p(x_{t-1} | x_t)` from the network's raw
    output at `x_t`. With `clip_denoised=c`, `x_0` is clipped to `[-c, c]` first (IDDPM's
    `clip_denoised` for data in a known range); `None` leaves it alone, as MAR samples."""
    eps, var_values = split_output(model_output)
    log_variance = learned_range_log_variance(s, var_values, t)
    pred_xstart = predict_xstart_from_eps(s, x_t, t, eps)
    if clip_denoised is not None:
        pred_xstart = jnp.clip(pred_xstart, -clip_denoised, clip_denoised)
    mean, _ = q_posterior_mean_variance(s, pred_xstart, x_t, t)
    return mean, log_variance, pred_xstart


def normal_kl(
    mean1: Float[Array, "*shape"],
    logvar1: Float[Array, "*#shape"],
    mean2: Float[Array, "*#shape"],
    logvar2: Float[Array, "*#shape"],
) -> Float[Array, "*shape"]:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def tail_accurate_tanh(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """`tanh`, correctly rounded in float32 away from zero.

    XLA's CPU `tanh` is a rational approximation a few ulp off that reaches +-1 already
    near |x| = 7.9 (the float32 `tanh` does only near 9.0). The decoder likelihood below
    takes differences of CDF values next to 1, where those ulp are the whole answer, so
    the tail is computed as `1 - 2e / (1 + e)` with `e = exp(-2|x|)`: `e` is small there,
    its few-ulp error falls far below half an ulp of the result, and the final subtraction
    rounds once.
    """
    a = jnp.abs(x)
    e = jnp.exp(-2 * a)
    tail = jnp.sign(x) * (1 - 2 * e / (1 + e))
    return jnp.where(a > 0.55, tail, jnp.tanh(x))


def approx_standard_normal_cdf(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """The tanh approximation of the standard normal CDF that IDDPM uses."""
    return 0.5 * (1.0 + tail_accurate_tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: Float[Array, "*shape"],
    means: Float[Array, "*shape"],
    log_scales: Float[Array, "*shape"],
) -> Float[Array, "*shape"]:
    """Log-probability (nats) of the 8-bit bin of width 2/255 around `x` (data in [-1, 1]),
    with open-ended edge bins, as IDDPM's decoder likelihood at t = 0."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_term(
    s: DiffusionSchedule,
    model_output: Float[Array, " out"],
    x_start: Float[Array, " token_dim"],
    x_t: Float[Array, " token_dim"],
    t: Int[Array, ""],
) -> Float[Array, ""]:
    """One term of the variational bound, averaged over channels and divided by log 2 as
    IDDPM's `_vb_terms_bpd` does: the decoder negative log-likelihood at t = 0, else
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
    true_mean, true_log_variance = q_posterior_mean_variance(s, x_start, x_t, t)
    mean, log_variance, _ = p_mean_variance(s, model_output, x_t, t)
    kl = jnp.mean(normal_kl(true_mean, true_log_variance, mean, log_variance)) / LOG2
    decoder_nll = -jnp.mean(
        discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
    ) / LOG2
    return jnp.where(t == 0, decoder_nll, kl)


def training_losses(
    s: DiffusionSchedule,
    model: Callable[[Float[Array, " token_dim"], Int[Array, ""]], Float[Array, " out"]],
    x_start: Float[Array, " token_dim"],
    t: Int[Array, ""],
    noise: Float[Array, " token_dim"],
) -> dict[str, Float[Array, ""]]:
    """MAR's training loss at one `(t, noise)`: `mse` of the noise prediction (mean over
    channels) plus `vb`, the bound term computed with the noise prediction held fixed so
    that only the variance values learn from it.

    `model(x_t, t)` is the network's raw output (noise, then variance values).
    """
    x_t = q_sample(s, x_start, t, noise)
    model_output = model(x_t, t)
    eps, var_values = split_output(model_output)
    frozen_output = jnp.concatenate([jax.lax.stop_gradient(eps), var_values])
    vb = vb_term(s, frozen_output, x_start, x_t, t)
    mse = jnp.mean((noise - eps) ** 2)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
