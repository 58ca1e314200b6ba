"""``python -m dynconv.autotune compile-check``: compile every kernel x config for sm_80 / sm_90.

No GPU is needed: ``triton.compile`` builds the cubin for a ``GPUTarget``, and the cubin's
registers, spill stack and shared memory are read with the ``cuobjdump`` shipped in Triton's
wheel (``--dump-resource-usage``); Triton's own ``shared`` metadata is the fallback for shared
memory. Kernels are discovered by iterating the modules of ``dynconv.kernels`` and calling each
module-level ``compile_cases()`` (a list of ``dynconv.kernels.configs.CompileCase``).

Exit status: 0 when every case compiles, spills nothing and fits the target's shared memory;
1 otherwise (the table says which case failed and why).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

TARGETS = (80, 90)


@dataclass
class Result:
    name: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None  # STACK + LOCAL from cuobjdump
    shared_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None

    def problems(self, shared_limit: int) -> list[str]:
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes")
        if self.shared_bytes is not None and self.shared_bytes > shared_limit:
            out.append(f"shared memory {self.shared_bytes} > limit {shared_limit}")
        return out


def discover_cases(only: str | None = None):
    """(module name, index, CompileCase) for every ``compile_cases()`` in ``dynconv.kernels``.

    ``only`` is a regular expression that the case names must match.
    """
    import dynconv.kernels as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        make = getattr(module, "compile_cases", None)
        if make is None:
            continue
        for index, case in enumerate(make()):
            if only is None or re.search(only, case.name):
                found.append((module.__name__, index, case))
    return found


def cuobjdump_path() -> str | None:
    """The cuobjdump of Triton's wheel, else one on PATH."""
    import triton

    candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("cuobjdump")


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> tuple[int, int, int]:
    """(registers, spill bytes, static shared bytes) from ``cuobjdump --dump-resource-usage``."""
    match = _USAGE.search(text)
    if match is None:
        raise ValueError(f"no resource usage line in cuobjdump output: {text[:200]!r}")
    registers, stack, shared, local = (int(v) for v in match.groups())
    return registers, stack + local, shared


def divisibility_attrs(case) -> dict:
    """Triton's ``attrs`` for the case's arguments that are multiples of 16 (none by default)."""
    names = getattr(case, "divisible", ())
    if not names:
        return {}
    from triton.backends.compiler import BaseBackend

    parse = getattr(BaseBackend, "parse_attr", None)
    attr = parse("D") if parse is not None else [["tt.divisibility", 16]]
    arg_names = list(case.kernel.arg_names)
    return {(arg_names.index(name),): attr for name in names}


def compile_one(module_name: str, index: int, arch: int) -> Result:
    """Compile case ``index`` of ``module_name.compile_cases()`` for sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(module_name)
    case = module.compile_cases()[index]
    result = Result(case.name, arch)
    start = time.perf_counter()
    try:
        source = ASTSource(case.kernel, case.signature, case.constexprs,
                           divisibility_attrs(case))
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
    except Exception as exc:  # any compiler failure is reported, not raised
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    # The dynamic shared memory the kernel is launched with: what Triton checks against the
    # device's opt-in limit at launch.
    result.shared_bytes = int(compiled.metadata.shared)
    tool = cuobjdump_path()
    if tool is None:
        result.error = "cuobjdump not found (looked in triton/backends/nvidia/bin and PATH)"
        return result
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        run = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=False)
    try:
        registers, spills, static_shared = parse_resource_usage(run.stdout)
    except ValueError as exc:
        result.error = str(exc)
        return result
    del static_shared  # the per-block reservation of sm_90, outside the opt-in limit
    result.registers, result.spill_bytes = registers, spills
    return result


def shared_limit(arch: int) -> int:
    from dynconv.kernels.configs import SHARED_MEMORY_LIMITS

    return SHARED_MEMORY_LIMITS[arch]


HEADER = f"{'case':<52} {'sm':>3} {'regs':>5} {'spill':>6} {'shared':>7} {'s':>5}  status"


def format_row(r: Result) -> str:
    problems = r.problems(shared_limit(r.arch))
    status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    regs = "-" if r.registers is None else str(r.registers)
    spill = "-" if r.spill_bytes is None else str(r.spill_bytes)
    shared = "-" if r.shared_bytes is None else str(r.shared_bytes)
    return f"{r.name:<52} {r.arch:>3} {regs:>5} {spill:>6} {shared:>7} {r.seconds:>5.1f}  {status}"


def format_table(results: list[Result]) -> str:
    return "\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in results])


class _Serial:
    """In-process stand-in for a process pool (``--jobs 1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, function, *iterables):
        return map(function, *iterables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.autotune compile-check",
        description="Compile every Triton kernel x config for sm_80 and sm_90 (no GPU needed); "
                    "fail on a compile error, a register spill or shared memory over the limit.",
    )
    parser.add_argument("--only", help="regular expression: check only cases whose name matches")
    parser.add_argument("--arch", type=int, action="append", choices=TARGETS,
                        help="compute capability to target (repeatable; default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiler processes (default: CPU count)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile-check needs TRITON_INTERPRET unset (the interpreter does not compile)",
              file=sys.stderr)
        return 2

    cases = discover_cases(args.only)
    if not cases:
        print("no compile cases found", file=sys.stderr)
        return 1
    # Workers get (module, index, arch) and rebuild the case: only plain values are pickled.
    jobs = [(module_name, index, arch)
            for module_name, index, _case in cases for arch in args.arch or TARGETS]
    start = time.perf_counter()
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    results = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) if args.jobs > 1 else _Serial() as pool:
        for result in pool.map(compile_one, *zip(*jobs, strict=True)):
            results.append(result)
            print(format_row(result), flush=True)  # rows as they finish: CI shows progress
    failures = [r for r in results if r.problems(shared_limit(r.arch))]
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s, "
          f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
