"""The torch-free safetensors reader and writer, and the checked StateDict loaders build on."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from fluid._weights import (
    StateDict,
    WeightError,
    read_folder_weights,
    read_safetensors,
    write_safetensors,
)

TENSORS = {
    "enc.w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "enc.b": np.linspace(-1, 1, 3).astype(np.float16),
    "ids": np.array([1, -2], np.int64),
    "half": np.full((2, 2), 1.5, ml_dtypes.bfloat16),
}


def test_round_trip_every_dtype(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", TENSORS, {"format": "np"})
    back = read_safetensors(tmp_path / "w.safetensors")
    assert set(back) == set(TENSORS)
    for k, v in TENSORS.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k].astype(np.float64), v.astype(np.float64))


def test_reads_files_written_by_safetensors(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    plain = {k: v for k, v in TENSORS.items() if k != "half"}
    sn.save_file(plain, str(tmp_path / "w.safetensors"))
    back = read_safetensors(tmp_path / "w.safetensors")
    for k, v in plain.items():
        np.testing.assert_array_equal(back[k], v)
    # ...and safetensors reads ours
    write_safetensors(tmp_path / "ours.safetensors", plain)
    theirs = sn.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in plain.items():
        np.testing.assert_array_equal(theirs[k], v)


def test_truncated_file_is_named(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", TENSORS)
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(WeightError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(WeightError, match="not a safetensors file"):
        read_safetensors(tmp_path / "tiny.safetensors")


def test_unknown_dtype_is_refused(tmp_path):
    head = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0")
    with pytest.raises(WeightError, match="F8_E4M3"):
        read_safetensors(tmp_path / "w.safetensors")


def test_folder_refuses_pickles(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightError, match="pytorch_model.bin"):
        read_folder_weights(tmp_path)


def test_folder_merges_shards(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"y": np.zeros(3, np.float32)})
    assert sorted(read_folder_weights(tmp_path)) == ["x", "y"]
    write_safetensors(tmp_path / "c.safetensors", {"x": np.ones(2, np.float32)})
    with pytest.raises(WeightError, match="more than one file"):
        read_folder_weights(tmp_path)


def test_state_dict_names_missing_misshaped_and_unused_keys():
    sd = StateDict(TENSORS, "ckpt")
    with pytest.raises(WeightError, match=r"missing key 'enc\.ww'.*Closest present: enc\.w"):
        sd.take("enc.ww")
    with pytest.raises(WeightError, match=r"'enc\.w' has shape \(2, 3\), the model expects \(3, 2\)"):
        sd.take("enc.w", (3, 2))
    np.testing.assert_array_equal(sd.take("enc.w", (2, 3)), TENSORS["enc.w"])
    assert sd.unused() == ["enc.b", "half", "ids"]
    with pytest.raises(WeightError, match="3 unused keys"):
        sd.finish()
    sd.finish(ignore=["enc.b", "half", "ids"])
