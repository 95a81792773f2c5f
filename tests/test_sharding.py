"""Meshes, sharding rules over parameter paths, sharded creation and batches (8 CPU devices)."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fluid.build import abstract_model, build_model
from fluid.model import FluidModel
from fluid.nn import stacked_field
from fluid.presets import get_config
from fluid.recipes import fit_images, make_source, make_text_tokenizer
from fluid.train import make_optimizer
from fluid.train._rules import named_leaves
from fluid.train._sharding import (
    DEFAULT_MIN_SIZE,
    RULES,
    create_sharded,
    describe_shardings,
    make_mesh,
    param_shardings,
    put_sharded,
    shard_batch,
    state_shardings,
)
from fluid.train._trainer import TrainState

SDS = jax.ShapeDtypeStruct


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 4, "model": 2})


@pytest.fixture(scope="module")
def wide():
    """tiny-fluid at width 64 (qkv weights `(2, 192, 64)`) and a 90-word text vocabulary,
    as shapes only."""
    return abstract_model(get_config("tiny-fluid", **{"model.width": 64}).model, text_vocab_size=90)


def _specs(tree, shardings) -> dict[str, P]:
    names = dict(named_leaves(shardings))
    return {name: names[name].spec for name, _ in named_leaves(tree)}


# -- meshes ----------------------------------------------------------------------------------
def test_mesh_infers_the_remaining_devices():
    assert dict(make_mesh().shape) == {"data": 8, "model": 1}
    assert dict(make_mesh({"data": -1, "model": 2}).shape) == {"data": 4, "model": 2}
    assert dict(make_mesh({"model": -1, "data": 2}).shape) == {"data": 2, "model": 4}
    mesh = make_mesh({"data": -1}, devices=jax.devices()[:3])
    assert dict(mesh.shape) == {"data": 3, "model": 1}
    assert mesh.axis_names == ("data", "model")
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"data": 4, "model": 4}, "needs 16 devices but there are 8 devices"),
        ({"data": 3, "model": -1}, "does not divide the device count; there are 8 devices"),
        ({"data": -1, "model": -1}, "at most one -1"),
        ({"data": 0, "model": -1}, "positive"),
    ],
)
def test_mesh_sizes_that_do_not_fit_the_devices_are_refused(shape, message):
    with pytest.raises(ValueError, match=message) as info:
        make_mesh(shape)
    assert "{'data': 4, 'model': 2}" in str(info.value)  # a valid example for 8 devices


def test_mesh_with_an_unknown_axis_is_refused():
    with pytest.raises(ValueError, match="unknown mesh axes .'tensor'."):
        make_mesh({"data": -1, "tensor": 2})


# -- rules on the tiny-fluid model -----------------------------------------------------------
def test_replicate_rule_set_replicates_every_array(mesh, wide):
    specs = _specs(wide, param_shardings(wide, mesh, "replicate"))
    assert len(specs) > 50
    assert set(specs.values()) == {P()}


def test_fsdp_specs_of_named_parameters(mesh, wide):
    specs = _specs(wide, param_shardings(wide, mesh, "fsdp"))
    # The largest dimension of a stacked (depth, 3 * width, width) weight.
    assert specs["backbone.blocks.layers.attn.qkv.weight"] == P(None, "data", None)
    assert specs["backbone.blocks.layers.mlp.fc2.weight"] == P(None, None, "data")
    assert specs["aligner.blocks.layers.mlp.fc1.weight"] == P(None, "data", None)
    # Under the 2**14-element threshold: replicated however divisible.
    assert specs["backbone.blocks.layers.attn.qkv.bias"] == P()  # 2 x 192
    assert specs["backbone.blocks.layers.attn.proj.weight"] == P()  # 2 x 64 x 64 = 8192
    assert specs["backbone.norm.weight"] == P()
    assert specs["null_ids"] == P()

    small = _specs(wide, param_shardings(wide, mesh, "fsdp", min_size=1024))
    # A tie between the two 64s goes to the leading one; the depth axis is never split.
    assert small["backbone.blocks.layers.attn.proj.weight"] == P(None, "data", None)
    # 90 words do not divide over 4 devices: the next largest dimension does.
    assert small["text_encoder.token_embed.weight"] == P(None, "data")  # (90, 32)
    assert small["head.time_fc1.weight"] == P(None, "data")  # (32, 256)
    assert small["head.final_linear.weight"] == P("data", None)  # (96, 64)
    assert small["backbone.blocks.layers.attn.qkv.bias"] == P()  # 384 < 1024


@pytest.mark.parametrize("min_size", [1, 1024, DEFAULT_MIN_SIZE])
def test_fsdp_every_parameter_follows_the_policy(mesh, wide, min_size):
    specs = _specs(wide, param_shardings(wide, mesh, "fsdp", min_size=min_size))
    n = mesh.shape["data"]
    sharded = 0
    for name, leaf in named_leaves(wide):
        shape, spec = leaf.shape, specs[name]
        stacked = ".layers." in name or name.startswith("head.block_")
        allowed = [d for d in range(int(stacked), len(shape)) if shape[d] % n == 0]
        if leaf.size < min_size or not allowed or name.startswith("tokenizer."):
            assert spec == P(), name
            continue
        best = max(allowed, key=lambda d: (shape[d], -d))
        expected = [None] * len(shape)
        expected[best] = "data"
        assert spec == P(*expected), (name, shape, spec)
        sharded += 1
    assert sharded >= 6


def test_depth_axis_of_stacked_blocks_is_never_split():
    mesh = make_mesh({"data": 4, "model": 2})
    tree = {
        "backbone": {"blocks": {"layers": {"w": SDS((64, 8, 12), jnp.float32),
                                           "odd": SDS((64, 6, 6), jnp.float32)}}},
        "head": {"block_fc1": {"weight": SDS((64, 8, 12), jnp.float32)}},
        "flat": SDS((64, 8, 12), jnp.float32),
        "mlp": {"layers": [SDS((64, 8, 12), jnp.float32)]},  # a list of layers, not a stack
    }
    specs = _specs(tree, param_shardings(tree, mesh, "fsdp", min_size=1))
    assert specs["backbone.blocks.layers.w"] == P(None, None, "data")
    assert specs["head.block_fc1.weight"] == P(None, None, "data")
    assert specs["backbone.blocks.layers.odd"] == P()  # replicated, not split by depth
    assert specs["flat"] == P("data", None, None)  # an unstacked array: largest dimension
    assert specs["mlp.layers.0"] == P("data", None, None)


class _Tower(eqx.Module):
    """A plug-in's block: its arrays stacked along a leading depth axis of 64."""

    w: jax.Array
    b: jax.Array


class _DeclaredHead(eqx.Module):
    towers: _Tower = stacked_field()  # a name no rule knows
    proj: jax.Array


class _UndeclaredHead(eqx.Module):
    towers: _Tower
    proj: jax.Array


def _plugin(cls, leaf):
    # Depth 64 is the largest dimension and divides over 8 devices: plain fsdp splits it.
    return {"head": cls(_Tower(leaf((64, 16, 12)), leaf((64, 16))), leaf((64, 16, 12)))}


def test_a_declared_stack_keeps_its_depth_axis_whatever_its_name():
    mesh = make_mesh()  # 8 CPU devices on "data"
    assert mesh.shape["data"] == 8

    def sds(shape):
        return SDS(shape, jnp.float32)

    for rules in ("fsdp", ((r".*", "fsdp"),)):
        tree = _plugin(_DeclaredHead, sds)
        declared = _specs(tree, param_shardings(tree, mesh, rules, min_size=1))
        assert declared["head.towers.w"] == P(None, "data", None)  # as "fsdp_stacked"
        assert declared["head.towers.b"] == P(None, "data")
        assert declared["head.proj"] == P("data", None, None)  # not in the stack
        tree = _plugin(_UndeclaredHead, sds)
        undeclared = _specs(tree, param_shardings(tree, mesh, rules, min_size=1))
        assert undeclared["head.towers.w"] == P("data", None, None)  # plain fsdp
        assert undeclared["head.towers.b"] == P("data", None)
    # The declaration follows the parameters into a partition and Adam's moments.
    params = _plugin(_DeclaredHead, sds)
    state = jax.eval_shape(optax.adam(1e-3).init, params)
    specs = _specs(state, state_shardings(state, mesh, "fsdp", min_size=1))
    assert specs["0.mu.head.towers.w"] == P(None, "data", None)
    assert specs["0.nu.head.proj"] == P("data", None, None)
    partial = eqx.filter(params, lambda x: x.ndim == 3)
    specs = _specs(partial, param_shardings(partial, mesh, "fsdp", min_size=1))
    assert specs == {"head.towers.w": P(None, "data", None), "head.proj": P("data", None, None)}
    # Placed: every device holds all 64 layers of its slice.
    arrays = _plugin(_DeclaredHead, lambda shape: jnp.ones(shape, jnp.float32))
    placed = put_sharded(arrays, mesh, "fsdp", min_size=1)
    shards = placed["head"].towers.w.addressable_shards
    assert len(shards) == 8 and {shard.data.shape for shard in shards} == {(64, 2, 12)}


def test_no_divisible_dimension_replicates_and_one_device_axis_replicates():
    tree = {"a": SDS((100, 64), jnp.float32), "b": SDS((30, 10), jnp.float32)}
    eight = _specs(tree, param_shardings(tree, make_mesh(), "fsdp", min_size=1))
    assert eight == {"a": P(None, "data"), "b": P()}
    one = _specs(tree, param_shardings(tree, make_mesh({"data": 1, "model": -1}), "fsdp",
                                       min_size=1))
    assert one == {"a": P(), "b": P()}


def test_custom_rules_first_match_wins_and_none_and_static_leaves_stay_none(mesh):
    tree = {"x": {"weight": SDS((64, 64), jnp.float32)}, "y": SDS((64, 64), jnp.float32),
            "frozen": None, "fn": jax.nn.gelu}
    rules = ((r"(^|\.)x\.", "replicate"), (r".*", "fsdp"))
    out = param_shardings(tree, mesh, rules, min_size=1)
    assert out["x"]["weight"].spec == P()
    assert out["y"].spec == P("data", None)
    assert out["frozen"] is None and out["fn"] is None


def test_unknown_tactic_and_rule_set_are_refused_listing_the_known(mesh):
    tree = {"w": SDS((8, 8), jnp.float32)}
    with pytest.raises(KeyError, match="unknown tactic 'tp'.*'fsdp', 'fsdp_stacked', 'replicate'"):
        param_shardings(tree, mesh, ((r".*", "tp"),))
    with pytest.raises(KeyError, match="unknown rule set 'zero3'.*'fsdp', 'replicate'"):
        param_shardings(tree, mesh, "zero3")
    assert set(RULES) >= {"fsdp", "replicate"}


def test_describe_shardings_lists_path_shape_and_spec(mesh, wide):
    text = describe_shardings(wide, param_shardings(wide, mesh, "fsdp"))
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("backbone.blocks.layers.attn.qkv.weight"))
    assert row.split()[1:] == ["(2,", "192,", "64)", "P(None,", "'data',", "None)"]
    assert lines[0].split() == ["path", "shape", "spec"]
    assert len(lines) == len(named_leaves(wide)) + 2
    assert lines[-1].endswith("replicated") and " 0 sharded" not in lines[-1]


# -- training state --------------------------------------------------------------------------
def test_optimizer_state_and_ema_mirror_the_parameter_shardings(mesh, wide):
    config = get_config("tiny-fluid", **{"model.width": 64})
    floating = lambda x: isinstance(x, SDS) and jnp.issubdtype(x.dtype, jnp.floating)
    params = eqx.filter(wide, floating)
    optimizer = make_optimizer(config.optim, config.steps)

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(params)
        return TrainState(params, opt_state, params, jnp.zeros((), jnp.int32), jr.key(0))

    state = jax.eval_shape(init, params)
    specs = _specs(state, state_shardings(state, mesh, "fsdp"))
    by_param = _specs(params, param_shardings(params, mesh, "fsdp"))
    assert sum(spec != P() for spec in by_param.values()) > 5
    mirrored = 0
    for name, spec in specs.items():
        owner = [p for p in by_param if name.endswith("." + p)]
        if owner:
            assert spec == by_param[owner[0]], name
            mirrored += 1
        else:
            assert spec == P(), name  # counts, step, key
    # params, ema, Adam's mu and nu.
    assert mirrored == 4 * len(by_param)
    assert specs["opt_state.1.0.mu.backbone.blocks.layers.attn.qkv.weight"] == P(None, "data", None)


# -- placing arrays --------------------------------------------------------------------------
def test_shard_batch_splits_the_leading_axis_over_data(mesh):
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
             "text_ids": rng.integers(0, 50, (8, 16)).astype(np.int32)}
    out = shard_batch(batch, mesh)
    for name, x in out.items():
        assert x.sharding.spec == P("data")
        assert x.sharding.mesh.shape == mesh.shape
        assert len(x.addressable_shards) == 8
        for shard in x.addressable_shards:
            # Row block i lives on the two devices of data index i.
            assert shard.data.shape == (2, *batch[name].shape[1:])
            start = shard.index[0].start
            np.testing.assert_array_equal(np.asarray(shard.data), batch[name][start:start + 2])
        np.testing.assert_array_equal(np.asarray(x), batch[name])


def test_shard_batch_refuses_a_batch_not_divisible_by_data(mesh):
    with pytest.raises(ValueError, match="'image'.*batch size of 6.*the 4 devices"):
        shard_batch({"image": np.zeros((6, 4), np.float32)}, mesh)


def test_put_sharded_places_an_existing_tree_and_filter_shard_accepts_it(mesh):
    tree = {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), "act": jax.nn.gelu}
    placed = put_sharded(tree, mesh, "fsdp", min_size=1)
    assert placed["w"].sharding.spec == P("data", None) and placed["act"] is jax.nn.gelu
    chex.assert_trees_all_equal(placed["w"], tree["w"])
    shardings = param_shardings(tree, mesh, "fsdp", min_size=1)
    out = eqx.filter_jit(lambda t: eqx.filter_shard(t, shardings))(tree)
    assert out["w"].sharding.is_equivalent_to(shardings["w"], 2)


@pytest.mark.parametrize("variant", ["tiny-fluid", "tiny-discrete-random"])
def test_create_sharded_model_equals_the_unsharded_build(mesh, variant):
    # tiny-discrete-random fits its palette codebook by k-means on NumPy images and encodes
    # the empty caption with SentencePiece, host-side work inside the traced build.
    config = get_config(variant).model
    dataset = make_source(get_config(variant).data)
    tokenizer = make_text_tokenizer(dataset, config.text_vocab_size, n=256)
    images = fit_images(dataset, 32)

    def build():
        return build_model(config, text_tokenizer=tokenizer, key=jr.key(3), fit_images=images)

    model = create_sharded(build, mesh, "fsdp", min_size=1024)
    reference = build()
    assert isinstance(model, FluidModel)
    assert model.caption_dropout == reference.caption_dropout
    arrays = eqx.filter(model, eqx.is_array)
    expected = param_shardings(arrays, mesh, "fsdp", min_size=1024)
    chex.assert_trees_all_equal(arrays, eqx.filter(reference, eqx.is_array))
    chex.assert_trees_all_equal_structs(arrays, expected)
    sharded = 0
    for (name, x), (_, s) in zip(named_leaves(arrays), named_leaves(expected), strict=True):
        assert isinstance(x.sharding, NamedSharding) and x.sharding.spec == s.spec, name
        sharded += s.spec != P()
    assert sharded > 10
    # Each device holds a quarter of a sharded weight, not the whole.
    qkv = model.backbone.blocks.layers.attn.qkv.weight
    assert qkv.sharding.spec == P(None, "data", None)
    assert {shard.data.shape for shard in qkv.addressable_shards} == {(2, 24, 32)}
    # The fitted palette codebook (32 x 48) is large enough to split, but the rule set keeps
    # the tokenizer whole, which is what makes it equal to the unsharded fit above.
    for x in jax.tree.leaves(arrays.tokenizer):
        assert x.sharding.spec == P()
