"""The two plain-autograd backends users write today: per-sample loop and grouped-conv trick.

Both are readable references; neither is lean. ``loop`` runs one ``F.conv2d`` per sample;
``grouped`` folds the batch into the channel axis and runs one convolution with
``groups = B * groups``, which makes autograd keep the B x |W| mixed-weight tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.geometry import ConvGeometry, output_memory_format


def mix_bank(routing: torch.Tensor, weight_bank: torch.Tensor) -> torch.Tensor:
    """Per-sample kernels ``W[b] = sum_k routing[b, k] * weight_bank[k]`` as one matmul.

    routing (B, K), weight_bank (K, *kernel_shape) -> (B, *kernel_shape).
    """
    num_experts = weight_bank.shape[0]
    mixed = routing @ weight_bank.reshape(num_experts, -1)
    return mixed.reshape((routing.shape[0],) + tuple(weight_bank.shape[1:]))


def _empty_batch(x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """y (0, Cout, Ho, Wo) for an empty batch, still connected to every input: the gradients
    of the bank and the bias bank are zeros (a sum over no samples), as the other backends'."""
    weight = torch.einsum("bk,k...->...", routing, weight_bank)
    bias = None if bias_bank is None else torch.einsum("bk,kc->c", routing, bias_bank)
    return F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation,
                    geometry.groups).contiguous(memory_format=output_memory_format(x))


def loop_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """One ``F.conv2d`` per sample. x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
    if x.shape[0] == 0:
        return _empty_batch(x, weight_bank, routing, bias_bank, geometry)
    outputs = []
    for b in range(x.shape[0]):
        weight = mix_bank(routing[b : b + 1], weight_bank)[0]
        bias = None if bias_bank is None else routing[b] @ bias_bank
        outputs.append(
            F.conv2d(
                x[b : b + 1],
                weight,
                bias,
                geometry.stride,
                geometry.padding,
                geometry.dilation,
                geometry.groups,
            )
        )
    return torch.cat(outputs, dim=0)


def grouped_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """The grouped-conv trick: the batch becomes groups. x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
    batch, in_channels, height, width = x.shape
    if batch == 0:
        return _empty_batch(x, weight_bank, routing, bias_bank, geometry)
    out_channels = weight_bank.shape[1]
    weight = mix_bank(routing, weight_bank).reshape(
        (batch * out_channels,) + tuple(weight_bank.shape[2:])
    )
    bias = None if bias_bank is None else (routing @ bias_bank).reshape(-1)
    y = F.conv2d(
        x.reshape(1, batch * in_channels, height, width),
        weight,
        bias,
        geometry.stride,
        geometry.padding,
        geometry.dilation,
        batch * geometry.groups,
    )
    # The batch folded into channels loses x's memory format: give y the one F.conv2d would.
    y = y.reshape(batch, out_channels, y.shape[2], y.shape[3])
    return y.contiguous(memory_format=output_memory_format(x))


def spanning_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """The batch-spanning form: ``y[b] = sum_k a[b, k] conv(x[b], W_k)`` as ONE static conv.

    The input is scaled by each expert's routing weight and stacked along channels, within each
    group: x' (B, G * K * Cin/G, H, W) with ``x'[b, (g, k, c)] = a[b, k] x[b, (g, c)]``, and the
    bank is one weight (Cout, K * Cin/G, kh, kw) with ``W'[(g, o), (k, c)] = bank[k, (g, o), c]``;
    the bias is ``a @ bias_bank``. Every op is a standard one with the batch as a plain leading
    dimension, so this is what ONNX export records (any batch size); it costs K x the FLOPs of
    the static conv, so it is not a training path. x (B, Cin, H, W) -> (B, Cout, Ho, Wo).
    """
    batch, in_channels, height, width = x.shape
    num_experts, out_channels, in_per_group = weight_bank.shape[:3]
    groups = geometry.groups
    scaled = routing.view(batch, 1, num_experts, 1, 1, 1) * x.reshape(
        batch, groups, 1, in_per_group, height, width)
    scaled = scaled.reshape(batch, groups * num_experts * in_per_group, height, width)
    weight = weight_bank.reshape(num_experts, groups, out_channels // groups, in_per_group,
                                 *weight_bank.shape[3:])
    weight = weight.permute(1, 2, 0, 3, 4, 5).reshape(
        out_channels, num_experts * in_per_group, *weight_bank.shape[3:])
    y = F.conv2d(scaled, weight, None, geometry.stride, geometry.padding, geometry.dilation,
                 groups)
    if bias_bank is not None:
        y = y + (routing @ bias_bank).view(batch, out_channels, 1, 1)
    return y.contiguous(memory_format=output_memory_format(x))
