"""The ``native`` backend: a lean custom-autograd dynamic convolution on PyTorch's own kernels.

It is what ``backend="auto"`` runs where Triton does not (the CPU). Compared to the grouped
trick under plain autograd it

- saves only x, the routing weights and the parameters for backward, never the mixed
  per-sample weights (B x |W|): those are recomputed chunk by chunk in backward;
- processes the batch in chunks so that the mixed weights and the weight gradients that exist at
  any moment are bounded (see :func:`batch_chunk_size`);
- is a ``torch.library`` custom op, so ``torch.compile(fullgraph=True, dynamic=True)`` treats it
  as one opaque node (Inductor cannot lower a convolution whose ``groups`` depends on a symbolic
  batch size).
"""

from __future__ import annotations

import torch

from .validation import ConvGeometry

# Bytes of mixed weights (and of their gradient in backward) allowed to exist per chunk.
MIXED_WEIGHT_BUDGET_BYTES = 8 * 2**20


def batch_chunk_size(batch: int, weight_numel: int, element_size: int) -> int:
    """Samples per chunk so that one chunk's mixed weights fit MIXED_WEIGHT_BUDGET_BYTES."""
    return max(1, min(batch, MIXED_WEIGHT_BUDGET_BYTES // max(1, weight_numel * element_size)))


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is channels_last (and not also plain contiguous), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _output_hw(x, weight_bank, stride, padding, dilation):
    sizes = []
    for axis in range(2):
        reach = dilation[axis] * (weight_bank.shape[3 + axis] - 1) + 1
        sizes.append((x.shape[2 + axis] + 2 * padding[axis] - reach) // stride[axis] + 1)
    return sizes


def _grouped_chunk(x_chunk, weights, bias, stride, padding, dilation, groups):
    """Convolve a chunk of n samples with their own weights via one grouped convolution."""
    n, in_channels, height, width = x_chunk.shape
    y = torch.nn.functional.conv2d(
        x_chunk.reshape(1, n * in_channels, height, width), weights, bias, stride, padding,
        dilation, n * groups,
    )
    return y.reshape(n, -1, y.shape[2], y.shape[3])


@torch.library.custom_op("dynconv::native_forward", mutates_args=())
def native_forward(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    routing: torch.Tensor,
    bias_bank: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """y (B, Cout, Ho, Wo) from x (B, Cin, H, W), bank (K, Cout, Cin/g, kh, kw), routing (B, K)."""
    batch = x.shape[0]
    num_experts, out_channels = weight_bank.shape[:2]
    kernel_shape = tuple(weight_bank.shape[2:])
    bank_2d = weight_bank.reshape(num_experts, -1)
    chunk = batch_chunk_size(batch, bank_2d.shape[1], x.element_size())
    height_out, width_out = _output_hw(x, weight_bank, stride, padding, dilation)
    y = x.new_empty((batch, out_channels, height_out, width_out)).contiguous(
        memory_format=output_memory_format(x)
    )
    for start in range(0, batch, chunk):
        a = routing[start : start + chunk]
        weights = (a @ bank_2d).reshape((a.shape[0] * out_channels,) + kernel_shape)
        bias = None if bias_bank is None else (a @ bias_bank).reshape(-1)
        y[start : start + chunk] = _grouped_chunk(
            x[start : start + chunk], weights, bias, stride, padding, dilation, groups
        )
    return y


@native_forward.register_fake
def _native_forward_fake(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups):
    height_out, width_out = _output_hw(x, weight_bank, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight_bank.shape[1], height_out, width_out)).contiguous(
        memory_format=output_memory_format(x)
    )


@torch.library.custom_op("dynconv::native_backward", mutates_args=())
def native_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    routing: torch.Tensor,
    bias_bank: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, weight_bank, routing, bias_bank); an unrequested one is an empty tensor.

    For each chunk of samples the mixed weights W_b are recomputed, the per-sample weight
    gradient gW_b comes from one grouped ``convolution_backward``, and it is contracted at once:
    grad_bank += a^T gW, grad_routing[b, k] = <gW_b, bank[k]> (+ the bias terms).
    """
    need_x, need_bank, need_routing, need_bias = output_mask
    need_bias = need_bias and bias_bank is not None
    batch = x.shape[0]
    num_experts, out_channels = weight_bank.shape[:2]
    kernel_shape = tuple(weight_bank.shape[2:])
    bank_2d = weight_bank.reshape(num_experts, -1)
    # Low-precision gradients are summed over chunks in fp32, then cast once.
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    # Outputs of a custom op may not alias each other: each unrequested gradient gets its own
    # empty tensor.
    empty = lambda: x.new_empty(0)  # noqa: E731
    grad_x = torch.empty_like(x) if need_x else empty()
    grad_bank = bank_2d.new_zeros(bank_2d.shape, dtype=acc_dtype) if need_bank else None
    grad_routing = torch.empty_like(routing) if need_routing else empty()
    grad_bias = (
        bias_bank.new_zeros(bias_bank.shape, dtype=acc_dtype) if need_bias else None
    )
    need_weight = need_bank or need_routing
    chunk = batch_chunk_size(batch, bank_2d.shape[1], x.element_size())
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        a = routing[start:stop]
        if need_x or need_weight:
            weights = (a @ bank_2d).reshape((n * out_channels,) + kernel_shape)
            x_chunk = x[start:stop]
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad_out[start:stop].reshape(1, n * out_channels, *grad_out.shape[2:]),
                x_chunk.reshape(1, -1, *x.shape[2:]),
                weights, None, stride, padding, dilation, False, [0, 0], n * groups,
                [need_x, need_weight, False],
            )
            if need_x:
                grad_x[start:stop] = gx.reshape(x_chunk.shape)
            if need_weight:
                gw_2d = gw.reshape(n, -1)
                if need_bank:
                    grad_bank.addmm_(a.t().to(acc_dtype), gw_2d.to(acc_dtype))
                if need_routing:
                    grad_routing[start:stop] = gw_2d @ bank_2d.t()
        if bias_bank is not None and (need_bias or need_routing):
            grad_b = grad_out[start:stop].sum(dim=(2, 3))
            if need_bias:
                grad_bias.addmm_(a.t().to(acc_dtype), grad_b.to(acc_dtype))
            if need_routing:
                grad_routing[start:stop] += grad_b @ bias_bank.t()
    grad_bank = grad_bank.to(x.dtype).reshape(weight_bank.shape) if need_bank else empty()
    grad_bias = grad_bias.to(x.dtype) if need_bias else empty()
    return grad_x, grad_bank, grad_routing, grad_bias


@native_backward.register_fake
def _native_backward_fake(
    grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, output_mask
):
    need_x, need_bank, need_routing, need_bias = output_mask
    empty = lambda: x.new_empty(0)  # noqa: E731
    return (
        torch.empty_like(x) if need_x else empty(),
        torch.empty_like(weight_bank, memory_format=torch.contiguous_format)
        if need_bank else empty(),
        torch.empty_like(routing, memory_format=torch.contiguous_format)
        if need_routing else empty(),
        bias_bank.new_empty(bias_bank.shape)
        if (need_bias and bias_bank is not None) else empty(),
    )


def _setup_context(ctx, inputs, output):
    x, weight_bank, routing, bias_bank, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight_bank, routing, bias_bank)
    ctx.geometry = (stride, padding, dilation, groups)


def _backward(ctx, grad_out):
    x, weight_bank, routing, bias_bank = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    mask = list(ctx.needs_input_grad[:4])
    grad_x, grad_bank, grad_routing, grad_bias = native_backward(
        grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, mask
    )
    return (
        grad_x if mask[0] else None,
        grad_bank if mask[1] else None,
        grad_routing if mask[2] else None,
        grad_bias if mask[3] and bias_bank is not None else None,
        None, None, None, None,
    )


native_forward.register_autograd(_backward, setup_context=_setup_context)


def native_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """Dispatch entry point: x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
    return native_forward(
        x, weight_bank, routing, bias_bank, list(geometry.stride), list(geometry.padding),
        list(geometry.dilation), geometry.groups,
    )
