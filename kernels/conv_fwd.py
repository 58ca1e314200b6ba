"""Conv forward kernel: output-stationary implicit GEMM, one sample and one group per program.

Computes y (B, C_out, HO, WO) = conv2d(x[b] (C_in, H, W), W_b (C_out, C_in/G, KH, KW), bias_b
(C_out)) for every sample b, with G groups (C_IN_G = C_in/G, C_OUT_G = C_out/G) and
W_b = sum_k a[b, k] bank[k]. For sample b and group g the program computes a
(BLOCK_M x BLOCK_N) tile of

    y[b, g*C_OUT_G + n, ho, wo] = bias_b[n] + sum_r x_col[m, r] * W_b[r, n]

with rows m = ho * WO + wo (that sample's output pixels), columns n (that group's output
channels) and the reduction r = (i * KW + j) * C_IN_G + c over the taps and input channels,
walked in BLOCK_K chunks: tap by tap, BLOCK_K channels at a time, from C_IN_G >= 16
(``TAP_MAJOR``: all index math per row or per column), or as one flattened axis below that
(no lanes wasted on small channel counts, per-element index math). Padding is a load mask.
Accumulation is fp32; the result is cast to y's dtype in the epilogue. x, y and the weights are
addressed through their strides, so NCHW, channels_last and other strided tensors need no copy.

Two strategies share the kernel:

- premix (``FUSED=False``): W_b comes from the mix kernel's buffer (one row per sample of the
  current chunk; ``w_stride_e`` steps between samples).
- fused (``FUSED=True``): W_b is never materialised: each reduction step loads the K bank tiles
  and mixes them with a[b, :] in registers (``w_stride_e`` steps between experts). K is a
  compile-time constant and the experts are unrolled (``kernels/_experts.py``), so the bank
  tiles are pipelined like x's; past ``EXPERT_CHUNK`` experts the reduction runs once per chunk
  of them (each pass rounds its partial W_b to x's dtype before the dot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INT32_LIMIT, dot_settings, resolve_tap_major, span
from ._experts import mixed_tile, routing_chunk
from ._taps import flattened_x_tile, next_tap_step, tap_major_x_tile
from .configs import (
    CONV_FWD_KEY,
    conv_fwd_configs,
    expert_chunk,
    prune_conv_fwd_configs,
)
from .tuned_table import with_tuned_table


@triton.jit
def _accumulate(acc, x_tile, w_base, w_offs, mask_w, a_chunk, w_stride_e, e0,
                EXPERT_CHUNK: tl.constexpr, NUM_EXPERTS: tl.constexpr, FUSED: tl.constexpr,
                DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """acc + x_tile @ W tile; fused mixes the W tile from the chunk's bank tiles first."""
    if FUSED:
        mixed = mixed_tile(w_base, w_offs, mask_w, a_chunk, w_stride_e, e0, EXPERT_CHUNK,
                           NUM_EXPERTS, BLOCK_K, BLOCK_N)
        # Round the mixed weights to the input dtype, as premix stores them.
        w_tile = mixed.to(x_tile.dtype)
    else:
        w_tile = tl.load(w_base + w_offs, mask=mask_w, other=0.0)
    if DOT_FP32:
        return tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)


# BATCH_START changes from one premix chunk to the next: not specializing it (on 1 or on
# divisibility by 16) keeps one compiled kernel for all chunks.
@triton.jit(do_not_specialize=["BATCH_START"])
def conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, y_ptr,
    BATCH_START,
    C_IN_G, H, W, C_OUT_G, HO, WO, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    w_stride_e, w_stride_g, w_stride_o, w_stride_c, w_stride_h, w_stride_w,
    bias_stride_e, bias_stride_o,
    a_stride_b, a_stride_k,
    y_stride_b, y_stride_c, y_stride_h, y_stride_w,
    NUM_EXPERTS: tl.constexpr, EXPERT_CHUNK: tl.constexpr,
    FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET_64: tl.constexpr,
    TAP_MAJOR: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(HO * WO, BLOCK_M), G * cdiv(C_OUT_G, BLOCK_N), samples in this launch).

    Sample ``BATCH_START + program_id(2)`` of x / a / y. Weights: premix reads row
    ``program_id(2)`` of the mixed buffer (NUM_EXPERTS = EXPERT_CHUNK = 1); fused reads the
    bank's NUM_EXPERTS rows, EXPERT_CHUNK of them per pass of the reduction loop.
    """
    pid_m = tl.program_id(0)
    pid_gn = tl.program_id(1)
    pid_b = tl.program_id(2)
    n_tiles = tl.cdiv(C_OUT_G, BLOCK_N)
    g = pid_gn // n_tiles
    pid_n = pid_gn % n_tiles
    b = BATCH_START + pid_b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OFFSET_64:
        # One sample (or one expert's weights) spans more than 2**31 elements: all offsets in
        # int64.
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        g = g.to(tl.int64)
    mask_m = offs_m < HO * WO
    mask_n = offs_n < C_OUT_G
    ho = offs_m // WO
    wo = offs_m % WO
    h0 = ho * stride_h - pad_h
    w0 = wo * stride_w - pad_w

    x_base = x_ptr + b * x_stride_b + g * C_IN_G * x_stride_c
    if FUSED:
        w_base = w_ptr + g * w_stride_g
    else:
        w_base = w_ptr + pid_b.to(tl.int64) * w_stride_e + g * w_stride_g
    w_cols = offs_n[None, :] * w_stride_o
    a_row = a_ptr + b * a_stride_b

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One pass of the reduction per chunk of experts (a single pass unless fused has more than
    # EXPERT_CHUNK experts): each pass pipelines x and the chunk's bank tiles together.
    for e0 in range(0, NUM_EXPERTS, EXPERT_CHUNK):
        a_chunk = ()
        if FUSED:
            a_chunk = routing_chunk(a_row, a_stride_k, e0, EXPERT_CHUNK, NUM_EXPERTS)
        if TAP_MAJOR:
            # One tap per step, BLOCK_K channels of it (the counters i, j, c0 carried).
            i = pid_m * 0
            j = pid_m * 0
            c0 = pid_m * 0
            for _ in range(0, KH * KW * tl.cdiv(C_IN_G, BLOCK_K)):
                x_tile, c, mask_r = tap_major_x_tile(
                    x_base, 0, h0, w0, mask_m, i, j, c0, C_IN_G, H, W, dil_h, dil_w,
                    x_stride_c, x_stride_h, x_stride_w, OFFSET_64, BLOCK_K)
                w_offs = (c * w_stride_c)[:, None] + w_cols + (i * w_stride_h + j * w_stride_w)
                acc = _accumulate(acc, x_tile, w_base, w_offs, mask_r[:, None] & mask_n[None, :],
                                  a_chunk, w_stride_e, e0, EXPERT_CHUNK, NUM_EXPERTS, FUSED,
                                  DOT_FP32, INPUT_PRECISION, BLOCK_K, BLOCK_N)
                i, j, c0 = next_tap_step(i, j, c0, C_IN_G, KW, BLOCK_K)
        else:
            tl.static_assert(not OFFSET_64, "int64 offsets need TAP_MAJOR")
            for r0 in range(0, C_IN_G * KH * KW, BLOCK_K):
                x_tile, c, tap, mask_r = flattened_x_tile(
                    x_base, 0, h0, w0, mask_m, r0, C_IN_G, H, W, KH, KW, dil_h, dil_w,
                    x_stride_c, x_stride_h, x_stride_w, BLOCK_K)
                w_rows = c * w_stride_c + (tap // KW) * w_stride_h + (tap % KW) * w_stride_w
                acc = _accumulate(acc, x_tile, w_base, w_rows[:, None] + w_cols,
                                  mask_r[:, None] & mask_n[None, :],
                                  a_chunk, w_stride_e, e0, EXPERT_CHUNK, NUM_EXPERTS, FUSED,
                                  DOT_FP32, INPUT_PRECISION, BLOCK_K, BLOCK_N)

    if HAS_BIAS:
        channel = g * C_OUT_G + offs_n
        if FUSED:
            bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for e in tl.static_range(NUM_EXPERTS):
                a_e = tl.load(a_row + e * a_stride_k).to(tl.float32)
                bank_bias = tl.load(bias_ptr + e * bias_stride_e + channel * bias_stride_o,
                                    mask=mask_n, other=0.0)
                bias += a_e * bank_bias.to(tl.float32)
            bias = bias.to(x_ptr.dtype.element_ty)
        else:
            bias = tl.load(bias_ptr + pid_b.to(tl.int64) * bias_stride_e
                           + channel * bias_stride_o, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    y_offs = ((g * C_OUT_G + offs_n)[None, :] * y_stride_c
              + ho[:, None] * y_stride_h + wo[:, None] * y_stride_w)
    tl.store(y_ptr + b * y_stride_b + y_offs, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# The persisted per-GPU tuned table is consulted first, then the autotuner.
conv_fwd_tuned = with_tuned_table("conv_fwd", triton.autotune(
    configs=conv_fwd_configs(), key=CONV_FWD_KEY,
    prune_configs_by={"early_config_prune": prune_conv_fwd_configs},
)(conv_fwd_kernel))


def conv_fwd(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    routing: torch.Tensor | None,
    y: torch.Tensor,
    batch_start: int,
    batch_count: int,
    stride, padding, dilation,
    interpreter: bool = False,
    offset_64: bool | None = None,
    tap_major: bool | None = None,
) -> None:
    """Write ``y[batch_start : batch_start + batch_count]``.

    Args:
        x: (B, C_in, H, W), any strides. y: (B, C_out, HO, WO), any strides, written in place.
        weights: (E, G, C_out/G, C_in/G, KH, KW), any strides; tiles are read fastest along
            C_out/G, so a layout with unit C_out/G stride (:func:`dynconv.kernels.mix.pack_bank`,
            the mix kernel's rows) makes every weight load contiguous. Premix (``routing``
            None): E >= batch_count mixed weights, row e for sample batch_start + e. Fused:
            E = K, the bank, mixed with ``routing`` (B, K) in the kernel (K is compiled in).
        bias: (E, C_out) laid out like ``weights`` along E, or None.
        stride, padding, dilation: (h, w) pairs; padding symmetric.
        interpreter: running under TRITON_INTERPRET (bf16 dots are upcast there).
        offset_64: force int64 (True) or int32 (False) in-sample offsets; None decides from the
            tensors' extents.
        tap_major: walk the reduction tap by tap, BLOCK_K channels at a time (True), or as one
            flattened (tap, channel) axis (False); None: tap-major when C_in/G >= 16 or with
            int64 offsets, flattened otherwise.
    """
    fused = routing is not None
    num_experts, groups, out_per_group, in_per_group, kh, kw = weights.shape
    height_out, width_out = y.shape[2], y.shape[3]
    dot_fp32, precision = dot_settings(x.dtype, interpreter)
    # Sample and expert offsets are int64 in the kernel; the rest fits int32 unless one sample,
    # one expert's weights (fused) or one sample's mixed weights (premix) spans more.
    if offset_64 is None:
        spans = (span(x, 1), span(y, 1), span(weights, 1))
        offset_64 = max(spans) > INT32_LIMIT
    tap_major = resolve_tap_major(tap_major, offset_64, in_per_group)
    bias_arg = bias if bias is not None else y
    a_arg = routing if fused else y
    grid = lambda meta: (
        triton.cdiv(height_out * width_out, meta["BLOCK_M"]),
        groups * triton.cdiv(out_per_group, meta["BLOCK_N"]),
        batch_count,
    )
    conv_fwd_tuned[grid](
        x, weights, bias_arg, a_arg, y,
        batch_start,
        in_per_group, x.shape[2], x.shape[3], out_per_group, height_out, width_out, kh, kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(),
        *weights.stride(),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        routing.stride(0) if fused else 0, routing.stride(1) if fused else 0,
        *y.stride(),
        NUM_EXPERTS=num_experts if fused else 1,
        EXPERT_CHUNK=expert_chunk(num_experts) if fused else 1,
        FUSED=fused, HAS_BIAS=bias is not None, OFFSET_64=offset_64, TAP_MAJOR=tap_major,
        DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
    )
