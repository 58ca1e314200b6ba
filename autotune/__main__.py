"""``python -m dynconv.autotune <command> [args]`` (also the ``dynconv-autotune`` script):
dispatch to one tool module per command; ``<command> --help`` tells each one's options."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "compile-check": "dynconv.autotune.compile_check",
    "bench": "dynconv.autotune.bench",
    "report": "dynconv.autotune.report",
    "sweep": "dynconv.autotune.sweep",
    "gpu-check": "dynconv.autotune.gpu_check",
    "cpu-formulations": "dynconv.autotune.cpu_formulations",
    "roofline": "dynconv.autotune.roofline",
    "onnx": "dynconv.autotune.onnx_bench",
}
SUMMARIES = {
    "compile-check": "compile every launched Triton kernel specialisation for sm_80 / sm_90 "
                     "(no GPU)",
    "bench": "time fwd / bwd / fwd+bwd and peak memory of each provider vs the static conv",
    "report": "turn bench CSVs into PNG plots and a summary.md",
    "sweep": "autotune the Triton kernels over a shape set; write the per-GPU tuned table",
    "gpu-check": "on a GPU machine, within 7 minutes: precompile, correctness, decisive timings",
    "cpu-formulations": "time the native backend's CPU formulations (its rule's evidence)",
    "roofline": "H200 roofline model: each strategy's bound per layer vs the static conv (no GPU)",
    "onnx": "time the ONNX export forms in onnxruntime CPU vs the static model's export",
}


def usage() -> str:
    lines = ["usage: python -m dynconv.autotune <command> [--help] [args]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:{width}s}  {SUMMARIES[name]}" for name in COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}; expected one of {list(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
