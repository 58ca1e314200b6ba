"""Triton helpers of the forward kernels' implicit-GEMM reduction over (tap, input channel):
the x tile of one reduction step, for the two ways the reduction is walked.

- Tap-major (C_in/G >= 16): one tap (i, j) per step and BLOCK_K channels of it. The
  (i, j, c0) of a step are counters carried through the loop (:func:`next_tap_step`), so no
  integer division runs per step, and the index math is per row or per column.
- Flattened (fewer channels): r = tap * C_in/G + c, BLOCK_K of them per step, so no lane is
  wasted on small channel counts, at the price of per-element (BLOCK_M x BLOCK_K) index math.

Rows m are output pixels: ``h0``, ``w0`` (BLOCK_M,) are their top-left input coordinates
(ho * stride - pad), ``row_offsets`` their offsets into x apart from the pixel (0 when the
program covers one sample, the sample's offset when rows span the batch). Padding is the load
mask. Used by :mod:`.conv_fwd` and :mod:`.conv_fwd_spanning`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tap_major_x_tile(x_base, row_offsets, h0, w0, mask_m, i, j, c0, C_IN_G, H, W, dil_h, dil_w,
                     x_stride_c, x_stride_h, x_stride_w, OFFSET_64: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """(x tile (BLOCK_M, BLOCK_K), channels c (BLOCK_K,), their mask) of tap (i, j), channels
    c0 .. c0 + BLOCK_K - 1."""
    c = c0 + tl.arange(0, BLOCK_K)
    if OFFSET_64:
        c = c.to(tl.int64)
    mask_r = c < C_IN_G
    hi = h0 + i * dil_h
    wi = w0 + j * dil_w
    row_ok = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    x_tile = tl.load(
        x_base + (row_offsets + hi * x_stride_h + wi * x_stride_w)[:, None]
        + (c * x_stride_c)[None, :],
        mask=row_ok[:, None] & mask_r[None, :], other=0.0,
    )
    return x_tile, c, mask_r


@triton.jit
def next_tap_step(i, j, c0, C_IN_G, KW, BLOCK_K: tl.constexpr):
    """The (tap row, tap column, first channel) of the next tap-major step."""
    c0 += BLOCK_K
    next_tap = c0 >= C_IN_G
    c0 = tl.where(next_tap, 0, c0)
    j = tl.where(next_tap, j + 1, j)
    next_row = j >= KW
    j = tl.where(next_row, 0, j)
    i = tl.where(next_row, i + 1, i)
    return i, j, c0


@triton.jit
def flattened_x_tile(x_base, row_offsets, h0, w0, mask_m, r0, C_IN_G, H, W, KH, KW, dil_h,
                     dil_w, x_stride_c, x_stride_h, x_stride_w, BLOCK_K: tl.constexpr):
    """(x tile (BLOCK_M, BLOCK_K), channels c, taps (BLOCK_K,), reduction mask) of the flattened
    reduction indices r0 .. r0 + BLOCK_K - 1 (int32 index math)."""
    offs_r = r0 + tl.arange(0, BLOCK_K)
    mask_r = offs_r < C_IN_G * KH * KW
    c = offs_r % C_IN_G
    tap = offs_r // C_IN_G
    dh = (tap // KW) * dil_h
    dw = (tap % KW) * dil_w
    hi = h0[:, None] + dh[None, :]
    wi = w0[:, None] + dw[None, :]
    mask_x = (mask_m[:, None] & mask_r[None, :]
              & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))
    # The input offset separates into a row (pixel) part and a column part.
    x_rows = row_offsets + h0 * x_stride_h + w0 * x_stride_w
    x_cols = c * x_stride_c + dh * x_stride_h + dw * x_stride_w
    x_tile = tl.load(x_base + x_rows[:, None] + x_cols[None, :], mask=mask_x, other=0.0)
    return x_tile, c, tap, mask_r
