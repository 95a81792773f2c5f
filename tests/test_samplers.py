"""The diffusion head's samplers: the default chain bit for bit as before the options, the
respaced schedules and DDIM against NumPy transcriptions of their papers' formulas, and the
step schedule over generation progress (DiSA) that iterative heads share."""

import dataclasses
import json
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

from fluid.heads import AbstractIterativeHead, DiffusionHead, FlowHead, annealed_steps
from fluid.heads import _gaussian_diffusion as gd

GOLDEN = Path(__file__).parent / "fixtures" / "diffusion_sampler_golden.npz"
TOL = {"atol": 1e-5, "rtol": 1e-5}

perturbed = eqx.filter_jit(helpers.perturbed)


# -- NumPy transcriptions (float64) -----------------------------------------------------------
def np_space_timesteps(num_timesteps, count):
    """improved-diffusion's `space_timesteps(num_timesteps, [count])`: one section, a running
    float stride, Python's `round`."""
    frac_stride = (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return np.array(taken)


def np_respaced(num_timesteps, count):
    """`SpacedDiffusion`: the kept steps' cumulative products, the betas recomputed from them
    (`beta_i = 1 - abar[k_i] / abar[k_{i-1}]`), and the processes' derived constants."""
    s = np.arange(num_timesteps + 1) / num_timesteps
    f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    base = np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))
    kept = np_space_timesteps(num_timesteps, count)
    abar = base[kept]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    return {"kept": kept, "abar": abar, "abar_prev": abar_prev, "betas": betas,
            "posterior_variance": betas * (1 - abar_prev) / (1 - abar)}


def np_ddim(x_t, pred_x0, abar, abar_prev, eta):
    """DDIM (Song et al., 2021, eq. 12): `x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev -
    sigma^2) eps + sigma z` with `eps` the noise implied by `(x_t, x0)` and
    `sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)`."""
    eps = (x_t - np.sqrt(abar) * pred_x0) / np.sqrt(1 - abar)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    return np.sqrt(abar_prev) * pred_x0 + np.sqrt(1 - abar_prev - sigma**2) * eps, sigma


# -- the default chain is the one before the options ------------------------------------------
GOLDEN_CONFIGS = {  # as tests/fixtures/diffusion_sampler_golden.py made them
    "a": {"kwargs": {"width": 32, "depth": 2, "sampling_steps": 20}, "cfg": 2.5,
          "temperature": 0.8},
    "b": {"kwargs": {"width": 32, "depth": 2, "clip_denoised": 1.0, "noise_shift": 2.0},
          "cfg": 3.0, "temperature": 1.0},
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CONFIGS))
@pytest.mark.parametrize("explicit", [False, True])
def test_default_sampler_is_bit_for_bit_the_one_before_the_options(name, explicit):
    data = np.load(GOLDEN)
    config = GOLDEN_CONFIGS[name]
    extra = {"sampler": "ddpm", "eta": 0.0, "progress_steps": None} if explicit else {}
    head = DiffusionHead(12, 6, **config["kwargs"], **extra, key=jr.key(0))
    params, static = eqx.partition(head, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(params)
    leaves = [jnp.asarray(data[f"{name}/param{i}"]) for i in range(len(leaves))]
    head = eqx.combine(jtu.tree_unflatten(treedef, leaves), static)
    z, zu = jnp.asarray(data[f"{name}/z"]), jnp.asarray(data[f"{name}/zu"])
    keys = jr.split(jr.key(4), 4)
    cfg, temperature = config["cfg"], config["temperature"]
    steps = head.sampling_steps if explicit else None

    guided = eqx.filter_jit(lambda h, z, zu, keys: jax.vmap(
        lambda a, b, k: h.sample(a, b, cfg, temperature, key=k, steps=steps))(z, zu, keys))
    plain = eqx.filter_jit(lambda h, z, keys: jax.vmap(
        lambda a, k: h.sample(a, None, 1.0, temperature, key=k, steps=steps))(z, keys))
    chex.assert_trees_all_equal(
        (guided(head, z, zu, keys), plain(head, z, keys),
         head.sample(z[0], zu[0], cfg, temperature, key=keys[0], steps=steps)),
        (data[f"{name}/guided"], data[f"{name}/plain"], data[f"{name}/eager"]),
    )


def test_golden_fixture_records_how_it_was_made():
    meta = json.loads(GOLDEN.with_suffix(".json").read_text())
    assert set(meta["configs"]) == set(GOLDEN_CONFIGS)
    for name, config in GOLDEN_CONFIGS.items():
        assert meta["configs"][name] == config


def with_fields(head, **changes):
    """`head` with fields (static ones included) changed, rebuilt as Equinox unflattens a
    module (no `__init__`)."""
    new = object.__new__(type(head))
    for field in dataclasses.fields(head):
        value = changes.get(field.name, getattr(head, field.name))
        object.__setattr__(new, field.name, value)
    return new


# -- respacing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [25, 50, 100])
def test_respaced_schedule_matches_improved_diffusion(steps):
    ref = np_respaced(1000, steps)
    s = gd.diffusion_schedule(1000, steps)
    np.testing.assert_array_equal(s.timestep_map, ref["kept"])
    assert s.timestep_map[0] == 0 and s.timestep_map[-1] == 999
    for ours, theirs in [(s.alphas_cumprod, ref["abar"]), (s.betas, ref["betas"]),
                         (s.alphas_cumprod_prev, ref["abar_prev"]),
                         (s.posterior_variance, ref["posterior_variance"])]:
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_steps_argument_is_the_head_respaced_to_that_many_steps(sampler, eta):
    head = perturbed(DiffusionHead(12, 6, width=32, depth=2, clip_denoised=1.0,
                                   sampler=sampler, eta=eta, key=jr.key(0)), jr.key(1), 0.05)
    z, zu = jr.normal(jr.key(2), (2, 12))
    for steps in (25, 50):
        respaced = with_fields(head, sampling_steps=steps)
        assert respaced.gen_schedule.num_steps == steps
        sample = eqx.filter_jit(lambda h, s: h.sample(z, zu, 2.0, 0.9, key=jr.key(3), steps=s))
        chex.assert_trees_all_equal(sample(head, steps), sample(respaced, None))
        assert head.num_evaluations(steps) == steps
    assert head.num_evaluations() == 100


# -- DDIM --------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [25, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_the_papers_update(steps, eta):
    s = gd.diffusion_schedule(1000, steps)
    ref = np_respaced(1000, steps)
    rng = np.random.default_rng(0)
    for t in (0, 1, steps // 2, steps - 1):
        x_t, x0 = rng.normal(size=(2, 6)).astype(np.float32)
        mean, sigma = gd.ddim_step(s, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(x0), eta)
        ref_mean, ref_sigma = np_ddim(x_t.astype(np.float64), x0.astype(np.float64),
                                      ref["abar"][t], ref["abar_prev"][t], eta)
        chex.assert_trees_all_close((mean, sigma), (ref_mean, ref_sigma), **TOL)
        if t == 0:  # the last step lands on the predicted x0
            chex.assert_trees_all_close(mean, x0, **TOL)
            assert float(sigma) == 0.0


@pytest.mark.parametrize("steps", [25, 50, 100])
def test_ddim_variance_at_eta_one_is_the_ddpm_posterior_variance(steps):
    s = gd.diffusion_schedule(1000, steps)
    sigma, direction = gd.ddim_coefficients(s, 1.0)
    np.testing.assert_allclose(sigma**2, np_respaced(1000, steps)["posterior_variance"],
                               rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(sigma**2, s.posterior_variance, rtol=1e-10, atol=1e-15)
    assert np.all(direction >= 0) and np.all(np.isfinite(direction))
    zero, _ = gd.ddim_coefficients(s, 0.0)
    assert not zero.any()


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("guided", [False, True])
def test_ddim_chain_follows_network_and_the_papers_update(eta, guided):
    # The chain written here from the public `network` / `guided_output` and eq. 12 (with
    # IDDPM's clipped x0 and the noise re-derived from it) must give the head's token.
    head = perturbed(DiffusionHead(12, 6, width=32, depth=2, clip_denoised=1.0,
                                   sampler="ddim", eta=eta, key=jr.key(0)), jr.key(1), 0.05)
    z, zu = jr.normal(jr.key(2), (2, 12))
    cfg, temperature, key, steps = 2.5, 0.8, jr.key(8), 25
    ref = np_respaced(1000, steps)

    @eqx.filter_jit
    def reference(head):
        k_init, k_steps = jr.split(key)
        x = jr.normal(k_init, (6,))
        for i in range(steps):
            t = steps - 1 - i
            t_net = jnp.asarray(ref["kept"][t], jnp.int32)
            out = head.guided_output(x, t_net, z, zu, cfg)[0] if guided else head.network(
                x, t_net, z)
            eps = out[:6]
            abar, abar_prev = float(ref["abar"][t]), float(ref["abar_prev"][t])
            x0 = jnp.clip((x - np.sqrt(1 - abar) * eps) / np.sqrt(abar), -1.0, 1.0)
            eps = (x - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = np.sqrt(abar_prev) * x0 + np.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
            if eta:
                x = x + sigma * temperature * jr.normal(jr.fold_in(k_steps, i), (6,))
        return x

    sampled = eqx.filter_jit(
        lambda h: h.sample(z, zu if guided else None, cfg, temperature, key=key, steps=steps)
    )(head)
    chex.assert_trees_all_close(sampled, reference(head), **TOL)


def test_temperature_scales_only_injected_noise():
    head = perturbed(DiffusionHead(12, 6, width=32, depth=2, sampling_steps=25, sampler="ddim",
                                   clip_denoised=1.0, key=jr.key(0)), jr.key(1), 0.05)
    z = jr.normal(jr.key(2), (12,))
    sample = eqx.filter_jit(lambda h, temp: h.sample(z, None, 1.0, temp, key=jr.key(3)))
    # eta = 0 injects nothing: the temperature changes nothing.
    chex.assert_trees_all_equal(sample(head, 1.0), sample(head, 0.3))
    noisy = with_fields(head, eta=1.0)
    assert float(jnp.abs(sample(noisy, 1.0) - sample(noisy, 0.3)).max()) > 1e-4


def test_options_are_checked():
    with pytest.raises(ValueError, match="sampler"):
        DiffusionHead(4, 2, width=8, depth=1, sampler="plms", key=jr.key(0))
    with pytest.raises(ValueError, match="eta"):
        DiffusionHead(4, 2, width=8, depth=1, eta=0.5, key=jr.key(0))  # DDPM has no eta
    with pytest.raises(ValueError, match="eta"):
        DiffusionHead(4, 2, width=8, depth=1, sampler="ddim", eta=1.5, key=jr.key(0))
    with pytest.raises(ValueError, match="progress_steps"):
        DiffusionHead(4, 2, width=8, depth=1, progress_steps=[50, 1], key=jr.key(0))
    with pytest.raises(ValueError, match="progress_steps"):
        FlowHead(4, 2, width=8, depth=1, progress_steps=[], key=jr.key(0))
    with pytest.raises(ValueError, match="respace"):
        DiffusionHead(4, 2, width=8, depth=1, progress_steps=[2000], key=jr.key(0))


# -- step schedule over generation progress (DiSA) ---------------------------------------------
def test_annealed_steps():
    assert annealed_steps(50, 5, 4) == (50, 35, 20, 5)
    assert annealed_steps(50, 5, 2) == (50, 5)  # DiSA's two-stage schedule
    cosine = annealed_steps(50, 5, 5, "cosine")
    assert cosine[0] == 50 and cosine[-1] == 5 and cosine[2] == round(27.5)
    w = (1 + np.cos(np.pi * np.arange(5) / 4)) / 2
    assert cosine == tuple(round(5 + 45 * float(v)) for v in w)
    with pytest.raises(ValueError):
        annealed_steps(50, 5, 1)


@pytest.mark.parametrize("cls", [DiffusionHead, FlowHead])
def test_steps_at_progress(cls):
    plain = cls(4, 2, width=8, depth=1, sampling_steps=20, key=jr.key(0))
    assert isinstance(plain, AbstractIterativeHead)
    assert [plain.steps_at(p) for p in (0.0, 0.5, 1.0)] == [20, 20, 20]
    assert plain.step_choices() == (20,)
    head = cls(4, 2, width=8, depth=1, sampling_steps=20, progress_steps=[50, 35, 20, 5],
               key=jr.key(0))
    assert head.progress_steps == (50, 35, 20, 5)
    progress = [0.0, 0.1, 0.2499, 0.25, 0.5, 0.74, 0.75, 0.99, 1.0, 1.2, -0.1]
    assert [head.steps_at(p) for p in progress] == [50, 50, 50, 35, 20, 20, 5, 5, 5, 5, 50]
    assert head.step_choices() == (50, 35, 20, 5)
    assert cls(4, 2, width=8, depth=1, progress_steps=(8, 8, 4),
               key=jr.key(0)).step_choices() == (8, 4)


@pytest.mark.parametrize("cls", [DiffusionHead, FlowHead])
def test_sample_at_traced_progress_is_sample_with_the_steps_at_it(cls):
    head = perturbed(cls(12, 6, width=16, depth=1, progress_steps=(12, 6, 3), key=jr.key(0)),
                     jr.key(1), 0.05)
    z, zu = jr.normal(jr.key(2), (2, 12))

    @eqx.filter_jit
    def at_progress(head, progress):
        return head.sample_at_progress(progress, z, zu, 2.0, 1.0, key=jr.key(3))

    @eqx.filter_jit
    def with_steps(head, steps):
        return head.sample(z, zu, 2.0, 1.0, key=jr.key(3), steps=steps)

    seen = set()
    for progress in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        steps = head.steps_at(progress)
        seen.add(steps)
        chex.assert_trees_all_close(at_progress(head, jnp.asarray(progress)),
                                    with_steps(head, steps), **TOL)
    assert seen == {12, 6, 3}
    unguided = eqx.filter_jit(lambda h, p: h.sample_at_progress(p, z, None, 1.0, 1.0,
                                                                key=jr.key(3)))
    chex.assert_trees_all_close(
        unguided(head, jnp.asarray(0.5)),
        eqx.filter_jit(lambda h: h.sample(z, None, 1.0, 1.0, key=jr.key(3), steps=6))(head),
        **TOL)
    # Under vmap over positions, one progress for all: the switch keeps one branch.
    batch = eqx.filter_jit(lambda h, p: jax.vmap(
        lambda a, b, k: h.sample_at_progress(p, a, b, 2.0, 1.0, key=k))(
            jnp.stack([z, zu]), jnp.stack([zu, z]), jr.split(jr.key(4), 2)))
    chex.assert_shape(batch(head, jnp.asarray(0.9)), (2, 6))


# -- quality: a briefly trained head samples its targets with each sampler ----------------------
def test_briefly_trained_head_samples_its_targets_with_each_sampler():
    head = DiffusionHead(4, 8, width=64, depth=2, batch_mul=4, sampling_steps=50,
                         clip_denoised=1.0, key=jr.key(0))
    trained, means = helpers.fit_class_means(head, 800)
    for sampler, eta, steps in [("ddpm", 0.0, 25), ("ddim", 0.0, 25), ("ddim", 0.0, 10),
                                ("ddim", 1.0, 25)]:
        samples = helpers.class_samples(with_fields(trained, sampler=sampler, eta=eta), steps)
        assert float(jnp.abs(samples - means).max()) < 0.25, (sampler, eta, steps)
