"""Conv forward, batch-spanning strategy: one implicit GEMM whose rows span the batch.

Computes y (B, C_out, HO, WO) with ``y[b] = sum_k a[b, k] conv(x[b], bank[k]) + sum_k a[b, k]
bias_bank[k]``, which equals conv(x[b], W_b) + bias_b for ``W_b = sum_k a[b, k] bank[k]``: a
static conv over K x C_in routing-scaled channels with the bank as one (C_out, K x C_in/G, KH,
KW) weight. Per group g the program computes a (BLOCK_M x BLOCK_N) tile of

    y[b, g*C_OUT_G + n, ho, wo] = sum_k a[b, k] (bias_bank[k, n] + sum_r x_col[m, r] bank[k][r, n])

with rows m = (b * HO + ho) * WO + wo over the whole batch of the launch (so small images fill
the tiles: 49 pixels of a 7x7 sample no longer pad a 64-row tile), columns n (that group's
output channels) and the reduction over (expert k, tap, C_IN_G chunk). No per-sample weight
exists; the bank tiles are the shared B operand, read from a repacked bank (:func:`pack_bank`:
tiles contiguous along C_out/G), so every tile load of the main loop is a contiguous,
pipelined (cp.async) load.

Where the routing scale goes: into a per-expert partial accumulator. The reduction runs expert
by expert; each expert's pass accumulates ``part = x_col @ bank[k]`` (fp32, tensor cores, both
operands straight from shared memory, the x tile unmodified), then ``acc += a[b_row, k] *
(part + bias_bank[k])`` once per pass (BLOCK_M x BLOCK_N multiply-adds per expert). Scaling
the x tile rows while loading instead would cost BLOCK_M x BLOCK_K multiplies and two dtype
conversions on every step (about as much CUDA-core work per step as the mixing that makes the
fused kernel slow), force the A operand through registers, and round ``a x`` to the input
dtype before the dot; the partial accumulator costs a second fp32 accumulator (registers:
configs.py keeps BLOCK_M x BLOCK_N <= 64 fp32 per thread each) and restarts the software
pipeline once per expert (reduction steps per expert = KH x KW x ceil(C_IN_G / BLOCK_K)).

The reduction walks tap by tap, BLOCK_K channels at a time from C_IN_G >= 16 (``TAP_MAJOR``),
or one flattened (tap, channel) axis below that, as :mod:`.conv_fwd` does. x and y are
addressed through their strides (NCHW, channels_last, any view); offsets are int32 within a
launch (the launcher splits the batch so that each launch's x and y span < 2**31 elements)
unless one sample alone is larger (``OFFSET_64``). No atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INT32_LIMIT, dot_settings, resolve_tap_major, span
from ._taps import flattened_x_tile, next_tap_step, tap_major_x_tile
from .configs import (
    CONV_FWD_SPANNING_KEY,
    conv_fwd_spanning_configs,
    prune_conv_fwd_spanning_configs,
)
from .tuned_table import with_tuned_table


@triton.jit
def _dot(x_tile, w_tile, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if DOT_FP32:
        return tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)


@triton.jit
def conv_fwd_spanning_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, y_ptr,
    ROWS, NUM_EXPERTS,
    C_IN_G, H, W, C_OUT_G, HO, WO, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    w_stride_e, w_stride_g, w_stride_o, w_stride_c, w_stride_h, w_stride_w,
    bias_stride_e, bias_stride_o,
    a_stride_b, a_stride_k,
    y_stride_b, y_stride_c, y_stride_h, y_stride_w,
    HAS_BIAS: tl.constexpr, OFFSET_64: tl.constexpr, TAP_MAJOR: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(ROWS, BLOCK_M), G * cdiv(C_OUT_G, BLOCK_N)), ROWS = samples x HO x WO.

    The bank ``w`` is (NUM_EXPERTS, G, C_OUT_G, C_IN_G, KH, KW) through its strides (expert
    offsets in int64, the rest int32); ``a`` is (samples, NUM_EXPERTS); bias (NUM_EXPERTS,
    C_out).
    """
    pid_m = tl.program_id(0)
    pid_gn = tl.program_id(1)
    n_tiles = tl.cdiv(C_OUT_G, BLOCK_N)
    g = pid_gn // n_tiles
    pid_n = pid_gn % n_tiles

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OFFSET_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        g = g.to(tl.int64)
    mask_m = offs_m < ROWS
    mask_n = offs_n < C_OUT_G
    # Row m -> (sample, output pixel); rows past ROWS read sample 0's pixels (masked anyway).
    pixels = HO * WO
    b = offs_m // pixels
    pix = offs_m % pixels
    ho = pix // WO
    wo = pix % WO
    h0 = ho * stride_h - pad_h
    w0 = wo * stride_w - pad_w

    x_base = x_ptr + g * C_IN_G * x_stride_c
    x_rows = b * x_stride_b
    w_group = w_ptr + g * w_stride_g
    w_cols = offs_n[None, :] * w_stride_o
    a_rows = a_ptr + b * a_stride_b
    channel = g * C_OUT_G + offs_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, NUM_EXPERTS):
        w_base = w_group + tl.cast(k, tl.int64) * w_stride_e
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if TAP_MAJOR:
            # One tap per step, BLOCK_K channels of it (the counters i, j, c0 carried).
            i = pid_m * 0
            j = pid_m * 0
            c0 = pid_m * 0
            for _ in range(0, KH * KW * tl.cdiv(C_IN_G, BLOCK_K)):
                x_tile, c, mask_r = tap_major_x_tile(
                    x_base, x_rows, h0, w0, mask_m, i, j, c0, C_IN_G, H, W, dil_h, dil_w,
                    x_stride_c, x_stride_h, x_stride_w, OFFSET_64, BLOCK_K)
                w_tile = tl.load(
                    w_base + (c * w_stride_c)[:, None] + w_cols
                    + (i * w_stride_h + j * w_stride_w),
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0,
                )
                part = _dot(x_tile, w_tile, part, DOT_FP32, INPUT_PRECISION)
                i, j, c0 = next_tap_step(i, j, c0, C_IN_G, KW, BLOCK_K)
        else:
            tl.static_assert(not OFFSET_64, "int64 offsets need TAP_MAJOR")
            for r0 in range(0, C_IN_G * KH * KW, BLOCK_K):
                x_tile, c, tap, mask_r = flattened_x_tile(
                    x_base, x_rows, h0, w0, mask_m, r0, C_IN_G, H, W, KH, KW, dil_h, dil_w,
                    x_stride_c, x_stride_h, x_stride_w, BLOCK_K)
                w_rows = c * w_stride_c + (tap // KW) * w_stride_h + (tap % KW) * w_stride_w
                w_tile = tl.load(w_base + w_rows[:, None] + w_cols,
                                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                part = _dot(x_tile, w_tile, part, DOT_FP32, INPUT_PRECISION)
        # The routing scale of each row's sample, once per expert (and its bias term).
        a_k = tl.load(a_rows + k * a_stride_k, mask=mask_m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias_k = tl.load(bias_ptr + tl.cast(k, tl.int64) * bias_stride_e
                             + channel * bias_stride_o, mask=mask_n, other=0.0)
            part += bias_k.to(tl.float32)[None, :]
        acc += a_k[:, None] * part

    y_offs = (b * y_stride_b + ho * y_stride_h + wo * y_stride_w)[:, None] \
        + (channel * y_stride_c)[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# The persisted per-GPU tuned table is consulted first, then the autotuner.
conv_fwd_spanning_tuned = with_tuned_table("conv_fwd_spanning", triton.autotune(
    configs=conv_fwd_spanning_configs(), key=CONV_FWD_SPANNING_KEY,
    prune_configs_by={"early_config_prune": prune_conv_fwd_spanning_configs},
)(conv_fwd_spanning_kernel))


def samples_per_launch(x: torch.Tensor, y: torch.Tensor, pixels: int,
                       offset_64: bool) -> int:
    """Most samples one launch takes: with int32 offsets, as many as keep the launch's x and y
    spans (and its row count) within 2**31 - 1; at least 1 (one sample past that takes int64
    offsets)."""
    batch = x.shape[0]
    limit = INT32_LIMIT // max(1, pixels)
    if not offset_64:
        for t in (x, y):
            per_sample = abs(t.stride(0))
            if per_sample:
                limit = min(limit, (INT32_LIMIT - span(t, 1)) // per_sample + 1)
    return max(1, min(batch, limit))


def conv_fwd_spanning(
    x: torch.Tensor,
    bank: torch.Tensor,
    bias_bank: torch.Tensor | None,
    routing: torch.Tensor,
    y: torch.Tensor,
    stride, padding, dilation,
    interpreter: bool = False,
    offset_64: bool | None = None,
    tap_major: bool | None = None,
    max_samples: int | None = None,
) -> None:
    """Write all of y.

    Args:
        x: (B, C_in, H, W), any strides. y: (B, C_out, HO, WO), any strides, written in place.
        bank: (K, G, C_out/G, C_in/G, KH, KW), any strides; tiles are read fastest along
            C_out/G, so a layout with unit C_out/G stride (``mixed_views(pack_bank(...))`` of
            :mod:`.mix`) makes every bank load contiguous.
        bias_bank: (K, C_out), any strides, or None. routing: (B, K), any strides.
        stride, padding, dilation: (h, w) pairs; padding symmetric.
        interpreter: running under TRITON_INTERPRET (bf16 dots are upcast there).
        offset_64: force int64 (True) or int32 (False) offsets; None: int64 only when one
            sample of x or y spans more than 2**31 - 1 elements (the batch is split into
            launches whose spans fit otherwise).
        tap_major: as :func:`.conv_fwd.conv_fwd` (None: tap-major from C_in/G >= 16 or with
            int64 offsets).
        max_samples: at most this many samples per launch (tests; default: what int32 allows).
    """
    num_experts, groups, out_per_group, in_per_group, kh, kw = bank.shape
    batch = x.shape[0]
    height_out, width_out = y.shape[2], y.shape[3]
    pixels = height_out * width_out
    dot_fp32, precision = dot_settings(x.dtype, interpreter)
    if offset_64 is None:
        offset_64 = max(span(x, 1), span(y, 1)) > INT32_LIMIT
    tap_major = resolve_tap_major(tap_major, offset_64, in_per_group)
    chunk = samples_per_launch(x, y, pixels, offset_64)
    if max_samples is not None:
        chunk = max(1, min(chunk, max_samples))
    bias_arg = bias_bank if bias_bank is not None else y
    for start in range(0, batch, chunk):
        count = min(chunk, batch - start)
        xs, ys, a = x[start:start + count], y[start:start + count], routing[start:start + count]
        rows = count * pixels
        grid = lambda meta, rows=rows: (
            triton.cdiv(rows, meta["BLOCK_M"]),
            groups * triton.cdiv(out_per_group, meta["BLOCK_N"]),
        )
        conv_fwd_spanning_tuned[grid](
            xs, bank, bias_arg, a, ys,
            rows, num_experts,
            in_per_group, x.shape[2], x.shape[3], out_per_group, height_out, width_out, kh, kw,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *xs.stride(),
            *bank.stride(),
            bias_bank.stride(0) if bias_bank is not None else 0,
            bias_bank.stride(1) if bias_bank is not None else 0,
            *a.stride(),
            *ys.stride(),
            HAS_BIAS=bias_bank is not None, OFFSET_64=offset_64, TAP_MAJOR=tap_major,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )
