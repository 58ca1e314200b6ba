"""The geometry of one dynamic convolution call: normalised arguments, output size and layout.

Pure functions of shapes and strides (no checks): :mod:`dynconv.validation` builds a
:class:`ConvGeometry` from user arguments; every backend reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConvGeometry:
    """The normalised geometry of one dynamic convolution call.

    ``padding`` is symmetric (top = bottom, left = right). ``extra_padding`` is the additional
    (bottom, right) padding that ``padding="same"`` needs when the total padding is odd; the
    dispatcher applies it with ``F.pad`` before any backend runs, as ``F.conv2d`` does.
    """

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    extra_padding: tuple[int, int] = (0, 0)


def output_hw(in_hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an (H, W) input with symmetric padding."""
    return tuple(
        (in_hw[a] + 2 * padding[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1
        for a in range(2)
    )


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is channels_last (and not also plain contiguous), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
