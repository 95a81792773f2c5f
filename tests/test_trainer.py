"""The trainer on 8 CPU devices: meshes, gradient accumulation, precision, resume, bad input."""

import dataclasses
import json

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import losses as _losses
from helpers import trainer_params as _params

from fluid.config import MeshConfig, TrainConfig, override
from fluid.presets import get_config
from fluid.recipes import cast_backbone, prepare, resolve_precision
from fluid.train import (
    CheckpointCorruptError,
    CheckpointMismatchError,
)


def _config(**changes) -> TrainConfig:
    # A smaller tiny-fluid: one block, so that each trainer compiles quickly.
    config = get_config(
        "tiny-fluid", **{"model.backbone.depth": 1, "data.fit_images": 16, "steps": 8}
    )
    return dataclasses.replace(config, **changes)


def _mesh(data: int, model: int, rules: str = "replicate") -> MeshConfig:
    return MeshConfig(data=data, model=model, rules=rules, min_shard_size=256)


# -- meshes -------------------------------------------------------------------------------
def test_step_on_4x2_mesh_equals_one_device():
    # SGD keeps the update linear in the gradient, so equal parameters mean equal gradients
    # (Adam's first step is about sign(g), which hides gradient errors).
    one = prepare(_config(mesh=_mesh(1, 1)), progress=False, devices=jax.devices()[:1],
                  optimizer=optax.sgd(0.5))
    meshes = {
        rules: prepare(_config(mesh=_mesh(4, 2, rules)), progress=False,
                       optimizer=optax.sgd(0.5))
        for rules in ("replicate", "fsdp")
    }
    specs = [x.sharding.spec for x in jax.tree.leaves(eqx.filter(meshes["fsdp"].trainer.state.params,
                                                                  eqx.is_array))]
    assert any("data" in spec for spec in specs), "fsdp rules left every parameter whole"
    loss_one = _losses(one.run(1))
    for mesh in meshes.values():
        assert mesh.mesh.shape == {"data": 4, "model": 2}
        np.testing.assert_allclose(_losses(mesh.run(1)), loss_one, rtol=1e-5)
        chex.assert_trees_all_close(_params(mesh), _params(one), atol=1e-5, rtol=1e-5)
        # The updated state keeps the placement the rules gave it (the step pins it).
        for got, want in zip(jax.tree.leaves(mesh.trainer.state), jax.tree.leaves(mesh.trainer.state_sharding)):
            assert got.sharding.is_equivalent_to(want, got.ndim)


# -- gradient accumulation -------------------------------------------------------------------
def test_gradient_accumulation_equals_whole_batch():
    whole = prepare(_config(), progress=False, optimizer=optax.sgd(0.5))
    loss_whole = _losses(whole.run(2))
    for k in (2, 4):
        accum = prepare(_config(grad_accum=k), progress=False, optimizer=optax.sgd(0.5))
        np.testing.assert_allclose(_losses(accum.run(2)), loss_whole, rtol=1e-5)
        chex.assert_trees_all_close(_params(accum), _params(whole), atol=1e-5, rtol=1e-5)


def test_grad_accum_must_divide_batch():
    with pytest.raises(ValueError, match="grad_accum=3 must be >= 1 and divide batch_size=8"):
        _config(grad_accum=3)


# -- precision --------------------------------------------------------------------------------
def test_bfloat16_backbone_keeps_float32_master_weights_head_and_loss():
    assert resolve_precision("auto") == jnp.float32  # CPU: float32 measures faster
    assert resolve_precision("bfloat16") == jnp.bfloat16
    f32 = prepare(_config(precision="float32"), progress=False)
    bf16 = prepare(_config(precision="bfloat16"), progress=False)
    model = cast_backbone(bf16.model(ema=False), jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(eqx.filter(model.backbone, eqx.is_inexact_array))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    head = {x.dtype for x in jax.tree.leaves(eqx.filter(model.head, eqx.is_inexact_array))}
    assert head == {jnp.dtype(jnp.float32)}
    loss32, loss16 = _losses(f32.run(6)), _losses(bf16.run(6))
    assert np.all(np.isfinite(loss16))
    # bfloat16 has 8 bits of mantissa: close to the float32 run, but not equal to it. (The
    # head's zero-initialised output and AdaLN layers make the first steps' losses
    # independent of the backbone; from step 3 on they depend on it.)
    np.testing.assert_allclose(loss16, loss32, rtol=5e-2)
    assert not np.array_equal(loss16[3:], loss32[3:])
    master = {x.dtype for x in jax.tree.leaves(eqx.filter(bf16.trainer.state, eqx.is_inexact_array))}
    assert master == {jnp.dtype(jnp.float32)}


# -- checkpoints and resume --------------------------------------------------------------------
def test_interrupted_run_resumes_with_the_same_losses(tmp_path):
    config = _config(steps=6, checkpoint_every=2)
    straight = _losses(prepare(config, progress=False).run())

    first = prepare(config, out_dir=tmp_path, progress=False)
    head = _losses(first.run(3))  # stops between checkpoints; `run` saves on the way out
    assert first.trainer.checkpoints.all_steps() == [2, 3]
    second = prepare(config, out_dir=tmp_path, progress=False)
    assert second.step == 3
    tail = _losses(second.run())
    np.testing.assert_allclose(np.concatenate([head, tail]), straight, rtol=1e-6)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_from_4x2_mesh_restores_on_8x1(tmp_path):
    config = _config(steps=4, mesh=_mesh(4, 2, "fsdp"))
    straight = _losses(prepare(config, progress=False).run())
    prepare(config, out_dir=tmp_path, progress=False).run(2)
    moved = prepare(dataclasses.replace(config, mesh=_mesh(8, 1, "fsdp")), out_dir=tmp_path,
                    progress=False)
    assert moved.step == 2 and moved.mesh.shape == {"data": 8, "model": 1}
    tail = _losses(moved.run())
    np.testing.assert_allclose(tail, straight[2:], rtol=1e-5)


def test_checkpoint_from_another_config_names_the_first_mismatch(tmp_path):
    prepare(_config(steps=1), out_dir=tmp_path, progress=False).run()
    other = _config(steps=1, optim=dataclasses.replace(_config().optim, learning_rate=0.5))
    with pytest.raises(CheckpointMismatchError, match=r"optim\.learning_rate=0\.001.*0\.5"):
        prepare(other, out_dir=tmp_path, progress=False)
    # Training for longer is what resuming is for: a different `steps` is accepted.
    assert prepare(_config(steps=3), out_dir=tmp_path, progress=False).step == 1


def test_truncated_checkpoint_is_not_resumed_from(tmp_path):
    config = _config(steps=2, checkpoint_every=1)
    prepare(config, out_dir=tmp_path, progress=False).run()
    step2 = tmp_path / "checkpoints" / "2"
    biggest = max((p for p in step2.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="2"):
        resumed = prepare(config, out_dir=tmp_path, progress=False)
    assert resumed.step == 1
    with pytest.raises(CheckpointCorruptError, match="earlier step"):
        resumed.trainer.checkpoints.restore({"state": resumed.trainer.state, "frozen": resumed.trainer.frozen}, step=2)


def test_unknown_override_key_names_the_closest():
    with pytest.raises(KeyError, match="Did you mean 'grad_accum'"):
        override(_config(), "grad_acum", "2")
    with pytest.raises(TypeError, match="grad_accum takes an int"):
        override(_config(), "grad_accum", "two")
