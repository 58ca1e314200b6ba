"""Input-gradient kernel: a per-sample transposed implicit GEMM.

Computes grad_x (B, C_in, H, W) from grad_y (B, C_out, HO, WO), the bank (K, C_out, C_in/G, KH,
KW) and the routing a (B, K). For sample b of group g (C_IN_G = C_in/G, C_OUT_G = C_out/G)::

    grad_x[b, g*C_IN_G + ci, ih, iw] = sum_{co, kh, kw} grad_y[b, g*C_OUT_G + co, oh, ow]
                                                        * W_b[g*C_OUT_G + co, ci, kh, kw]
    with ih = oh*STRIDE_H - PAD_H + kh*DIL_H, iw = ow*STRIDE_W - PAD_W + kw*DIL_W,
    W_b = sum_k a[b, k] * bank[k]

One program computes a BLOCK_M x BLOCK_N tile of grad_x for one sample: rows are input pixels
(ih, iw), columns are input channels of one group; the reduction runs over (kh, kw) and the
group's output channels in BLOCK_K chunks. An input pixel receives a tap (kh, kw) only when
``ih + PAD_H - kh*DIL_H`` is a non-negative multiple of the stride that lands inside the output;
the other rows are masked. The per-sample kernel W_b is mixed from the K bank tiles in registers
inside the reduction loop, so it never exists in memory. Every grad_x element is written by
exactly one program (no atomics: deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import check_int32_spans, dot_settings, span
from .configs import (
    CONV_BWD_DX_KEY,
    conv_bwd_dx_configs,
    prune_conv_bwd_dx_configs,
)
from .tuned_table import with_tuned_table


@triton.jit
def conv_bwd_dx_kernel(
    gy_ptr, bank_ptr, a_ptr, gx_ptr,
    H, W, HO, WO, C_IN_G, C_OUT_G, NUM_EXPERTS,
    gy_stride_b, gy_stride_c, gy_stride_h, gy_stride_w,
    bank_stride_k, bank_stride_o, bank_stride_c, bank_stride_h, bank_stride_w,
    a_stride_b, a_stride_k,
    gx_stride_b, gx_stride_c, gx_stride_h, gx_stride_w,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (B * cdiv(H * W, BLOCK_M), G * cdiv(C_IN_G, BLOCK_N))."""
    tiles_m = (H * W + BLOCK_M - 1) // BLOCK_M
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = pid0 // tiles_m
    tile_m = pid0 % tiles_m
    tiles_n = (C_IN_G + BLOCK_N - 1) // BLOCK_N
    g = pid1 // tiles_n
    tile_n = pid1 % tiles_n

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels
    ih = rows // W
    iw = rows % W
    row_ok = rows < H * W
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within group g
    col_ok = cols < C_IN_G
    red = tl.arange(0, BLOCK_K)  # output channels within group g

    # 64-bit arithmetic only for the per-sample / per-group base pointers; offsets inside one
    # sample (and inside the bank) are int32: fewer registers (the launcher checks the spans).
    b64 = b.to(tl.int64)
    gy_base = gy_ptr + b64 * gy_stride_b + (g * C_OUT_G).to(tl.int64) * gy_stride_c
    bank_base = bank_ptr + (g * C_OUT_G).to(tl.int64) * bank_stride_o
    a_base = a_ptr + b64 * a_stride_b

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        num_h = ih + PAD_H - kh * DIL_H
        oh = num_h // STRIDE_H
        ok_h = (num_h >= 0) & (num_h % STRIDE_H == 0) & (oh < HO)
        for kw in range(KW):
            num_w = iw + PAD_W - kw * DIL_W
            ow = num_w // STRIDE_W
            ok_w = (num_w >= 0) & (num_w % STRIDE_W == 0) & (ow < WO)
            ok_row = row_ok & ok_h & ok_w
            # Rows with ok_row False have meaningless (oh, ow); their loads are masked.
            pix_off = oh * gy_stride_h + ow * gy_stride_w
            tap_off = kh * bank_stride_h + kw * bank_stride_w
            for co0 in range(0, C_OUT_G, BLOCK_K):
                co = co0 + red
                co_ok = co < C_OUT_G
                gy = tl.load(gy_base + (pix_off[:, None] + co[None, :] * gy_stride_c),
                             mask=ok_row[:, None] & co_ok[None, :], other=0.0)
                w_mask = co_ok[:, None] & col_ok[None, :]
                w_off = co[:, None] * bank_stride_o + cols[None, :] * bank_stride_c + tap_off
                w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
                for k in range(NUM_EXPERTS):
                    a_k = tl.load(a_base + k * a_stride_k).to(tl.float32)
                    tile = tl.load(bank_base + k * bank_stride_k + w_off, mask=w_mask, other=0.0)
                    w += a_k * tile.to(tl.float32)
                if DOT_FP32:
                    acc += tl.dot(gy.to(tl.float32), w, input_precision=INPUT_PRECISION)
                else:
                    acc += tl.dot(gy, w.to(gy.dtype), input_precision=INPUT_PRECISION)

    gx_base = gx_ptr + b64 * gx_stride_b + (g * C_IN_G).to(tl.int64) * gx_stride_c
    gx_off = cols[None, :] * gx_stride_c + ih[:, None] * gx_stride_h + iw[:, None] * gx_stride_w
    tl.store(gx_base + gx_off, acc.to(gx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# The persisted per-GPU tuned table is consulted first, then the autotuner. Every output element
# is written once by one program, so re-running a config while tuning leaves the right answer:
# no reset_to_zero needed.
conv_bwd_dx_tuned = with_tuned_table("conv_bwd_dx", triton.autotune(
    configs=conv_bwd_dx_configs(), key=CONV_BWD_DX_KEY,
    prune_configs_by={"early_config_prune": prune_conv_bwd_dx_configs},
)(conv_bwd_dx_kernel))


def conv_bwd_dx(grad_out, weight_bank, routing, x_shape, stride, padding, dilation, groups,
                out=None, interpreter=False):
    """grad_x of dynamic convolution.

    Args:
        grad_out: (B, Cout, Ho, Wo), any strides.
        weight_bank: (K, Cout, Cin // groups, kh, kw), any strides.
        routing: (B, K).
        x_shape: (B, Cin, H, W) of the forward input.
        stride, padding, dilation: pairs of ints (symmetric padding); groups: int.
        out: optional preallocated (B, Cin, H, W) tensor (any strides) to write into.
        interpreter: whether the kernel runs under the Triton interpreter (CPU tensors).

    Returns:
        grad_x (B, Cin, H, W) in grad_out's dtype; ``out`` when given, else contiguous.
    """
    batch, in_channels, height, width = x_shape
    num_experts, out_channels, in_per_group, kh, kw = weight_bank.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    if out is None:
        out = grad_out.new_empty((batch, in_channels, height, width))
    if out.numel() == 0:
        return out
    out_per_group = out_channels // groups
    check_int32_spans(**{"one sample of grad_out": span(grad_out, 1),
                         "one sample of grad_x": span(out, 1), "weight_bank": span(weight_bank)})
    dot_fp32, precision = dot_settings(grad_out.dtype, interpreter)
    args = (
        grad_out, weight_bank, routing, out,
        height, width, ho, wo, in_per_group, out_per_group, num_experts,
        *grad_out.stride(), *weight_bank.stride(), *routing.stride(), *out.stride(),
    )
    meta = dict(
        KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0],
        PAD_W=padding[1], DIL_H=dilation[0], DIL_W=dilation[1], DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
    )

    def grid(m):
        return (batch * triton.cdiv(height * width, m["BLOCK_M"]),
                groups * triton.cdiv(in_per_group, m["BLOCK_N"]))

    conv_bwd_dx_tuned[grid](*args, **meta)
    return out
