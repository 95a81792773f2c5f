"""Fake installed distributions: a `*.dist-info` folder on `sys.path`, as pip would leave."""

import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN_HEAD = REPO / "examples" / "plugin_head"


def make_distribution(
    root: Path,
    name: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str] | None = None,
    version: str = "0.1.0",
) -> Path:
    """Write `name`'s metadata (and module sources) under `root`; return `root`."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source)
    return root


def expose_plugin_head(root: Path) -> None:
    """Make `examples/plugin_head` importable and discoverable, from its own pyproject.toml."""
    project = tomllib.loads((PLUGIN_HEAD / "pyproject.toml").read_text())["project"]
    make_distribution(root, project["name"], project["entry-points"], version=project["version"])
    for path in (str(root), str(PLUGIN_HEAD)):
        if path not in sys.path:
            sys.path.insert(0, path)
