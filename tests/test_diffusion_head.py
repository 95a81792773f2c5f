"""The diffusion head against NumPy's DDPM/IDDPM formulas, against MAR's own numbers (the
`mar_diffloss_tiny` fixture), and its sampling and training semantics."""

import math
from pathlib import Path

import chex
import equinox as eqx
import helpers
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

from fluid.heads import _gaussian_diffusion as gd
from fluid.heads._diffusion import DiffusionHead
from fluid.heads._mar_convert import MarCheckpointError, load_mar_diffloss

FIXTURE = Path(__file__).parent / "fixtures" / "mar_diffloss_tiny.npz"
TOL = dict(atol=1e-5, rtol=1e-5)


# -- NumPy reference (float64), written from the DDPM / IDDPM papers ------------------------
def np_cosine_betas(n):
    s = np.arange(n + 1) / n
    abar = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1 - abar[1:] / abar[:-1], 0.999)


def np_process(betas):
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return dict(
        abar=abar,
        coef1=betas * np.sqrt(abar_prev) / (1 - abar),
        coef2=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
        post_logvar=np.log(np.append(post_var[1], post_var[1:])),
        log_betas=np.log(betas),
    )


def np_respaced_betas(n, steps):
    kept = np.round(np.arange(steps) * (n - 1) / (steps - 1)).astype(np.int64)
    abar = np.cumprod(1 - np_cosine_betas(n))[kept]
    return kept, 1 - abar / np.append(1.0, abar[:-1])


def np_normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def np_discretized_loglik(x, mean, log_scale):
    def cdf(v):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    inv = np.exp(-log_scale)
    plus, minus = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    mid = np.log(np.maximum(plus - minus, 1e-12))
    return np.where(
        x < -0.999,
        np.log(np.maximum(plus, 1e-12)),
        np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)), mid),
    )


def np_training_losses(ref, x0, t, noise, out_at):
    """mse and vb (bits per dim, IDDPM's unit) given the network's output at x_t."""
    abar = ref["abar"][t]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    out = out_at(x_t)
    eps, v = out[: len(x0)], out[len(x0) :]
    frac = (v + 1) / 2
    logvar = frac * ref["log_betas"][t] + (1 - frac) * ref["post_logvar"][t]
    pred_x0 = np.sqrt(1 / abar) * x_t - np.sqrt(1 / abar - 1) * eps
    mean = ref["coef1"][t] * pred_x0 + ref["coef2"][t] * x_t
    true_mean = ref["coef1"][t] * x0 + ref["coef2"][t] * x_t
    if t == 0:
        vb = -np.mean(np_discretized_loglik(x0, mean, 0.5 * logvar)) / np.log(2)
    else:
        vb = np.mean(np_normal_kl(true_mean, ref["post_logvar"][t], mean, logvar)) / np.log(2)
    mse = np.mean((noise - eps) ** 2)
    return dict(x_t=x_t, mse=mse, vb=vb, loss=mse + vb)


perturbed = eqx.filter_jit(helpers.perturbed)


def test_schedules_match_numpy():
    train = gd.diffusion_schedule(1000)
    ref = np_process(np_cosine_betas(1000))
    chex.assert_trees_all_close(train.betas, np_cosine_betas(1000), atol=1e-10, rtol=1e-10)
    chex.assert_trees_all_close(
        (train.alphas_cumprod, train.posterior_mean_coef1, train.posterior_mean_coef2),
        (ref["abar"], ref["coef1"], ref["coef2"]),
        atol=1e-10,
        rtol=1e-10,
    )
    chex.assert_trees_all_close(
        train.posterior_log_variance_clipped, ref["post_logvar"], atol=1e-10, rtol=1e-10
    )
    kept, betas = np_respaced_betas(1000, 100)
    gen = gd.diffusion_schedule(1000, 100)
    np.testing.assert_array_equal(gen.timestep_map, kept)
    assert gen.timestep_map[:3].tolist() == [0, 10, 20]
    assert gen.timestep_map[-2:].tolist() == [989, 999]
    chex.assert_trees_all_close(gen.betas, betas, atol=1e-10, rtol=1e-10)
    chex.assert_trees_all_close(
        gen.posterior_log_variance_clipped, np_process(betas)["post_logvar"], atol=1e-10, rtol=1e-10
    )
    assert train.betas.max() == pytest.approx(0.999)


@pytest.mark.parametrize("shift", [2.0, 4.0])
def test_shifted_schedule_divides_the_snr(shift):
    # Simple diffusion's shifted cosine: SNR_shift = SNR / shift^2 on the continuous curve;
    # IDDPM's betas take ratios of it, so the cumulative products are f(t) / f(0).
    base = gd.diffusion_schedule(1000).alphas_cumprod
    shifted = gd.diffusion_schedule(1000, None, shift).alphas_cumprod
    assert np.all(shifted[1:-1] < base[1:-1])  # more noise at every step
    # Written from the formula: abar / (abar + shift^2 (1 - abar)) on IDDPM's grid.
    s = np.arange(1001) / 1000
    abar = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = abar / (abar + shift**2 * (1 - abar))
    betas = np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    np.testing.assert_allclose(
        gd.diffusion_schedule(1000, None, shift).betas, betas, atol=1e-12, rtol=1e-10
    )
    snr = lambda a: a / (1 - a)  # noqa: E731
    curve = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(snr(abar), snr(curve) / shift**2, rtol=1e-9)


def test_elementwise_formulas_match_numpy():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(2, 16)).astype(np.float32)
    lv1, lv2 = rng.normal(size=(2, 16)).astype(np.float32)
    chex.assert_trees_all_close(
        gd.normal_kl(jnp.asarray(m1), jnp.asarray(lv1), jnp.asarray(m2), jnp.asarray(lv2)),
        np_normal_kl(*(a.astype(np.float64) for a in (m1, lv1, m2, lv2))),
        **TOL,
    )
    # Well-conditioned bins, plus both open-ended edge bins.
    x = np.concatenate([rng.uniform(-0.99, 0.99, 12), [-1.0, -1.0, 1.0, 1.0]]).astype(np.float32)
    mean = (x + rng.normal(scale=0.03, size=16)).astype(np.float32)
    log_scale = np.full(16, math.log(0.05), np.float32)
    chex.assert_trees_all_close(
        gd.discretized_gaussian_log_likelihood(*map(jnp.asarray, (x, mean, log_scale))),
        np_discretized_loglik(*(a.astype(np.float64) for a in (x, mean, log_scale))),
        **TOL,
    )
    grid = np.linspace(-12, 12, 2001, dtype=np.float32)
    chex.assert_trees_all_close(
        gd.tail_accurate_tanh(jnp.asarray(grid)),
        np.tanh(grid.astype(np.float64)),
        atol=1.2e-7,
        rtol=0,
    )


@pytest.fixture(scope="module")
def small():
    return perturbed(DiffusionHead(12, 8, width=32, depth=2, key=jr.key(0)), jr.key(1), 0.05)


@pytest.mark.parametrize("t", [0, 1, 7, 250, 998, 999])
def test_training_losses_match_numpy(small, t):
    head = small
    x0, noise = jr.normal(jr.key(2), (2, 8))
    # Keep x0 inside one 8-bit bin's reach at t = 0, where the decoder likelihood is
    # well conditioned in float32.
    x0 = 0.5 * x0 / jnp.max(jnp.abs(x0))
    c = jr.normal(jr.key(3), (12,))
    tt = jnp.asarray(t, jnp.int32)
    ours = eqx.filter_jit(DiffusionHead.training_losses)(head, x0, tt, noise, c)
    network = eqx.filter_jit(DiffusionHead.network)
    ref = np_training_losses(
        np_process(np_cosine_betas(1000)),
        np.asarray(x0, np.float64),
        t,
        np.asarray(noise, np.float64),
        lambda x_t: np.asarray(network(head, jnp.asarray(x_t, jnp.float32), tt, c), np.float64),
    )
    chex.assert_trees_all_close(head.q_sample(x0, tt, noise), ref["x_t"], **TOL)
    chex.assert_trees_all_close(
        {k: ours[k] for k in ("loss", "mse", "vb")},
        {k: np.float32(ref[k]) for k in ("loss", "mse", "vb")},
        **TOL,
    )


# -- MAR parity ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mar():
    data = np.load(FIXTURE)
    def group(name):
        return {k.removeprefix(name): data[k] for k in data.files if k.startswith(name)}

    return group("weights/"), group("io/"), group("schedule/")


def mar_head(weights, dtype=jnp.float32):
    head = DiffusionHead(32, 16, width=48, depth=2, key=jr.key(0))
    head = jtu.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, head)
    return load_mar_diffloss(head, weights)


@eqx.filter_jit
def reverse_step(head, io):
    t_gen = jnp.asarray(io["t_gen"], jnp.int32)
    mean, log_variance, pred_xstart = jax.vmap(head.p_mean_variance)(io["x_t"], t_gen, io["c"])
    return {"p_mean": mean, "p_log_variance": log_variance, "pred_xstart": pred_xstart}


def test_mar_schedules(mar):
    _, _, schedule = mar
    train, gen = gd.diffusion_schedule(1000), gd.diffusion_schedule(1000, 100)
    ours = {
        "train_betas": train.betas,
        "train_alphas_cumprod": train.alphas_cumprod,
        "gen_betas": gen.betas,
        "gen_timestep_map": gen.timestep_map,
        "gen_posterior_log_variance_clipped": gen.posterior_log_variance_clipped,
    }
    chex.assert_trees_all_close(ours, schedule, **TOL)
    np.testing.assert_array_equal(gen.timestep_map, schedule["gen_timestep_map"])


@eqx.filter_jit
def mar_outputs(head, io):
    t = jnp.asarray(io["t_train"], jnp.int32)
    losses = jax.vmap(head.training_losses)(io["x_start"], t, io["noise"], io["c"])
    n = len(io["cfg_t"]) // 2
    guided = jax.vmap(head.guided_output, in_axes=(0, 0, 0, 0, None))(
        io["cfg_x"][:n],
        jnp.asarray(io["cfg_t"][:n], jnp.int32),
        io["cfg_c"][:n],
        io["cfg_c"][n:],
        2.5,
    )
    return {
        "net_out": jax.vmap(head.network)(io["x_start"], t, io["c"]),
        "x_t": jax.vmap(head.q_sample)(io["x_start"], t, io["noise"]),
        "loss": losses["loss"],
        "mse": losses["mse"],
        "vb": losses["vb"],
        "cfg_out": jnp.concatenate([guided[:, 0], guided[:, 1]]),
    }


def test_mar_parity(mar):
    weights, io, _ = mar
    head = mar_head(weights)
    ours = mar_outputs(head, io)
    chex.assert_trees_all_close(ours, {k: io[k] for k in ours}, **TOL)
    n = len(io["cfg_t"]) // 2
    # The guided rows share the conditional half's x: MAR's forward_with_cfg ignores the rest.
    chex.assert_trees_all_close(io["cfg_x"][:n], io["x_t"][:n])

    # At t = 999, x0 = 20291 * x_t - 20291 * eps: the network's float32 rounding (about 4e-6
    # in MAR's and in fluid's evaluation alike) is amplified past 1e-5 relative, so rows
    # there are compared in float64 below; every other row is compared here.
    well_conditioned = io["t_gen"] < 99
    step = reverse_step(head, io)
    chex.assert_trees_all_close(
        {k: v[well_conditioned] for k, v in step.items()},
        {k: io[k][well_conditioned] for k in step},
        **TOL,
    )


def test_mar_parity_reverse_step_in_float64(mar):
    """The same head evaluated in float64 (no rounding noise of its own) gives MAR's
    reverse step on every row, t = 999 included."""
    weights, io, _ = mar
    with jax.enable_x64(True):
        head = mar_head(weights, jnp.float64)
        assert head.dtype == jnp.float64
        io64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in io.items()}
        step = reverse_step(head, io64)
        chex.assert_trees_all_close(step, {k: io[k].astype(np.float64) for k in step}, **TOL)


def test_converter_errors(mar):
    weights, _, _ = mar
    head = DiffusionHead(32, 16, width=48, depth=2, key=jr.key(0))
    missing = {k: v for k, v in weights.items() if k != "res_blocks.1.mlp.0.bias"}
    with pytest.raises(MarCheckpointError, match=r"res_blocks\.1\.mlp\.0\.bias"):
        load_mar_diffloss(head, missing)
    bad = dict(weights, **{"cond_embed.weight": weights["cond_embed.weight"].T})
    with pytest.raises(MarCheckpointError, match=r"cond_embed\.weight.*\(32, 48\).*\(48, 32\)"):
        load_mar_diffloss(head, bad)
    extra = dict(weights, **{"res_blocks.2.in_ln.weight": weights["res_blocks.0.in_ln.weight"]})
    with pytest.raises(MarCheckpointError, match=r"res_blocks\.2\.in_ln\.weight"):
        load_mar_diffloss(head, extra)
    # A full MAR checkpoint: the network under `diffloss.net.`, other modules ignored.
    full = {"diffloss.net." + k: v for k, v in weights.items()}
    full["encoder_blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    loaded = load_mar_diffloss(head, full, prefix="diffloss.net.")
    chex.assert_trees_all_equal(loaded, load_mar_diffloss(head, weights))
    with pytest.raises(MarCheckpointError, match=r"diffloss\.net\.input_proj\.weight"):
        without = {k: v for k, v in full.items() if not k.endswith("input_proj.weight")}
        load_mar_diffloss(head, without, "diffloss.net.")


# -- semantics -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    head = DiffusionHead(12, 6, width=32, depth=2, sampling_steps=20, batch_mul=3, key=jr.key(0))
    return head, perturbed(head, jr.key(1), 0.05)


def test_untrained_head_predicts_zero(tiny):
    head, _ = tiny
    x, c = jr.normal(jr.key(2), (6,)), jr.normal(jr.key(3), (12,))
    out = head.network(x, jnp.asarray(500, jnp.int32), c)
    chex.assert_trees_all_equal(out, jnp.zeros((12,), jnp.float32))
    # Schedules are constants, not leaves: nothing the optimiser could train or decay.
    for leaf in jtu.tree_leaves(eqx.filter(head, eqx.is_array)):
        assert 1000 not in leaf.shape and 20 not in leaf.shape
    assert head.num_evaluations() == 20


def test_guidance_at_scale_one_equals_conditional(tiny):
    _, head = tiny
    z, zu = jr.normal(jr.key(2), (2, 12))
    keys = jr.split(jr.key(3), 8)

    @eqx.filter_jit
    def samples(zu, cfg):
        return jax.vmap(lambda k: head.sample(z, zu, cfg, 1.0, key=k))(keys)

    plain = samples(None, 1.0)
    chex.assert_trees_all_close(samples(zu, 1.0), plain, **TOL)
    strong = samples(zu, 3.0)
    assert np.abs(np.asarray(strong - plain)).max() > 1e-3


@pytest.mark.parametrize("guided", [False, True])
def test_sampling_chain_follows_network_and_reverse_steps(tiny, guided):
    # `sample` runs the network on weights it slices once, outside its chain; the chain
    # written here from the public `network` / `guided_output` (the scanned weights) and
    # `p_mean_variance` must give the same token.
    _, head = tiny
    z, zu = jr.normal(jr.key(2), (2, 12))
    cfg, temperature, key = 2.5, 0.8, jr.key(8)
    s = head.gen_schedule

    @eqx.filter_jit
    def reference(head):
        k_init, k_steps = jr.split(key)
        x = jr.normal(k_init, (6,))
        for i in range(head.sampling_steps):
            t_gen = head.sampling_steps - 1 - i
            t_net = jnp.asarray(s.timestep_map[t_gen], jnp.int32)
            if guided:
                out = head.guided_output(x, t_net, z, zu, cfg)[0]
            else:
                out = head.network(x, t_net, z)
            mean, log_var, _ = gd.p_mean_variance(s, out, x, jnp.asarray(t_gen), None)
            noise = jr.normal(jr.fold_in(k_steps, i), (6,))
            x = mean + (jnp.exp(0.5 * log_var) * noise * temperature if t_gen else 0.0)
        return x

    sampled = eqx.filter_jit(
        lambda h: h.sample(z, zu if guided else None, cfg, temperature, key=key)
    )(head)
    chex.assert_trees_all_close(sampled, reference(head), **TOL)


def test_sampling_is_deterministic_given_the_key(tiny):
    _, head = tiny
    z = jr.normal(jr.key(2), (12,))
    a = head.sample(z, None, 1.0, 1.0, key=jr.key(4))
    chex.assert_shape(a, (6,))
    chex.assert_type(a, jnp.float32)
    chex.assert_trees_all_equal(a, head.sample(z, None, 1.0, 1.0, key=jr.key(4)))
    assert np.abs(np.asarray(a - head.sample(z, None, 1.0, 1.0, key=jr.key(5)))).max() > 0
    # Temperature scales only the injected noise: at zero the chain is its mean path.
    cold = head.sample(z, None, 1.0, 0.0, key=jr.key(4))
    assert np.isfinite(np.asarray(cold)).all()
    assert np.abs(np.asarray(cold - a)).max() > 0


def test_jit_equals_eager(tiny):
    _, head = tiny
    z, zu = jr.normal(jr.key(2), (2, 12))
    target = jr.normal(jr.key(3), (6,))
    chex.assert_trees_all_close(
        eqx.filter_jit(lambda h: h.loss(z, target, key=jr.key(6)))(head),
        head.loss(z, target, key=jr.key(6)),
        **TOL,
    )
    chex.assert_trees_all_close(
        eqx.filter_jit(lambda h: h.sample(z, zu, 2.0, 0.9, key=jr.key(7)))(head),
        head.sample(z, zu, 2.0, 0.9, key=jr.key(7)),
        **TOL,
    )


def test_loss_is_finite_and_trains_every_leaf(tiny):
    _, head = tiny
    z = jr.normal(jr.key(2), (12,))
    target = jr.normal(jr.key(3), (6,))
    loss, grads = eqx.filter_jit(
        eqx.filter_value_and_grad(lambda h: h.loss(z, target, key=jr.key(8)))
    )(head)
    chex.assert_type(loss, jnp.float32)
    assert np.isfinite(float(loss))
    for path, g in jtu.tree_flatten_with_path(eqx.filter(grads, eqx.is_array))[0]:
        assert np.isfinite(np.asarray(g)).all(), jtu.keystr(path)
        assert float(jnp.max(jnp.abs(g))) > 0, f"no gradient reaches {jtu.keystr(path)}"
    # The loss averages batch_mul independent (t, noise) draws.
    keys = jr.split(jr.key(8), head.batch_mul)

    def draw(k):
        k_t, k_n = jr.split(k)
        t = jr.randint(k_t, (), 0, 1000)
        return head.training_losses(target, t, jr.normal(k_n, (6,)), z)["loss"]

    chex.assert_trees_all_close(loss, jnp.mean(jax.jit(jax.vmap(draw))(keys)), **TOL)


def test_vb_trains_only_the_variance_values(tiny):
    _, head = tiny
    z = jr.normal(jr.key(2), (12,))
    target = jr.normal(jr.key(3), (6,))
    t = jnp.asarray(300, jnp.int32)
    noise = jr.normal(jr.key(4), (6,))

    def vb(out_flat):
        losses = gd.training_losses(head.train_schedule, lambda x, tt: out_flat, target, t, noise)
        return losses["vb"]

    g = jax.grad(vb)(head.network(head.q_sample(target, t, noise), t, z))
    chex.assert_trees_all_equal(g[:6], jnp.zeros((6,), jnp.float32))
    assert float(jnp.max(jnp.abs(g[6:]))) > 0


def test_clip_denoised_clips_predicted_x0_before_the_posterior():
    from fluid.heads import _gaussian_diffusion as gd

    head = DiffusionHead(8, 4, width=16, depth=1, sampling_steps=10, key=jr.key(0))
    s = head.gen_schedule
    out = jr.normal(jr.key(1), (8,))
    x_t = 3.0 * jr.normal(jr.key(2), (4,))
    t = jnp.asarray(9, jnp.int32)
    _, _, x0 = gd.p_mean_variance(s, out, x_t, t)
    mean, _, x0c = gd.p_mean_variance(s, out, x_t, t, 1.0)
    assert float(jnp.abs(x0).max()) > 1.0  # the case is one where clipping matters
    chex.assert_trees_all_close(x0c, jnp.clip(x0, -1.0, 1.0))
    c1 = np.asarray(s.posterior_mean_coef1)[9]
    c2 = np.asarray(s.posterior_mean_coef2)[9]
    chex.assert_trees_all_close(
        mean, (c1 * np.clip(np.asarray(x0), -1, 1) + c2 * np.asarray(x_t)).astype(np.float32),
        atol=1e-5, rtol=1e-5,
    )


def test_briefly_trained_head_samples_its_conditional_targets():
    # A head fitted to four condition-dependent points must sample near them: this checks the
    # whole chain (training timesteps, respacing, guidance-free sampling) end to end.
    head = DiffusionHead(4, 8, width=64, depth=2, batch_mul=4, sampling_steps=50,
                         clip_denoised=1.0, key=jr.key(0))
    trained, means = helpers.fit_class_means(head, 800)
    samples = helpers.class_samples(trained)
    assert float(jnp.abs(samples - means).max()) < 0.25
