"""Shared layers of `fluid.nn`: the exact GELU against float64, and `scan_layers`, whose
rematerialisation changes what the backward pass keeps, never the values or gradients."""

import re

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.ad_checkpoint import print_saved_residuals
from scipy.special import erf

from fluid.heads._diffusion import DiffusionHead
from fluid.nn import TransformerStack, _scan
from fluid.nn._init import dense, vector_products
from fluid.nn._mlp import gelu

DEPTH, DIM, SEQ = 2, 32, 10


def test_gelu_is_the_exact_gelu():
    x = np.linspace(-12.0, 12.0, 20001)
    phi = 0.5 * (1 + erf(x / np.sqrt(2)))  # standard normal CDF and density, float64
    pdf = np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)
    xs = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(jax.jit(gelu)(xs), x * phi, atol=2e-6, rtol=1e-6)
    grad = jax.jit(jax.vmap(jax.grad(gelu)))(xs)
    np.testing.assert_allclose(grad, phi + x * pdf, atol=2e-6, rtol=1e-6)
    # not the tanh approximation, which is 4.7e-4 away near |x| = 2
    tanh = jax.nn.gelu(xs, approximate=True)
    assert float(jnp.max(jnp.abs(tanh - jnp.asarray(x * phi, jnp.float32)))) > 1e-4


def test_dense_is_the_linear_layer_on_the_last_axis():
    layer = eqx.nn.Linear(5, 3, key=jr.key(0))
    no_bias = eqx.nn.Linear(5, 3, use_bias=False, key=jr.key(1))
    for shape in [(5,), (4, 5), (2, 4, 5)]:
        x = jr.normal(jr.key(2), shape)
        for lin in (layer, no_bias):
            expected = lin(x) if x.ndim == 1 else jax.vmap(lin)(x.reshape(-1, 5)).reshape(
                *shape[:-1], 3)
            chex.assert_trees_all_close(dense(lin, x), expected, atol=1e-6, rtol=1e-6)
    # a module standing in for a linear layer is called on each vector
    doubled = lambda v: 2.0 * layer(v)  # noqa: E731
    x = jr.normal(jr.key(4), (2, 4, 5))
    chex.assert_trees_all_close(dense(doubled, x), 2.0 * dense(layer, x), atol=1e-6)
    # per-vector products (for cached decoding): the same values
    with vector_products():
        per_vector = jax.jit(lambda m, v: dense(m, v))(layer, x)
    chex.assert_trees_all_close(per_vector, dense(layer, x), atol=1e-6, rtol=1e-6)
    # under vmap too, with gradients
    x = jr.normal(jr.key(3), (4, 5))
    g_dense = jax.grad(lambda m: jnp.sum(jax.vmap(lambda v: dense(m, v))(x) ** 2))(layer)
    g_layer = jax.grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))(layer)
    chex.assert_trees_all_close(g_dense, g_layer, atol=1e-5, rtol=1e-6)


def stack_loss(params, static, x):
    return jnp.sum(jnp.tanh(eqx.combine(params, static)(x)) ** 2)


def head_loss(params, static, z, target, key):
    head = eqx.combine(params, static)
    keys = jr.split(key, z.shape[0])
    return jnp.mean(jax.vmap(head.loss)(z, target, key=keys))


def stack_and_input():
    stack = TransformerStack(DEPTH, DIM, 4, key=jr.key(0))
    return *eqx.partition(stack, eqx.is_array), jr.normal(jr.key(1), (SEQ, DIM))


def head_and_input():
    head = DiffusionHead(DIM, 6, width=24, depth=3, batch_mul=2, key=jr.key(2))
    z = jr.normal(jr.key(3), (5, DIM))
    target = jr.normal(jr.key(4), (5, 6))
    return *eqx.partition(head, eqx.is_array), z, target, jr.key(5)


def value_and_grads():
    params, static, x = stack_and_input()
    stack = jax.jit(jax.value_and_grad(stack_loss), static_argnums=1)(params, static, x)
    hparams, hstatic, *rest = head_and_input()
    head = jax.jit(jax.value_and_grad(head_loss), static_argnums=1)(hparams, hstatic, *rest)
    return stack, head


def test_remat_keeps_values_and_gradients(monkeypatch):
    assert _scan.REMAT_POLICY is not None
    with_remat = value_and_grads()
    monkeypatch.setattr(_scan, "REMAT_POLICY", None)
    plain = value_and_grads()
    chex.assert_trees_all_close(with_remat, plain, atol=1e-6, rtol=1e-5)
    # and the gradients are not trivially equal: every block contributes
    (_, grads), _ = plain
    assert float(jnp.min(jnp.abs(grads.layers.mlp.fc1.weight).sum(axis=(1, 2)))) > 0


def saved_per_layer(capsys) -> int:
    """Elements per layer the backward pass keeps from the scanned layers' forward pass."""
    params, static, x = stack_and_input()
    print_saved_residuals(stack_loss, params, static, x)
    total = 0
    for line in capsys.readouterr().out.splitlines():
        if "output of scan" in line:
            dims = [int(d) for d in re.search(r"\[([\d,]+)\]", line).group(1).split(",")]
            assert dims[0] == DEPTH, line
            total += int(jnp.prod(jnp.asarray(dims[1:])))
    return total


def test_remat_keeps_only_the_linear_outputs(capsys, monkeypatch):
    # qkv (3 d), the attention projection (d), fc1 (4 d) and fc2 (d) at every position
    assert saved_per_layer(capsys) == SEQ * (3 + 1 + 4 + 1) * DIM
    monkeypatch.setattr(_scan, "REMAT_POLICY", None)
    # a plain scan also keeps normalisations, attention weights and activations
    assert saved_per_layer(capsys) > SEQ * (3 + 1 + 4 + 1) * DIM + SEQ * SEQ * 4
