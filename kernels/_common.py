"""What every Triton kernel module shares: the interpreter switch, dot precision, offset limits.

Imports torch only (never triton), so that the backends can ask whether kernels would run in
Triton's interpreter without importing Triton.
"""

from __future__ import annotations

import os

import torch

# tl.dot needs every operand dimension >= 16 on a GPU.
MIN_DOT_BLOCK = 16


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors).
    Triton reads the variable when it is first imported; so should every caller."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_mismatch() -> str | None:
    """Why Triton cannot honour ``TRITON_INTERPRET`` as the environment says now, or None.

    Triton reads the variable when it is imported: its own library functions are then either
    compiled-kernel or interpreted functions for the rest of the process. Set (or unset) later,
    kernels fail deep inside Triton (``Cannot call @triton.jit'd outside of the scope of a
    kernel``, or ``0 active drivers``)."""
    import sys

    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return None
    interpreted = type(getattr(standard, "cdiv", None)).__name__ == "InterpretedFunction"
    if interpreted == interpreter_enabled():
        return None
    if interpreter_enabled():
        return ("TRITON_INTERPRET=1 was set after Triton was imported, and Triton reads it only "
                "when it is imported: set it in the environment before Python starts (or before "
                "anything imports triton or torch._inductor)")
    return ("TRITON_INTERPRET was unset after Triton was imported in interpreter mode, and "
            "Triton reads it only when it is imported: start a new process without it")


def dot_settings(dtype: torch.dtype, interpreter: bool) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands of ``dtype``.

    fp32 follows ``torch.backends.cudnn.allow_tf32`` (tf32 or ieee). The interpreter's bf16
    ``tl.dot`` multiplies raw bits, so there bf16 operands are upcast to fp32 first.
    """
    upcast = interpreter and dtype == torch.bfloat16
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return upcast, "tf32"
    return upcast, "ieee"


INT32_LIMIT = 2**31 - 1


def span(t: torch.Tensor, skip_dims: int = 0) -> int:
    """Largest element offset reachable inside ``t`` ignoring its first ``skip_dims`` dims."""
    return sum((size - 1) * abs(stride)
               for size, stride in zip(t.shape[skip_dims:], t.stride()[skip_dims:], strict=True))


def check_int32_spans(**spans: int) -> None:
    """The Triton kernels address the bank (and, in backward, one sample) with int32 offsets."""
    for name, value in spans.items():
        if value > INT32_LIMIT:
            raise ValueError(
                f"{name} spans {value} elements, more than the 2**31 - 1 that the Triton "
                f"kernels address with 32-bit offsets; split the input or the bank"
            )


def resolve_tap_major(tap_major: bool | None, offset_64: bool, in_per_group: int) -> bool:
    """How a conv forward walks its reduction: ``tap_major`` as given, or (None) tap by tap
    from C_in/G >= MIN_DOT_BLOCK or with int64 offsets, else as one flattened (tap, channel)
    axis. The flattened walk keeps int32 per-element index math, so int64 offsets need
    tap-major."""
    if tap_major is None:
        tap_major = offset_64 or in_per_group >= MIN_DOT_BLOCK
    if offset_64 and not tap_major:
        raise ValueError("int64 offsets need tap_major=True")
    return tap_major
