"""Checkpoints: exact round trips, keep-last-K, atomicity, resharding, config and shape checks."""

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from helpers import flip_middle
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from fluid import UserError
from fluid.config import DataConfig, TrainConfig, override, to_dict
from fluid.run import (
    COMMIT_FILE,
    RESUMABLE_CONFIG_KEYS,
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointMismatchError,
    check_config,
    named_leaves,
)
from fluid.train import TrainState


class Proj(eqx.Module):
    weight: jax.Array
    bias: jax.Array
    frozen: Any  # None, as in `TrainState.params` where a leaf is not trained
    activation: str = eqx.field(static=True)


def make_state(seed: int, width: int = 4) -> TrainState:
    """A small training state: params, AdamW state after one update, EMA, step, typed key."""
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    params = {
        "proj": Proj(
            weight=jr.normal(k1, (8, width), jnp.float32),
            bias=jr.normal(k2, (16,), jnp.float32),
            frozen=None,
            activation="gelu",
        )
    }
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    # optax mixes Python floats with int32 counts, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        _, opt_state = optimizer.update(grads, opt_state, params)
    return TrainState(
        params=params,
        opt_state=opt_state,
        ema=jax.tree.map(lambda x: 0.5 * x, params),
        step=jnp.asarray(seed + 1, jnp.int32),
        key=k3,
    )


def assert_states_equal(a: TrainState, b: TrainState) -> None:
    """Exact equality of every array leaf and of the tree structure (keys as key data)."""
    as_data = lambda s: jax.tree.map(  # noqa: E731
        lambda x: jr.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        s,
    )
    assert jax.tree.structure(a) == jax.tree.structure(b)
    chex.assert_trees_all_close(as_data(a), as_data(b), rtol=0, atol=0)
    chex.assert_trees_all_equal_dtypes(as_data(a), as_data(b))


CONFIG = to_dict(TrainConfig())


def save(manager: CheckpointManager, step: int, seed: int | None = None) -> TrainState:
    state = make_state(step if seed is None else seed)
    manager.save(step, state, config=CONFIG, data_state={"next_batch": step * 10})
    return state


def abstract_state() -> Any:
    return jax.eval_shape(lambda: make_state(0))


def mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return jax.make_mesh(
        shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )


def shardings_on(m: jax.sharding.Mesh) -> Any:
    """Weights split over both axes, vectors over "data", scalars and the key replicated."""

    def spec(x):
        if len(x.shape) == 2:
            return NamedSharding(m, P("data", "model"))
        if len(x.shape) == 1:
            return NamedSharding(m, P("data"))
        return NamedSharding(m, P())

    return jax.tree.map(spec, abstract_state())


def largest_array_file(step_dir: Path) -> Path:
    # With one process Orbax merges the arrays into `state/d/`; the biggest file is `weight`'s.
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    assert files, f"no array files under {step_dir}/state/d"
    return max(files, key=lambda p: p.stat().st_size)


def largest_state_file(step_dir: Path) -> Path:
    # Any file under `state/`, wherever Orbax put it; with `WIDE` arrays it holds array data.
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def strip_digests(step_dir: Path) -> None:
    """Rewrite a commit file as fluid wrote it before digests: sizes only."""
    commit = json.loads((step_dir / COMMIT_FILE).read_text())
    del commit["sha256"]
    (step_dir / COMMIT_FILE).write_text(json.dumps(commit))


# Wide enough that the largest file under `state/` is array data, which Orbax does not
# checksum (its b-tree nodes it does).
WIDE = 1024


# -- round trip, retention ------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    assert manager.latest_step() is None
    state = save(manager, 7)
    restored, data_state, step = manager.restore(abstract_state())
    assert step == 7
    assert data_state == {"next_batch": 70}
    assert_states_equal(restored, state)
    # Non-array leaves come from `state_like`, and the key is a usable typed key again.
    assert restored.params["proj"].frozen is None
    assert restored.params["proj"].activation == "gelu"
    chex.assert_trees_all_close(
        jr.key_data(jr.split(restored.key)), jr.key_data(jr.split(state.key))
    )
    assert manager.saved_config(7) == CONFIG


def test_commit_file_records_size_and_digest_of_every_file(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    root = tmp_path / "1"
    commit = json.loads((root / COMMIT_FILE).read_text())
    on_disk = {
        str(p.relative_to(root))
        for item in ("state", "config", "data_state")
        for p in (root / item).rglob("*")
        if p.is_file()
    }
    assert set(commit["files"]) == set(commit["sha256"]) == on_disk
    for rel, digest in commit["sha256"].items():
        assert digest == hashlib.sha256((root / rel).read_bytes()).hexdigest(), rel
        assert commit["files"][rel] == (root / rel).stat().st_size, rel


def test_checkpoint_without_digests_restores(tmp_path):
    # Saved by fluid before digests: checked by size alone, and still restorable.
    manager = CheckpointManager(tmp_path)
    state = save(manager, 1)
    strip_digests(tmp_path / "1")
    assert manager.latest_step() == 1
    assert manager.saved_config() == CONFIG
    restored, data_state, step = manager.restore(abstract_state(), config=CONFIG)
    assert step == 1 and data_state == {"next_batch": 10}
    assert_states_equal(restored, state)


def test_restore_into_a_concrete_state_keeps_its_shardings(tmp_path):
    manager = CheckpointManager(tmp_path)
    state = save(manager, 1)
    like = jax.device_put(make_state(5), jax.devices()[3])
    restored, _, _ = manager.restore(like)
    assert_states_equal(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == SingleDeviceSharding(jax.devices()[3])


def test_keeps_the_newest_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        save(manager, step)
    assert manager.all_steps() == [30, 40]
    assert manager.latest_step() == 40
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["30", "40"]
    state, _, step = manager.restore(abstract_state(), step=30)
    assert step == 30
    assert_states_equal(state, make_state(30))


def test_refuses_to_save_over_complete_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    save(manager, 2)
    with pytest.raises(ValueError, match=r"complete checkpoints at steps \[2\]"):
        save(manager, 2)
    with pytest.raises(ValueError, match=r"complete checkpoints at steps \[1, 2\]"):
        save(manager, 1)
    assert manager.all_steps() == [1, 2]


# -- atomicity ------------------------------------------------------------------------------
def crash_tmp_dir(root: Path) -> None:
    # Orbax died while writing step 3: its temporary directory is all that is left.
    shutil.copytree(root / "2", root / "3.orbax-checkpoint-tmp-1700000000000000")


def crash_before_commit(root: Path) -> None:
    # Orbax renamed step 3 into place, the process died before the commit file.
    shutil.copytree(root / "2", root / "3")
    (root / "3" / COMMIT_FILE).unlink()


def truncated_array_file(root: Path) -> None:
    shutil.copytree(root / "2", root / "3")
    f = largest_array_file(root / "3")
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def deleted_array_file(root: Path) -> None:
    shutil.copytree(root / "2", root / "3")
    largest_array_file(root / "3").unlink()


@pytest.mark.parametrize(
    "crash", [crash_tmp_dir, crash_before_commit, truncated_array_file, deleted_array_file]
)
def test_half_written_checkpoint_is_never_latest(tmp_path, crash):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    state2 = save(manager, 2)
    crash(tmp_path)
    assert any(p.name.startswith("3") for p in tmp_path.iterdir())  # the crash left traces
    listed = crash is not crash_tmp_dir  # Orbax itself never lists a temporary directory
    warns = lambda: (  # noqa: E731
        pytest.warns(UserWarning, match="skipping checkpoint")
        if listed
        else contextlib.nullcontext()
    )
    with warns():
        assert manager.latest_step() == 2
    assert manager.all_steps() == [1, 2]
    with warns():
        restored, data_state, step = manager.restore(abstract_state())
    assert step == 2 and data_state == {"next_batch": 20}
    assert_states_equal(restored, state2)
    # The resumed run saves step 3 again: the remains are cleared, not taken for a checkpoint.
    state3 = save(manager, 3, seed=33)
    assert manager.latest_step() == 3
    assert not any("tmp" in p.name for p in tmp_path.iterdir())
    assert_states_equal(manager.restore(abstract_state())[0], state3)


def test_damaged_checkpoint_names_its_directory(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    save(manager, 2)
    f = largest_array_file(tmp_path / "2")
    with open(f, "r+b") as fh:
        fh.truncate(3)
    with pytest.raises(CheckpointCorruptError) as info:
        manager.restore(abstract_state(), step=2)
    message = str(info.value)
    assert str(tmp_path / "2") in message
    assert f"{f.relative_to(tmp_path / '2')} has 3 bytes" in message
    assert "restore an earlier step (1)" in message and "delete it" in message


def test_bytes_changed_in_place_are_refused_by_restore(tmp_path):
    # Same size, 64 bytes of array data inverted: Orbax would restore it without complaint.
    manager = CheckpointManager(tmp_path)

    def wide(seed: int) -> TrainState:
        return make_state(seed, width=WIDE)

    state1 = wide(1)
    manager.save(1, state1, config=CONFIG, data_state={})
    manager.save(2, wide(2), config=CONFIG, data_state={})
    f = largest_state_file(tmp_path / "2")
    flip_middle(f)
    # Listing reads sizes only: the damaged step is still the latest, and a resumed run is
    # stopped by `restore`'s message rather than moved back to step 1 behind the user's back.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.latest_step() == 2
    assert manager.all_steps() == [1, 2]
    like = jax.eval_shape(lambda: wide(0))
    with pytest.raises(CheckpointCorruptError) as info:
        manager.restore(like)
    rel = f.relative_to(tmp_path / "2")
    assert str(info.value) == (
        f"checkpoint {tmp_path / '2'} is damaged: {rel}: its contents changed since it was "
        "saved (checksum mismatch); restore an earlier step (1) or delete it to resume from "
        "the latest complete one."
    )
    # The command line prints a user error's message alone, without a traceback.
    assert isinstance(info.value, UserError)
    restored, _, step = manager.restore(like, step=1)
    assert step == 1
    assert_states_equal(restored, state1)


def test_changed_config_file_is_refused_by_saved_config(tmp_path):
    # Still valid JSON, so Orbax reads it happily; only the digest shows the change.
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    f = tmp_path / "1" / "config" / "metadata"
    text = f.read_text()
    assert '"width": 256' in text
    f.write_text(text.replace('"width": 256', '"width": 512', 1))
    assert manager.latest_step() == 1
    with pytest.raises(CheckpointCorruptError, match=r"config/metadata: its contents changed"):
        manager.saved_config(1)
    with pytest.raises(CheckpointCorruptError, match=r"config/metadata: its contents changed"):
        manager.restore(abstract_state())


# Orbax leaves an asyncio callback behind when tensorstore fails mid-read; it surfaces later
# as "Event loop is closed", which is Orbax's and harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("digests", [True, False])
def test_garbled_array_file_gives_the_damage_error(tmp_path, digests):
    # Same size, wrong bytes: the sizes cannot tell; the digests can, and without them (a
    # checkpoint from before digests) Orbax's own checksums of its b-tree nodes.
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    f = largest_array_file(tmp_path / "1")
    f.write_bytes(os.urandom(f.stat().st_size))
    if not digests:
        strip_digests(tmp_path / "1")
    assert manager.latest_step() == 1
    damaged = (
        r"is damaged: state/\S+: its contents changed since it was saved \(checksum mismatch\)"
        if digests
        else r"is damaged: reading (it|its metadata) failed \(ValueError: DATA_LOSS"
    )
    with pytest.raises(CheckpointCorruptError, match=damaged) as info:
        manager.restore(abstract_state())
    assert str(tmp_path / "1") in str(info.value)
    assert "delete it and start afresh" in str(info.value)


def test_missing_step(tmp_path):
    manager = CheckpointManager(tmp_path / "never-written")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.restore(abstract_state())
    assert not (tmp_path / "never-written").exists()  # reading creates nothing
    save(manager, 1)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 .* complete ones: \[1\]"):
        manager.restore(abstract_state(), step=5)


# -- resharding -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["mesh_8x1", "one_device"])
def test_restores_onto_another_mesh(tmp_path, target):
    saved_shardings = shardings_on(mesh((4, 2)))
    state = jax.device_put(make_state(3), saved_shardings)
    assert state.params["proj"].weight.sharding == NamedSharding(mesh((4, 2)), P("data", "model"))
    manager = CheckpointManager(tmp_path)
    manager.save(3, state, config=CONFIG, data_state={})
    if target == "mesh_8x1":
        wanted = shardings_on(mesh((8, 1)))
    else:
        wanted = SingleDeviceSharding(jax.devices()[5])
    restored, _, _ = manager.restore(abstract_state(), shardings=wanted)
    assert_states_equal(restored, make_state(3))
    want_leaves = (
        jax.tree.leaves(wanted) if target == "mesh_8x1" else [wanted] * len(jax.tree.leaves(state))
    )
    got_leaves = jax.tree.leaves(restored)
    assert len(got_leaves) == len(want_leaves)
    for got, want in zip(got_leaves, want_leaves):
        assert got.sharding == want, (got.sharding, want)


def test_shardings_must_cover_every_leaf(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    partial = shardings_on(mesh((8, 1)))
    partial = eqx.tree_at(lambda s: s.key, partial, None)
    with pytest.raises(ValueError, match="no sharding for key"):
        manager.restore(abstract_state(), shardings=partial)


# -- config and structure checks ------------------------------------------------------------
def test_config_mismatch_names_the_first_key(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    current = TrainConfig()
    current = override(current, "optim.learning_rate", 3e-4)
    current = override(current, "model.width", 128)
    with pytest.raises(CheckpointMismatchError) as info:
        manager.restore(abstract_state(), config=to_dict(current))
    message = str(info.value)
    assert (
        f"checkpoint {tmp_path / '1'} was made with model.width=256, this run has "
        "model.width=128; resume with the same config or start a fresh output directory."
    ) == message
    assert isinstance(info.value, ValueError)


def test_check_config_nested_and_absent_keys():
    saved = {"model": {"head": {"name": "diffusion", "kwargs": {"width": 256}}}, "steps": 10}
    same = {"model": {"head": {"name": "diffusion", "kwargs": {"width": 256}}}, "steps": 10}
    check_config(saved, same)
    wider = {"model": {"head": {"name": "diffusion", "kwargs": {"width": 512}}}, "steps": 10}
    with pytest.raises(CheckpointMismatchError, match=r"model\.head\.kwargs\.width=256, .*=512"):
        check_config(saved, wider)
    extra = {"model": {"head": {"name": "diffusion", "kwargs": {"width": 256, "depth": 3}}}}
    with pytest.raises(CheckpointMismatchError, match=r"made with no model\.head\.kwargs\.depth"):
        check_config(saved, extra)
    # A tuple in this run's config equals the list JSON made of it.
    check_config({"data": {"categories": ["a", "b"]}}, {"data": {"categories": ("a", "b")}})


def test_a_checkpoint_from_before_a_key_existed_matches_its_old_value():
    # Runs saved before `model.aligner`, `model.token_norm`, `optim.decay_rules` and
    # `data.style` existed had a transformer aligner, a normed token embedding, fluid's decay
    # rules and flat images.
    current = to_dict(TrainConfig())
    saved = to_dict(TrainConfig())
    for section, key in (
        ("model", "aligner"), ("model", "token_norm"), ("optim", "decay_rules"), ("data", "style")
    ):
        del saved[section][key]
    check_config(saved, current)
    other = to_dict(TrainConfig())
    other["model"]["aligner"] = "identity"
    with pytest.raises(CheckpointMismatchError, match=r'model\.aligner="transformer".*"identity"'):
        check_config(saved, other)
    shaded = to_dict(TrainConfig(data=DataConfig(style="shaded")))
    with pytest.raises(CheckpointMismatchError, match=r'data\.style="flat".*"shaded"'):
        check_config(saved, shaded)


def test_resumable_keys_may_differ(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    current = to_dict(TrainConfig(steps=5000, log_every=1, sample_steps=64, sample_cfg=1.5))
    current["mesh_shape"] = [8, 1]  # a field the saved config never had
    state, _, step = manager.restore(abstract_state(), config=current)
    assert step == 1
    assert_states_equal(state, make_state(1))
    assert "steps" in RESUMABLE_CONFIG_KEYS
    # `steps` is the top-level field only; a warm-up change is a real change.
    warmup = to_dict(override(TrainConfig(), "optim.warmup_steps", 7))
    with pytest.raises(CheckpointMismatchError, match=r"optim\.warmup_steps=100"):
        manager.restore(abstract_state(), config=warmup)


def test_shape_mismatch_names_the_parameter(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    wider = jax.eval_shape(lambda: make_state(0, width=8))
    with pytest.raises(CheckpointMismatchError) as info:
        manager.restore(wider)
    assert "params.proj.weight is float32[8,4] in the checkpoint and float32[8,8] here" in str(
        info.value
    )
    assert str(tmp_path / "1") in str(info.value)


def test_missing_and_extra_leaves_are_named(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    like = abstract_state()
    without_ema = eqx.tree_at(lambda s: s.ema, like, None)
    with pytest.raises(CheckpointMismatchError, match=r"it has ema\.proj\.bias \(and 1 more\)"):
        manager.restore(without_ema)
    extra = jax.ShapeDtypeStruct((2,), jnp.float32)
    more = eqx.tree_at(lambda s: s.ema, like, {**like.ema, "extra": extra})
    missing = r"it has no ema\.extra \(float32\[2\] here\)"
    with pytest.raises(CheckpointMismatchError, match=missing):
        manager.restore(more)
    as_float = eqx.tree_at(lambda s: s.step, like, jax.ShapeDtypeStruct((), jnp.float32))
    with pytest.raises(CheckpointMismatchError, match=r"step is int32\[\] in the checkpoint"):
        manager.restore(as_float)


# -- reading some leaves --------------------------------------------------------------------
def test_saved_leaves_lists_every_array_by_name(tmp_path):
    manager = CheckpointManager(tmp_path)
    state = save(manager, 1)
    saved = manager.saved_leaves(1)
    names = [n for n, leaf in named_leaves(state) if eqx.is_array(leaf)]
    assert sorted(saved) == sorted(names)
    assert saved["ema.proj.weight"] == jax.ShapeDtypeStruct((8, 4), jnp.float32)
    # A typed key is stored, and listed, as its raw key data.
    assert saved["key"].shape == jr.key_data(state.key).shape


def test_restore_leaves_reads_the_named_leaves_only(tmp_path):
    manager = CheckpointManager(tmp_path)
    state = save(manager, 1)
    like = abstract_state()
    arrays, step = manager.restore_leaves(
        {"ema.proj.weight": like.ema["proj"].weight, "key": like.key,
         # One of several names: the one the checkpoint holds is read.
         ("frozen.proj.bias", "params.proj.bias"): like.params["proj"].bias},
    )
    assert step == 1
    assert set(arrays) == {"ema.proj.weight", "key", ("frozen.proj.bias", "params.proj.bias")}
    chex.assert_trees_all_equal(arrays["ema.proj.weight"], state.ema["proj"].weight)
    chex.assert_trees_all_equal(
        arrays[("frozen.proj.bias", "params.proj.bias")], state.params["proj"].bias
    )
    chex.assert_trees_all_equal(jr.key_data(arrays["key"]), jr.key_data(state.key))
    device = SingleDeviceSharding(jax.devices()[1])
    arrays, _ = manager.restore_leaves({"ema.proj.weight": like.ema["proj"].weight},
                                       sharding=device)
    assert arrays["ema.proj.weight"].sharding == device


def test_restore_leaves_checks_names_shapes_and_digests(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 1)
    wrong = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    with pytest.raises(CheckpointMismatchError, match=r"ema\.proj\.weight is float32\[8,4\]"):
        manager.restore_leaves({"ema.proj.weight": wrong})
    # Below a `complete` prefix, every saved array must be asked for.
    with pytest.raises(CheckpointMismatchError, match=r"it has ema\.proj\.bias, which this"):
        manager.restore_leaves({"ema.proj.weight": abstract_state().ema["proj"].weight},
                               complete=("ema",))
    # None of the names held: reported under the first.
    with pytest.raises(CheckpointMismatchError, match=r"it has no frozen\.w \(float32\[8,8\]"):
        manager.restore_leaves({("frozen.w", "ema.w"): wrong})
    f = largest_state_file(tmp_path / "1")
    flip_middle(f)
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        manager.restore_leaves({"step": jax.ShapeDtypeStruct((), jnp.int32)})
