"""``python -m dynconv.autotune compile-check``: compile what really launches, for sm_80 / sm_90.

No GPU is needed. :mod:`.launch_capture` drives the Triton backend's launchers on meta tensors
and records every launch, each config the autotuner would try included, specialised by Triton's
own binder; each distinct specialisation is compiled with ``triton.compile`` for a
``GPUTarget``. The cubin's registers, spill stack and shared memory are read with the
``cuobjdump`` shipped in Triton's wheel, and its SASS (:mod:`.sass`) says whether the main loop
uses tensor cores (wgmma or mma.sync) and asynchronous loads (cp.async or TMA), and how many
instructions one step of it takes. ``--no-sass`` leaves the disassembly out (about a third of
the time of each compile on a 2-core machine): the verdict needs only the registers, spills and
shared memory, and CI's ``make compile-check`` takes that; ``make codegen-report`` reads the SASS.

``--report DIR`` writes ``codegen_triton<version>.csv`` (one row per compiled specialisation)
and ``summary_triton<version>.md`` (the verdict per kernel) into DIR.

Exit status: 0 when every specialisation compiles, spills nothing and fits the target's shared
memory; 1 otherwise (the table says which and why); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .launch_capture import CompileJob, jobs_for
from .sass import SassStats, analyse

TARGETS = (80, 90)


@dataclass
class Result:
    job: CompileJob
    registers: int | None = None
    spill_bytes: int | None = None  # STACK + LOCAL from cuobjdump
    shared_bytes: int | None = None
    sass: SassStats | None = None
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


def compile_job(job: CompileJob, read_sass: bool = True) -> Result:
    """Compile one captured specialisation and read its resources and (``read_sass``) its
    SASS; without it ``Result.sass`` stays None."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(job)
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    start = time.perf_counter()
    try:
        source = ASTSource(kernel, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32),
                                  options=job.options)
    except Exception as exc:  # any compiler failure is reported, not raised
        lines = str(exc).strip().splitlines() or [""]
        result.error = f"{type(exc).__name__}: {lines[-1][:200]}"
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
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=False)
        sass = (subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                               check=False) if read_sass else None)
    try:
        registers, spills, _static_shared = parse_resource_usage(usage.stdout)
    except ValueError as exc:
        result.error = str(exc)
        return result
    result.registers, result.spill_bytes = registers, spills
    result.sass = analyse(sass.stdout) if sass is not None else None
    return result


def shared_limit(arch: int) -> int:
    from dynconv.kernels.configs import SHARED_MEMORY_LIMITS

    return SHARED_MEMORY_LIMITS[arch]


def _short_kernel(job: CompileJob) -> str:
    return job.kernel.removesuffix("_kernel")


def variant(job: CompileJob) -> str:
    """The launch family of a job, from its first launch label: the memory layout (``cl`` or
    ``nchw``) and, for the forward, the strategy (``premix`` or ``fused``)."""
    words = job.labels[0].split()
    layout = "cl" if "cl" in words else "nchw"
    strategy = words[-1].removeprefix("fwd-") if words[-1].startswith("fwd-") else ""
    return f"{strategy} {layout}".strip() if job.kernel == "conv_fwd_kernel" else layout


def row_values(r: Result) -> dict:
    """One CSV / table row of a result."""
    loop = r.sass.main_loop if r.sass else None
    return {
        "kernel": _short_kernel(r.job), "variant": variant(r.job), "dtype": r.job.dtype,
        "config": r.job.config,
        "specialisation": r.job.specialisation, "sm": r.job.arch, "registers": r.registers,
        "spill_bytes": r.spill_bytes, "shared_bytes": r.shared_bytes,
        "tensor_core": r.sass.tensor_core if r.sass else None,
        "async_loads": r.sass.async_loads if r.sass else None,
        "plain_loads": r.sass.plain_loads if r.sass else None,
        "loop_instructions": loop.instructions if loop else None,
        "loop_tensor_core_ops": loop.tensor_core if loop else None,
        "loop_async_loads": loop.async_loads if loop else None,
        "loop_plain_loads": loop.plain_loads if loop else None,
        "loop_waits_for_mma": loop.waits_for_mma if loop else None,
        "seconds": round(r.seconds, 2),
        "status": "; ".join(r.problems(shared_limit(r.job.arch))) or "ok",
        "launches": len(r.job.labels), "example_launch": r.job.labels[0],
    }


_COLUMNS = (("kernel", 12), ("dtype", 5), ("config", 20), ("sm", 3), ("registers", 4),
            ("spill_bytes", 5), ("shared_bytes", 6), ("tensor_core", 6),
            ("loop_instructions", 5), ("loop_async_loads", 5), ("loop_plain_loads", 5))
HEADER = " ".join(f"{name[:width]:>{width}}" if i > 2 else f"{name[:width]:<{width}}"
                  for i, (name, width) in enumerate(_COLUMNS)) + "  status"


def format_row(r: Result) -> str:
    values = row_values(r)
    cells = []
    for i, (name, width) in enumerate(_COLUMNS):
        value = "-" if values[name] is None else str(values[name])
        cells.append(f"{value:>{width}}" if i > 2 else f"{value:<{width}}")
    status = values["status"]
    return " ".join(cells) + "  " + (status if status == "ok" else "FAIL: " + status)


def triton_version() -> str:
    import triton

    return triton.__version__


def write_report(results: list[Result], folder: str) -> tuple[str, str]:
    """codegen_triton<v>.csv and summary_triton<v>.md in ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    version = triton_version()
    csv_path = os.path.join(folder, f"codegen_triton{version}.csv")
    rows = [row_values(r) for r in results]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["triton", *rows[0]])
        writer.writeheader()
        for row in rows:
            writer.writerow({"triton": version, **row})
    md_path = os.path.join(folder, f"summary_triton{version}.md")
    with open(md_path, "w") as f:
        f.write(summary_markdown(results, version))
    return csv_path, md_path


def summary_markdown(results: list[Result], version: str) -> str:
    """Per kernel and target: how many specialisations, wgmma / mma, async loads in the main
    loop, instructions per main-loop step (min-median-max), registers, failures."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[(_short_kernel(r.job), variant(r.job), r.job.arch)].append(r)
    lines = [
        f"# Codegen of the launched kernels (Triton {version})",
        "",
        "Every specialisation the Triton backend launches on the driven cases (ResNet-18's layers",
        "at batch 32 and the tests' small shapes; every config the autotuner would try), compiled",
        "for sm_80 and sm_90 by `python -m dynconv.autotune compile-check --report <dir>`. The",
        "main loop is the innermost loop holding the tensor-core op (`autotune/sass.py`).",
        "",
        "| kernel | launches | sm | compiled | failed | tensor cores (main loop) | main loop "
        "with async loads | main loop with plain loads | waits for its wgmma each step | "
        "instructions per step (min / median / max) | registers (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, family, arch), group in sorted(groups.items()):
        ok = [r for r in group if r.sass is not None and r.sass.main_loop is not None]
        failed = sum(bool(r.problems(shared_limit(arch))) for r in group)
        kinds = sorted({r.sass.tensor_core for r in ok if r.sass.main_loop.tensor_core})
        if any(not r.sass.main_loop.tensor_core for r in ok):
            kinds.append("none")
        steps = sorted(r.sass.main_loop.instructions for r in ok)
        step_text = (f"{steps[0]} / {steps[len(steps) // 2]} / {steps[-1]}" if steps else "-")
        lines.append(
            f"| {kernel} | {family} | {arch} | {len(group)} | {failed} | "
            f"{', '.join(kinds) or '-'} | "
            f"{sum(r.sass.main_loop.async_loads > 0 for r in ok)} of {len(ok)} | "
            f"{sum(r.sass.main_loop.plain_loads > 0 for r in ok)} of {len(ok)} | "
            f"{sum(r.sass.main_loop.waits_for_mma for r in ok)} of {len(ok)} | {step_text} | "
            f"{max((r.registers or 0) for r in group)} |"
        )
    failures = [r for r in results if r.problems(shared_limit(r.job.arch))]
    lines += ["", f"{len(results)} specialisations compiled, {len(failures)} failed."]
    for r in failures[:40]:
        lines.append(f"- {_short_kernel(r.job)} {r.job.dtype} {r.job.config} sm_{r.job.arch}: "
                     f"{'; '.join(r.problems(shared_limit(r.job.arch)))} "
                     f"(e.g. {r.job.labels[0]})")
    return "\n".join(lines) + "\n"


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
        description="Compile every Triton kernel specialisation the backend really launches "
                    "(captured on meta tensors) for sm_80 and sm_90, no GPU needed; fail on a "
                    "compile error, a register spill or shared memory over the limit.",
    )
    parser.add_argument("--only", help="regular expression: compile only the specialisations "
                                       "whose kernel name or a launch label matches")
    parser.add_argument("--arch", type=int, action="append", choices=TARGETS,
                        help="compute capability to target (repeatable; default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiler processes (default: CPU count)")
    parser.add_argument("--no-sass", dest="read_sass", action="store_false",
                        help="do not disassemble the cubins (the tensor-core, async-load and "
                             "main-loop columns read '-'); the verdict is the same")
    parser.add_argument("--report", metavar="DIR",
                        help="write codegen_triton<version>.csv and summary_triton<version>.md")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile-check needs TRITON_INTERPRET unset (the interpreter does not compile)",
              file=sys.stderr)
        return 2

    start = time.perf_counter()
    jobs = jobs_for(args.arch or TARGETS)
    if args.only:
        pattern = re.compile(args.only)
        jobs = [job for job in jobs if pattern.search(job.kernel)
                or any(pattern.search(label) for label in job.labels)]
    if not jobs:
        print("no launches captured" + (f" matching {args.only!r}" if args.only else ""),
              file=sys.stderr)
        return 1
    print(f"Triton {triton_version()}: {len(jobs)} specialisations captured in "
          f"{time.perf_counter() - start:.0f} s")
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    results = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) if args.jobs > 1 else _Serial() as pool:
        for result in pool.map(functools.partial(compile_job, read_sass=args.read_sass), jobs):
            results.append(result)
            print(format_row(result), flush=True)  # rows as they finish: CI shows progress
    failures = [r for r in results if r.problems(shared_limit(r.job.arch))]
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s, "
          f"{len(failures)} failed")
    if args.report:
        for path in write_report(results, args.report):
            print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
