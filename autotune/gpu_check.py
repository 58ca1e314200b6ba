"""``python -m dynconv.autotune gpu-check``: the one command to run on a GPU machine.

With torch and Triton installed and no network it runs, each step in its own process with its
own time limit (limits add up to 7.5 minutes by default):

1. ``pytest`` on the test files that exercise the Triton kernels (CUDA tensors on this machine);
2. a short autotune ``sweep`` (ResNet-18 layers, bf16, batch 32), whose table is written to the
   output folder, not into the package;
3. the ``bench`` with the ``gpu`` preset (ResNet-18 layers at batch 32 / 128, bf16 and fp32,
   channels_last), using that fresh table;
4. the ``report`` of that bench.

Everything goes to ``<out>/<device>/``: ``gpu_check.log`` (every step's output and a final
status table), the tuned table ``<device>.json``, ``bench_gpu.csv``, the PNGs and
``summary.md``. A step that cannot run (no CUDA, no tests folder, missing module) is reported
as skipped or failed in the log and the exit status; it does not stop the steps after it.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# Test files that run Triton kernels; matched under --tests-dir.
TEST_PATTERNS = ("test_*triton*.py", "test_kernel*.py", "test_tuned*.py")


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict | None = None
    skip_reason: str | None = None
    status: str = "not run"
    seconds: float = 0.0


class Log:
    """Writes to stdout and to the log file at once."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w", buffering=1)  # closed by close()
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")

    def close(self) -> None:
        self.file.close()


def environment() -> tuple[dict, str | None]:
    """(facts about torch / Triton / the GPU, why the GPU steps cannot run or None)."""
    facts = {"python": sys.version.split()[0]}
    try:
        import torch
    except ImportError as exc:
        return facts, f"torch is not importable: {exc}"
    facts["torch"] = torch.__version__
    facts["torch cuda"] = str(torch.version.cuda)
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError as exc:
        facts["triton"] = f"not importable ({exc})"
    if not torch.cuda.is_available():
        return facts, "torch.cuda.is_available() is False: no usable CUDA GPU"
    facts["gpu"] = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    facts["capability"] = f"sm_{major}{minor}"
    facts["gpu memory GiB"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}"
    if facts["triton"].startswith("not importable"):
        return facts, "Triton is not importable"
    return facts, None


def gpu_test_files(tests_dir: str) -> list[str]:
    files = set()
    for pattern in TEST_PATTERNS:
        files.update(glob.glob(os.path.join(tests_dir, pattern)))
    return sorted(files)


def run_step(step: Step, log: Log) -> None:
    """Run one step's process, streaming its output to the log, killing it at its timeout."""
    log(f"\n=== {step.name}: {' '.join(shlex.quote(a) for a in step.argv)}"
        f"  (limit {step.timeout_s:.0f} s)")
    if step.skip_reason:
        step.status = f"skipped: {step.skip_reason}"
        log(step.status)
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(step.env or {})}
    start = time.monotonic()
    try:
        process = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, start_new_session=True)
    except OSError as exc:
        step.status = f"failed to start: {exc}"
        log(step.status)
        return
    assert process.stdout is not None

    def pump():  # a thread, so that a silent process can still be timed out
        for line in process.stdout:
            log(line.rstrip("\n").split("\r")[-1])  # progress bars: keep their last state

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=step.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(10)
    step.seconds = time.monotonic() - start
    if timed_out:
        step.status = f"timed out after {step.timeout_s:.0f} s"
    elif process.returncode == 0:
        step.status = "ok"
    else:
        step.status = f"failed (exit code {process.returncode})"
    log(f"--- {step.name}: {step.status} in {step.seconds:.0f} s")


def build_steps(args, device_slug: str, gpu_reason: str | None) -> list[Step]:
    folder = os.path.join(args.out, device_slug)
    py = sys.executable
    table_dir = folder
    tests = gpu_test_files(args.tests_dir) if os.path.isdir(args.tests_dir) else []
    test_skip = gpu_reason
    if not test_skip and not os.path.isdir(args.tests_dir):
        test_skip = f"no tests folder at {args.tests_dir!r} (run from the source tree)"
    elif not test_skip and not tests:
        test_skip = f"no Triton test files matching {TEST_PATTERNS} in {args.tests_dir!r}"
    test_skip = test_skip or None
    try:
        import pytest  # noqa: F401
    except ImportError:
        test_skip = test_skip or "pytest is not installed"
    sweep_argv = [py, "-m", "dynconv.autotune", "sweep", "--set", "resnet18", "--batch",
                  "32", "--dtype", "bf16", "--layout", "channels_last", "--table-dir",
                  table_dir, "--time-budget",
                  str(int(args.sweep_budget)), "--no-progress"]
    bench_argv = [py, "-m", "dynconv.autotune", "bench", "--preset", "gpu", "--out", args.out,
                  "--time-budget", str(int(args.bench_budget)), "--rep-ms", "10", "--no-progress"]
    return [
        Step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *tests],
             args.tests_timeout, skip_reason=test_skip),
        Step("sweep", sweep_argv, args.sweep_budget + 45, skip_reason=gpu_reason),
        Step("bench", bench_argv, args.bench_budget + 45,
             env={"DYNCONV_TUNED_DIR": table_dir}, skip_reason=gpu_reason),
        Step("report", [py, "-m", "dynconv.autotune", "report", folder], 60,
             skip_reason=gpu_reason),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.autotune gpu-check",
        description="On a GPU machine (no network needed): the Triton tests, a short autotune "
                    "sweep, the GPU bench and its report, written to OUT/<device>/.")
    parser.add_argument("--out", default="perf_reports", help="output root (default %(default)s)")
    parser.add_argument("--tests-dir", default="tests", help="where the test files are")
    parser.add_argument("--tests-timeout", type=float, default=140.0, metavar="S")
    parser.add_argument("--sweep-budget", type=float, default=50.0, metavar="S",
                        help="the sweep starts no new kernel x shape after S seconds")
    parser.add_argument("--bench-budget", type=float, default=110.0, metavar="S",
                        help="bench stops starting new cases after S seconds")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    args = parser.parse_args(argv)
    for name in ("tests_timeout", "sweep_budget", "bench_budget"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")

    facts, gpu_reason = environment()
    if gpu_reason:
        device_slug = "no_gpu"
    else:
        from .measure import device_slug as slug_of

        device_slug = slug_of("cuda")
    steps = build_steps(args, device_slug, gpu_reason)
    if args.dry_run:
        print("gpu-check dry run; environment: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
        if gpu_reason:
            print(f"GPU steps would be skipped: {gpu_reason}")
        for step in steps:
            state = f"  [skip: {step.skip_reason}]" if step.skip_reason else ""
            print(f"  {step.name:7s} limit {step.timeout_s:4.0f} s: {' '.join(step.argv)}{state}")
        print(f"would write to {os.path.join(args.out, device_slug)}")
        return 0

    log = Log(os.path.join(args.out, device_slug, "gpu_check.log"))
    started = time.monotonic()
    try:
        log("dynconv gpu-check " + time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        for key, value in facts.items():
            log(f"  {key}: {value}")
        if gpu_reason:
            log(f"GPU steps skipped: {gpu_reason}")
        for step in steps:
            run_step(step, log)
        log(f"\n=== summary ({time.monotonic() - started:.0f} s in all)")
        for step in steps:
            log(f"  {step.name:7s} {step.status}")
    finally:
        log.close()
    return 0 if all(step.status == "ok" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
