"""``dynamic_conv2d``: validate, then look the backend up in the registry and call it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends.registry import check_backend_name, resolve
from .validation import check_conv_inputs


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

    Returns:
        y, (B, Cout, Ho, Wo), in x's dtype.
    """
    check_backend_name(backend)
    geometry = check_conv_inputs(
        x, weight_bank, routing, bias_bank, stride, padding, dilation, groups
    )
    if geometry.extra_padding != (0, 0):
        # An odd total padding ("same" with an even dilated kernel, "same_tf"): pad the extra
        # row/column at the bottom/right as F.conv2d and TensorFlow do, then every backend sees
        # symmetric padding.
        x = F.pad(x, (0, geometry.extra_padding[1], 0, geometry.extra_padding[0]))
    return resolve(backend, x).function(x, weight_bank, routing, bias_bank, geometry)
