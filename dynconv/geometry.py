"""The geometry of one dynamic convolution call: normalised arguments, output size and layout.

Pure functions of shapes and strides (no checks): :mod:`dynconv.validation` builds a
:class:`ConvGeometry` from user arguments; every backend reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConvGeometry:
    """The normalised geometry of one dynamic convolution call: one int per spatial axis
    ((H, W) for the 2-D convolution the backends run; (L,) and (D, H, W) for the 1-D and 3-D
    front ends, which map themselves onto it).

    ``padding`` is symmetric (top = bottom, left = right). ``extra_padding`` is the additional
    (bottom, right) padding that ``padding="same"`` or ``"same_tf"`` needs when the total
    padding is odd; the dispatcher applies it with ``F.pad`` before any backend runs, as
    ``F.conv2d`` does for ``"same"``.
    """

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    extra_padding: tuple[int, ...] = (0, 0)


def output_hw(in_hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an (H, W) input with symmetric padding."""
    return tuple(
        (in_hw[a] + 2 * padding[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1
        for a in range(2)
    )


def same_tf_padding_total(size, kernel, stride, dilation):
    """Total padding of one spatial axis under TF-style "same" (TensorFlow's ``padding="SAME"``,
    ONNX's ``SAME_UPPER``, timm's ``Conv2dSame``): the least padding that gives
    ``ceil(size / stride)`` outputs. It depends on the input size; the first ``total // 2`` go
    before the input and the rest (one more when the total is odd) after it.

    ``size`` may be a symbolic int (under torch.compile): only integer arithmetic is used.
    """
    out = (size + stride - 1) // stride  # ceil(size / stride)
    total = (out - 1) * stride + (kernel - 1) * dilation + 1 - size
    return max(total, 0)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is channels_last (and not also plain contiguous), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
