"""The README's example runs as written, and its backends table lists the registry's backends."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, str(readme), "exec"), {"__name__": "readme_example"})


def _backends_table(text: str) -> list[str]:
    """The names in the first column of README.md's table headed ``| backend | ... |``."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if re.match(r"\|\s*backend\s*\|", line))
    names = []
    for line in lines[header + 2:]:  # after the |---| separator
        if not line.startswith("|"):
            break
        first_cell = line.split("|")[1]
        names += re.findall(r'`"(\w+)"`', first_cell)
    return names


def test_readme_backends_table_matches_the_registry():
    from dynconv.backends.registry import BACKEND_NAMES

    readme = Path(__file__).resolve().parents[1] / "README.md"
    names = _backends_table(readme.read_text())
    assert len(names) == len(set(names)), f"a backend is listed twice: {names}"
    assert set(names) == set(BACKEND_NAMES), (
        f"README backends table {sorted(names)} != registry {sorted(BACKEND_NAMES)}"
    )
