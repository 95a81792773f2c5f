"""The command line: train, resume by running again, sample from a run or a checkpoint."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import user_error
from PIL import Image

import fluid
from fluid.cli import main
from fluid.run import RunFolder
from fluid.train import load_model

TINY = ["model.backbone.depth=1", "data.fit_images=16", "checkpoint_every=2", "sample_steps=2"]


def test_train_resume_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny-fluid", "--out", str(run), "steps=2", *TINY]) == 0
    assert main(["train", "tiny-fluid", "--out", str(run), "steps=3", *TINY]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    # Every file `fluid train` wrote is one its run folder's layout names.
    folder = RunFolder(run)
    assert set(run.iterdir()) == {
        folder.config, folder.text_tokenizer, folder.text_tokenizer_record, folder.metrics,
        folder.tensorboard, folder.checkpoints, folder.model, folder.model_info, folder.samples,
        folder.loss_curve, folder.summary,
    }
    summary = json.loads(folder.summary.read_text())
    assert (summary["samples"], summary["model"]) == (str(folder.samples), str(folder.model))

    # The saved final model and the last checkpoint's EMA weights are the same arrays.
    saved, _, config = load_model(run)
    from_checkpoint, _, config2 = load_model(run / "checkpoints" / "3")
    assert config == config2 and config.steps == 3
    for a, b in zip(jax.tree.leaves(eqx.filter(saved, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(from_checkpoint, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    grid = tmp_path / "grid.png"
    capsys.readouterr()
    assert main(["sample", str(run / "checkpoints" / "2"), "--prompt", "a red circle",
                 "--prompt", "a blue square", "--out", str(grid), "--steps", "2"]) == 0
    assert "sampling" in capsys.readouterr().err  # the progress bar over batches
    image = np.asarray(Image.open(grid))
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two tiles side by side
    # Prompts from a file, several images each, one PNG per image; from a pretrained folder
    # the same images as from the run, and as the Python pipeline gives.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    pretrained = fluid.load(run).save_pretrained(tmp_path / "pretrained")
    for source, images in ((run, tmp_path / "from_run"), (pretrained, tmp_path / "from_folder")):
        assert main(["sample", str(source), "--prompts-file", str(prompts), "--per-prompt", "2",
                     "--images-dir", str(images), "--out", str(tmp_path / "g.png"),
                     "--steps", "2", "--seed", "5"]) == 0
    written = sorted(p.name for p in (tmp_path / "from_run").iterdir())
    assert written == ["0000.png", "0001.png", "0002.png", "0003.png"]
    pipe = fluid.load(pretrained)(["a red circle", "a blue square"], num_images_per_prompt=2,
                                  seed=5, steps=2)
    for i, name in enumerate(written):
        a = np.asarray(Image.open(tmp_path / "from_run" / name))
        np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "from_folder" / name)))
        np.testing.assert_array_equal(a, np.asarray(pipe[i]))
    # --batch-size: batches of the pipeline's batch_size (batch b > 0 with its own key).
    assert main(["sample", str(pretrained), "--prompts-file", str(prompts), "--per-prompt", "2",
                 "--images-dir", str(tmp_path / "batched"), "--out", str(tmp_path / "g.png"),
                 "--steps", "2", "--seed", "5", "--batch-size", "3"]) == 0
    batched = fluid.load(pretrained)(["a red circle", "a blue square"], num_images_per_prompt=2,
                                     seed=5, steps=2, batch_size=3)
    for i, name in enumerate(written):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "batched" / name)),
                                      np.asarray(batched[i]))
    assert not np.array_equal(np.asarray(batched[3]), np.asarray(pipe[3]))  # its own key
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "has no prompt" in user_error(
        capsys, ["sample", str(run), "--prompts-file", str(empty)]
    )
    assert "cannot read the prompts file" in user_error(
        capsys, ["sample", str(run), "--prompts-file", str(tmp_path / "absent.txt")]
    )
    # More steps than the model has tokens: refused with the range, nothing sampled or saved.
    assert "give --steps between 1 and" in user_error(
        capsys, ["sample", str(run), "--prompt", "x", "--out", str(tmp_path / "no.png"),
                 "--steps", "1000"]
    )
    assert not (tmp_path / "no.png").exists()
    # A text model takes captions, not classes.
    assert "text-conditional model" in user_error(
        capsys, ["sample", str(run), "--class", "3", "--out", str(tmp_path / "no.png")]
    )


# A class-conditional model as MAR's, composed by overrides: captions are class ids.
CLASS_LABELS = [('model.text_encoder={"name": "class_labels", "kwargs": {"num_classes": 3, '
                 '"dim": 32}}'), "model.text_len=2"]


def test_a_class_conditional_run_samples_classes_by_id_or_name(tmp_path, capsys):
    data = tmp_path / "data"
    for label, name in enumerate(("cat", "dog", "fox")):
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (80 * label, 40 * i, 200)).save(data / name / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "tiny-fluid", "--out", str(run), "steps=2", *TINY, *CLASS_LABELS,
                 "data.dataset=imagefolder", f"data.path={data}"]) == 0
    capsys.readouterr()
    grids = {}
    for way, argv in {"ids": ["--class", "1", "--class", "2"],
                      "names": ["--class", "dog", "--class", "fox"],
                      "prompts": ["--prompt", "1", "--prompt", "2"]}.items():
        grids[way] = tmp_path / f"{way}.png"
        assert main(["sample", str(run), *argv, "--out", str(grids[way]), "--steps", "2"]) == 0
        assert str(grids[way]) in capsys.readouterr().out
    image = np.asarray(Image.open(grids["ids"]))
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two tiles side by side
    # A name is its folder's id (sorted: cat 0, dog 1, fox 2), and a class-id prompt the
    # class: the same seed draws the same grid, captioned "1 dog", "2 fox".
    assert grids["ids"].read_bytes() == grids["names"].read_bytes()
    assert grids["ids"].read_bytes() == grids["prompts"].read_bytes()
    for argv, says in [
        (["--class", "3"], "class 3 is out of range: the model has 3 classes, 0 to 2"),
        (["--class", "wolf"], "no class named 'wolf'"),
        (["--class", "1", "--prompt", "1"], "not both"),
        ([], "give --prompt"),
        (["--prompt", "a red circle"], "class-conditional model (3 classes), not a text one"),
        (["--prompt", "7"], "class 7 is out of range"),
    ]:
        assert says in user_error(
            capsys, ["sample", str(run), *argv, "--out", str(tmp_path / "no.png")])
    assert not (tmp_path / "no.png").exists()


def test_sample_from_a_directory_without_a_model_names_what_it_needs(tmp_path, capsys):
    assert "checkpoints/<step>" in user_error(
        capsys, ["sample", str(tmp_path), "--prompt", "a red circle"]
    )
    # `--debug` (or FLUID_DEBUG=1) shows the exception itself.
    with pytest.raises(FileNotFoundError, match="checkpoints/<step>"):
        main(["sample", str(tmp_path), "--prompt", "a red circle", "--debug"])


def test_override_typo_stops_with_the_closest_key(tmp_path, capsys, monkeypatch):
    assert "Did you mean 'grad_accum'" in user_error(
        capsys, ["train", "tiny-fluid", "--out", str(tmp_path), "grad_acum=2"]
    )
    monkeypatch.setenv("FLUID_DEBUG", "1")
    with pytest.raises(KeyError, match="Did you mean 'grad_accum'"):
        main(["train", "tiny-fluid", "--out", str(tmp_path), "grad_acum=2"])


@pytest.mark.parametrize(
    "argv, says",
    [
        (["train", "tiny-fluid", "optim.learning_rate=-1"], "optim.learning_rate must be > 0"),
        (["train", "tiny-fluid", "--dry-run", "grad_accum=3"], "grad_accum=3"),
        (["train", "no-such-preset"], "unknown preset"),
        (["train", "tiny-fluid", "model.head.kwargs.widht=8"], "Did you mean 'width'"),
        (["sample", "RUN", "--prompt", "x", "--out", "grid.txt"], "must end in one of"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, says, tmp_path, capsys):
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    assert says in user_error(capsys, argv)


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    # Only user errors are shortened to one line; a bug anywhere else surfaces whole.
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("fluid.cli.cmd_presets", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["presets"])


def test_warnings_print_as_one_line(monkeypatch, capsys):
    import warnings

    def warns(args):
        warnings.warn("the data is odd", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr("fluid.cli.cmd_presets", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["presets"]) == 0
    assert capsys.readouterr().err.strip() == "warning: the data is odd"


@pytest.mark.parametrize("option", [["--steps", "0"], ["--temperature", "-1"], ["--cfg", "-5"]])
def test_sample_refuses_out_of_range_options_before_loading(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse: status 2, the range in the message
        main(["sample", str(tmp_path), "--prompt", "x", *option])
    assert stop.value.code == 2
    assert "must be at least" in capsys.readouterr().err


def test_a_whole_component_spec_overrides_from_json():
    from fluid.config import ComponentSpec
    from fluid.presets import get_config

    spec = '{"name": "kl", "kwargs": {"path": "vae/", "image_size": 32, "patch_size": 2}}'
    config = get_config("shapes-fluid", **{"model.tokenizer": spec})
    assert config.model.tokenizer == ComponentSpec(
        name="kl", kwargs={"path": "vae/", "image_size": 32, "patch_size": 2}
    )
    with pytest.raises(TypeError, match="takes a component name"):
        get_config("shapes-fluid", **{"model.tokenizer": '{"nme": "kl"}'})


def test_an_over_long_prompt_is_warned_about_with_its_length():
    from fluid.data.shapes import ShapesDataset
    from fluid.recipes import make_text_tokenizer
    from fluid.sample import warn_truncated

    tokenizer = make_text_tokenizer(ShapesDataset(16), vocab_size=64)
    short, long = "a red circle", " ".join(["a red circle left of a blue square"] * 4)
    warn_truncated(tokenizer, [short], 16)  # fits: nothing said
    with pytest.warns(UserWarning, match=r"longer than the 16 tokens.*\(\d+ tokens\)") as seen:
        warn_truncated(tokenizer, [short, long], 16)
    assert short not in str(seen[0].message).split(":", 1)[1].replace(long, "")
