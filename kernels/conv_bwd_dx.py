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
inside the reduction loop, so it never exists in memory: the bank is repacked once per call
with input channels innermost (contiguous tile loads), K is a compile-time constant and the
experts are unrolled (``kernels/_experts.py``), so the pipeliner makes every bank tile an
asynchronous copy. Every grad_x element is written by exactly one program (no atomics:
deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import check_int32_spans, dot_settings, span
from ._experts import mixed_tile, routing_chunk
from .configs import (
    CONV_BWD_DX_KEY,
    conv_bwd_dx_configs,
    expert_chunk,
    prune_conv_bwd_dx_configs,
)
from .tuned_table import with_tuned_table


@triton.jit
def conv_bwd_dx_kernel(
    gy_ptr, bank_ptr, a_ptr, gx_ptr,
    H, W, HO, WO, C_IN_G, C_OUT_G,
    gy_stride_b, gy_stride_c, gy_stride_h, gy_stride_w,
    bank_stride_k, bank_stride_h, bank_stride_w, bank_stride_o, bank_stride_c,
    a_stride_b, a_stride_k,
    gx_stride_b, gx_stride_c, gx_stride_h, gx_stride_w,
    NUM_EXPERTS: tl.constexpr, EXPERT_CHUNK: tl.constexpr,
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
    ih_pad = ih + PAD_H
    iw_pad = iw + PAD_W

    # 64-bit arithmetic only for the per-sample / per-group / per-expert base pointers; offsets
    # inside one sample (and inside one expert) are int32: fewer registers (the launcher checks
    # the spans).
    b64 = b.to(tl.int64)
    gy_base = gy_ptr + b64 * gy_stride_b + (g * C_OUT_G).to(tl.int64) * gy_stride_c
    bank_base = bank_ptr + (g * C_OUT_G).to(tl.int64) * bank_stride_o
    a_row = a_ptr + b64 * a_stride_b
    w_cols = cols[None, :] * bank_stride_c

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    co_chunks = tl.cdiv(C_OUT_G, BLOCK_K)
    # One pass of the reduction per chunk of experts (a single pass up to EXPERT_CHUNK experts);
    # one loop over (tap, output-channel chunk) per pass, so that the pipeliner overlaps the
    # loads of the next steps across taps.
    for e0 in range(0, NUM_EXPERTS, EXPERT_CHUNK):
        a_chunk = routing_chunk(a_row, a_stride_k, e0, EXPERT_CHUNK, NUM_EXPERTS)
        for step in range(0, KH * KW * co_chunks):
            tap = step // co_chunks
            kh = tap // KW
            kw = tap % KW
            co = (step % co_chunks) * BLOCK_K + red
            co_ok = co < C_OUT_G
            num_h = ih_pad - kh * DIL_H
            oh = num_h // STRIDE_H
            num_w = iw_pad - kw * DIL_W
            ow = num_w // STRIDE_W
            ok_row = (row_ok & (num_h >= 0) & (num_h % STRIDE_H == 0) & (oh < HO)
                      & (num_w >= 0) & (num_w % STRIDE_W == 0) & (ow < WO))
            # Rows with ok_row False have meaningless (oh, ow); their loads are masked.
            gy = tl.load(gy_base + ((oh * gy_stride_h + ow * gy_stride_w)[:, None]
                                    + co[None, :] * gy_stride_c),
                         mask=ok_row[:, None] & co_ok[None, :], other=0.0)
            w_offs = co[:, None] * bank_stride_o + w_cols + (kh * bank_stride_h
                                                             + kw * bank_stride_w)
            w = mixed_tile(bank_base, w_offs, co_ok[:, None] & col_ok[None, :], a_chunk,
                           bank_stride_k, e0, EXPERT_CHUNK, NUM_EXPERTS, BLOCK_K, BLOCK_N)
            if DOT_FP32:
                acc = tl.dot(gy.to(tl.float32), w, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(gy, w.to(gy.dtype), acc, input_precision=INPUT_PRECISION)

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


def pack_bank_for_dgrad(weight_bank):
    """The bank (K, C_out, C_in/G, KH, KW), any strides, copied to (K, KH, KW, C_out, C_in/G)
    contiguous: the dgrad tile (output channels x input channels of one tap) is then read with
    input channels contiguous. One copy of the bank per call, small next to grad_x."""
    num_experts, out_channels, in_per_group, kh, kw = weight_bank.shape
    # A fresh tensor, not .contiguous(): that would keep a permuted view's strides on the
    # size-1 tap dims of a 1x1 kernel (stride 1, so the kernel could not prove its tiles
    # aligned); here every stride is the product of the sizes after it.
    packed = weight_bank.new_empty((num_experts, kh, kw, out_channels, in_per_group))
    return packed.copy_(weight_bank.permute(0, 3, 4, 1, 2))


def conv_bwd_dx(grad_out, weight_bank, routing, x_shape, stride, padding, dilation, groups,
                out=None, interpreter=False):
    """grad_x of dynamic convolution.

    Args:
        grad_out: (B, Cout, Ho, Wo), any strides.
        weight_bank: (K, Cout, Cin // groups, kh, kw), any strides (repacked here,
            :func:`pack_bank_for_dgrad`).
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
    bank = pack_bank_for_dgrad(weight_bank)
    dot_fp32, precision = dot_settings(grad_out.dtype, interpreter)
    args = (
        grad_out, bank, routing, out,
        height, width, ho, wo, in_per_group, out_per_group,
        *grad_out.stride(), *bank.stride(), *routing.stride(), *out.stride(),
    )
    meta = dict(
        NUM_EXPERTS=num_experts, EXPERT_CHUNK=expert_chunk(num_experts),
        KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0],
        PAD_W=padding[1], DIL_H=dilation[0], DIL_W=dilation[1], DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
    )

    def grid(m):
        return (batch * triton.cdiv(height * width, m["BLOCK_M"]),
                groups * triton.cdiv(in_per_group, m["BLOCK_N"]))

    conv_bwd_dx_tuned[grid](*args, **meta)
    return out
