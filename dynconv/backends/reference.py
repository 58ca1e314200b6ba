"""The two plain-autograd backends users write today, per-sample loop and grouped-conv trick, and
the forms ONNX export records.

Both backends are readable references; neither is lean. ``loop`` runs one ``F.conv2d`` per
sample; ``grouped`` folds the batch into the channel axis and runs one convolution with
``groups = B * groups``, which makes autograd keep the B x |W| mixed-weight tensor.

The export forms (``spanning``, ``scan``, ``matmul`` and ``auto``, a per-layer choice between
the first two) have the backends' signature and use only ops with a standard ONNX form, the
batch a plain leading dimension, so that the graph takes any batch size. What each costs in
onnxruntime is measured by ``python -m dynconv.autotune onnx`` (perf_reports/onnx/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.geometry import ConvGeometry, output_hw, output_memory_format


def mix_bank(routing: torch.Tensor, weight_bank: torch.Tensor,
             tap_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample kernels ``W[b] = sum_k routing[b, k] * weight_bank[k]`` as one matmul, each
    times ``tap_scale[b]`` (ODConv's (B, kh, kw) tap scale) when given.

    routing (B, K), weight_bank (K, Cout, Cin/g, kh, kw) -> (B, Cout, Cin/g, kh, kw).
    """
    num_experts = weight_bank.shape[0]
    mixed = routing @ weight_bank.reshape(num_experts, -1)
    mixed = mixed.reshape((routing.shape[0],) + tuple(weight_bank.shape[1:]))
    if tap_scale is not None:
        mixed = mixed * tap_scale[:, None, None]
    return mixed


def _empty_batch(x, weight_bank, routing, bias_bank, geometry: ConvGeometry, tap_scale=None):
    """y (0, Cout, Ho, Wo) for an empty batch, still connected to every input: the gradients
    of the bank and the bias bank are zeros (a sum over no samples), as the other backends'."""
    weight = torch.einsum("bk,k...->...", routing, weight_bank)
    if tap_scale is not None:
        weight = weight * tap_scale.sum(0)
    bias = None if bias_bank is None else torch.einsum("bk,kc->c", routing, bias_bank)
    return F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation,
                    geometry.groups).contiguous(memory_format=output_memory_format(x))


def loop_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                        tap_scale=None):
    """One ``F.conv2d`` per sample. x (B, Cin, H, W) -> (B, Cout, Ho, Wo); tap_scale
    (B, kh, kw) or None scales each sample's mixed kernel."""
    if x.shape[0] == 0:
        return _empty_batch(x, weight_bank, routing, bias_bank, geometry, tap_scale)
    outputs = []
    for b in range(x.shape[0]):
        weight = mix_bank(routing[b : b + 1], weight_bank,
                          None if tap_scale is None else tap_scale[b : b + 1])[0]
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


def grouped_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                           tap_scale=None):
    """The grouped-conv trick: the batch becomes groups. x (B, Cin, H, W) -> (B, Cout, Ho, Wo);
    tap_scale (B, kh, kw) or None scales each sample's mixed kernel."""
    batch, in_channels, height, width = x.shape
    if batch == 0:
        return _empty_batch(x, weight_bank, routing, bias_bank, geometry, tap_scale)
    out_channels = weight_bank.shape[1]
    weight = mix_bank(routing, weight_bank, tap_scale).reshape(
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


def _known_true(condition) -> bool:
    """Whether ``condition`` holds: a bool in eager mode; while tracing with symbolic sizes,
    True only where it holds for every size the trace covers (decided without adding a guard).
    """
    if isinstance(condition, bool):
        return condition
    # Imported here: it brings in sympy, half a second that ``import dynconv`` need not pay.
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(condition)


def _scan():
    """torch's ``scan`` higher-order op (a private API, which the ONNX exporter records as a
    ``Scan``), or None where this torch has none. Imported on use, not with dynconv."""
    try:
        from torch._higher_order_ops.scan import scan
    except ImportError:
        return None
    return scan


def scan_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                        tap_scale=None):
    """The per-sample form: every sample's kernel mixed once, then that sample's own conv.

    The mixing is one MatMul for the whole batch (``routing @ bank``, (B, K) x (K, |W|)); the
    convolutions run in a ``scan`` over the batch, which ONNX export records as a ``Scan`` whose
    body is one ``Conv`` taking sample b's (1, Cin, H, W) slice and its mixed weight as inputs.
    It costs the static conv's FLOPs (on the runtime's conv for non-constant weights) plus the
    mixing: the bank read once and B x |W| written. x (B, Cin, H, W) -> (B, Cout, Ho, Wo).
    A torch without ``scan`` (a private API of recent versions) records the spanning form.
    ``tap_scale`` (B, kh, kw) or None scales each sample's mixed kernel.
    """
    if _known_true(x.shape[0] == 0):
        return _empty_batch(x, weight_bank, routing, bias_bank, geometry, tap_scale)
    scan = _scan()
    if scan is None:  # a torch without it: the form every torch has
        if tap_scale is not None:
            from .scales import fold_tap_scale

            y = spanning_dynamic_conv2d(x, *fold_tap_scale(weight_bank, routing, tap_scale),
                                        None, geometry)
            return y if bias_bank is None else y + (routing @ bias_bank)[:, :, None, None]
        return spanning_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry)
    weights = mix_bank(routing, weight_bank, tap_scale)  # (B, Cout, Cin/g, kh, kw)
    samples = (x.unsqueeze(1), weights)  # x[b] as a (1, Cin, H, W) batch of one
    if bias_bank is not None:
        samples += (routing @ bias_bank,)  # (B, Cout)

    def one_sample(carry, sample):
        x_b, weight_b, *bias_b = sample
        y_b = F.conv2d(x_b, weight_b, bias_b[0] if bias_b else None, geometry.stride,
                       geometry.padding, geometry.dilation, geometry.groups)
        # scan carries a state from step to step; this form has none, and the carry returned
        # must not alias the one given (a HOP rule): hence the clone of a dummy.
        return carry.clone(), y_b

    _, y = scan(one_sample, x.new_zeros(1), samples)  # (B, 1, Cout, Ho, Wo)
    return y.squeeze(1).contiguous(memory_format=output_memory_format(x))


def matmul_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                          tap_scale=None):
    """The im2col form: patches, then one batched MatMul with the per-sample mixed weights.

    Patches come from a static depthwise Conv with one-hot kernels (channel ``c * kh * kw + t``
    of the result is input channel c shifted by tap t; a 1x1 kernel without padding takes the
    strided input itself), viewed as (B, G, Cin/G * kh * kw, Ho * Wo); the weights are mixed to
    (B, G, Cout/G, Cin/G * kh * kw). No loop and no Scan: the batch is the MatMul's batch.
    It writes and reads kh * kw x the input as patches. x (B, Cin, H, W) -> (B, Cout, Ho, Wo);
    ``tap_scale`` (B, kh, kw) or None scales each sample's mixed kernel.
    """
    batch, in_channels = x.shape[:2]
    _, out_channels, in_per_group, kh, kw = weight_bank.shape
    groups = geometry.groups
    out_h, out_w = output_hw(tuple(x.shape[2:]), (kh, kw), geometry.stride, geometry.padding,
                             geometry.dilation)
    if (kh, kw) == (1, 1) and tuple(geometry.padding) == (0, 0):
        patches = x[:, :, ::geometry.stride[0], ::geometry.stride[1]]
    else:
        one_hot = torch.eye(kh * kw, dtype=x.dtype, device=x.device).view(kh * kw, 1, kh, kw)
        patches = F.conv2d(x, one_hot.repeat(in_channels, 1, 1, 1), None, geometry.stride,
                           geometry.padding, geometry.dilation, in_channels)
    patches = patches.reshape(batch, groups, in_per_group * kh * kw, out_h * out_w)
    weights = mix_bank(routing, weight_bank, tap_scale).reshape(batch, groups,
                                                                out_channels // groups,
                                                     in_per_group * kh * kw)
    y = (weights @ patches).reshape(batch, out_channels, out_h, out_w)
    if bias_bank is not None:
        y = y + (routing @ bias_bank).view(batch, out_channels, 1, 1)
    return y.contiguous(memory_format=output_memory_format(x))


def auto_onnx_form(x, weight_bank, routing, bias_bank, geometry: ConvGeometry, tap_scale=None):
    """The default export form, chosen per layer from the shapes traced at export: ``spanning``
    for an ungrouped conv whose output is a single pixel, ``scan`` everywhere else.

    At one output pixel the conv is a few FLOPs per weight, so the per-sample form's cost is its
    mixing (B x |W| written, then read), and the K x FLOPs of spanning over one shared, constant
    weight cost less; not for a grouped (depthwise) conv, whose spanning Conv has K input
    channels per group, a slow path of onnxruntime's (measured: perf_reports/onnx/README.md).
    x (B, Cin, H, W) -> (B, Cout, Ho, Wo).
    """
    out_h, out_w = output_hw(tuple(x.shape[2:]), tuple(weight_bank.shape[3:]), geometry.stride,
                             geometry.padding, geometry.dilation)
    if geometry.groups == 1 and _known_true(out_h * out_w == 1) and tap_scale is None:
        return spanning_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry)
    return scan_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry, tap_scale)
