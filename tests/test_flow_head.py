"""The flow-matching head: its ODE solvers against closed-form solutions, its three
parameterisations against each other, its loss against NumPy, its sampling chain and
counting, and a tiny FluidModel trained and sampled with it."""

import chex
import equinox as eqx
import helpers
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from fluid.heads import HEADS, FlowHead
from fluid.heads._flow import (
    PREDICTIONS,
    ode_solve,
    prediction_target,
    shift_time,
    time_grid,
    to_velocity,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
perturbed = eqx.filter_jit(helpers.perturbed)


# -- solvers against the exact flow of a linear field --------------------------------------------
def linear_field():
    """`v(x, t) = A x + b + c t` with `A` symmetric (a real eigenbasis) and the exact value at
    `t = 0` of the solution through `x1` at `t = 1`: with the particular solution
    `x_p(t) = p + q t` (`q = -A^-1 c`, `p = A^-1 (q - b)`),
    `x(0) = expm(-A) (x1 - p - q) + p`."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 3))
    a = 0.5 * (m + m.T)
    b, c, x1 = rng.normal(size=(3, 3))
    q = -np.linalg.solve(a, c)
    p = np.linalg.solve(a, q - b)
    lam, vecs = np.linalg.eigh(a)
    exact = vecs @ np.diag(np.exp(-lam)) @ vecs.T @ (x1 - p - q) + p
    return a, b, c, x1, exact


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_solver_converges_at_its_order_on_a_linear_field(solver, order):
    a, b, c, x1, exact = linear_field()
    with jax.enable_x64(True):
        A, B, C = (jnp.asarray(v) for v in (a, b, c))

        def velocity(x, t):
            return A @ x + B + C * t

        errors = []
        for steps in (8, 16, 32, 64):
            ts = jnp.asarray(time_grid(steps))
            x0 = jax.jit(lambda x, ts: ode_solve(velocity, x, ts, solver))(jnp.asarray(x1), ts)
            errors.append(float(np.linalg.norm(np.asarray(x0) - exact)))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    # Halving the step divides the global error by 2^order.
    np.testing.assert_allclose(ratios, 2.0**order, rtol=0.15)
    # |x(0)| is 1.5: at 64 steps Euler is off by 0.033, Heun by 6.5e-4.
    assert errors[-1] < (0.05 if order == 1 else 1e-3)


def test_solver_steps_are_eulers_and_heuns_formulas():
    # One step of each, by hand, on a nonlinear field.
    def velocity(x, t):
        return jnp.sin(x) * (1.0 + t)

    x = jnp.asarray([0.3, -1.2])
    ts = jnp.asarray([1.0, 0.6, 0.0])
    h1, h2 = -0.4, -0.6
    euler = x + h1 * velocity(x, 1.0)
    euler = euler + h2 * velocity(euler, 0.6)
    chex.assert_trees_all_close(ode_solve(velocity, x, ts, "euler"), euler, **TOL)
    v = velocity(x, 1.0)
    heun = x + h1 * 0.5 * (v + velocity(x + h1 * v, 0.6))
    heun = heun + h2 * velocity(heun, 0.6)  # the last step is Euler's
    chex.assert_trees_all_close(ode_solve(velocity, x, ts, "heun"), heun, **TOL)


def test_time_grid_and_shift():
    np.testing.assert_allclose(time_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    t = np.linspace(0.01, 0.99, 50)
    shifted = shift_time(t, 3.0)
    np.testing.assert_allclose(((1 - shifted) / shifted) ** 2, ((1 - t) / t) ** 2 / 9.0,
                               rtol=1e-10)
    np.testing.assert_allclose(time_grid(4, 3.0), shift_time(time_grid(4), 3.0))
    assert time_grid(4, 3.0)[0] == 1.0 and time_grid(4, 3.0)[-1] == 0.0


# -- parameterisations -------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_three_parameterisations_give_the_same_velocity(t):
    x0, eps = jr.normal(jr.key(0), (2, 6))
    t = jnp.asarray(t)
    x_t = (1 - t) * x0 + t * eps
    velocities = [to_velocity(p, prediction_target(p, x0, eps), x_t, t, 0.05)
                  for p in PREDICTIONS]
    for v in velocities:
        chex.assert_trees_all_close(v, eps - x0, **TOL)


def test_denominators_are_clamped_at_t_eps():
    x0, eps = jr.normal(jr.key(0), (2, 6))
    t = jnp.asarray(0.01)
    x_t = (1 - t) * x0 + t * eps
    # clean: (x_t - x0) / max(t, t_eps) = t (eps - x0) / t_eps
    chex.assert_trees_all_close(to_velocity("clean", x0, x_t, t, 0.05),
                                0.01 / 0.05 * (eps - x0), **TOL)
    t = jnp.asarray(0.99)
    x_t = (1 - t) * x0 + t * eps
    chex.assert_trees_all_close(to_velocity("noise", eps, x_t, t, 0.05),
                                0.01 / 0.05 * (eps - x0), **TOL)


# -- the loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("loss_space", ["velocity", "prediction"])
@pytest.mark.parametrize("t", [0.02, 0.3, 0.97])
def test_training_loss_matches_numpy(prediction, loss_space, t):
    head = perturbed(FlowHead(12, 6, width=32, depth=2, prediction=prediction,
                              loss_space=loss_space, key=jr.key(0)), jr.key(1), 0.05)
    x0, eps = jr.normal(jr.key(2), (2, 6))
    c = jr.normal(jr.key(3), (12,))
    ours = eqx.filter_jit(FlowHead.training_loss)(head, x0, jnp.asarray(t), eps, c)

    x0_, eps_ = np.asarray(x0, np.float64), np.asarray(eps, np.float64)
    x_t = (1 - t) * x0_ + t * eps_
    out = np.asarray(eqx.filter_jit(FlowHead.network)(
        head, jnp.asarray(x_t, jnp.float32), jnp.asarray(t), c), np.float64)
    if loss_space == "prediction" or prediction == "velocity":
        target = {"velocity": eps_ - x0_, "noise": eps_, "clean": x0_}[prediction]
        expected = np.mean((out - target) ** 2)
    elif prediction == "clean":  # JiT: |x0 - x0_hat|^2 / max(t, t_eps)^2
        expected = np.mean((out - x0_) ** 2) / max(t, 0.05) ** 2
    else:
        expected = np.mean((out - eps_) ** 2) / max(1 - t, 0.05) ** 2
    chex.assert_trees_all_close(ours, np.float32(expected), **TOL)


def test_loss_averages_batch_mul_shifted_draws_and_trains_every_leaf():
    head = perturbed(FlowHead(12, 6, width=32, depth=2, batch_mul=3, noise_shift=2.0,
                              key=jr.key(0)), jr.key(1), 0.05)
    z, target = jr.normal(jr.key(2), (12,)), jr.normal(jr.key(3), (6,))
    loss, grads = eqx.filter_jit(
        eqx.filter_value_and_grad(lambda h: h.loss(z, target, key=jr.key(8))))(head)

    def draw(k):
        k_t, k_eps = jr.split(k)
        t = jr.uniform(k_t, ())
        t = 2.0 * t / (1 + t)
        return head.training_loss(target, t, jr.normal(k_eps, (6,)), z)

    chex.assert_trees_all_close(loss, jnp.mean(jax.jit(jax.vmap(draw))(jr.split(jr.key(8), 3))),
                                **TOL)
    for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array)):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0


# -- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("guided", [False, True])
def test_sampling_chain_follows_the_velocity(solver, prediction, guided):
    # Written from the public `velocity` / `guided_velocity` on the shifted grid: the head
    # slices its weights once outside the chain, and must give the same token.
    head = perturbed(FlowHead(12, 6, width=32, depth=2, prediction=prediction, solver=solver,
                              sampling_steps=5, noise_shift=2.0, key=jr.key(0)),
                     jr.key(1), 0.05)
    z, zu = jr.normal(jr.key(2), (2, 12))
    cfg, temperature, key = 2.5, 0.8, jr.key(8)
    ts = [float(v) for v in time_grid(5, 2.0)]

    @eqx.filter_jit
    def reference(head):
        def v(x, t):
            t = jnp.asarray(t, jnp.float32)
            return head.guided_velocity(x, t, z, zu, cfg) if guided else head.velocity(x, t, z)

        x = temperature * jr.normal(key, (6,))
        for i in range(5):
            h = ts[i + 1] - ts[i]
            if solver == "euler" or i == 4:
                x = x + h * v(x, ts[i])
            else:
                k1 = v(x, ts[i])
                x = x + h * 0.5 * (k1 + v(x + h * k1, ts[i + 1]))
        return x

    sampled = eqx.filter_jit(
        lambda h: h.sample(z, zu if guided else None, cfg, temperature, key=key))(head)
    chex.assert_trees_all_close(sampled, reference(head), **TOL)


def test_temperature_scales_the_initial_noise():
    # An untrained velocity head predicts zero velocity: the token is the initial noise.
    head = FlowHead(12, 6, width=16, depth=1, key=jr.key(0))
    z = jr.normal(jr.key(2), (12,))
    for temperature in (1.0, 0.5, 0.0):
        chex.assert_trees_all_close(head.sample(z, None, 1.0, temperature, key=jr.key(3)),
                                    temperature * jr.normal(jr.key(3), (6,)), **TOL)


class _Counting(eqx.Module):
    """The output layer, reporting through a host callback how many rows it sees."""

    linear: eqx.nn.Linear

    def __call__(self, x):
        jax.debug.callback(lambda x: _COUNT.append(x.size // x.shape[-1]), x)
        return self.linear(x)


_COUNT: list[int] = []


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_num_evaluations_counts_the_network_calls(solver):
    head = FlowHead(12, 6, width=16, depth=1, solver=solver, key=jr.key(0))
    counting = eqx.tree_at(lambda h: h.final_linear, head, _Counting(head.final_linear))
    z, zu = jr.normal(jr.key(2), (2, 12))
    for steps in (1, 3, 6):
        for uncond, halves in ((None, 1), (zu, 2)):
            _COUNT.clear()
            jax.block_until_ready(eqx.filter_jit(
                lambda h, s=steps, u=uncond: h.sample(z, u, 2.0, 1.0, key=jr.key(1), steps=s)
            )(counting))
            assert sum(_COUNT) == halves * head.num_evaluations(steps)
    assert head.num_evaluations(4) == (4 if solver == "euler" else 7)


def test_briefly_trained_head_samples_its_conditional_targets():
    head = FlowHead(4, 8, width=64, depth=2, batch_mul=4, sampling_steps=4, key=jr.key(0))
    trained, means = helpers.fit_class_means(head, 400)
    for steps in (4, 2):
        samples = helpers.class_samples(trained, steps)
        assert float(jnp.abs(samples - means).max()) < 0.25, steps


# -- in a model --------------------------------------------------------------------------------
FLOW_OVERRIDES = {
    "model.head": "flow", "model.head.width": "32", "model.head.depth": "1",
    "model.head.batch_mul": "2", "model.head.sampling_steps": "3",
}


def test_tiny_fluid_model_with_the_flow_head_trains_and_samples():
    from fluid.presets import get_config
    from fluid.recipes import prepare
    from fluid.sample import sample_images

    config = get_config("tiny-fluid", **FLOW_OVERRIDES)
    assert config.model.head.name == "flow"
    trainer = prepare(config, progress=False)
    assert type(trainer.model().head) is FlowHead is HEADS.get("flow")
    losses = np.array([r["loss"] for r in trainer.run()])
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    images = sample_images(trainer.model(), trainer.text_tokenizer,
                           ["a red circle", "two blue squares"],
                           text_len=config.model.text_len, key=jr.key(0), steps=4, cfg=2.0)
    chex.assert_shape(images, (2, 16, 16, 3))
    assert np.isfinite(images).all()


def test_raster_model_samples_with_the_flow_head():
    # The causal sampler runs the head on per-vector products (`fluid.nn.per_vector`).
    from fluid.presets import get_config
    from fluid.recipes import prepare
    from fluid.sample import sample_images

    config = get_config("tiny-continuous-raster", **FLOW_OVERRIDES)
    trainer = prepare(config, progress=False)
    model = trainer.model()
    model = eqx.tree_at(lambda m: m.head, model, perturbed(model.head, jr.key(1), 0.05))
    images = sample_images(model, trainer.text_tokenizer, ["a red circle"],
                           text_len=config.model.text_len, key=jr.key(0), steps=4, cfg=2.0)
    chex.assert_shape(images, (1, 16, 16, 3))
    assert np.isfinite(images).all()
