"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_compose_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md lost its Python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "(1, 32, 32, 3)" in capsys.readouterr().out
