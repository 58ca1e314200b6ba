"""The ``native`` backend: a lean custom-autograd dynamic convolution on PyTorch's own kernels.

It is what ``backend="auto"`` runs where Triton does not (the CPU). Compared to the grouped
trick under plain autograd it

- saves only x, the routing weights and the parameters for backward, and the mixed
  per-sample weights (B x |W|) only when they are small: at most max(SAVE_MIXED_MAX_FRACTION
  (a quarter) of x's bytes, SAVE_MIXED_MIN_BYTES (16 MiB)), in eager mode
  (:class:`_EagerNativeConv`); otherwise they are recomputed chunk by chunk in backward;
- where they are that small and the rule's input gradient is the grouped convolution (and
  its forward not per-sample), an eager call that needs gradients takes autograd's own graph
  of the grouped trick instead
  (``CallPlan.graph``): the same convolutions, with a C++ backward instead of a Python one
  (a Python ``autograd.Function`` costs ~0.15 ms a step, as much as a small layer's
  convolution); an eager call that needs no gradient skips the ``autograd.Function``;
- processes the batch in chunks of equal size so that the temporaries that exist at any moment
  (mixed weights, their gradient, im2col patches) are bounded: MIXED_WEIGHT_BUDGET_BYTES each,
  raised to K samples per chunk up to LARGE_TEMPORARY_BYTES (see :func:`batch_chunk_size`,
  ``_plan``);
- plans a call (formulations, chunk, derived shapes) once per distinct signature (shapes,
  strides, dtype, thread count, forced choices): a small bounded cache, ``_plan``;
- picks, per shape and thread count and separately for the forward, the input gradient and
  the weight gradient, how each chunk is convolved (grouped convolution, per-sample
  convolution or im2col + batched matmul: :mod:`.formulations`) by a measured rule
  (:mod:`.rule`);
- is a ``torch.library`` custom op under ``torch.compile``, so ``fullgraph=True,
  dynamic=True`` treats it as one opaque node (Inductor cannot lower a convolution whose
  ``groups`` depends on a symbolic batch size) and the choice above is made at run time on
  concrete shapes; in eager mode the same implementation runs through a plain
  ``autograd.Function``, without the custom op's dispatch cost;
- keeps CPU temporaries off fresh pages where it can: the mixed weights live in a per-thread
  workspace reused across calls, outputs are only allocated when a chunk's result cannot be
  returned as it is, and chunks stay below glibc's mmap threshold (see LARGE_TEMPORARY_BYTES).
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch

from dynconv.geometry import ConvGeometry, output_hw, output_memory_format

from .. import benchmark
from ..benchmark import benchmark_enabled
from ..custom_op import (
    backward_through,
    call_forward,
    define_custom_ops,
    fake_backward_outputs,
    forward_output,
)
from ..reference import grouped_dynamic_conv2d
from .formulations import (
    FORMULATIONS,
    WRITES_GRAD_WEIGHTS_INTO_BUFFER,
    conv_backward,
    conv_forward,
)
from .rule import FormulationPlan, choose_formulations, close_plans

# Bytes that each per-chunk temporary (the mixed weights, their gradient, the im2col patches
# and their gradient) may take.
MIXED_WEIGHT_BUDGET_BYTES = 8 * 2**20
# glibc serves blocks above 32 MiB (its largest mmap threshold) straight from mmap and returns
# them on free, so each such temporary page-faults anew on every call. Chunks stay below it.
LARGE_TEMPORARY_BYTES = 24 * 2**20
# The eager backward keeps the forward's mixed weights (instead of mixing them again) when all
# B x |W| of them take at most this fraction of x's bytes (x is saved for backward anyway), i.e.
# when 4 * Cout * kh * kw / groups <= H * W for a quarter, or at most SAVE_MIXED_MIN_BYTES,
# whichever is larger: never the 37.7 MiB of the 128-channel 16x16 layer at batch 64 (x:
# 8 MiB). Both 0 turn saving off (recompute_mixed_weights: benchmarks, tests).
SAVE_MIXED_MAX_FRACTION = 0.25
# Small is small in bytes too: a few MiB of mixed weights are no memory problem
# whatever x's size, and saving them (or autograd's own graph, see CallPlan.graph) removes the
# recompute and the Python backward that made small layers lose to the grouped trick.
SAVE_MIXED_MIN_BYTES = 16 * 2**20
# Plans (formulations, chunk, derived shapes) kept per distinct call signature; the cache is
# emptied when it is full (a model has far fewer distinct layer shapes than this).
PLAN_CACHE_SIZE = 512

# Set by :func:`force_formulation` (tests, benchmarks): (plan or None, chunk or None).
_forced: tuple[FormulationPlan | None, int | None] = (None, None)


@contextlib.contextmanager
def force_formulation(formulation=None, chunk: int | None = None):
    """Within the block, every native op uses ``formulation`` and/or ``chunk`` samples per chunk.

    ``formulation`` is one name of ``FORMULATIONS`` for all three parts, or a
    (forward, input_grad, weight_grad) triple of names. For tests and benchmarks; ``None``
    leaves that choice to the rule / the memory budget.
    """
    global _forced
    plan = None if formulation is None else _as_plan(formulation)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be an int >= 1 or None, got {chunk!r}")
    previous = _forced
    _forced = (plan, chunk)
    try:
        yield
    finally:
        _forced = previous


@contextlib.contextmanager
def recompute_mixed_weights():
    """Within the block, the eager backward always recomputes the mixed weights (never saves
    them, never takes autograd's graph, which saves them): SAVE_MIXED_MAX_FRACTION and
    SAVE_MIXED_MIN_BYTES are 0. For benchmarks and tests."""
    global SAVE_MIXED_MAX_FRACTION, SAVE_MIXED_MIN_BYTES
    previous = SAVE_MIXED_MAX_FRACTION, SAVE_MIXED_MIN_BYTES
    SAVE_MIXED_MAX_FRACTION, SAVE_MIXED_MIN_BYTES = 0.0, 0
    try:
        yield
    finally:
        SAVE_MIXED_MAX_FRACTION, SAVE_MIXED_MIN_BYTES = previous


def _as_plan(formulation) -> FormulationPlan:
    try:
        names = (formulation,) * 3 if isinstance(formulation, str) else tuple(formulation)
    except TypeError:
        names = ()
    if len(names) != 3 or any(name not in FORMULATIONS for name in names):
        raise ValueError(
            f"formulation must be one of {FORMULATIONS}, a (forward, input_grad, weight_grad) "
            f"triple of them, or None; got {formulation!r}"
        )
    return FormulationPlan(*names)


def batch_chunk_size(
    batch: int, weight_numel: int, element_size: int, sample_temp_numel: int = 0
) -> int:
    """Samples per chunk so that each per-chunk temporary fits MIXED_WEIGHT_BUDGET_BYTES.

    weight_numel is |W| (one sample's mixed weights); sample_temp_numel the size of the largest
    other per-sample temporary of the formulation (e.g. im2col patches). ``_plan`` may raise
    the result to K samples, up to LARGE_TEMPORARY_BYTES per temporary.
    """
    per_sample = max(1, weight_numel, sample_temp_numel) * element_size
    return max(1, min(batch, MIXED_WEIGHT_BUDGET_BYTES // per_sample))


class CallPlan(NamedTuple):
    """How one call runs, a function of the call's shapes, strides, dtype, thread count and the
    forced choices (cached by :func:`_plan`)."""

    formulations: FormulationPlan
    chunk: int  # samples per chunk
    weight_shape: tuple  # one sample's mixed weights: (Cout, Cin / groups, kh, kw)
    chunk_weight_shape: tuple  # (chunk,) + weight_shape
    weight_numel: int  # |W|
    y_strides: tuple  # strides of a dense y (B, Cout, Ho, Wo) in x's memory format
    save_mixed: bool  # B x |W| fits max(SAVE_MIXED_MAX_FRACTION of x, SAVE_MIXED_MIN_BYTES)
    # An eager call that needs gradients runs autograd's own graph of the grouped trick
    # (:func:`_takes_graph`: within the saving threshold, nothing forced, the rule's plan): see
    # :func:`native_dynamic_conv2d`.
    graph: bool = False
    benchmarked: bool = False  # the formulations were timed (benchmark mode), not the rule's


_plan_cache: dict = {}


def _plan(x, weight_bank, stride, padding, dilation, groups) -> CallPlan:
    """How this call runs: forced, else the rule within the budget; cached per signature.

    The key holds everything the plan reads: the shapes, x's strides (its memory format), the
    dtype, the geometry, torch's thread count, the forced formulation / chunk and the module
    constants (tests change them). Tensor subclasses (fake tensors) are planned uncached.
    """
    if type(x) is not torch.Tensor:
        return _make_plan(x, weight_bank, stride, padding, dilation, groups)
    timed = benchmark_enabled() and _forced[0] is None
    key = (x.shape, x.stride(), x.dtype, weight_bank.shape, tuple(stride), tuple(padding),
           tuple(dilation), groups, torch.get_num_threads(), _forced, MIXED_WEIGHT_BUDGET_BYTES,
           LARGE_TEMPORARY_BYTES, SAVE_MIXED_MAX_FRACTION, SAVE_MIXED_MIN_BYTES, timed)
    plan = _plan_cache.get(key)
    if plan is None:
        formulations = None
        if timed:
            formulations = _benchmark_formulations(x, weight_bank, stride, padding, dilation,
                                                   groups)
        with force_formulation(formulations) if formulations else contextlib.nullcontext():
            plan = _make_plan(x, weight_bank, stride, padding, dilation, groups)
        if formulations is not None:  # the timed plan, taken as the rule's would be
            plan = plan._replace(benchmarked=True,
                                 graph=_takes_graph(plan.formulations, plan.save_mixed))
        if len(_plan_cache) >= PLAN_CACHE_SIZE:
            _plan_cache.clear()
        _plan_cache[key] = plan
    return plan


def _benchmark_formulations(x, weight_bank, stride, padding, dilation, groups):
    """Benchmark mode: where the rule is close to a threshold for this call
    (:func:`.rule.close_plans`), time a forward+backward of each close plan on x and the bank
    (routing weights drawn here: the time does not depend on their values) and return the
    fastest plan; None where there is nothing to choose."""
    batch, in_channels, height, width = x.shape
    out_channels, kernel = weight_bank.shape[1], tuple(weight_bank.shape[3:])
    out_hw = output_hw((height, width), kernel, stride, padding, dilation)
    if batch == 0:
        return None
    plans = close_plans(batch, in_channels, out_channels, (height, width), kernel, out_hw,
                        groups, x.dtype, output_memory_format(x) == torch.channels_last,
                        torch.get_num_threads(), tuple(stride))
    if len(plans) < 2:
        return None
    x, weight_bank = x.detach(), weight_bank.detach()
    routing = torch.softmax(torch.randn(batch, weight_bank.shape[0], device=x.device), dim=1)
    routing = routing.to(x.dtype)

    def run(plan):
        def forward_backward():
            with force_formulation(plan):
                y = forward_impl(x, weight_bank, routing, None, stride, padding, dilation,
                                 groups)
                backward_impl(torch.ones_like(y), x, weight_bank, routing, None, stride,
                              padding, dilation, groups, [True, True, True, False])
        return forward_backward

    times = benchmark.time_alternatives({plan: run(plan) for plan in plans}, x.device)
    chosen = benchmark.fastest(times)
    benchmark.log.debug("dynconv benchmark: native %s -> %s (%s)", tuple(x.shape), chosen,
                        benchmark.describe(times))
    return chosen


def clear_plan_cache() -> None:
    """Forget every cached plan (they are rebuilt on use)."""
    _plan_cache.clear()


def _make_plan(x, weight_bank, stride, padding, dilation, groups) -> CallPlan:
    batch, in_channels, height, width = x.shape
    out_channels, kernel = weight_bank.shape[1], tuple(weight_bank.shape[3:])
    out_h, out_w = output_hw((height, width), kernel, stride, padding, dilation)
    memory_format = output_memory_format(x)
    plan, chunk = _forced
    if plan is None:
        plan = choose_formulations(
            batch, in_channels, out_channels, (height, width), kernel, (out_h, out_w), groups,
            x.dtype, memory_format == torch.channels_last, torch.get_num_threads(),
            tuple(stride),
        )
    weight_numel = weight_bank[0].numel()
    if chunk is None:
        temp = 0
        if "im2col" in plan:
            temp = in_channels * kernel[0] * kernel[1] * out_h * out_w
        # Low-precision weight gradients are converted to fp32 for the bank gradient sums.
        element_size = max(x.element_size(), 4)
        chunk = batch_chunk_size(batch, weight_numel, element_size, temp)
        # Every chunk reads the whole bank (mixing, twice with backward) and updates its
        # gradient: with at least K samples per chunk that traffic stays at most that of the
        # chunk's own mixed weights. Not past LARGE_TEMPORARY_BYTES for a temporary allocated
        # fresh on every call, though: larger blocks come from the OS page by page each time,
        # and their page faults cost more than re-reading the bank. The mixed weights, and
        # the weight gradient of the formulations that write it into a buffer, live in the
        # reused workspace instead (which may then hold as much as the bank itself: K
        # samples); the rest (im2col patches, a grouped weight gradient, an fp32 copy of a
        # low-precision one) are fresh.
        fresh = temp
        if (plan.weight_grad not in WRITES_GRAD_WEIGHTS_INTO_BUFFER
                or element_size != x.element_size()):
            fresh = max(fresh, weight_numel)
        at_least_k = weight_bank.shape[0]
        if fresh:
            at_least_k = min(at_least_k, max(1, LARGE_TEMPORARY_BYTES // (fresh * element_size)))
        chunk = max(chunk, at_least_k)
        # Chunks of equal size: 16 samples in chunks of at most 14 run as 8 + 8, not 14 + 2
        # (a small last chunk is a poorly used convolution, and a second buffer shape).
        if 0 < chunk < batch:
            chunk = -(-batch // -(-batch // chunk))
    chunk = max(1, min(chunk, batch))
    weight_shape = tuple(weight_bank.shape[1:])
    save_mixed = batch > 0 and within_saving_threshold(
        batch * weight_numel * weight_bank.element_size(), x.numel() * x.element_size())
    graph = _takes_graph(plan, save_mixed)
    return CallPlan(
        plan, chunk, weight_shape, (chunk,) + weight_shape, weight_numel,
        _dense_strides((batch, out_channels, out_h, out_w), memory_format), save_mixed, graph,
    )


def within_saving_threshold(mixed_bytes: int, x_bytes: int) -> bool:
    """Whether B x |W| mixed weights of ``mixed_bytes`` may be kept for the backward (or the
    grouped trick's own graph taken) beside an input of ``x_bytes``: at most
    max(SAVE_MIXED_MAX_FRACTION of x, SAVE_MIXED_MIN_BYTES)."""
    return mixed_bytes <= max(SAVE_MIXED_MAX_FRACTION * x_bytes, SAVE_MIXED_MIN_BYTES)


def _takes_graph(plan: FormulationPlan, save_mixed: bool) -> bool:
    """Whether a call whose rule gives ``plan`` takes autograd's graph of the grouped trick
    (when it needs gradients): within the saving threshold (``save_mixed``), nothing forced,
    and the rule's input gradient the grouped one and its forward not per-sample. Measured
    (1 thread, CPU time, forward + backward, perf_reports/cpu_native "Fourth pass"): every
    all-grouped small layer is then level with the trick instead of 3-30 % behind, and so are
    the grouped / grouped / im2col and im2col / grouped / im2col plans of 256-384 channels at
    batch 1-4 (their Function was 8-26 % behind the trick: the im2col weight gradient's gain is
    smaller than splitting convolution_backward in two). A 1x1 layer (im2col for every part:
    0.7x the trick) and the per-sample plans keep the native Function."""
    return (save_mixed and _forced == (None, None) and plan.input_grad == "grouped"
            and plan.forward != "per_sample")


_workspace = threading.local()


# Workspace slots: the mixed weights of a chunk, and the chunk's per-sample weight gradient.
MIXED, GRAD_MIXED = "mixed", "grad_mixed"


def _workspace_buffer(chunk: int, bank_2d: torch.Tensor, slot: str = MIXED) -> torch.Tensor:
    """A (chunk, |W|) buffer, reused by every chunk: ``slot`` MIXED for the mixed weights of a
    chunk, GRAD_MIXED for their gradient (the weight gradient of the chunk's convolutions,
    where the formulation can write into a given buffer).

    On the CPU each slot is a per-thread workspace kept between calls (at most
    LARGE_TEMPORARY_BYTES per slot and dtype, or the largest bank's size where chunks of K
    samples need it; :func:`clear_workspace` frees it), because a
    buffer freed at the end of one pass and allocated again in the next comes back from the OS
    page by page: 18 MB of fresh pages cost ~10 ms on a 2-core VM, as much as the mixing
    itself. Elsewhere (CUDA keeps its own cache) it is a plain allocation, and so it is for
    tensor subclasses (fake tensors while tracing).
    """
    width = bank_2d.shape[1]
    dtype = bank_2d.dtype
    views = getattr(_workspace, "views", None)
    if views is not None and type(bank_2d) is torch.Tensor:
        view = views.get((slot, dtype, chunk, width))
        if view is not None and view.device == bank_2d.device:
            return view
    shape = (chunk, width)
    numel = chunk * width
    # At most LARGE_TEMPORARY_BYTES per slot, or the bank's size (K samples: see ``_plan``).
    limit = max(LARGE_TEMPORARY_BYTES, bank_2d.numel() * bank_2d.element_size())
    if (bank_2d.device.type != "cpu" or type(bank_2d) is not torch.Tensor
            or numel * bank_2d.element_size() > limit):
        return bank_2d.new_empty(shape)
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None or views is None:
        buffers = _workspace.buffers = {}
        views = _workspace.views = {}
    buffer = buffers.get((slot, dtype))
    # A normal tensor even if this first call runs under inference_mode, so that later calls
    # outside it may write into it (its views too).
    with torch.inference_mode(False):
        if buffer is None or buffer.numel() < numel:
            buffer = bank_2d.new_empty(numel)
            if type(buffer) is not torch.Tensor:  # a subclass made by an active mode
                return buffer.view(shape)
            buffers[(slot, dtype)] = buffer
            # The views of a smaller buffer would keep it alive: drop them.
            for key in [key for key in views if key[:2] == (slot, dtype)]:
                del views[key]
        view = buffer[:numel].view(shape)
    views[(slot, dtype, chunk, width)] = view
    return view


def clear_workspace() -> None:
    """Free this thread's workspace of the native backend (mixed weights and their gradient;
    it is rebuilt on use)."""
    _workspace.buffers = {}
    _workspace.views = {}


def _is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                 tap_scale=None):
    """y (B, Cout, Ho, Wo) from x (B, Cin, H, W), bank (K, Cout, Cin/g, kh, kw), routing (B, K);
    ``tap_scale`` (B, kh, kw) or None multiplies each sample's mixed kernel tap by tap."""
    plan = _plan(x, weight_bank, stride, padding, dilation, groups)
    return _forward(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, plan,
                    None, tap_scale)


def _scale_taps(weights: torch.Tensor, tap_scale: torch.Tensor | None) -> torch.Tensor:
    """``weights`` (n, ..., kh, kw), contiguous, times ``tap_scale`` (n, kh, kw) in place."""
    if tap_scale is not None:
        n, taps = weights.shape[0], tap_scale[0].numel()
        weights.view(n, -1, taps).mul_(tap_scale.reshape(n, 1, taps))
    return weights


def _forward(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, plan,
             mixed, tap_scale=None):
    """forward_impl with its plan; ``mixed`` (B, |W|), if given, receives all the mixed
    (and tap-scaled) weights (to be saved for backward) instead of the workspace."""
    batch = x.shape[0]
    chunk = plan.chunk
    bank_2d = weight_bank.reshape(weight_bank.shape[0], plan.weight_numel)
    if chunk == batch:  # one chunk: no slicing (an empty batch has chunk 1)
        if mixed is None:
            mixed = _workspace_buffer(chunk, bank_2d)
        weights = _scale_taps(torch.mm(routing, bank_2d, out=mixed), tap_scale).view(
            plan.chunk_weight_shape)
        bias = None if bias_bank is None else routing @ bias_bank
        y = conv_forward(plan.formulations.forward, x, weights, bias, stride, padding,
                         dilation, groups)
        # The output is copied only when the result does not have y's dense strides.
        if y.stride() == plan.y_strides:
            return y
        out = forward_output(x, weight_bank, stride, padding, dilation)
        out.copy_(y)
        return out
    buffer = _workspace_buffer(chunk, bank_2d) if mixed is None else None
    y = forward_output(x, weight_bank, stride, padding, dilation)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        a = routing[start:stop]
        out = mixed[start:stop] if buffer is None else buffer[: stop - start]
        weights = _scale_taps(torch.mm(a, bank_2d, out=out),
                              None if tap_scale is None else tap_scale[start:stop])
        weights = weights.view((stop - start,) + plan.weight_shape)
        bias = None if bias_bank is None else a @ bias_bank
        y[start:stop] = conv_forward(
            plan.formulations.forward, x[start:stop], weights, bias, stride, padding, dilation,
            groups,
        )
    return y


def _dense_strides(shape, memory_format) -> tuple[int, ...]:
    """Strides of ``torch.empty(shape, memory_format=memory_format)`` for a 4-d shape (as c10
    computes them: sizes of 0 count as 1 in contiguous strides, as they are in channels_last)."""
    if memory_format == torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [0] * 4, 1
    for dim in (3, 2, 1, 0):
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def backward_impl(
    grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, output_mask,
    mixed=None, *, tap_scale=None,
):
    """Gradients (x, weight_bank, routing, bias_bank), and tap_scale's fifth when it is given;
    an unrequested one is an empty tensor.

    For each chunk of samples the mixed weights W_b are recomputed (or read from ``mixed``,
    (B, |W|), the forward's, when it saved them), the per-sample weight
    gradient gW_b comes from the chunk's formulation, and it is contracted at once:
    grad_bank += a^T gW, grad_routing[b, k] = <gW_b, bank[k]> (+ the bias terms). With a tap
    scale s (B, T), T = kh kw, the gradient reaching the unscaled mix is s_b gW_b (scaled in
    place), contracted as above; grad_s[b, t] = sum_(o, i) gW_b[o, i, t] U_b[o, i, t] with U_b
    the unscaled mixed weights, mixed again into the workspace (one more (n, K) @ (K, |W|)
    product and one pass over gW, where a per-tap batched product of gW with the bank cost
    1.7x the whole backward at 512 channels 7x7: strided operands copied per tap).
    """
    need_x, need_bank, need_routing, need_bias = output_mask[:4]
    need_tap = tap_scale is not None and len(output_mask) > 4 and output_mask[4]
    need_bias = need_bias and bias_bank is not None
    need_weight = need_bank or need_routing or need_tap
    batch = x.shape[0]
    plan = _plan(x, weight_bank, stride, padding, dilation, groups)
    bank_2d = weight_bank.reshape(weight_bank.shape[0], plan.weight_numel)
    # Low-precision gradients are summed over chunks in fp32, then cast once.
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    # Outputs of a custom op may not alias each other: each unrequested gradient gets its own
    # empty tensor. grad_x is allocated only if the chunks' results cannot be returned as they
    # are (see forward_impl).
    _, grad_bank, grad_routing, grad_bias, *grad_tap = fake_backward_outputs(
        x, weight_bank, routing, bias_bank, [False, need_bank, need_routing, need_bias, need_tap],
        tap_scale,
    )
    tap_grads = tuple(grad_tap) if tap_scale is not None else ()
    grad_x = None if need_x and batch > 0 else (torch.empty_like(x) if need_x else x.new_empty(0))
    if batch == 0:  # no chunk runs: the bank gradients are exact zeros
        return (grad_x, grad_bank.zero_(), grad_routing, grad_bias.zero_()) + tap_grads
    # The bank gradients are accumulated over chunks straight in the outputs (the first chunk
    # writes, the others add), or in fp32 buffers cast once for low-precision inputs.
    low_precision = acc_dtype != x.dtype
    bank_acc = bias_acc = None
    if need_bank:
        bank_acc = bank_2d.new_empty(bank_2d.shape, dtype=acc_dtype) if low_precision else (
            grad_bank.view(bank_2d.shape))
    if need_bias:
        bias_acc = bias_bank.new_empty(bias_bank.shape, dtype=acc_dtype) if low_precision else (
            grad_bias)
    chunk = plan.chunk
    buffer = None
    if mixed is None and (need_x or need_weight):
        buffer = _workspace_buffer(chunk, bank_2d)
    # The chunk's weight gradient, if its formulation can write it into a buffer: reused by
    # every chunk and every call, like the mixed weights.
    grad_buffer = None
    if need_weight and plan.formulations.weight_grad in WRITES_GRAD_WEIGHTS_INTO_BUFFER:
        grad_buffer = _workspace_buffer(chunk, bank_2d, GRAD_MIXED)
    whole = chunk == batch
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        a = routing if whole else routing[start:stop]
        a_t = a.t().to(acc_dtype) if low_precision else a.t()
        grad_out_chunk = grad_out if whole else grad_out[start:stop]
        s = None if tap_scale is None else (tap_scale if whole else tap_scale[start:stop])
        if need_x or need_weight:
            if buffer is None:  # the forward's (tap-scaled there)
                weights = mixed if whole else mixed[start:stop]
            else:
                weights = _scale_taps(torch.mm(a, bank_2d, out=buffer if whole else buffer[:n]),
                                      s)
            weights = weights.view(plan.chunk_weight_shape if whole else (n,) + plan.weight_shape)
            gx, gw = _chunk_backward(
                plan.formulations, grad_out_chunk, x if whole else x[start:stop], weights, stride,
                padding, dilation, groups, need_x, need_weight,
                None if grad_buffer is None else grad_buffer[:n].view(weights.shape),
            )
            if need_x:
                if grad_x is None:
                    # torch.empty_like keeps the strides of a dense x: gx can stand for it if
                    # it has them.
                    single = whole and gx.stride() == x.stride() and _is_dense(x)
                    grad_x = gx if single else torch.empty_like(x)
                if grad_x is not gx:
                    grad_x[start:stop] = gx
            if need_weight:
                gw_2d = gw.reshape(n, -1)
                if s is not None:
                    if need_tap:
                        # The unscaled mixed weights again, into the chunk's workspace (free
                        # once the convolutions' backward has read the scaled ones).
                        if buffer is None:
                            buffer = _workspace_buffer(chunk, bank_2d)
                        unscaled = torch.mm(a, bank_2d, out=buffer if whole else buffer[:n])
                        _tap_gradient(unscaled, gw_2d, grad_tap[0][start:stop], acc_dtype)
                    gw_2d = _scale_taps(gw_2d if gw_2d.is_contiguous() else gw_2d.clone(), s)
                if need_bank:
                    _accumulate_mm(
                        bank_acc, a_t, gw_2d.to(acc_dtype) if low_precision else gw_2d, start
                    )
                if need_routing:
                    torch.mm(gw_2d, bank_2d.t(), out=grad_routing[start:stop])
        if bias_bank is not None and (need_bias or need_routing):
            grad_b = grad_out_chunk.sum(dim=(2, 3))
            if need_bias:
                _accumulate_mm(
                    bias_acc, a_t, grad_b.to(acc_dtype) if low_precision else grad_b, start
                )
            if need_routing:
                grad_routing[start:stop].addmm_(grad_b, bias_bank.t())
    if need_bank and low_precision:
        grad_bank.copy_(bank_acc.view(weight_bank.shape))
    if need_bias and low_precision:
        grad_bias.copy_(bias_acc)
    return (grad_x, grad_bank, grad_routing, grad_bias) + tap_grads


def _tap_gradient(unscaled, gw_2d, grad_tap, acc_dtype) -> None:
    """grad_tap (n, kh, kw) = sum over (o, i) of gW_b * W_b, W_b the unscaled mixed weights:
    ``unscaled`` (n, |W|), a workspace overwritten with the product; gw_2d (n, |W|)."""
    n, taps = grad_tap.shape[0], grad_tap[0].numel()
    product = unscaled.view(n, -1, taps).mul_(gw_2d.view(n, -1, taps))
    grad_tap.view(n, taps).copy_(product.sum(1, dtype=acc_dtype))


def _chunk_backward(plan, grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w,
                    gw_out=None):
    """(grad_x or None, grad_weights or None) of a chunk, each part by its own formulation
    (the weight gradient written into ``gw_out`` where that formulation can)."""
    if plan.input_grad == plan.weight_grad or not (need_x and need_w):
        formulation = plan.input_grad if need_x else plan.weight_grad
        return conv_backward(
            formulation, grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w,
            gw_out if need_w else None,
        )
    gx, _ = conv_backward(
        plan.input_grad, grad_out, x, weights, stride, padding, dilation, groups, True, False
    )
    _, gw = conv_backward(
        plan.weight_grad, grad_out, x, weights, stride, padding, dilation, groups, False, True,
        gw_out,
    )
    return gx, gw


def _accumulate_mm(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, start: int):
    """out = left @ right for the first chunk (start 0), out += left @ right after."""
    if start == 0:
        torch.mm(left, right, out=out)
    else:
        out.addmm_(left, right)


native_forward, native_backward = define_custom_ops("native", forward_impl, backward_impl)


class _EagerNativeConv(torch.autograd.Function):
    """The eager-mode twin of the custom ops: the same implementations without the custom op's
    dispatch and autograd wrapper, which also keeps the forward's mixed weights for backward
    when they are small (``CallPlan.save_mixed``; only when ``may_save``, i.e. grad mode is on
    and an input that needs them requires grad).

    Saving is eager-only: under torch.compile the op's schema (shared with the Triton backend)
    returns y alone (a second output would change the op both backends define, and its fake
    would need a size guard on H x W). Under the fraction of x the recompute it avoids is
    small (a (B, K) @ (K, |W|) product, K multiply-adds per weight, against the convolution's
    Ho x Wo >= about 4 Cout kh kw / groups per weight); under the 16 MiB floor it is not always
    (128 channels at 7x7), and there saving, or autograd's own graph, is what keeps small
    layers level with the grouped trick.
    """

    @staticmethod
    def forward(ctx, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                tap_scale, may_save):
        plan = _plan(x, weight_bank, stride, padding, dilation, groups)
        mixed = None
        if may_save and plan.save_mixed:
            mixed = weight_bank.new_empty((x.shape[0], plan.weight_numel))
        y = _forward(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                     plan, mixed, tap_scale)
        ctx.save_for_backward(x, weight_bank, routing, bias_bank, tap_scale, mixed)
        ctx.geometry = (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        # The saved mixed weights (or None) reach backward_impl after the mask.
        return backward_through(backward_impl, ctx, grad_out)


def native_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                          tap_scale=None):
    """Dispatch entry point: x (B, Cin, H, W) -> (B, Cout, Ho, Wo); ``tap_scale`` (B, kh, kw)
    or None: ODConv's tap scale of each sample's mixed kernel.

    Under torch.compile the custom op (one opaque node of the graph). In eager mode:

    - no gradient to record (grad mode off, or no input requires grad): the forward alone;
    - the plan's ``graph`` (B x |W| within the saving threshold and the rule's input gradient
      grouped, see ``_takes_graph``): autograd's own graph of the grouped trick, whose backward
      runs in autograd's C++ nodes; a Python ``autograd.Function`` costs ~0.15 ms a step more,
      as much as a small layer's convolution (a cost accepted elsewhere); it saves
      the B x |W| mixed weights, at most max(x / 4, 16 MiB) here, as the Function may;
    - otherwise the same implementation as the custom op through a plain autograd.Function,
      which skips the custom op's dispatch and autograd wrapper (a fixed cost per call that
      can be as large as a small layer's whole convolution).
    """
    if torch.compiler.is_compiling():
        return call_forward(native_forward, x, weight_bank, routing, bias_bank, geometry,
                            tap_scale)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight_bank.requires_grad or routing.requires_grad
        or (bias_bank is not None and bias_bank.requires_grad)
        or (tap_scale is not None and tap_scale.requires_grad))
    if not needs_grad:  # no graph to record: the forward alone, without autograd.Function
        return forward_impl(x, weight_bank, routing, bias_bank, geometry.stride,
                            geometry.padding, geometry.dilation, geometry.groups, tap_scale)
    if _plan(x, weight_bank, geometry.stride, geometry.padding, geometry.dilation,
             geometry.groups).graph:
        return grouped_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry, tap_scale)
    may_save = (x.requires_grad or weight_bank.requires_grad or routing.requires_grad
                or (tap_scale is not None and tap_scale.requires_grad))
    return _EagerNativeConv.apply(
        x, weight_bank, routing, bias_bank, geometry.stride, geometry.padding, geometry.dilation,
        geometry.groups, tap_scale, may_save,
    )
