"""Run from a source checkout without an install (``python -m dynconv.autotune ...`` in the
tree's root): pyproject.toml's package-dir maps ``kernels/`` and ``autotune/`` onto
``dynconv.kernels`` and ``dynconv.autotune``. Where no installed finder does, importing this
module puts the tree's root on the package's search path, so that the same names resolve to the
same folders. An install (wheel or editable) is left alone."""

import importlib.util
import os
import sys


def map_source_tree(package: str) -> bool:
    """Whether the tree's root was added to ``package``'s ``__path__``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if (os.path.isfile(os.path.join(root, "pyproject.toml"))
            and os.path.isfile(os.path.join(root, "kernels", "__init__.py"))
            and importlib.util.find_spec(f"{package}.kernels") is None):
        sys.modules[package].__path__.append(root)
        return True
    return False


map_source_tree(__package__)
