"""``dynamic_conv2d``: validate, then look the backend up in the registry and call it;
``dynamic_conv1d`` and ``dynamic_conv3d``: the same on one or three spatial axes, mapped onto
the 2-D backends (every backend runs them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends.registry import check_backend_name, resolve
from .backends.scales import scaled_conv2d
from .geometry import ConvGeometry
from .validation import check_conv_inputs, check_scales


def dynamic_conv2d(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    routing: torch.Tensor,
    bias_bank: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
    *,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    tap_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dynamic convolution: sample b is convolved with ``sum_k routing[b, k] * weight_bank[k]``.

    Args:
        x: input, (B, Cin, H, W), NCHW or channels_last.
        weight_bank: the kernel bank, (K, Cout, Cin // groups, kh, kw).
        routing: mixing weights, (B, K) (rows of a softmax, or sigmoid gates).
        bias_bank: optional bias bank, (K, Cout), mixed with the same weights.
        stride, padding, dilation, groups: as in ``F.conv2d``; ``padding`` is an int, a pair,
            ``"same"`` or ``"valid"`` (as in ``F.conv2d``), or ``"same_tf"``: TensorFlow's
            "SAME" (timm's ``Conv2dSame``, ONNX's ``SAME_UPPER``), any stride, the padding
            computed per call from H and W so that ``Ho = ceil(H / stride)``, the extra row /
            column of an odd total at the bottom / right.
        backend: ``"auto"`` (Triton on CUDA, ``"native"`` elsewhere), ``"loop"``,
            ``"grouped"``, ``"native"`` or ``"triton"``.
        in_scale, out_scale, tap_scale: ODConv's per-sample scales, each optional: (B, Cin),
            (B, Cout) and (B, kh, kw). Sample b's kernel becomes
            ``M_b[o, i, t] = out_scale[b, o] * in_scale[b, c] * tap_scale[b, t] * W_b[o, i, t]``
            (c the input channel that weight (o, i) reads); the bias is not scaled. The channel
            scales act on x and y (``conv(x * in_scale, .) * out_scale``), the tap scale on the
            mixed kernels (see :mod:`dynconv.backends.scales`).

    Returns:
        y, (B, Cout, Ho, Wo), in x's dtype.
    """
    check_backend_name(backend)
    geometry = check_conv_inputs(
        x, weight_bank, routing, bias_bank, stride, padding, dilation, groups
    )
    scaled = in_scale is not None or out_scale is not None or tap_scale is not None
    if scaled:
        check_scales(x, weight_bank, in_scale, out_scale, tap_scale)
    if geometry.extra_padding != (0, 0):
        # An odd total padding ("same" with an even dilated kernel, "same_tf"): pad the extra
        # row/column at the bottom/right as F.conv2d and TensorFlow do, then every backend sees
        # symmetric padding.
        x = F.pad(x, (0, geometry.extra_padding[1], 0, geometry.extra_padding[0]))
    if scaled:
        return scaled_conv2d(resolve(backend, x), x, weight_bank, routing, bias_bank, geometry,
                             in_scale, out_scale, tap_scale)
    return resolve(backend, x).function(x, weight_bank, routing, bias_bank, geometry)


def dynamic_conv1d(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    routing: torch.Tensor,
    bias_bank: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """1-D dynamic convolution: sample b is convolved with ``sum_k routing[b, k] *
    weight_bank[k]``.

    Args:
        x: input, (B, Cin, L); a channels-innermost x (strides (L * Cin, 1, Cin)) gives a
            channels-innermost y.
        weight_bank: (K, Cout, Cin // groups, k). routing: (B, K). bias_bank: (K, Cout) or
            None.
        stride, padding, dilation, groups: as in ``F.conv1d``; ``padding`` is an int, a
            1-tuple, ``"same"``, ``"valid"`` or ``"same_tf"`` (see :func:`dynamic_conv2d`).
        backend: as in :func:`dynamic_conv2d`.

    Returns:
        y, (B, Cout, Lo), in x's dtype.

    It runs as the 2-D convolution of x viewed as (B, Cin, 1, L) with the bank viewed as
    (K, Cout, Cin // groups, 1, k): views, no copies, the same kernels and the same cost.
    """
    check_backend_name(backend)
    geometry = check_conv_inputs(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                                 groups, spatial_dims=1)
    if geometry.extra_padding != (0,):
        x = F.pad(x, (0, geometry.extra_padding[0]))
    planar = ConvGeometry((1, geometry.stride[0]), (0, geometry.padding[0]),
                          (1, geometry.dilation[0]), geometry.groups)
    x2d = x.unsqueeze(2)
    y = resolve(backend, x2d).function(x2d, weight_bank.unsqueeze(3), routing, bias_bank,
                                       planar).squeeze(2)
    if x.stride(1) == 1 and not x.is_contiguous() and y.stride(1) != 1 and y.shape[1] > 1:
        y = y.transpose(1, 2).contiguous().transpose(1, 2)  # channels-innermost in, out
    return y


def dynamic_conv3d(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    routing: torch.Tensor,
    bias_bank: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """3-D dynamic convolution: sample b is convolved with ``sum_k routing[b, k] *
    weight_bank[k]``.

    Args:
        x: input, (B, Cin, D, H, W), NCDHW or channels_last_3d (which y keeps).
        weight_bank: (K, Cout, Cin // groups, kd, kh, kw). routing: (B, K). bias_bank:
            (K, Cout) or None.
        stride, padding, dilation, groups: as in ``F.conv3d``; ``padding`` is an int, a triple,
            ``"same"``, ``"valid"`` or ``"same_tf"`` (see :func:`dynamic_conv2d`).
        backend: as in :func:`dynamic_conv2d`.

    Returns:
        y, (B, Cout, Do, Ho, Wo), in x's dtype.

    It runs as kd 2-D dynamic convolutions, one per depth tap t, each over the B x Do output
    planes folded into the batch: ``y[b, :, d] = sum_t conv2d(x[b, :, d * sd + t * dd],
    sum_k a[b, k] bank[k, :, :, t])``. Exact, the same FLOPs as the 3-D convolution, on every
    backend; what it costs beyond that: the input planes of each tap are gathered into a folded
    copy (kd copies of about x's size, which the backward keeps), and each folded plane mixes
    its own per-sample weights (Do x the mixing of one weight per sample).
    """
    check_backend_name(backend)
    geometry = check_conv_inputs(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                                 groups, spatial_dims=3)
    (sd, sh, sw), (pd, ph, pw) = geometry.stride, geometry.padding
    (dd, dh, dw), (ed, eh, ew) = geometry.dilation, geometry.extra_padding
    channels_last = (x.dim() == 5 and not x.is_contiguous()
                     and x.is_contiguous(memory_format=torch.channels_last_3d))
    # the depth padding here (the taps slice a padded x), the extra bottom / right pixel of an
    # odd total too; the symmetric height / width padding goes to the 2-D calls
    if (pd, ed, eh, ew) != (0, 0, 0, 0):
        x = F.pad(x, (0, ew, 0, eh, pd, pd + ed))
    batch, depth = x.shape[0], x.shape[2]
    kernel_depth = weight_bank.shape[3]
    depth_out = (depth - dd * (kernel_depth - 1) - 1) // sd + 1
    planar = ConvGeometry((sh, sw), (ph, pw), (dh, dw), geometry.groups)
    routing_per_plane = routing.repeat_interleave(depth_out, dim=0)  # (B * Do, K), b-major
    y = None
    for tap in range(kernel_depth):
        first = tap * dd
        planes = _fold_depth(x[:, :, first:first + (depth_out - 1) * sd + 1:sd], channels_last)
        part = resolve(backend, planes).function(
            planes, weight_bank[:, :, :, tap].contiguous(), routing_per_plane,
            bias_bank if tap == 0 else None, planar)
        y = part if y is None else y + part
    return _unfold_depth(y, batch, depth_out, channels_last)


def _fold_depth(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C, D, H, W) -> (B * D, C, H, W), plane (b, d) at b * D + d; channels_last when
    asked (one copy either way)."""
    batch, channels, depth, height, width = x.shape
    if channels_last:
        folded = x.permute(0, 2, 3, 4, 1).reshape(batch * depth, height, width, channels)
        return folded.permute(0, 3, 1, 2)
    return x.transpose(1, 2).reshape(batch * depth, channels, height, width)


def _unfold_depth(y: torch.Tensor, batch: int, depth: int, channels_last: bool) -> torch.Tensor:
    """(B * D, C, H, W) -> (B, C, D, H, W): channels_last_3d when asked, else contiguous."""
    channels, height, width = y.shape[1:]
    if channels_last:
        return y.permute(0, 2, 3, 1).reshape(batch, depth, height, width, channels).permute(
            0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d)  # a view if it was
    return y.reshape(batch, depth, channels, height, width).transpose(1, 2).contiguous()
