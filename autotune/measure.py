"""The measuring library of the tools: one timer, one memory probe, the run's record.

- :class:`Timer`: times a callable in ms. On the CPU a sample runs the callable back to back
  until it lasts ``min_sample_ms`` (at most ``max_calls`` calls) and returns the mean call, on
  the wall clock or on this process's CPU clock. On a GPU a sample is
  ``triton.testing.do_bench``'s median over ``rep_ms`` (CUDA events and synchronisation around
  the calls where Triton is not installed). :meth:`Timer.interleaved` alternates a static
  reference sample and a sample of the callable, round after round, so that the ratio between
  the two holds on a noisy machine: the figure is the median of the per-round ratios.
- :func:`fresh_process_peak_rss`: peak RSS of one run in a fresh process (CPU).
- :func:`read_proc_status`: one field of ``/proc/self/status``, in bytes.
- :func:`device_name`, :func:`device_slug`, :func:`versions` (torch, Triton, Python and the git
  commit of the source tree): what a result row records about where it was measured.
- :func:`progress`: a tqdm progress bar, or a silent stand-in.
- ``csv_list``, ``int_list``, ``shape_arg``: argparse types the tools' command lines share.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .shapes import ConvShape, parse_shape

# ---------------------------------------------------------------------------------------------
# timing

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass(frozen=True)
class Timing:
    """Interleaved samples (ms) of a callable and of its static reference, round by round."""

    times_ms: list[float]
    static_times_ms: list[float]

    @property
    def time_ms(self) -> float:
        return _median(self.times_ms)

    @property
    def static_ms(self) -> float:
        return _median(self.static_times_ms)

    @property
    def ratio(self) -> float:
        """Median over the rounds of callable / static (rounds with a zero static are left out)."""
        return _median([t / s for t, s in zip(self.times_ms, self.static_times_ms, strict=True)
                        if s > 0])

    @property
    def ratio_of_mins(self) -> float:
        if not self.times_ms or min(self.static_times_ms) <= 0:
            return float("nan")
        return min(self.times_ms) / min(self.static_times_ms)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Timer:
    """Times zero-argument callables in ms on ``device`` (``"cpu"`` or ``"cuda"``).

    ``clock``: ``"wall"`` (``time.perf_counter``) or ``"process"`` (``time.process_time``: with
    one thread it leaves out the time other processes hold the core; with more it also counts
    threads waiting at barriers). CPU only; a GPU is timed with CUDA events.
    """

    def __init__(self, device: str = "cpu", clock: str = "wall", rep_ms: float = 25.0,
                 min_sample_ms: float = 10.0, max_calls: int = 20):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
        if device == "cuda" and clock != "wall":
            raise ValueError("a GPU is timed with CUDA events: clock must be 'wall'")
        self.device = device
        self.clock = clock
        self.rep_ms = rep_ms
        self.min_sample_ms = min_sample_ms
        self.max_calls = max_calls
        self._now = CLOCKS[clock]
        self._do_bench = None
        if device == "cuda":
            from dynconv.backends.registry import triton_importable

            if triton_importable():
                import triton.testing

                self._do_bench = triton.testing.do_bench

    def calls_for(self, fn: Callable) -> int:
        """Run ``fn`` once (a warm-up) and return how many calls make one sample."""
        if self._do_bench is not None:
            fn()
            return 1
        once = self.sample(fn, 1)
        return max(1, min(self.max_calls, math.ceil(self.min_sample_ms / max(once, 1e-3))))

    def sample(self, fn: Callable, calls: int = 1) -> float:
        """One sample: the mean ms of ``calls`` back-to-back calls (GPU: ``do_bench``'s median)."""
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=max(1, int(self.rep_ms // 4)),
                                        rep=int(self.rep_ms), return_mode="median"))
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        start = self._now()
        for _ in range(calls):
            fn()
        return (self._now() - start) * 1e3 / calls

    def interleaved(self, fn: Callable, static_fn: Callable, rounds: int) -> Timing:
        """Warm both up, then ``rounds`` times: one sample of ``static_fn``, one of ``fn``."""
        static_calls = self.calls_for(static_fn)
        calls = self.calls_for(fn)
        times, static_times = [], []
        for _ in range(rounds):
            static_times.append(self.sample(static_fn, static_calls))
            times.append(self.sample(fn, calls))
        return Timing(times, static_times)

    def median(self, fn: Callable, samples: int, calls: int = 1) -> float:
        """Median ms of ``samples`` samples of ``fn`` (no warm-up: call it once first)."""
        return _median([self.sample(fn, calls) for _ in range(samples)])


# ---------------------------------------------------------------------------------------------
# memory


def read_proc_status(field_name: str) -> int | None:
    """A ``/proc/self/status`` field given in kB (``VmRSS``, ``VmHWM``...) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class MemoryResult:
    """Peak RSS of one run in a fresh process.

    ``extra_bytes`` is the peak over the RSS just before the run: what the run took from the
    OS, whatever the allocator. It is None where the peak could not be reset before the run.
    """

    status: str  # "ok" or "error"
    peak_bytes: int | None = None
    extra_bytes: int | None = None
    rss_before_bytes: int | None = None
    note: str = ""


# glibc's mallopt parameter (malloc.h) and the threshold the memory child pins it at
M_MMAP_THRESHOLD = -3
MEMORY_CHILD_MMAP_THRESHOLD = 128 * 1024


def pin_mmap_threshold(threshold: int = MEMORY_CHILD_MMAP_THRESHOLD) -> bool:
    """Make glibc's malloc serve every block of ``threshold`` bytes or more with its own mapping,
    returned to the OS when freed; whether that worked (False off glibc).

    By default glibc raises that threshold each time it frees a mapped block (up to 32 MiB), and
    blocks below it come from its heap, which keeps freed memory: the RSS peak of one call then
    depends on which blocks earlier calls freed, by tens of MiB from run to run for the same
    call. Pinned (which also stops the raising), the peak RSS is what the call holds at once,
    to the page."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _memory_child(setup: Callable, args: tuple, threads: int, conn) -> None:
    try:
        pinned = pin_mmap_threshold()
        if threads:
            torch.set_num_threads(threads)
        # a miniature run first loads every lazily initialised code path (oneDNN primitives,
        # custom-op dispatch), so that the peak below is the run's own
        setup(*args, miniature=True)()
        run = setup(*args, miniature=False)
        before = read_proc_status("VmRSS")
        reset = _reset_peak_rss()
        result = run()
        peak = read_proc_status("VmHWM")
        del result
        if peak is None or before is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            conn.send(MemoryResult("ok", peak, None, before,
                                   "no /proc/self/status: peak is the process's ru_maxrss"))
        elif not reset:
            conn.send(MemoryResult("ok", peak, None, before,
                                   "VmHWM could not be reset: peak is the process's"))
        else:
            conn.send(MemoryResult("ok", peak, peak - before, before,
                                   "" if pinned else "glibc's mmap threshold not pinned: the "
                                   "peak includes what the allocator kept"))
    except Exception as exc:  # reported to the parent, not raised there
        conn.send(MemoryResult("error", note=f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


_CONTEXT = None


def _context(preload: list[str]):
    """Forkserver where available: children fork from a server that imported torch (and the
    setup's module) but never ran an op; else spawn."""
    global _CONTEXT
    if _CONTEXT is None:
        methods = multiprocessing.get_all_start_methods()
        _CONTEXT = multiprocessing.get_context(
            "forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            _CONTEXT.set_forkserver_preload(preload)
    return _CONTEXT


def fresh_process_peak_rss(setup: Callable, args: tuple = (), threads: int = 0,
                           timeout_s: float = 300.0) -> MemoryResult:
    """Peak RSS of one run in a fresh process.

    ``setup(*args, miniature=...)`` (module-level, picklable) builds its inputs and returns the
    zero-argument run: called with ``miniature=True`` for a small warm-up run, then with
    ``miniature=False`` for the run measured. The child resets ``VmHWM`` through
    ``/proc/self/clear_refs`` after building the inputs, runs once and reports ``VmHWM`` and
    ``VmHWM`` minus ``VmRSS`` just before the run. ``threads``: torch threads in the child (0:
    torch's default). A failure comes back as a result with status ``"error"`` and a note.
    """
    module = getattr(setup, "func", setup).__module__
    context = _context(["torch", "dynconv", module])
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_memory_child, args=(setup, args, threads, sender))
    process.start()
    sender.close()
    result = MemoryResult("error", note=f"no result within {timeout_s:.0f} s")
    if receiver.poll(timeout_s):
        try:
            result = receiver.recv()
        except EOFError:
            result = MemoryResult("error", note="the memory child exited without a result")
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    elif process.exitcode not in (0, None) and result.status == "ok":
        result = MemoryResult("error", note=f"the memory child exited with code "
                                            f"{process.exitcode}")
    return result


def cuda_peak_memory(fn: Callable) -> tuple[int, int]:
    """(max_memory_allocated during one call, that minus what was allocated before), bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - before


# ---------------------------------------------------------------------------------------------
# where a result was measured


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model (``/proc/cpuinfo``; else the platform's processor)."""
    if device == "cuda":
        from dynconv.kernels.tuned_table import device_id

        return device_id(torch.device("cuda"))[1]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str) -> str:
    """Folder name of a device's results: ``cpu``, or the tuned table's GPU slug
    (``nvidia_h200``)."""
    if device == "cpu":
        return "cpu"
    from dynconv.kernels.tuned_table import device_id

    return device_id(torch.device(device))[0]


_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", "-C", _SOURCE_ROOT, *args],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Short hash of the source tree's HEAD, ``-dirty`` if tracked files have uncommitted
    changes; ``unknown`` where the code does not run from a git checkout."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or os.path.realpath(top) != os.path.realpath(_SOURCE_ROOT):
        return "unknown"  # e.g. an installed copy inside some other repository
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if changes else commit


def versions() -> dict:
    """torch, Triton (empty if not installed) and Python versions, and :func:`git_commit`."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "commit": git_commit()}


# ---------------------------------------------------------------------------------------------
# progress


class _NoBar:
    def set_postfix_str(self, _text):
        pass

    def update(self, _n):
        pass

    def close(self):
        pass


def progress(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr, or a stand-in with the same methods (disabled, or no tqdm)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# argument types shared by the tools' command lines


def csv_list(choices: Iterable[str], what: str):
    """argparse type: a comma-separated subset of ``choices``, with a clear error."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; "
                f"expected a comma-separated list from {list(choices)}")
        return items

    return parse


def int_list(what: str):
    """argparse type: a comma-separated list of positive ints."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(item) for item in text.split(",") if item.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma-separated list of positive ints, got {text!r}")
        return values

    return parse


def shape_arg(text: str) -> ConvShape:
    """argparse type: a ``--shape`` layer (see :func:`dynconv.autotune.shapes.parse_shape`)."""
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
