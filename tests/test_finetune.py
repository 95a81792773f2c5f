"""Fine-tuning: `init_from` copies a trained run's weights into the model of a new config by
name, `freeze` keeps parts as they were, LoRA adapters train alone in the backbone and merge
back; the whole of it from the command line."""

import dataclasses
import json

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fluid
from fluid import ConfigError, abstract_model
from fluid.cli import main
from fluid.config import TrainConfig, override, to_dict
from fluid.nn import LoRALinear, TransformerStack, add_lora, dense, merge_lora, per_vector
from fluid.presets import get_config
from fluid.recipes import prepare
from fluid.run import (
    CheckpointMismatchError,
    InitFromMismatchError,
    check_config,
    load_model,
    named_leaves,
)
from fluid.train import make_mesh, param_shardings

TINY = {"model.backbone.depth": 1, "data.fit_images": 16}


def _config(**overrides):
    return get_config("tiny-fluid", **{**TINY, **overrides})


def _arrays(tree) -> dict[str, np.ndarray]:
    return {n: np.array(x) for n, x in named_leaves(tree) if eqx.is_array(x)}


def _part(arrays, prefix):
    return {n: x for n, x in arrays.items() if n.startswith(prefix)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Four steps of a one-block tiny-fluid, checkpointed and saved (EMA decay 0.5, so its
    EMA weights differ from its raw ones)."""
    out = tmp_path_factory.mktemp("source")
    config = dataclasses.replace(_config(**{"optim.ema_decay": 0.5}), steps=4)
    recipe = prepare(config, out_dir=out, progress=False)
    recipe.run()
    recipe.save()
    return out


def _finetune(source, out, **overrides):
    config = _config(init_from=str(source), **overrides)
    return prepare(config, out_dir=out, progress=False)


def _batch(recipe):
    batch = next(recipe.trainer.loader)
    return {k: jnp.asarray(v) for k, v in batch.items()}, jr.split(jr.key(7), 8)


def _loss(model, batch, keys):
    total, count = eqx.filter_jit(lambda m: m.loss_terms(batch, keys=keys, dropout=False))(model)
    return float(jnp.sum(total) / jnp.sum(count)), total


def test_init_from_copies_the_ema_weights_and_freeze_keeps_parts(source, tmp_path, capsys):
    ema, _, _ = load_model(source, ema=True)
    raw, _, _ = load_model(source / "checkpoints" / "4", ema=False)
    recipe = _finetune(source, tmp_path, steps=2, freeze="backbone,aligner",
                       **{"optim.learning_rate": 1e-2, "optim.warmup_steps": 0})
    out = capsys.readouterr().out
    assert "init_from: starting from the EMA weights of step 4" in out
    start = _arrays(recipe.model(ema=False))
    # Every array, bit for bit, is the source's EMA one (which is not its raw one).
    assert _equal(start, _arrays(ema))
    assert not _equal(start, _arrays(raw))
    recipe.run()
    after = _arrays(recipe.model(ema=False))
    for frozen in ("backbone.", "aligner."):
        assert _equal(_part(after, frozen), _part(start, frozen))
    head = _part(after, "head.")
    assert any(not np.array_equal(head[n], start[n]) for n in head)


def test_a_different_width_is_refused_naming_the_paths(source, tmp_path):
    with pytest.raises(InitFromMismatchError) as error:
        _finetune(source, tmp_path, **{"model.width": 48})
    message = str(error.value)
    assert "backbone.pos_embed: float32[16, 32] in the source, float32[16, 48]" in message
    assert "head." in message and "init_from unset" in message


def test_source_arrays_without_a_place_are_refused_unless_not_strict(source, tmp_path, capsys):
    with pytest.raises(InitFromMismatchError, match=r"token_embedding\.norm\.weight.*init_strict"):
        _finetune(source, tmp_path / "strict", **{"model.token_norm": False})
    capsys.readouterr()
    recipe = _finetune(source, tmp_path / "loose", init_strict=False,
                       **{"model.token_norm": False})
    out = capsys.readouterr().out
    assert "dropped (init_strict=false): token_embedding.norm.bias, token_embedding.norm.weight" \
        in out
    assert recipe.model(ema=False).token_embedding.norm is None


def test_lora_starts_equal_trains_adapters_alone_and_merges(source, tmp_path, capsys):
    ema, _, _ = load_model(source)
    recipe = _finetune(source, tmp_path, steps=12, **{
        "model.lora_rank": 2, "model.lora_alpha": 4.0, "optim.learning_rate": 3e-3,
        "optim.warmup_steps": 0,
    })
    # The new adapters keep their fresh initialisation, listed in one line.
    fresh = [line for line in capsys.readouterr().out.splitlines() if "fresh" in line]
    assert len(fresh) == 1 and "backbone.blocks.layers.attn.qkv.lora_b" in fresh[0]
    model = recipe.model(ema=False)
    model = eqx.combine(jax.tree.map(jnp.copy, eqx.filter(model, eqx.is_array)), model)
    assert isinstance(model.backbone.blocks.layers.attn.qkv, LoRALinear)
    batch, keys = _batch(recipe)
    loss0, terms0 = _loss(model, batch, keys)
    # B starts at zero: the outputs are the source's exactly.
    np.testing.assert_array_equal(terms0, _loss(ema, batch, keys)[1])

    recipe.run()
    trained = recipe.model(ema=False)
    start, after = _arrays(model), _arrays(trained)
    adapters = {n for n in start if n.endswith((".lora_a", ".lora_b"))}
    assert adapters and all(not np.array_equal(start[n], after[n]) for n in adapters
                            if n.endswith(".lora_b"))
    base = {n for n in _part(start, "backbone.") if n not in adapters}
    assert all(np.array_equal(start[n], after[n]) for n in base)
    assert _loss(trained, batch, keys)[0] < loss0

    merged = merge_lora(trained)
    assert not any(n.endswith(("lora_a", "lora_b")) for n in _arrays(merged))
    assert _arrays(merged).keys() == _arrays(ema).keys()
    chex.assert_trees_all_close(_loss(merged, batch, keys)[1], _loss(trained, batch, keys)[1],
                                atol=1e-5, rtol=1e-5)


def test_lora_linear_with_dense_stacks_and_per_vector():
    k1, k2, k3, k4 = jr.split(jr.key(0), 4)
    layer = add_lora(eqx.nn.Linear(6, 5, key=k1), 3, 6.0, key=k2)
    layer = eqx.tree_at(lambda m: m.lora_b, layer, jr.normal(k3, (5, 3)))
    x = jr.normal(k4, (4, 2, 6))
    expect = jnp.einsum("oi,abi->abo", layer.weight + 2.0 * layer.lora_b @ layer.lora_a, x)
    chex.assert_trees_all_close(dense(layer, x), expect + layer.bias[None, None], atol=1e-5,
                                rtol=1e-5)
    chex.assert_trees_all_close(per_vector(layer)(x[0, 0]), dense(layer, x)[0, 0], atol=1e-6)
    chex.assert_trees_all_close(dense(merge_lora(layer), x), dense(layer, x), atol=1e-5,
                                rtol=1e-5)
    # A stacked layer's adapters carry its depth axis.
    stack = add_lora(TransformerStack(3, 8, 2, key=k1), 2, 2.0, key=k2)
    assert stack.layers.mlp.fc1.lora_a.shape == (3, 2, 8)
    assert stack.layers.mlp.fc1.lora_b.shape == (3, 32, 2)
    h = jr.normal(k3, (5, 8))
    chex.assert_trees_all_close(stack(h), merge_lora(stack)(h), atol=1e-6)


def test_cli_finetunes_with_lora_saves_loads_and_resumes(source, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "tiny-fluid", "--out", str(run), f"init_from={source}", "model.lora_rank=2",
            "model.backbone.depth=1", "data.fit_images=16", "sample_steps=2"]
    assert main([*argv, "steps=3"]) == 0
    assert "init_from: copied" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["init_from"] == str(source)
    # The run folder and `fluid.load` rebuild the adapters from the config.
    model, _, _ = load_model(run)
    assert isinstance(model.backbone.blocks.layers.mlp.fc2, LoRALinear)
    pipe = fluid.load(run)
    chex.assert_trees_all_equal(_arrays(pipe.model), _arrays(model))
    raw, _, _ = load_model(run / "checkpoints" / "3", ema=False)
    src, _, _ = load_model(source)
    assert _equal(_part(_arrays(raw), "backbone.blocks.layers.attn.proj.weight"),
                  _part(_arrays(src), "backbone.blocks.layers.attn.proj.weight"))
    # Resuming continues from the run's own checkpoint, not from the source.
    config = _config(init_from=str(source), steps=4, sample_steps=2, **{"model.lora_rank": 2})
    resumed = prepare(config, out_dir=run, progress=True)
    out = capsys.readouterr().out
    assert "resumed from step 3" in out and "init_from" not in out
    assert resumed.step == 3
    assert _equal(_arrays(resumed.model(ema=False)), _arrays(raw))


def test_config_keys_of_fine_tuning():
    # Checkpoints saved before these keys existed resume as runs without them.
    saved = to_dict(TrainConfig())
    for key in ("init_from", "init_strict", "freeze"):
        del saved[key]
    del saved["model"]["lora_rank"], saved["model"]["lora_alpha"]
    check_config(saved, to_dict(TrainConfig()))
    with pytest.raises(CheckpointMismatchError, match=r"model\.lora_rank=0"):
        check_config(saved, to_dict(override(TrainConfig(), "model.lora_rank", "4")))
    assert override(TrainConfig(), "freeze", "backbone,head").freeze == ("backbone", "head")
    with pytest.raises(ConfigError, match="freeze must be one of"):
        override(TrainConfig(), "freeze", "backbone,tokenizer")
    with pytest.raises(ConfigError, match="model.lora_rank must be >= 0"):
        override(TrainConfig(), "model.lora_rank", "-1")


def test_fsdp_never_splits_the_depth_axis_of_stacked_adapters():
    # 64 blocks: the depth axis is the adapters' largest, which fsdp would split were the
    # adapters not found stacked.
    config = get_config("tiny-fluid", **{"model.lora_rank": 1, "model.backbone.depth": 64})
    model = abstract_model(config.model)
    shardings = param_shardings(model, make_mesh({"data": 2}, jax.devices()[:2]), "fsdp",
                                min_size=0)
    qkv = shardings.backbone.blocks.layers.attn.qkv
    assert model.backbone.blocks.layers.attn.qkv.lora_a.shape == (64, 1, 32)
    # Split inside a layer, never along the depth axis the scan slices.
    assert qkv.lora_a.spec[0] is None and qkv.lora_b.spec[0] is None
    assert "data" in tuple(qkv.lora_a.spec) + tuple(qkv.lora_b.spec)
