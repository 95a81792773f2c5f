"""Saved models: checksummed round trips, and one clear error for every kind of damage."""

import hashlib
import json
import os
from pathlib import Path

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import arrays, flip_middle

from fluid import MissingInputError, UserError
from fluid.run import (
    CorruptModelError,
    file_digest,
    load_model_file,
    read_model_info,
    save_model_file,
)


def mlp(seed: int = 0, width: int = 8, depth: int = 2) -> eqx.nn.MLP:
    return eqx.nn.MLP(3, 2, width, depth, key=jr.key(seed))


def assert_one_clear_message(error: BaseException, path: Path) -> str:
    """The message names the file, stands alone on one line and is printed as a user error."""
    message = str(error)
    assert str(path) in message
    assert "\n" not in message and "Traceback" not in message
    assert isinstance(error, ValueError) and isinstance(error, UserError)
    return message


# -- round trip -----------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path):
    model = mlp(0)
    path = tmp_path / "model.eqx"
    save_model_file(path, model, step=1234)
    # Into a skeleton of other values, concrete or abstract.
    for skeleton in (mlp(1), eqx.filter_eval_shape(mlp, 1)):
        loaded = load_model_file(path, skeleton)
        assert jax.tree.structure(loaded) == jax.tree.structure(model)
        chex.assert_trees_all_equal(arrays(loaded), arrays(model))
        chex.assert_trees_all_equal_dtypes(arrays(loaded), arrays(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.eqx", "model.json"]


def test_sidecar_records_step_size_and_digest(tmp_path):
    path = tmp_path / "model.eqx"
    save_model_file(path, mlp(0), step=1234)
    info = read_model_info(path)
    assert info == json.loads((tmp_path / "model.json").read_text())
    assert info == {
        "format": 1,
        "step": 1234,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert isinstance(info["step"], int)


def test_saving_again_replaces_both_files(tmp_path):
    path = tmp_path / "model.eqx"
    save_model_file(path, mlp(0), step=1)
    save_model_file(path, mlp(1), step=2)
    assert read_model_info(path)["step"] == 2
    chex.assert_trees_all_equal(arrays(load_model_file(path, mlp(0))), arrays(mlp(1)))


def test_file_digest_is_sha256_across_chunks(tmp_path):
    # Longer than one read chunk (1 MiB) and not a multiple of it.
    f = tmp_path / "blob"
    data = os.urandom(2 * 2**20 + 12345)
    f.write_bytes(data)
    assert file_digest(f) == hashlib.sha256(data).hexdigest()
    assert file_digest(str(f)) == file_digest(f)


def test_model_file_may_not_end_in_json(tmp_path):
    with pytest.raises(ValueError, match="cannot end in .json"):
        save_model_file(tmp_path / "model.json", mlp(0), step=0)


# -- damage ---------------------------------------------------------------------------------
def test_truncated_file_is_one_clear_error(tmp_path):
    path = tmp_path / "model.eqx"
    save_model_file(path, mlp(0), step=1)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptModelError) as info:
        load_model_file(path, mlp(0))
    message = assert_one_clear_message(info.value, path)
    assert f"it has {size // 2} bytes instead of the {size} it was saved with" in message
    assert "Recipe.save" in message and "checkpoints" in message


def test_flipped_bytes_fail_the_checksum(tmp_path):
    # Same size: before checksums this loaded, with other weights, without complaint.
    path = tmp_path / "model.eqx"
    save_model_file(path, mlp(0), step=1)
    (tmp_path / "checkpoints").mkdir()
    flip_middle(path)
    with pytest.raises(CorruptModelError) as info:
        load_model_file(path, mlp(0))
    message = assert_one_clear_message(info.value, path)
    assert message == (
        f"{path} is damaged: its contents changed since it was saved (checksum mismatch with "
        "model.json); save the model again from training (Recipe.save), or load a checkpoint "
        f"from {tmp_path / 'checkpoints'}/ instead."
    )


def test_crash_between_the_two_renames_reads_as_corrupt(tmp_path, monkeypatch):
    # The new model is in place, the sidecar still describes the old one: the old step
    # must not be reported for the new weights, nor the new weights taken as verified.
    path = tmp_path / "model.eqx"
    save_model_file(path, mlp(0), step=1)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated crash"):
        save_model_file(path, mlp(1), step=2)
    monkeypatch.undo()
    assert [Path(p).name for p in calls] == ["model.eqx", "model.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.eqx", "model.json"]
    with pytest.raises(CorruptModelError, match=r"checksum mismatch"):
        load_model_file(path, mlp(0))


def test_another_config_is_named_as_such(tmp_path):
    path = tmp_path / "model.eqx"
    save_model_file(path, mlp(0, width=8), step=1)
    with pytest.raises(CorruptModelError) as info:
        load_model_file(path, mlp(0, width=16))
    message = assert_one_clear_message(info.value, path)
    assert "layers.0.weight is float32[8,3] in the file and float32[16,3] here" in message
    assert "saved from another model config" in message


def test_more_or_fewer_leaves_are_another_config(tmp_path):
    w = jnp.zeros((4,), jnp.float32)
    path = tmp_path / "model.eqx"
    save_model_file(path, [w, w], step=1)
    with pytest.raises(CorruptModelError, match="holds more arrays than this model has"):
        load_model_file(path, [w])
    save_model_file(path, [w], step=1)
    with pytest.raises(CorruptModelError) as info:
        load_model_file(path, [w, w])
    message = assert_one_clear_message(info.value, path)
    assert "reading 1 failed" in message
    assert "size and checksum are as saved, so it was saved from another model config" in message


def test_missing_and_unreadable_files(tmp_path):
    path = tmp_path / "model.eqx"
    with pytest.raises(MissingInputError, match="no saved model at"):
        load_model_file(path, mlp(0))
    save_model_file(path, mlp(0), step=1)
    path.unlink()
    with pytest.raises(CorruptModelError, match="is missing, though model.json beside it"):
        load_model_file(path, mlp(0))
    save_model_file(path, mlp(0), step=1)
    (tmp_path / "model.json").write_text('{"format": 1, "step": 1')
    with pytest.raises(CorruptModelError, match="model.json, which records .* is unreadable"):
        read_model_info(path)
    with pytest.raises(CorruptModelError, match="is unreadable"):
        load_model_file(path, mlp(0))


# -- models saved before sidecars -----------------------------------------------------------
def test_model_without_sidecar_loads(tmp_path):
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, mlp(0))
    assert read_model_info(path) is None
    chex.assert_trees_all_equal(arrays(load_model_file(path, mlp(1))), arrays(mlp(0)))


def test_truncated_model_without_sidecar_is_one_clear_error(tmp_path):
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, mlp(0))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(CorruptModelError) as info:
        load_model_file(path, mlp(0))
    message = assert_one_clear_message(info.value, path)
    assert "does not load into this model: reading layers." in message
    assert "it is cut short or damaged, or was saved from another model config" in message
