"""Shared layers of `fluid.nn`: the exact GELU against float64, `dense`, `scan_layers`, whose
rematerialisation changes what the backward pass keeps, never the values or gradients, and
the declaration of stacked layers (`stacked_field`, `stacked_paths`)."""

import re

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from scipy.special import erf

from fluid.heads._diffusion import DiffusionHead
from fluid.nn import (
    DEFAULT_REMAT_POLICY,
    PerVectorLinear,
    TransformerStack,
    stacked_field,
    stacked_paths,
)
from fluid.nn import per_vector as wrap_per_vector
from fluid.nn._init import dense
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
    # per-vector products (for cached decoding), for the layers `per_vector` wraps: the
    # same values, and the program of `eqx.nn.Linear` called on each vector
    wrapped = wrap_per_vector({"a": layer, "b": [no_bias]})
    assert isinstance(wrapped["a"], PerVectorLinear) and wrapped["b"][0].weight is no_bias.weight
    per_vector_jaxpr = str(jax.make_jaxpr(lambda m, v: dense(m, v))(wrapped["a"], x))
    chex.assert_trees_all_close(dense(wrapped["a"], x), dense(layer, x), atol=1e-6, rtol=1e-6)
    each_vector = str(jax.make_jaxpr(lambda m, v: jax.vmap(jax.vmap(m))(v))(layer, x))
    assert each_vector == per_vector_jaxpr
    assert str(jax.make_jaxpr(lambda m, v: dense(m, v))(layer, x)) != per_vector_jaxpr
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


def stack_and_input(remat=DEFAULT_REMAT_POLICY):
    stack = TransformerStack(DEPTH, DIM, 4, remat=remat, key=jr.key(0))
    return *eqx.partition(stack, eqx.is_array), jr.normal(jr.key(1), (SEQ, DIM))


def head_and_input(remat=DEFAULT_REMAT_POLICY):
    head = DiffusionHead(DIM, 6, width=24, depth=3, batch_mul=2, remat=remat, key=jr.key(2))
    z = jr.normal(jr.key(3), (5, DIM))
    target = jr.normal(jr.key(4), (5, 6))
    return *eqx.partition(head, eqx.is_array), z, target, jr.key(5)


def value_and_grads(remat=DEFAULT_REMAT_POLICY):
    params, static, x = stack_and_input(remat)
    stack = jax.jit(jax.value_and_grad(stack_loss), static_argnums=1)(params, static, x)
    hparams, hstatic, *rest = head_and_input(remat)
    head = jax.jit(jax.value_and_grad(head_loss), static_argnums=1)(hparams, hstatic, *rest)
    return stack, head


def test_remat_keeps_values_and_gradients():
    assert DEFAULT_REMAT_POLICY is not None
    assert stack_and_input()[1].remat is DEFAULT_REMAT_POLICY
    assert head_and_input()[1].remat is DEFAULT_REMAT_POLICY
    with_remat = value_and_grads()
    plain = value_and_grads(remat=None)
    # (the two trees differ only in their static `remat`)
    chex.assert_trees_all_close(jax.tree.leaves(with_remat), jax.tree.leaves(plain),
                                atol=1e-6, rtol=1e-5)
    # and the gradients are not trivially equal: every block contributes
    (_, grads), _ = plain
    assert float(jnp.min(jnp.abs(grads.layers.mlp.fc1.weight).sum(axis=(1, 2)))) > 0


def saved_per_layer(capsys, remat=DEFAULT_REMAT_POLICY) -> int:
    """Elements per layer the backward pass keeps from the scanned layers' forward pass."""
    params, static, x = stack_and_input(remat)
    print_saved_residuals(stack_loss, params, static, x)
    total = 0
    for line in capsys.readouterr().out.splitlines():
        if "output of scan" in line:
            dims = [int(d) for d in re.search(r"\[([\d,]+)\]", line).group(1).split(",")]
            assert dims[0] == DEPTH, line
            total += int(jnp.prod(jnp.asarray(dims[1:])))
    return total


def test_remat_keeps_only_the_linear_outputs(capsys):
    # qkv (3 d), the attention projection (d), fc1 (4 d) and fc2 (d) at every position
    assert saved_per_layer(capsys) == SEQ * (3 + 1 + 4 + 1) * DIM
    # a plain scan also keeps normalisations, attention weights and activations
    assert saved_per_layer(capsys, remat=None) > SEQ * (3 + 1 + 4 + 1) * DIM + SEQ * SEQ * 4


def _names(paths) -> set[str]:
    return {jtu.keystr(p) for p in paths}


def test_stacked_paths_are_the_declared_fields_leaves():
    stack = TransformerStack(DEPTH, DIM, 4, key=jr.key(0))
    head = DiffusionHead(DIM, 6, width=24, depth=3, key=jr.key(2))
    tree = {"stack": stack, "head": [head]}
    expected = {jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(tree)[0]
                if ".layers" in jtu.keystr(p) or ".block_" in jtu.keystr(p)}
    assert len(expected) > 10
    found = _names(stacked_paths(tree))
    assert found == expected
    # every one of them has the leading depth axis
    leaves = {jtu.keystr(p): x for p, x in jtu.tree_flatten_with_path(tree)[0]}
    assert {leaves[name].shape[0] for name in found} == {DEPTH, 3}
    # the declaration lives on the classes: partitions and shapes carry it
    params, _ = eqx.partition(tree, eqx.is_inexact_array)
    assert _names(stacked_paths(params)) == found
    assert _names(stacked_paths(jax.eval_shape(lambda: tree))) == found
    assert _names(stacked_paths(eqx.filter(tree, lambda x: x.ndim == 3))) < found


def test_stacked_field_marks_only_its_own_field():
    class Inner(eqx.Module):
        a: jax.Array
        b: jax.Array = stacked_field()

    class Outer(eqx.Module):
        inner: Inner
        stack: Inner = stacked_field()

    x = jnp.zeros((2, 3))
    tree = Outer(Inner(x, x), Inner(x, x))
    assert _names(stacked_paths(tree)) == {".inner.b", ".stack.a", ".stack.b"}
    with pytest.raises(ValueError, match="cannot be static"):
        stacked_field(static=True)


def test_per_vector_changes_products_not_values():
    # `fluid.model`'s causal sampler runs its head, token embedding and backbone through
    # `per_vector`; `TransformerStack.decode` already computes per vector by itself.
    head = DiffusionHead(DIM, 6, width=24, depth=2, sampling_steps=3, key=jr.key(2))
    z, zu = jr.normal(jr.key(3), (2, DIM))

    def program(fn, *args):
        return str(jax.make_jaxpr(fn)(*args))

    def sample(h):
        return jax.vmap(lambda c, u, k: h.sample(c, u, 2.0, 1.0, key=k))(
            jnp.stack([z, z]), jnp.stack([zu, zu]), jr.split(jr.key(4), 2))

    assert program(sample, wrap_per_vector(head)) != program(sample, head)
    chex.assert_trees_all_close(sample(wrap_per_vector(head)), sample(head), atol=1e-5,
                                rtol=1e-5)

    stack = TransformerStack(DEPTH, DIM, 4, cross_attention=True, key=jr.key(0))
    ctx = jr.normal(jr.key(5), (3, DIM))
    ctx_mask = jnp.ones((3,), bool)
    cache = stack.init_cache(SEQ, ctx)
    x, t = jr.normal(jr.key(6), (DIM,)), jnp.asarray(2, jnp.int32)

    def decode(s):
        return s.decode(x, t, cache, ctx_mask)

    assert program(decode, eqx.tree_at(lambda s: s.layers, stack, wrap_per_vector(stack.layers))
                   ) == program(decode, stack)
