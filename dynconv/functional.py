"""``dynamic_conv2d``: validation, then dispatch to one backend."""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .native import native_dynamic_conv2d
from .reference import grouped_dynamic_conv2d, loop_dynamic_conv2d
from .validation import check_backend, check_conv_inputs

_TRITON_IMPORTABLE: bool | None = None


def triton_importable() -> bool:
    """Whether the ``triton`` package can be imported (checked once)."""
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        _TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_IMPORTABLE


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The dtypes the Triton kernels compute in (fp32 accumulation); float64 stays on "native".
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_triton_can_run(device: torch.device, dtype: torch.dtype) -> None:
    """Raise a ValueError saying why ``backend="triton"`` cannot run on ``device`` / ``dtype``."""
    if not triton_importable():
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' supports dtypes {TRITON_DTYPES}, got {dtype}; use backend='native' "
            f"(or 'auto', which picks it) for {dtype}"
        )
    if device.type == "cuda":
        return
    if device.type == "cpu" and triton_interpreter_enabled():
        return
    raise ValueError(
        f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported), got tensors on {device}"
    )


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend that ``backend`` means for input ``x``."""
    if backend != "auto":
        return backend
    if x.device.type == "cuda" and x.dtype in TRITON_DTYPES and triton_importable():
        return "triton"
    return "native"


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
        stride, padding, dilation, groups: as in ``F.conv2d``; ``padding`` also takes
            ``"same"`` and ``"valid"``.
        backend: ``"auto"`` (Triton on CUDA, ``"native"`` elsewhere), ``"loop"``,
            ``"grouped"``, ``"native"`` or ``"triton"``.

    Returns:
        y, (B, Cout, Ho, Wo), in x's dtype.
    """
    check_backend(backend)
    geometry = check_conv_inputs(
        x, weight_bank, routing, bias_bank, stride, padding, dilation, groups
    )
    if geometry.extra_padding != (0, 0):
        # padding="same" with an even dilated kernel: pad the extra row/column at the bottom/right
        # as F.conv2d does, then every backend sees symmetric padding.
        x = F.pad(x, (0, geometry.extra_padding[1], 0, geometry.extra_padding[0]))
    backend = resolve_backend(backend, x)
    if backend == "loop":
        return loop_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry)
    if backend == "grouped":
        return grouped_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry)
    if backend == "native":
        return native_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry)
    check_triton_can_run(x.device, x.dtype)
    from .triton_ops import triton_dynamic_conv2d

    return triton_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry)
