"""The README's examples work as written: its Python example runs, and every `fluid` command
it shows is accepted.

Commands that train (`train`, `train-tokenizer`, `demo`, `sweep`) run with `--dry-run`, which
resolves the preset and every override, opens the data and builds every part (reading the
files the command names) without training: what a wrong key, name or path would break.
Commands that read a run (`sample`, `eval`, `serve`: its server stopped once it listens) run
for real on a tiny run made here, with the README's placeholders filled in (`<class run>`: a
class-conditional run). The files the
commands name (`imgs/`, `sd-vae/`, `flan-t5-small/`, `clip-vit-b32/`, `runs/kl32/tokenizer`,
`imagenet/train/`, MAR's `checkpoint-last.pth` and `kl16.ckpt`) are made here, tiny and random.
"""

import importlib.util
import re
import shlex
from pathlib import Path

import jax.random as jr
import numpy as np
import pytest
from PIL import Image

from fluid.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
# Commands named in prose ("`fluid train` calls ..."), which need arguments to run.
NAMES_ONLY = {"fluid train", "fluid sample", "fluid eval", "fluid train-tokenizer",
              "fluid convert", "fluid serve"}


def test_readme_compose_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md lost its Python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "(1, 32, 32, 3)" in capsys.readouterr().out


def readme_commands(text: str) -> list[str]:
    """Every `fluid ...` command of the README: lines of its shell blocks (continuations
    joined, `pip install ... &&` prefixes and `# comments` dropped) and inline code spans."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = line.split("&&")[-1].strip()
            if line.startswith("fluid "):
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span in NAMES_ONLY:
            continue
        # Usage summaries (`fluid train <preset> [dotted.key=value ...]`) are not commands.
        if span.startswith("fluid ") and "[" not in span and "..." not in span:
            commands.append(span)
    return list(dict.fromkeys(commands))


def test_readme_commands_are_found():
    commands = readme_commands(README.read_text())
    # The extractor itself: a change of README syntax must not empty the test below.
    assert "fluid demo" in commands
    assert any(c.startswith("fluid train-tokenizer ") for c in commands)
    assert any("data.dataset=folder" in c for c in commands)
    assert len(commands) >= 10, commands


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory):
    """A working directory holding every file the README's commands name, and a tiny run."""
    from helpers import write_tiny_clip_folder, write_tiny_t5_folder

    from fluid.tokenizers import KLTokenizer

    root = tmp_path_factory.mktemp("readme")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red circle", "a blue square", "two green triangles"]):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "imgs" / f"{i}.png")
        (root / "imgs" / f"{i}.txt").write_text(caption)
    vae = KLTokenizer(32, patch_size=2, key=jr.key(0))
    vae.save_pretrained(root / "sd-vae")
    vae.save_pretrained(root / "runs" / "kl32" / "tokenizer")
    write_tiny_t5_folder(root / "flan-t5-small")
    write_tiny_clip_folder(root / "clip-vit-b32")
    run = root / "runs" / "tiny"
    tiny = ["steps=2", "checkpoint_every=1", "model.backbone.depth=1", "data.fit_images=16",
            "sample_steps=2"]
    assert main(["train", "tiny-fluid", "--out", str(run), *tiny]) == 0
    # Class folders named as ImageNet's, and a class-conditional run trained on them.
    for name in ("n01440764", "n01443537", "n01484850"):
        (root / "imagenet" / "train" / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "imagenet" / "train" / name / f"{i}.png")
    assert main(["train", "tiny-fluid", "--out", str(root / "runs" / "classes"), *tiny,
                 "data.dataset=imagefolder", f"data.path={root / 'imagenet' / 'train'}",
                 ('model.text_encoder={"name": "class_labels", "kwargs": {"num_classes": 1000, '
                  '"dim": 32}}'), "model.text_len=2"]) == 0
    # MAR's checkpoint (MAR-B's width, one block each side) and its autoencoder, pickled.
    if importlib.util.find_spec("torch") is not None:
        import torch
        from helpers import mar_state_dict, torch_state_dict, write_mar_checkpoint

        write_mar_checkpoint(root / "checkpoint-last.pth", mar_state_dict(768))
        with np.load(Path(__file__).parent / "fixtures" / "mar_tiny.npz") as data:
            vae = {k[4:]: data[k] for k in data.files if k.startswith("vae/")}
        torch.save({"model": torch_state_dict(vae)}, root / "kl16.ckpt")
    return root, run


def _argv(command: str, run: Path) -> list[str]:
    # The README's placeholder, filled in.
    preset = "tiny-tokenizer-kl" if command.startswith("fluid train-tokenizer") else "tiny-fluid"
    command = command.replace("<run dir or checkpoint>", shlex.quote(str(run)))
    command = command.replace("<class run>", shlex.quote(str(run.parent / "classes")))
    argv = shlex.split(command.replace("<preset>", preset))[1:]
    assert not any("<" in a for a in argv), f"unknown placeholder in `{command}`"
    if argv[0] in ("train", "train-tokenizer", "demo", "sweep"):
        return [*argv, "--dry-run"]
    if argv[0] == "sample":
        return [*argv, "--steps", "2"]
    if argv[0] == "eval":
        return [*argv, "--samples", "6", "--min-count", "2", "--validation-examples", "4"]
    return argv


@pytest.mark.parametrize("command", readme_commands(README.read_text()))
def test_readme_command_is_accepted(command, readme_world, monkeypatch, capsys):
    root, run = readme_world
    monkeypatch.chdir(root)
    argv = _argv(command, run)
    if argv[0] == "convert":  # reading pickles needs torch, the `reference` extra
        pytest.importorskip("torch")
    if argv[0] == "serve":  # the real server on a free port, stopped as Ctrl-C would
        import fluid.serve

        def stop(url):
            raise KeyboardInterrupt

        real = fluid.serve.serve
        monkeypatch.setattr(fluid.serve, "serve",
                            lambda pipeline, **kw: real(pipeline, **{**kw, "port": 0,
                                                                     "ready": stop}))
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"`{command}` ({argv}) failed:\n{captured.err}"
    if "--dry-run" in argv:
        assert "dry run: nothing trained" in captured.out
    if argv[0] in ("sample", "eval"):  # which weights were read, and from which step
        assert "step 2 from the " in captured.out, captured.out
    if argv[0] == "serve":
        assert captured.out.strip().endswith("stopped"), captured.out
