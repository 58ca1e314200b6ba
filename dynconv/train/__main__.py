"""``python -m dynconv.train``: see :mod:`dynconv.train.cli`."""

from .cli import main

raise SystemExit(main())
