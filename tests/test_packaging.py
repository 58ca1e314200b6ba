"""A plain (non-editable) install ships every package of the source tree.

setuptools installs only the packages pyproject lists; a sub-package added to the tree but not to
that list works in the editable dev install and is missing from a wheel (``import dynconv`` fails).
"""

import sys
from pathlib import Path

import pytest

if sys.version_info < (3, 11):
    pytest.skip("tomllib is Python 3.11+", allow_module_level=True)
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    package_dirs = config["package-dir"]
    on_disk = set()
    for package, directory in package_dirs.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / directory)
            if any(part.startswith((".", "__")) for part in relative.parts):
                continue
            on_disk.add(".".join((package, *relative.parts)))
    assert on_disk - listed == set(), f"packages missing from pyproject's list: {on_disk - listed}"
    assert listed - on_disk == set(), f"listed packages with no directory: {listed - on_disk}"
