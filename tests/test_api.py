"""The public API: every name `fluid` exports imports, cheaply; and no module of fluid reaches
into another package's private modules or names."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import fluid

ROOT = Path(fluid.__file__).resolve().parent
ERRORS = ["UserError", "ConfigError", "ConfigKeyError", "ConfigTypeError", "MissingInputError",
          "TrainingDiverged"]


@pytest.mark.parametrize("name", fluid.__all__)
def test_every_public_name_imports_from_its_module(name):
    value = getattr(fluid, name)
    if name in ERRORS:
        assert issubclass(value, fluid.UserError)
    else:
        assert value is getattr(importlib.import_module(fluid._LAZY[name]), name)


def test_the_public_lists_agree():
    assert sorted(fluid.__all__) == sorted([*ERRORS, *fluid._LAZY])
    # The names static tools see (`if TYPE_CHECKING:`) are those read lazily, from the same
    # modules.
    tree = ast.parse((ROOT / "__init__.py").read_text())
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) ==
                "TYPE_CHECKING"]
    static = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names:
            assert alias.asname == alias.name  # `X as X`: an explicit re-export
            static[alias.name] = f"fluid.{node.module}"
    assert static == fluid._LAZY
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fluid.nope  # noqa: B018


def test_import_fluid_loads_no_jax():
    code = "import sys, fluid; print('jax' in sys.modules, fluid.CONTINUOUS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "continuous"]


# -- private modules and names stay inside their package ----------------------------------
def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _owner(module: str) -> str | None:
    """The package whose internals `module` is (`fluid.nn` for `fluid.nn._init`; `fluid` for
    `fluid._types`, shared by all of fluid), or None for a public module."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            return ".".join(parts[:i])
    return None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports(root: Path):
    """`(file, module, source, name)` for every import of fluid in the package folder `root`,
    resolved to absolute names (`from ..nn import dense` in `fluid/backbones/_causal.py`:
    `("fluid/backbones/_causal.py", "fluid.backbones._causal", "fluid.nn", "dense")`)."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = ".".join(parts)
        else:
            package = ".".join(parts[:-1])
        module = ".".join(parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                targets = [(source, alias.name) for alias in node.names]
            else:
                continue
            for source, name in targets:
                if _within(source, "fluid"):
                    yield rel.as_posix(), module, source, name


def private_imports(root: Path) -> set[tuple[str, str]]:
    """`(file, what)` for every import under `root` (a `fluid` package folder) of another
    package's private module, or of a private name of a public module."""

    def is_module(name: str) -> bool:
        path = root.parent.joinpath(*name.split("."))
        return path.with_suffix(".py").exists() or (path / "__init__.py").exists()

    found = set()
    for rel, module, source, name in imports(root):
        if name is not None and is_module(f"{source}.{name}"):
            source, name = f"{source}.{name}", None
        owner = _owner(source)
        if owner is not None and not _within(module, owner):
            found.add((rel, source))
        elif name is not None and _private(name) and owner is None:
            found.add((rel, f"{source}.{name}"))
    return found


# -- layers (docs/architecture.md): a module imports its own layer and those below ---------
LAYERS = {
    "foundation": ["fluid._types", "fluid._errors", "fluid._registry", "fluid.config",
                   "fluid._overrides", "fluid._weights", "fluid._paths"],
    "nn": ["fluid.nn"],
    "components": ["fluid.tokenizers", "fluid.heads", "fluid.orders", "fluid.backbones",
                   "fluid.text", "fluid.data"],
    "model": ["fluid.model", "fluid.build", "fluid.presets", "fluid.sample", "fluid.viz",
              "fluid.convert"],
    "run folder": ["fluid.run", "fluid.pipeline"],
    "trainer": ["fluid.train"],
    "recipes": ["fluid.recipes"],
    "evaluation": ["fluid.eval"],
    "command line": ["fluid.cli", "fluid.__main__", "fluid.serve"],
}


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS.values()):
        if any(_within(module, p) for p in prefixes):
            return rank
    return None


def upward_imports(root: Path) -> set[tuple[str, str]]:
    """`(file, module it imports)` wherever a module imports one of a higher layer."""
    found = set()
    for rel, module, source, _ in imports(root):
        mine, theirs = layer_of(module), layer_of(source)
        if mine is not None and theirs is not None and theirs > mine:
            found.add((rel, source))
    return found


def test_every_module_has_a_layer():
    modules = {m for _, m, _, _ in imports(ROOT)} - {"fluid"}
    assert {m for m in modules if layer_of(m) is None} == set()


def test_no_module_imports_a_higher_layer():
    assert upward_imports(ROOT) == set()


def test_no_module_imports_another_packages_private_names():
    assert private_imports(ROOT) == set(), "imports of another package's private names"


def test_the_check_tells_internals_from_reaching_in(tmp_path):
    files = {
        "__init__.py": "",
        "_types.py": "K = 1\n",
        "config.py": "_hidden = 1\n",
        "a/__init__.py": "from ._x import f as f\n",
        "a/_x.py": "from .._types import K\n_g = 1\ndef f(): pass\n",
        "a/y.py": "from ._x import _g\nfrom . import _x\nimport fluid.a._x\n",
        "b/__init__.py": "",
        "b/z.py": ("from ..a._x import f\nfrom ..config import _hidden\nfrom ..a import f\n"
                   "def lazy():\n    import fluid.a._x\n"),
    }
    for name, text in files.items():
        (tmp_path / "fluid" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fluid" / name).write_text(text)
    assert private_imports(tmp_path / "fluid") == {
        ("fluid/b/z.py", "fluid.a._x"), ("fluid/b/z.py", "fluid.config._hidden"),
    }


def test_the_layer_check_finds_an_upward_import(tmp_path):
    files = {
        "__init__.py": "",
        "config.py": "",
        "nn/__init__.py": "from ..config import X\n",  # down: fine
        "heads/__init__.py": "from ..nn import dense\n",  # down: fine
        "model.py": "def lazy():\n    from .train import Trainer\n",  # up, even inside a function
        "train/__init__.py": "from ..model import FluidModel\nimport fluid.cli\n",  # one up
        "cli.py": "from .train import Trainer\n",
    }
    for name, text in files.items():
        (tmp_path / "fluid" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fluid" / name).write_text(text)
    assert upward_imports(tmp_path / "fluid") == {
        ("fluid/model.py", "fluid.train"),
        ("fluid/train/__init__.py", "fluid.cli"),
    }


# -- components are told apart by what they declare, never by the name they are registered as
def name_checks(root: Path) -> set[tuple[str, str]]:
    """`(file, comparison)` wherever a `.name` is compared with a string (or a collection
    of them) outside the registry: `spec.name == "t5"`."""
    found = set()
    for path in sorted(root.rglob("*.py")):
        if path.name == "_registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any(isinstance(s, ast.Attribute) and s.attr == "name" for s in sides)
            text = any(isinstance(s, ast.Constant) and isinstance(s.value, str)
                       or isinstance(s, ast.Tuple | ast.List | ast.Set) for s in sides)
            if named and text:
                found.add((path.relative_to(root.parent).as_posix(), ast.unparse(node)))
    return found


def test_no_component_is_told_by_its_name_outside_the_registry(tmp_path):
    assert name_checks(ROOT) == set()
    (tmp_path / "fluid").mkdir()
    (tmp_path / "fluid" / "x.py").write_text(
        "a = spec.name == 't5'\nb = config.model.tokenizer.name in ('kl', 'vq')\nc = n == 't5'\n"
    )
    assert name_checks(tmp_path / "fluid") == {
        ("fluid/x.py", "spec.name == 't5'"),
        ("fluid/x.py", "config.model.tokenizer.name in ('kl', 'vq')"),
    }
