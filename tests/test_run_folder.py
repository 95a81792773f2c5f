"""The run folder (`fluid.run`): below the trainer and evaluation, the one place that names its
files, and what a short training run writes there is what its layout names."""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import chex
import equinox as eqx
import optax
import pytest

import fluid
from fluid.eval import default_out_dir
from fluid.presets import get_config
from fluid.recipes import prepare
from fluid.run import (
    CheckpointManager,
    EvalReport,
    RunFolder,
    find_weights,
    load_model,
    read_model_info,
)

PACKAGE = Path(fluid.__file__).parent


def _modules_loaded_by(statement: str) -> list[str]:
    """The `fluid` modules in `sys.modules` after running `statement` in a fresh process."""
    listing = "print('\\n'.join(m for m in sys.modules if m.startswith('fluid')))"
    code = f"import sys\n{statement}\n{listing}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return done.stdout.split()


def test_run_package_imports_neither_train_nor_eval():
    modules = sorted(p.stem for p in (PACKAGE / "run").glob("*.py") if p.stem != "__init__")
    assert {"_checkpoint", "_layout", "_load"} <= set(modules)
    loaded = _modules_loaded_by("\n".join(f"import fluid.run.{m}" for m in modules))
    assert "fluid.run._load" in loaded  # the check sees what it imported
    above = [m for m in loaded if m.split(".")[:2] in (["fluid", "train"], ["fluid", "eval"],
                                                      ["fluid", "cli"])]
    assert above == []


def test_train_does_not_import_eval():
    # `fluid.eval` holds the sweep, which trains: it sits above the trainer, never below.
    loaded = _modules_loaded_by("import fluid.train")
    assert "fluid.train._trainer" in loaded and "fluid.run" in loaded
    assert [m for m in loaded if m.startswith("fluid.eval")] == []


def _layout_names() -> set[str]:
    """The first path component of everything `RunFolder` and `EvalReport` name."""
    root = Path("root")
    paths = []
    for cls, methods in ((RunFolder, ("checkpoint", "sample_grid", "eval_of")), (EvalReport, ())):
        layout = cls(root)
        for name, value in vars(cls).items():
            if isinstance(value, property):
                paths.append(getattr(layout, name))
        paths += [getattr(layout, m)(1) for m in methods]
    return {p.relative_to(root).parts[0] for p in paths}


def test_layout_names_every_file_of_a_run():
    assert _layout_names() >= {
        "config.json", "text_tokenizer.model", "metrics.jsonl", "tensorboard", "checkpoints",
        "samples", "model.eqx", "model.json", "tokenizer", "samples.png", "loss.png",
        "summary.json", "eval", "eval.json", "eval.md",
    }


def _bare_names(path: Path, names: set[str]) -> list[str]:
    """Where `path`'s code joins a path with a run-folder name (`out / "metrics.jsonl"`) or
    spells a file name of the layout (one with a dot) as a string of its own."""
    tree = ast.parse(path.read_text())
    # Docstrings, and argparse defaults (`fluid sample --out samples.png` names a file in the
    # working directory, not in a run folder), are not run-folder paths.
    skipped = {
        id(node.value) for node in ast.walk(tree)
        if isinstance(node, (ast.Expr, ast.keyword)) and isinstance(node.value, ast.Constant)
        and (isinstance(node, ast.Expr) or node.arg == "default")
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in names:
                found.append(f"{path.name}:{node.lineno}: / {right.value!r}")
        elif (isinstance(node, ast.Constant) and id(node) not in skipped
              and isinstance(node.value, str) and "." in node.value and node.value in names):
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    return found


def test_no_module_spells_a_run_folder_name_itself(tmp_path):
    # The modules that write or read run folders. (The tokenizers, the T5 encoder and
    # `fluid._weights` read `config.json` of Hugging Face and diffusers folders: theirs.)
    names = _layout_names()
    files = [*(PACKAGE / "run").glob("*.py"), *(PACKAGE / "train").glob("*.py"),
             *(PACKAGE / "recipes").glob("*.py"), *(PACKAGE / "eval").glob("*.py"), PACKAGE / "cli.py", PACKAGE / "sample.py",
             PACKAGE / "viz.py"]
    files = [f for f in files if f != PACKAGE / "run" / "_layout.py"]
    assert PACKAGE / "train" / "_trainer.py" in files
    assert PACKAGE / "recipes" / "_generate.py" in files
    found = [hit for f in files for hit in _bare_names(f, names)]
    assert found == []
    # The scan finds what it is for.
    sample = tmp_path / "sample.py"
    sample.write_text('"""model.eqx"""\nlog = run / "metrics.jsonl"\nname = "model.eqx"\n')
    assert {hit.split(":")[1] for hit in _bare_names(sample, names)} == {"2", "3"}


def _arrays(tree):
    return eqx.filter(tree, eqx.is_array)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of a one-block tiny-fluid with SGD (not the config's AdamW), saved."""
    out = tmp_path_factory.mktemp("run")
    config = get_config("tiny-fluid", **{"model.backbone.depth": 1, "data.fit_images": 16})
    config = dataclasses.replace(config, steps=2, checkpoint_every=1, sample_every=2,
                                 sample_steps=2)
    trainer = prepare(config, out_dir=out, progress=False, optimizer=optax.sgd(1e-2))
    trainer.run()
    trainer.save()
    return out, trainer


def test_training_writes_the_layout(trained):
    out, trainer = trained
    folder = RunFolder(out)
    assert trainer.folder == folder
    written = {
        folder.config, folder.text_tokenizer, folder.text_tokenizer_record, folder.metrics,
        folder.tensorboard,
        folder.checkpoints, folder.sample_grids, folder.model, folder.model_info,
    }
    assert set(out.iterdir()) == written
    assert set(folder.checkpoints.iterdir()) == {folder.checkpoint(1), folder.checkpoint(2)}
    assert trainer.checkpoint() == folder.checkpoint(2)
    assert set(folder.sample_grids.iterdir()) == {folder.sample_grid(2)}
    assert [json.loads(line)["step"] for line in folder.metrics.read_text().splitlines()] == [1, 2]
    assert read_model_info(folder.model)["step"] == 2
    assert RunFolder.of_checkpoint(folder.checkpoint(2)) == (folder, 2)
    assert RunFolder.of_checkpoint(out) is None
    assert default_out_dir(folder.checkpoint(2)) == folder.eval_of(2)
    assert default_out_dir(out) == folder.eval
    weights = find_weights(out)
    assert (weights.kind, weights.path, weights.step) == ("model", folder.model, 2)
    with CheckpointManager(folder.checkpoints, keep=None) as manager:
        assert Path(str(manager.step_directory(2))) == folder.checkpoint(2)
        names = manager.saved_leaves(2)
    # What `load_model` reads a model from, beside the optimiser's state.
    assert {n.split(".")[0] for n in names} == {"state", "frozen"}
    assert any(n.startswith("state.ema.") for n in names)
    assert any(n.startswith("state.params.") for n in names)


def test_a_checkpoint_loads_without_its_optimiser(trained):
    # The run trained with SGD; the config's AdamW state would not fit its checkpoint.
    out, trainer = trained
    folder = RunFolder(out)
    ema, _, config = load_model(folder.checkpoint(2))
    raw, _, _ = load_model(folder.checkpoint(2), ema=False)
    saved, _, _ = load_model(out)
    assert config == trainer.config
    chex.assert_trees_all_equal(_arrays(ema), _arrays(trainer.model(ema=True)))
    chex.assert_trees_all_equal(_arrays(raw), _arrays(trainer.model(ema=False)))
    chex.assert_trees_all_equal(_arrays(saved), _arrays(ema))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(_arrays(raw), _arrays(ema))
    earlier, _, _ = load_model(folder.checkpoint(1))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(_arrays(earlier), _arrays(ema))


def test_checkpoint_names_are_the_rules_names(trained):
    # The names a checkpoint stores are the names the trainer's rules match.
    from fluid.run import named_leaves
    from fluid.train import _rules

    _, trainer = trained
    tree = {"state": trainer.trainer.state, "frozen": trainer.trainer.frozen}
    names = [name for name, _ in named_leaves(tree)]
    assert names == [name for name, _ in _rules.named_leaves(tree)]
    assert len(set(names)) == len(names)
