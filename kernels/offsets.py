"""How far a kernel's offsets reach into a tensor, and the int32 limit they must stay under."""

from __future__ import annotations

import torch

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
