"""The ``native`` backend: a lean custom-autograd dynamic convolution on PyTorch's own kernels.

It is what ``backend="auto"`` runs where Triton does not (the CPU). Compared to the grouped
trick under plain autograd it

- saves only x, the routing weights and the parameters for backward, never the mixed
  per-sample weights (B x |W|): those are recomputed chunk by chunk in backward;
- processes the batch in chunks so that the temporaries that exist at any moment (mixed
  weights, their gradient, im2col patches) are bounded: MIXED_WEIGHT_BUDGET_BYTES each, raised
  to K samples per chunk up to LARGE_TEMPORARY_BYTES (see :func:`batch_chunk_size`, ``_plan``);
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

import torch

from dynconv.geometry import ConvGeometry, output_hw, output_memory_format

from ..custom_op import (
    call_forward,
    define_custom_ops,
    eager_autograd_function,
    fake_backward_outputs,
    forward_output,
)
from .formulations import FORMULATIONS, conv_backward, conv_forward
from .rule import FormulationPlan, choose_formulations

# Bytes that each per-chunk temporary (the mixed weights, their gradient, the im2col patches
# and their gradient) may take.
MIXED_WEIGHT_BUDGET_BYTES = 8 * 2**20
# glibc serves blocks above 32 MiB (its largest mmap threshold) straight from mmap and returns
# them on free, so each such temporary page-faults anew on every call. Chunks stay below it.
LARGE_TEMPORARY_BYTES = 24 * 2**20

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


def _plan(x, weight_bank, stride, padding, dilation, groups) -> tuple[FormulationPlan, int]:
    """(formulation of each part, samples per chunk): forced, else the rule within the budget."""
    batch, in_channels, height, width = x.shape
    out_channels, kernel = weight_bank.shape[1], tuple(weight_bank.shape[3:])
    out_h, out_w = output_hw((height, width), kernel, stride, padding, dilation)
    plan, chunk = _forced
    if plan is None:
        plan = choose_formulations(
            batch, in_channels, out_channels, (height, width), kernel, (out_h, out_w), groups,
            x.dtype, output_memory_format(x) == torch.channels_last, torch.get_num_threads(),
            tuple(stride),
        )
    if chunk is None:
        temp = 0
        if "im2col" in plan:
            temp = in_channels * kernel[0] * kernel[1] * out_h * out_w
        weight_numel = weight_bank[0].numel()
        # Low-precision weight gradients are converted to fp32 for the bank gradient sums.
        element_size = max(x.element_size(), 4)
        chunk = batch_chunk_size(batch, weight_numel, element_size, temp)
        # Every chunk reads the whole bank (mixing, twice with backward) and updates its
        # gradient: with at least K samples per chunk that traffic stays at most that of the
        # chunk's own mixed weights. Not past LARGE_TEMPORARY_BYTES, though: larger blocks come
        # fresh from the OS on every call, and their page faults cost more than re-reading
        # the bank.
        at_least_k = min(weight_bank.shape[0], max(
            1, LARGE_TEMPORARY_BYTES // (max(weight_numel, temp) * element_size)))
        chunk = max(chunk, at_least_k)
    return plan, max(1, min(chunk, batch))


_workspace = threading.local()


def _mixed_weight_buffer(chunk: int, bank_2d: torch.Tensor) -> torch.Tensor:
    """A (chunk, |W|) buffer for the mixed weights of one chunk, reused by every chunk.

    On the CPU it is a per-thread workspace kept between calls (at most LARGE_TEMPORARY_BYTES
    per dtype; :func:`clear_workspace` frees it), because a buffer freed at the end of the
    forward and allocated again in the backward comes back from the OS page by page, which can
    cost as much as the mixing itself. Elsewhere (CUDA keeps its own cache) it is a plain
    allocation, and so it is for tensor subclasses (fake tensors while tracing).
    """
    shape = (chunk, bank_2d.shape[1])
    numel = chunk * bank_2d.shape[1]
    if (bank_2d.device.type != "cpu" or type(bank_2d) is not torch.Tensor
            or numel * bank_2d.element_size() > LARGE_TEMPORARY_BYTES):
        return bank_2d.new_empty(shape)
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    buffer = buffers.get(bank_2d.dtype)
    if buffer is None or buffer.numel() < numel:
        # A normal tensor even if this first call runs under inference_mode, so that later
        # calls outside it may write into it.
        with torch.inference_mode(False):
            buffer = bank_2d.new_empty(numel)
        if type(buffer) is not torch.Tensor:  # a subclass made by an active mode
            return buffer.view(shape)
        buffers[bank_2d.dtype] = buffer
    return buffer[:numel].view(shape)


def clear_workspace() -> None:
    """Free this thread's mixed-weight workspace of the native backend (it is rebuilt on use)."""
    _workspace.buffers = {}


def _is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups):
    """y (B, Cout, Ho, Wo) from x (B, Cin, H, W), bank (K, Cout, Cin/g, kh, kw), routing (B, K)."""
    batch = x.shape[0]
    num_experts, out_channels = weight_bank.shape[:2]
    bank_2d = weight_bank.reshape(num_experts, -1)
    plan, chunk = _plan(x, weight_bank, stride, padding, dilation, groups)
    mixed = _mixed_weight_buffer(chunk, bank_2d)
    y = None
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        a = routing if chunk == batch else routing[start:stop]
        weights = torch.mm(a, bank_2d, out=mixed[: stop - start])
        weights = weights.view((stop - start,) + tuple(weight_bank.shape[1:]))
        bias = None if bias_bank is None else a @ bias_bank
        y_chunk = conv_forward(
            plan.forward, x if chunk == batch else x[start:stop], weights, bias, stride, padding,
            dilation, groups,
        )
        if y is None:
            # The output is allocated only when the single chunk's result cannot be returned
            # as it is: an unused allocation would push the real one onto fresh pages.
            if chunk == batch and y_chunk.stride() == _dense_strides(
                    y_chunk.shape, output_memory_format(x)):
                return y_chunk
            y = forward_output(x, weight_bank, stride, padding, dilation)
        y[start:stop] = y_chunk
    if y is None:  # empty batch
        y = forward_output(x, weight_bank, stride, padding, dilation)
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
    grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, output_mask
):
    """Gradients (x, weight_bank, routing, bias_bank); an unrequested one is an empty tensor.

    For each chunk of samples the mixed weights W_b are recomputed, the per-sample weight
    gradient gW_b comes from the chunk's formulation, and it is contracted at once:
    grad_bank += a^T gW, grad_routing[b, k] = <gW_b, bank[k]> (+ the bias terms).
    """
    need_x, need_bank, need_routing, need_bias = output_mask
    need_bias = need_bias and bias_bank is not None
    need_weight = need_bank or need_routing
    batch = x.shape[0]
    num_experts = weight_bank.shape[0]
    bank_2d = weight_bank.reshape(num_experts, -1)
    # Low-precision gradients are summed over chunks in fp32, then cast once.
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    # Outputs of a custom op may not alias each other: each unrequested gradient gets its own
    # empty tensor. grad_x is allocated only if the chunks' results cannot be returned as they
    # are (see forward_impl).
    _, grad_bank, grad_routing, grad_bias = fake_backward_outputs(
        x, weight_bank, routing, bias_bank, [False, need_bank, need_routing, need_bias]
    )
    grad_x = None if need_x and batch > 0 else (torch.empty_like(x) if need_x else x.new_empty(0))
    if batch == 0:  # no chunk runs: the bank gradients are exact zeros
        return grad_x, grad_bank.zero_(), grad_routing, grad_bias.zero_()
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
    plan, chunk = _plan(x, weight_bank, stride, padding, dilation, groups)
    mixed = _mixed_weight_buffer(chunk, bank_2d) if need_x or need_weight else None
    whole = chunk == batch
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        a = routing if whole else routing[start:stop]
        a_t = a.t().to(acc_dtype) if low_precision else a.t()
        grad_out_chunk = grad_out if whole else grad_out[start:stop]
        if need_x or need_weight:
            weights = torch.mm(a, bank_2d, out=mixed[:n]).view((n,) + tuple(weight_bank.shape[1:]))
            gx, gw = _chunk_backward(
                plan, grad_out_chunk, x if whole else x[start:stop], weights, stride, padding,
                dilation, groups, need_x, need_weight,
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
    return grad_x, grad_bank, grad_routing, grad_bias


def _chunk_backward(plan, grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w):
    """(grad_x or None, grad_weights or None) of a chunk, each part by its own formulation."""
    if plan.input_grad == plan.weight_grad or not (need_x and need_w):
        formulation = plan.input_grad if need_x else plan.weight_grad
        return conv_backward(
            formulation, grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w
        )
    gx, _ = conv_backward(
        plan.input_grad, grad_out, x, weights, stride, padding, dilation, groups, True, False
    )
    _, gw = conv_backward(
        plan.weight_grad, grad_out, x, weights, stride, padding, dilation, groups, False, True
    )
    return gx, gw


def _accumulate_mm(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, start: int):
    """out = left @ right for the first chunk (start 0), out += left @ right after."""
    if start == 0:
        torch.mm(left, right, out=out)
    else:
        out.addmm_(left, right)


native_forward, native_backward = define_custom_ops("native", forward_impl, backward_impl)
_EagerNativeConv = eager_autograd_function("EagerNativeConv", forward_impl, backward_impl)


def native_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """Dispatch entry point: x (B, Cin, H, W) -> (B, Cout, Ho, Wo).

    Under torch.compile the custom op (one opaque node of the graph); in eager mode the same
    implementation through a plain autograd.Function, which skips the custom op's dispatch and
    autograd wrapper (a fixed cost per call that can be as large as a small layer's whole
    convolution).
    """
    forward_op = native_forward if torch.compiler.is_compiling() else _EagerNativeConv.apply
    return call_forward(forward_op, x, weight_bank, routing, bias_bank, geometry)
