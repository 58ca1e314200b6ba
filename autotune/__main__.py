"""``python -m dynconv.autotune <command> [args]``: dispatch to one tool module per command."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "compile-check": "dynconv.autotune.compile_check",
    "bench": "dynconv.autotune.bench",
    "report": "dynconv.autotune.report",
    "sweep": "dynconv.autotune.sweep",
    "gpu-check": "dynconv.autotune.gpu_check",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: python -m dynconv.autotune {{{names}}} [--help]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
