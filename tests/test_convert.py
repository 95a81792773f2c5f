"""`fluid convert`: MAR's checkpoints (the model, its LDM-layout autoencoder) into folders fluid
reads without torch.

The MAR checkpoints here are written by `torch.save` as MAR's `util/misc.py save_model` writes
them (`model`, `model_ema`, an AdamW `optimizer` state dict, `epoch`, `scaler`, `args` as an
`argparse.Namespace`), with the state dict of `fixtures/mar_tiny.npz` (MAR's own names and
values). Files that must be refused are cut, foreign or hostile; a hostile pickle would leave a
marker file if anything in it ran.
"""

import argparse
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
from helpers import mar_state_dict, torch_state_dict, user_error, write_mar_checkpoint

from fluid._weights import WeightError
from fluid.build import load_mar
from fluid.cli import main
from fluid.convert import MAR_DECODER_EXCLUDE, read_mar_folder
from fluid.tokenizers import MAR_SCALING_FACTOR, KLTokenizer

torch = pytest.importorskip("torch")

FIXTURE = Path(__file__).parent / "fixtures" / "mar_tiny.npz"
HEADS = 4  # mar_tiny.json's encoder_num_heads; width 32 is none of MAR's sizes


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def weights(fixture):
    """MAR's state dict (`w/` arrays), and a distinct one standing for its EMA."""
    raw = {k.removeprefix("w/"): v for k, v in fixture.items() if k.startswith("w/")}
    return raw, {k: (0.5 * v + 0.25).astype(np.float32) for k, v in raw.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights):
    return write_mar_checkpoint(tmp_path_factory.mktemp("mar") / "checkpoint-last.pth", *weights)


# -- MAR's model ---------------------------------------------------------------------------------
def test_convert_mar_through_the_cli_loads_without_torch(checkpoint, weights, tmp_path, capsys):
    out = tmp_path / "mar"
    assert main(["convert", "mar", str(checkpoint), str(out), "--num-heads", str(HEADS)]) == 0
    printed = capsys.readouterr().out
    assert "took 'model_ema'" in printed and "epoch 399" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.tmp-*"))
    # In a process where torch cannot be imported: the folder reads, equals the EMA state
    # dict saved, and loads into MAR's parts.
    code = f"""
import sys
sys.modules["torch"] = None
import numpy as np
from fluid.build import load_mar
from fluid.convert import read_mar_folder
folder = read_mar_folder({str(out)!r})
with np.load({str(FIXTURE)!r}) as data:
    raw = {{k[2:]: data[k] for k in data.files if k.startswith("w/")}}
assert sorted(folder.tensors) == sorted(raw)
for k, v in raw.items():
    np.testing.assert_array_equal(folder.tensors[k], (0.5 * v + 0.25).astype(np.float32))
    assert folder.tensors[k].dtype == np.float32
parts = load_mar(folder.tensors, **folder.load_kwargs)
np.testing.assert_array_equal(np.asarray(parts.labels.class_embed),
                              folder.tensors["class_emb.weight"])
assert "torch" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
print("ok", folder.config["weights"], folder.num_heads, parts.head.batch_mul)
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    # MAR's `args` gave the diffusion batch multiplier (2, not MAR's default 4).
    assert result.stdout.split() == ["ok", "model_ema", str(HEADS), "2"]
    # The same parts as MAR's state dict loaded directly.
    folder = read_mar_folder(out)
    config = folder.config
    assert config["format"] == "fluid-mar" and config["epoch"] == 399
    assert config["num_heads_from"] == "given"
    assert config["mar_args"]["model"] == "mar_base" and "output_dir" not in config["mar_args"]
    assert config["architecture"] == {
        "width": 32, "depth": 2, "decoder_depth": 2, "seq_len": 16, "buffer_size": 4,
        "token_dim": 8, "num_classes": 10, "mlp_ratio": 4.0, "head_width": 48, "head_depth": 2,
        "parameters": sum(v.size for v in weights[1].values()),
    }
    chex.assert_trees_all_equal(load_mar(folder.tensors, **folder.load_kwargs),
                                load_mar(weights[1], num_heads=HEADS, batch_mul=2))


@pytest.mark.parametrize("ask, has_ema, taken", [
    (None, True, "model_ema"),
    ("model", True, "model"),
    ("model_ema", True, "model_ema"),
    (None, False, "model"),  # MAR saves model_ema=None when it kept no EMA
])
def test_model_or_model_ema_as_asked(ask, has_ema, taken, weights, tmp_path, capsys):
    raw, ema = weights
    path = write_mar_checkpoint(tmp_path / "c.pth", raw, ema if has_ema else None)
    argv = ["convert", "mar", path, tmp_path / "out", "--num-heads", HEADS]
    assert main([str(a) for a in argv + (["--weights", ask] if ask else [])]) == 0
    assert f"took {taken!r}" in capsys.readouterr().out
    folder = read_mar_folder(tmp_path / "out")
    assert folder.config["weights"] == taken
    chex.assert_trees_all_equal(folder.tensors, raw if taken == "model" else ema)


def test_a_missing_model_ema_is_named(weights, tmp_path, capsys):
    path = write_mar_checkpoint(tmp_path / "c.pth", weights[0])
    says = user_error(capsys, ["convert", "mar", path, tmp_path / "out", "--num-heads", HEADS,
                               "--weights", "model_ema"])
    assert "has no 'model_ema' state dict" in says and "--weights model" in says
    assert not (tmp_path / "out").exists()


def test_heads_follow_mar_sizes_else_are_required(weights, tmp_path, capsys):
    # MAR-B's width: 12 heads without being told (one block each side keeps the file small).
    # By the width alone (the run's args name no model), or by MAR's args.model.
    path = write_mar_checkpoint(tmp_path / "b.pth", mar_state_dict(768),
                                args=argparse.Namespace(img_size=256))
    assert main(["convert", "mar", str(path), str(tmp_path / "b")]) == 0
    assert "12 heads (MAR's MAR-B, by the width 768)" in capsys.readouterr().out
    folder = read_mar_folder(tmp_path / "b")
    assert folder.num_heads == 12 and folder.config["weights"] == "model"
    assert folder.config["mar_args"] == {"img_size": 256}
    assert (folder.config["batch_mul"], folder.config["sampling_steps"]) == (4, 100)  # MAR's
    path = write_mar_checkpoint(tmp_path / "b2.pth", mar_state_dict(768))
    assert main(["convert", "mar", str(path), str(tmp_path / "b2")]) == 0
    assert "(MAR's MAR-B (the checkpoint's args.model 'mar_base'))" in capsys.readouterr().out
    assert load_mar(folder.tensors, **folder.load_kwargs).backbone.encoder.num_heads == 12
    # Any other width needs --num-heads, which must divide it.
    path = write_mar_checkpoint(tmp_path / "tiny.pth", weights[0])
    says = user_error(capsys, ["convert", "mar", path, tmp_path / "t"])
    assert "width 32 is none of MAR's released sizes" in says and "--num-heads" in says
    says = user_error(capsys, ["convert", "mar", path, tmp_path / "t", "--num-heads", 5])
    assert "must divide the width 32" in says
    assert not (tmp_path / "t").exists()


def test_foreign_truncated_and_damaged_files_exit_2(checkpoint, weights, tmp_path, capsys):
    data = checkpoint.read_bytes()
    files = {
        "cut.pth": data[: len(data) // 2],
        "cut_end.pth": data[:-10],
        "page.pth": b"<!DOCTYPE html>\n<html><body>Sign in to download</body></html>\n",
        "noise.pth": bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        "empty.pth": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 7, 7),
                          "fc.weight": torch.zeros(10, 8)}}, tmp_path / "resnet.pth")
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}},
               tmp_path / "vae.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"model": {**torch_state_dict(weights[0]), "extra": "text"}}, tmp_path / "odd.pth")
    expected = {
        "cut.pth": "truncated",
        "cut_end.pth": "truncated",
        "page.pth": "not a torch checkpoint.*web page",
        "noise.pth": "not a torch checkpoint",
        "empty.pth": "the file is empty",
        "absent.pth": "no such file",
        "resnet.pth": r"not MAR's state dict .*no z_proj.weight.* are conv1.weight, fc.weight",
        "vae.pth": r"not a MAR checkpoint: no 'model' or 'model_ema' state dict .*'state_dict'",
        "tensor.pth": "not a MAR checkpoint: it holds a torch.Tensor",
        "odd.pth": "'extra' is a str, not a tensor",
    }
    for name, pattern in expected.items():
        says = user_error(capsys, ["convert", "mar", tmp_path / name, tmp_path / "out",
                                   "--num-heads", HEADS])
        assert str(tmp_path / name) in says
        assert re.search(pattern, says), (name, says)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    # An output folder that exists is never written into.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    says = user_error(capsys, ["convert", "mar", checkpoint, tmp_path / "full",
                               "--num-heads", HEADS])
    assert "exists and is not an empty folder" in says
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


class Hostile:
    """Unpickling this runs `exec`, which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_nothing_is_unpickled_outside_torchs_safe_loader(weights, tmp_path, capsys):
    marker = tmp_path / "marker"
    # The pickle is sound: an unsafe loader runs it.
    with open(tmp_path / "probe.pkl", "wb") as f:
        pickle.dump(Hostile(tmp_path / "probe"), f, protocol=2)
    with open(tmp_path / "probe.pkl", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "probe").exists()
    # A plain pickle and torch's old format: refused, naming what the file asks to call.
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"model": Hostile(marker)}, f, protocol=2)
    torch.save({"model": torch_state_dict(weights[0]), "model_ema": Hostile(marker)},
               tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("plain.pth", "legacy.pth"):
        says = user_error(capsys, ["convert", "mar", tmp_path / name, tmp_path / "out",
                                   "--num-heads", HEADS])
        assert re.search(r"refused: the file asks to call (builtins\.)?exec\b", says)
        assert "nothing of it was run" in says
    # torch's zip format: the hostile object becomes an inert placeholder; as the whole
    # file it is refused, beside MAR's weights it is left out.
    torch.save(Hostile(marker), tmp_path / "alone.pth")
    says = user_error(capsys, ["convert", "mar", tmp_path / "alone.pth", tmp_path / "out",
                               "--num-heads", HEADS])
    assert "not a MAR checkpoint: it holds a builtins.exec" in says
    write_mar_checkpoint(tmp_path / "beside.pth", weights[0], hook=Hostile(marker))
    assert main(["convert", "mar", str(tmp_path / "beside.pth"), str(tmp_path / "out"),
                 "--num-heads", str(HEADS)]) == 0
    chex.assert_trees_all_equal(read_mar_folder(tmp_path / "out").tensors, weights[0])
    assert not marker.exists()


def test_read_mar_folder_names_what_is_wrong(checkpoint, tmp_path, capsys):
    good = tmp_path / "good"
    assert main(["convert", "mar", str(checkpoint), str(good), "--num-heads", str(HEADS)]) == 0

    def broken(name, change):
        folder = tmp_path / name
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        change(folder)
        return folder

    weights_file = lambda f: f / "model.safetensors"

    def flip_byte(f):
        data = bytearray(weights_file(f).read_bytes())
        data[-5] ^= 1
        weights_file(f).write_bytes(bytes(data))

    def edit_config(f, old, new):
        text = (f / "config.json").read_text()
        assert old in text
        (f / "config.json").write_text(text.replace(old, new))

    cases = {
        "no such folder": tmp_path / "absent",
        "no config.json, so not a folder": broken("noconfig", lambda f: (f / "config.json").unlink()),
        "config.json: not valid JSON": broken(
            "badjson", lambda f: (f / "config.json").write_text('{"format": "fluid-mar", ')),
        "a diffusers AutoencoderKL folder": broken("diffusers", lambda f: (
            f / "config.json").write_text('{"_class_name": "AutoencoderKL"}')),
        "a fluid run": broken("run", lambda f: (
            f / "config.json").write_text('{"model": {}, "data": {}, "steps": 3}')),
        r"model.safetensors: missing": broken("noweights", lambda f: weights_file(f).unlink()),
        "bytes instead of the": broken("cut", lambda f: weights_file(f).write_bytes(
            weights_file(good).read_bytes()[:-100])),
        "contents changed since it was written": broken("flipped", flip_byte),
        "the tensors' num_classes is 10, config.json says 11": broken(
            "arch", lambda f: edit_config(f, '"num_classes": 10', '"num_classes": 11')),
        "format version 7": broken(
            "version", lambda f: edit_config(f, '"format_version": 1', '"format_version": 7')),
    }
    for says, folder in cases.items():
        with pytest.raises((WeightError, FileNotFoundError), match=says):
            read_mar_folder(folder)
    assert read_mar_folder(good).num_heads == HEADS


# -- MAR's autoencoder ---------------------------------------------------------------------------
def test_convert_ldm_through_the_cli(fixture, tmp_path, capsys):
    vae = {k.removeprefix("vae/"): v for k, v in fixture.items() if k.startswith("vae/")}
    torch.save({"model": torch_state_dict(vae)}, tmp_path / "kl16.ckpt")
    # The scale is not in the file: the user states it, or --mar.
    for extra, says in (([], "give --scaling-factor"),
                        (["--mar", "--scaling-factor", "0.2"], "not both"),
                        (["--scaling-factor", "0"], "must be > 0")):
        assert says in user_error(
            capsys, ["convert", "ldm", tmp_path / "kl16.ckpt", tmp_path / "x", *extra])
    assert not (tmp_path / "x").exists()

    assert main(["convert", "ldm", str(tmp_path / "kl16.ckpt"), str(tmp_path / "mar"),
                 "--mar", "--sample-size", "32"]) == 0
    attention = [k for k in vae if re.match(MAR_DECODER_EXCLUDE, k)]
    assert attention  # the fixture's LDM decoder has level attention, which MAR's code ignores
    printed = capsys.readouterr().out
    assert f"leaving out {len(attention)} other tensors" in printed
    assert "latents scaled by 0.2325" in printed
    mar = KLTokenizer(image_size=32, path=tmp_path / "mar")
    assert mar.scaling_factor == MAR_SCALING_FACTOR
    assert mar.up_block_types == ("UpDecoderBlock2D",) * 2

    assert main(["convert", "ldm", str(tmp_path / "kl16.ckpt"), str(tmp_path / "sd"),
                 "--scaling-factor", "0.18215", "--sample-size", "32"]) == 0
    sd = KLTokenizer(image_size=32, path=tmp_path / "sd")
    assert sd.scaling_factor == pytest.approx(0.18215)
    assert "AttnUpDecoderBlock2D" in sd.up_block_types
    # A damaged file: one line, exit 2, as for MAR's model.
    (tmp_path / "page.ckpt").write_text("<html>not found</html>")
    assert "web page" in user_error(
        capsys, ["convert", "ldm", tmp_path / "page.ckpt", tmp_path / "y", "--mar"])


def test_convert_help(capsys):
    for argv, words in ((["convert", "--help"], ["mar", "ldm", "weights-only"]),
                        (["convert", "mar", "--help"], ["--weights", "model_ema", "--num-heads",
                                                        "MAR-B", "read_mar_folder"]),
                        (["convert", "ldm", "--help"], ["--scaling-factor", "--mar", "0.2325"])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), (argv, text)
