"""Benchmark mode: the library times its own alternatives on a call's first occurrence and keeps
the fastest (as ``torch.backends.cudnn.benchmark`` does for cuDNN's algorithms). Off by default.

One switch for every backend (:func:`set_benchmark`, or ``DYNCONV_BENCHMARK=1``): the ``triton``
backend times its forward and backward strategies (:mod:`.triton.strategy`), the ``native`` one
its formulations where its measured rule is close to a threshold (:mod:`.native.op`). The
timer lives here, so that tests can put a fake one in its place (:data:`TIMER`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

ENV_BENCHMARK = "DYNCONV_BENCHMARK"
# Timed calls per alternative after one warm-up call (which compiles and autotunes): the median.
BENCHMARK_REPEATS = 5

log = logging.getLogger("dynconv.benchmark")

_benchmark: bool | None = None  # None: follow the environment variable


def set_benchmark(enabled: bool) -> None:
    """Time the alternatives (the ``triton`` backend's strategies, the ``native`` backend's
    close formulations) on the first call of each key and use the fastest from then on. Off by
    default, as ``torch.backends.cudnn.benchmark``; process-wide; ``DYNCONV_BENCHMARK=1`` turns
    it on for a process from the start."""
    global _benchmark
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _benchmark = enabled


def benchmark_enabled() -> bool:
    if _benchmark is not None:
        return _benchmark
    return os.environ.get(ENV_BENCHMARK, "0").strip().lower() in ("1", "true", "on", "yes")


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median ms of ``fn`` over ``repeats`` calls after one warm-up call: CUDA events on a
    GPU (host time included where the GPU waits for it, as an eager caller pays it), the wall
    clock elsewhere."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


# The timer of benchmark mode: (fn, device, repeats) -> ms. Tests put a fake one here.
TIMER: Callable[[Callable[[], object], torch.device, int], float] = _time_ms


def time_alternatives(runs: dict, device: torch.device,
                      repeats: int = BENCHMARK_REPEATS) -> dict:
    """{name: median ms, or why it could not run} of each zero-argument run."""
    times: dict = {}
    for name, run in runs.items():
        try:
            times[name] = TIMER(run, device, repeats)
        except Exception as exc:  # an alternative that cannot run this call here
            times[name] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
    return times


def fastest(times: dict):
    """The name with the lowest time, or None when none ran."""
    measured = {name: ms for name, ms in times.items() if isinstance(ms, float)}
    return min(measured, key=measured.get) if measured else None


def describe(times: dict) -> str:
    return ", ".join(f"{n} {t:.4g} ms" if isinstance(t, float) else f"{n} {t}"
                     for n, t in times.items())
