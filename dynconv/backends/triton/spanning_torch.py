"""The batch-spanning formulation on PyTorch's own convolutions (cuDNN on a GPU): a forward and a
backward strategy of the ``triton`` backend, chosen where they are measured faster than the
Triton kernels (:mod:`.strategy`).

``y[b] = sum_k a[b, k] conv(x[b], W_k)`` is one static convolution of the routing-scaled input
stacked along the channels, within each group (``x_s[b, (g, k, c)] = a[b, k] x[b, (g, c)]``,
(B, G * K * Cin/G, H, W)) with the bank as one weight (``W_s[(g, o), (k, c)] = bank[k, (g, o),
c]``, (Cout, K * Cin/G, kh, kw)). Its backward is that convolution's: one input gradient
``gx_s`` and one weight gradient, each a static convolution whose reduction spans the batch, with
K x the FLOPs of the static layer's. From them:

    grad_x[b, (g, c)] = sum_k a[b, k] gx_s[b, (g, k, c)]
    grad_a[b, k]      = sum_{g, c, pixels} gx_s[b, (g, k, c)] x[b, (g, c)]   (+ the bias part)
    grad_bank[k, (g, o), c] = gW_s[(g, o), (k, c)]

What the per-sample Triton weight gradient pays for instead is one GEMM per sample whose
reduction is only that sample's output pixels (49 at 7x7), and B x |W| per-sample gradients
contracted in its epilogue: measured on an H200 at batch 32 it is 8-40x cuDNN's static weight
gradient, where this form is about K x.

Memory: the batch runs in chunks whose stacked input (K x x's bytes) fits
``SPANNING_BUFFER_BYTES``; the backward holds x_s and gx_s of one chunk, the forward x_s. The
mixed weights (B x |W|) are never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bytes of one chunk's stacked input (K x the chunk's x); the batch is processed in chunks that
# fit, of at least one sample.
SPANNING_BUFFER_BYTES = 64 * 2**20


def chunk_size(x: torch.Tensor, num_experts: int, budget_bytes: int | None = None) -> int:
    """Samples per chunk: as many as keep the stacked input within ``budget_bytes``."""
    budget = SPANNING_BUFFER_BYTES if budget_bytes is None else budget_bytes
    per_sample = max(1, x[:1].numel() * x.element_size() * num_experts)
    return max(1, min(x.shape[0], budget // per_sample))


def stacked_input(x: torch.Tensor, routing: torch.Tensor, groups: int) -> torch.Tensor:
    """x_s (B, G * K * Cin/G, H, W): ``x_s[b, (g, k, c)] = a[b, k] x[b, (g, c)]``, as the
    reference form builds it (:func:`dynconv.backends.reference.spanning_dynamic_conv2d`: one
    broadcast product of x (B, G, 1, Cin/G, H, W) and the routing (B, 1, K, 1, 1, 1)), whose
    forward and backward through autograd measured 2.3-3.7x the static conv against 4.0-7.4x
    for an einsum formulation of the backward (H200, ResNet-18 layers at batch 32, bf16)."""
    batch, channels, height, width = x.shape
    num_experts = routing.shape[1]
    scaled = routing.view(batch, 1, num_experts, 1, 1, 1) * x.reshape(
        batch, groups, 1, channels // groups, height, width)
    return scaled.reshape(batch, groups * num_experts * (channels // groups), height, width)


def stacked_weight(weight_bank: torch.Tensor, groups: int) -> torch.Tensor:
    """W_s (Cout, K * Cin/G, kh, kw): ``W_s[(g, o), (k, c)] = bank[k, (g, o), c]``."""
    num_experts, out_channels, in_per_group = weight_bank.shape[:3]
    taps = weight_bank.shape[3:]
    grouped = weight_bank.view(num_experts, groups, out_channels // groups, in_per_group, *taps)
    return grouped.permute(1, 2, 0, 3, 4, 5).reshape(out_channels, num_experts * in_per_group,
                                                     *taps)


def bank_gradient(stacked_grad: torch.Tensor, weight_bank_shape, groups: int) -> torch.Tensor:
    """gW_s (Cout, K * Cin/G, kh, kw) back in the bank's layout (K, Cout, Cin/G, kh, kw)."""
    num_experts, out_channels, in_per_group = weight_bank_shape[:3]
    taps = tuple(weight_bank_shape[3:])
    grouped = stacked_grad.contiguous().view(groups, out_channels // groups, num_experts,
                                              in_per_group, *taps)
    return grouped.permute(2, 0, 1, 3, 4, 5).reshape(num_experts, out_channels, in_per_group,
                                                     *taps)


def spanning_torch_forward(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                           groups: int, out: torch.Tensor) -> torch.Tensor:
    """y into ``out`` (B, Cout, Ho, Wo; x's memory format), chunk by chunk over the batch."""
    weight = stacked_weight(weight_bank, groups)
    step = chunk_size(x, weight_bank.shape[0])
    for start in range(0, x.shape[0], step):
        stop = min(x.shape[0], start + step)
        routing_chunk = routing[start:stop]
        y = F.conv2d(stacked_input(x[start:stop], routing_chunk, groups), weight, None,
                     stride, padding, dilation, groups)
        if bias_bank is not None:
            y = y + (routing_chunk @ bias_bank)[:, :, None, None]
        out[start:stop].copy_(y)
    return out


def spanning_torch_backward(grad_out, x, weight_bank, routing, bias_bank, stride, padding,
                            dilation, groups: int, output_mask, bias_gradients):
    """(grad_x or None, grad_bank or None, grad_routing or None, grad_bias or None) for
    ``output_mask`` (x, bank, routing, bias). ``bias_gradients(grad_out, routing, bias_bank,
    need_routing, need_bias) -> (grad_a's bias part (B, K) fp32 or None, grad_bias fp32 or
    None)``: the Triton backward's own, shared. Sums over the experts and the batch accumulate
    in fp32; each gradient is returned in its input's dtype."""
    need_x, need_bank, need_routing, need_bias = output_mask
    need_bias = need_bias and bias_bank is not None
    batch, channels = x.shape[:2]
    num_experts = weight_bank.shape[0]
    in_per_group = channels // groups
    weight = stacked_weight(weight_bank, groups)
    need_stacked_x = need_x or need_routing  # both come from gx_s
    accumulate = torch.promote_types(x.dtype, torch.float32)
    grad_x = torch.empty_like(x) if need_x else None  # x's strides, as the kernels' grad_x
    grad_a = (torch.empty(batch, num_experts, dtype=accumulate, device=x.device)
              if need_routing else None)
    grad_weight = (torch.zeros(weight.shape, dtype=accumulate, device=x.device)
                   if need_bank else None)
    step = chunk_size(x, num_experts)
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        x_chunk, routing_chunk = x[start:stop], routing[start:stop]
        stacked = stacked_input(x_chunk, routing_chunk, groups)
        grad_stacked, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out[start:stop], stacked, weight, None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [need_stacked_x, need_bank, False])
        if need_bank:
            grad_weight += grad_w
        if not need_stacked_x:
            continue
        # gx_s as (B, G, K, Cin/G, H, W): the broadcast product's two gradients, as autograd
        # takes them (a product and a sum over the broadcast dimension each)
        height, width = x.shape[2:]
        count = stop - start
        stacked_grad = grad_stacked.reshape(count, groups, num_experts, in_per_group, height,
                                            width)
        if need_x:
            grad_x[start:stop] = (stacked_grad * routing_chunk.view(
                count, 1, num_experts, 1, 1, 1)).sum(2).reshape(x_chunk.shape)
        if need_routing:
            grad_a[start:stop] = (stacked_grad * x_chunk.reshape(
                count, groups, 1, in_per_group, height, width)).sum(
                (1, 3, 4, 5), dtype=accumulate)
    grad_bank = None
    if need_bank:
        grad_bank = bank_gradient(grad_weight, weight_bank.shape, groups).to(weight_bank.dtype)
    grad_bias = None
    if need_routing or need_bias:
        ga_bias, grad_bias = bias_gradients(grad_out, routing, bias_bank,
                                            need_routing and bias_bank is not None, need_bias)
        if ga_bias is not None:
            grad_a += ga_bias
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_bank.dtype)
    if grad_a is not None:
        grad_a = grad_a.to(routing.dtype)
    return grad_x, grad_bank, grad_a, grad_bias
