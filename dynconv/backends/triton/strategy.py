"""Which strategy the ``triton`` backend runs for one call: forced, measured, or modelled.

Forward strategies: ``premix``, ``fused``, ``spanning``, ``premix_tma`` (the Triton kernels) and
``spanning_torch`` (the batch-spanning form on PyTorch's convolution: cuDNN on a GPU,
:mod:`.spanning_torch`). Backward strategies: ``per_sample`` (the Triton dgrad / wgrad kernels)
and ``spanning_torch``.

For each call, in order:

1. a strategy forced by :func:`use_strategy` (process-wide, for experiments and tests);
2. the measured choice of the per-GPU tuned table (``strategies`` section, written by the sweep
   and gpu-check) for the call's exact key;
3. with benchmark mode on (:mod:`dynconv.backends.benchmark`), the in-process
   cache, filled on the first call of each key by timing every strategy that can run it (as
   ``torch.backends.cudnn.benchmark`` times cuDNN's algorithms): forward on the forward's first
   call, backward on the backward's;
4. the rule: the H200 roofline model for the forward (:mod:`.roofline_model`), ``per_sample``
   for the backward.

A model never overrides a measurement. The key (:func:`call_key`) holds the shapes, the
geometry, the dtype, x's memory format, whether there is a bias and, for the backward, which
gradients are asked for; the cache also the device.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import torch

from .. import benchmark
from ..benchmark import benchmark_enabled

FORWARD_STRATEGIES = ("premix", "fused", "spanning", "premix_tma", "spanning_torch")
BACKWARD_STRATEGIES = ("per_sample", "spanning_torch")
# Strategies the forward's rule may pick (premix_tma and spanning_torch only when measured).
MODELLED_FORWARD = ("premix", "fused", "spanning")
DEFAULT_BACKWARD = "per_sample"

_lock = threading.Lock()
_forced: dict[str, str | None] = {"forward": None, "backward": None}
_cache: dict[tuple, str] = {}
# The latest choice of each kind: (key, strategy, where it came from: "forced", "table",
# "benchmark" or "rule"), for tools and tests.
last_choice: dict[str, tuple[str, str, str]] = {}


# --- the switches ------------------------------------------------------------------------------


def clear_benchmark_cache() -> None:
    """Forget every timed choice (they are timed again on their next call)."""
    with _lock:
        _cache.clear()


@contextlib.contextmanager
def use_strategy(forward: str | None = None, backward: str | None = None):
    """Within the block, the ``triton`` backend runs these strategies (``None``: as outside
    the block: chosen as usual, or what an enclosing block forces). Process-wide, not per
    thread: autograd runs a backward on a thread of its own, and the backward reads the setting
    when it runs, so put the ``backward()`` call inside the block too. A strategy that cannot
    run a call raises ValueError there (premix_tma off sm_90)."""
    if forward is not None and forward not in FORWARD_STRATEGIES:
        raise ValueError(f"forward must be one of {FORWARD_STRATEGIES} or None, got {forward!r}")
    if backward is not None and backward not in BACKWARD_STRATEGIES:
        raise ValueError(f"backward must be one of {BACKWARD_STRATEGIES} or None, got "
                         f"{backward!r}")
    with _lock:
        saved = dict(_forced)
        _forced.update({kind: name for kind, name in (("forward", forward),
                                                       ("backward", backward)) if name})
    try:
        yield
    finally:
        with _lock:
            _forced.update(saved)


def forced(kind: str) -> str | None:
    return _forced[kind]


# --- keys --------------------------------------------------------------------------------------


def call_key(x_shape, weight_bank_shape, stride, padding, dilation, groups: int,
             dtype: torch.dtype, channels_last: bool, has_bias: bool,
             output_mask=None) -> str:
    """The text key of one call, as the tuned table stores it, e.g.
    ``B32 C512x7x7 O512 k3x3 s1x1 p1x1 d1x1 g1 K4 bf16 cl bias`` (+ `` grads1111``)."""
    batch, channels, height, width = x_shape
    num_experts, out_channels = weight_bank_shape[:2]
    kh, kw = weight_bank_shape[3:]
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.float32: "fp32"}.get(dtype, str(dtype).replace("torch.", ""))
    key = (f"B{batch} C{channels}x{height}x{width} O{out_channels} k{kh}x{kw} "
           f"s{stride[0]}x{stride[1]} p{padding[0]}x{padding[1]} d{dilation[0]}x{dilation[1]} "
           f"g{groups} K{num_experts} {dtype_name} {'cl' if channels_last else 'nchw'} "
           f"{'bias' if has_bias else 'nobias'}")
    if output_mask is not None:
        key += " grads" + "".join("1" if m else "0" for m in output_mask)
    return key


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# --- the choices -------------------------------------------------------------------------------


def choose(kind: str, key: str, device: torch.device,
           candidates: Callable[[], tuple[tuple[str, ...], dict[str, Callable[[], object]]]],
           rule: Callable[[], str]) -> str:
    """The strategy of one call (``kind`` "forward" or "backward"): forced, table, benchmark
    cache (timing the runs on a miss), rule. ``candidates()`` gives (the strategies that can run
    the call, {strategy: a zero-argument run of the call with it}); it is called only where a
    table or benchmark mode needs it, so that the rule's path pays for neither."""
    name, source = _choose(kind, key, device, functools.cache(candidates), rule)
    last_choice[kind] = (key, name, source)
    return name


def _choose(kind, key, device, candidates, rule) -> tuple[str, str]:
    from dynconv.kernels import tuned_table

    name = _forced[kind]
    if name is not None:
        return name, "forced"
    name = tuned_table.lookup_strategy(kind, key, device)
    if name is not None and name in candidates()[0]:
        return name, "table"
    if benchmark_enabled() and not _capturing(device) and len(candidates()[0]) > 1:
        cache_key = (kind, key, _device_key(device))
        with _lock:
            name = _cache.get(cache_key)
        if name is None:
            times = benchmark.time_alternatives(candidates()[1], device)
            name = benchmark.fastest(times) or rule()
            with _lock:
                _cache[cache_key] = name
            benchmark.log.debug("dynconv benchmark: triton %s %s -> %s (%s)", kind, key, name,
                                benchmark.describe(times))
        return name, "benchmark"
    return rule(), "rule"
