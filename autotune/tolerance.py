"""How far a dynamic convolution computed in a given dtype may be from the exact result: the
rounding bound that the tests and the GPU check's correctness pass both hold every backend to.

The bound is relative to each element's *scale*, the sum of the absolute values of the terms
that make it (what the float64 reference gives when run on absolute values).
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,  # 10 stored mantissa bits
    torch.bfloat16: 2.0**-8,  # 7 stored mantissa bits
}
TF32_UNIT_ROUNDOFF = 2.0**-11  # tf32 keeps fp16's 10 mantissa bits
ROUNDINGS = 4


def relative_tolerance(dtype: torch.dtype, reduction_length: int, tf32: bool = False,
                       roundings: int = ROUNDINGS) -> float:
    """Bound on |got - exact| of one element relative to its scale.

    - fp32 with ieee dots, and fp64: operands and accumulation are in the dtype, so the error
      is that of the sums: a sum (or chain of sums) of n products in working precision u errs
      by at most ~n * u of the sum of |products| (Higham's gamma_n). ``reduction_length`` is
      that n, the longest chain of roundings behind an element (:func:`reduction_lengths`).
    - fp16 / bf16, and fp32 with tf32 dots: the kernels accumulate in fp32, but round the mixed
      weights (or the dot operands) and the result to the dtype's mantissa (unit roundoff
      2**-11 for fp16 and tf32, 2**-8 for bf16). Those ``roundings`` (4 by default: a margin
      over the two or three that occur) dominate: the fp32 accumulation adds n * 2**-24, less
      than one fp16 rounding (2**-11) for any n < 8192, so ``reduction_length`` does not enter.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return roundings * UNIT_ROUNDOFF[dtype]
    if dtype == torch.float32 and tf32:
        return roundings * TF32_UNIT_ROUNDOFF
    return reduction_length * UNIT_ROUNDOFF[dtype]


def reduction_lengths(batch: int, in_channels: int, out_channels: int, kernel: tuple[int, int],
                      groups: int, experts: int, out_pixels: int) -> tuple[int, int]:
    """(forward, backward) longest chains of roundings behind an element.

    Forward: K products mixed into the weight, the Cin/groups x kh x kw products of the
    convolution, the bias added. Backward, the worst of the four gradients: grad_x, K (mixing)
    + Cout/groups x kh x kw taps; grad_bank and grad_bias, the output pixels of a sample, then
    the batch; grad_routing, the output pixels (the per-sample weight gradient), then the
    |W| = Cout x Cin/groups x kh x kw elements it is contracted over with the bank (or the Cout
    bias terms); plus one for the final sum or cast.
    """
    taps = kernel[0] * kernel[1]
    forward = experts + in_channels // groups * taps + 1
    weight = out_channels * (in_channels // groups) * taps
    backward = 1 + max(experts + out_channels // groups * taps, out_pixels + batch,
                       out_pixels + max(weight, out_channels))
    return forward, backward
