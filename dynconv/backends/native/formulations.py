"""Per-chunk convolution formulations of the ``native`` backend, all on PyTorch's own kernels.

Every formulation convolves a chunk of n samples, each with its own (already mixed) weights,
and computes the matching gradients. They differ only in how they map that batch of small
convolutions onto PyTorch kernels; which is fastest depends on the shape and the thread count
(see :mod:`dynconv.backends.native.rule` and ``python -m dynconv.autotune.cpu_formulations``):

- ``grouped``: one convolution with ``groups = n * groups``, the batch folded into channels;
- ``per_sample``: one ``F.conv2d`` / ``convolution_backward`` call per sample;
- ``im2col``: the patches of the chunk gathered once (a strided view, one copy), then one
  batched matmul per chunk; the input gradient is scattered back with ``F.fold``.

Shapes, for one chunk: x (n, Cin, H, W); weights (n, Cout, Cin // groups, kh, kw);
bias (n, Cout) or None; y and grad_out (n, Cout, Ho, Wo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.geometry import output_hw

FORMULATIONS = ("grouped", "per_sample", "im2col")


def _grouped_forward(x, weights, bias, stride, padding, dilation, groups):
    n, in_channels, height, width = x.shape
    y = F.conv2d(
        x.reshape(1, n * in_channels, height, width), weights.flatten(0, 1),
        None if bias is None else bias.reshape(-1), stride, padding, dilation, n * groups,
    )
    return y.view(n, -1, y.shape[2], y.shape[3])


def _grouped_backward(grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w,
                      gw_out=None):
    n = x.shape[0]
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad_out.reshape(1, -1, grad_out.shape[2], grad_out.shape[3]),
        x.reshape(1, -1, x.shape[2], x.shape[3]), weights.flatten(0, 1), None, stride, padding,
        dilation, False, [0, 0], n * groups, [need_x, need_w, False],
    )
    return (
        gx.view(x.shape) if need_x else None,
        gw.view(weights.shape) if need_w else None,
    )


def _per_sample_forward(x, weights, bias, stride, padding, dilation, groups):
    return torch.cat([
        F.conv2d(
            x[i : i + 1], weights[i], None if bias is None else bias[i], stride, padding,
            dilation, groups,
        )
        for i in range(x.shape[0])
    ])


def _per_sample_backward(grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w,
                         gw_out=None):
    grads_x, grads_w = [], []
    for i in range(x.shape[0]):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad_out[i : i + 1], x[i : i + 1], weights[i], None, stride, padding, dilation,
            False, [0, 0], groups, [need_x, need_w, False],
        )
        grads_x.append(gx)
        grads_w.append(gw)
    return (
        torch.cat(grads_x) if need_x else None,
        (torch.stack(grads_w) if gw_out is None else torch.stack(grads_w, out=gw_out))
        if need_w else None,
    )


def _patch_view(x_padded, kernel, stride, dilation, out_hw):
    """(n, Cin, kh, kw, Ho, Wo) view of the patches of a padded input (no copy)."""
    n, channels = x_padded.shape[:2]
    s_n, s_c, s_h, s_w = x_padded.stride()
    return x_padded.as_strided(
        (n, channels, kernel[0], kernel[1], out_hw[0], out_hw[1]),
        (s_n, s_c, dilation[0] * s_h, dilation[1] * s_w, stride[0] * s_h, stride[1] * s_w),
        x_padded.storage_offset(),
    )


def _im2col(x, kernel, stride, padding, dilation, groups, out_hw):
    """Patches as (n * groups, Cin // groups * kh * kw, Ho * Wo), in F.unfold's order."""
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, channels = x.shape[:2]
    patches = _patch_view(x, kernel, stride, dilation, out_hw)
    return patches.reshape(n * groups, channels // groups * kernel[0] * kernel[1], -1)


def _im2col_forward(x, weights, bias, stride, padding, dilation, groups):
    n, out_channels = weights.shape[:2]
    kernel = weights.shape[3:]
    out_hw = output_hw(x.shape[2:], kernel, stride, padding, dilation)
    cols = _im2col(x, kernel, stride, padding, dilation, groups, out_hw)
    w = weights.reshape(n * groups, out_channels // groups, -1)
    if bias is None:
        y = torch.bmm(w, cols)
    else:
        y = torch.baddbmm(bias.reshape(n * groups, out_channels // groups, 1), w, cols)
    return y.view(n, out_channels, out_hw[0], out_hw[1])


def _im2col_backward(grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w,
                     gw_out=None):
    n, out_channels = weights.shape[:2]
    kernel = weights.shape[3:]
    out_hw = grad_out.shape[2:]
    gy = grad_out.reshape(n * groups, out_channels // groups, -1)
    w = weights.reshape(n * groups, out_channels // groups, -1)
    gx = gw = None
    # One patch-sized temporary at a time: the patches are freed before their gradient exists.
    if need_w:
        cols = _im2col(x, kernel, stride, padding, dilation, groups, out_hw)
        out = None if gw_out is None else gw_out.view(gy.shape[0], gy.shape[1], cols.shape[1])
        gw = torch.bmm(gy, cols.transpose(1, 2), out=out).view(weights.shape)
        del cols
    if need_x:
        grad_cols = torch.bmm(w.transpose(1, 2), gy).view(n, -1, gy.shape[2])
        gx = F.fold(grad_cols, tuple(x.shape[2:]), kernel, dilation, padding, stride)
    return gx, gw


_FORWARD = {
    "grouped": _grouped_forward,
    "per_sample": _per_sample_forward,
    "im2col": _im2col_forward,
}
_BACKWARD = {
    "grouped": _grouped_backward,
    "per_sample": _per_sample_backward,
    "im2col": _im2col_backward,
}


def conv_forward(formulation, x, weights, bias, stride, padding, dilation, groups):
    """y (n, Cout, Ho, Wo): sample i of x convolved with weights[i] (+ bias[i])."""
    return _FORWARD[formulation](x, weights, bias, stride, padding, dilation, groups)


# Formulations whose weight gradient can be written into a given buffer (``gw_out``); the
# grouped one gets its gradient from ``convolution_backward``, which allocates it.
WRITES_GRAD_WEIGHTS_INTO_BUFFER = ("per_sample", "im2col")


def conv_backward(
    formulation, grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w,
    gw_out=None,
):
    """(grad_x (n, Cin, H, W) or None, grad_weights (n, Cout, Cin // groups, kh, kw) or None).

    ``gw_out``: a contiguous buffer of grad_weights' shape that the formulations of
    WRITES_GRAD_WEIGHTS_INTO_BUFFER write it into (the others ignore it).
    """
    return _BACKWARD[formulation](
        grad_out, x, weights, stride, padding, dilation, groups, need_x, need_w, gw_out
    )
