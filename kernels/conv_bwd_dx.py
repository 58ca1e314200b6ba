"""Input-gradient kernel: a per-sample transposed implicit GEMM.

Computes grad_x (B, C_in, H, W) from grad_y (B, C_out, HO, WO), the bank (K, C_out, C_in/G, KH,
KW) and the routing a (B, K). For sample b of group g (C_IN_G = C_in/G, C_OUT_G = C_out/G)::

    grad_x[b, g*C_IN_G + ci, ih, iw] = sum_{co, kh, kw} grad_y[b, g*C_OUT_G + co, oh, ow]
                                                        * W_b[g*C_OUT_G + co, ci, kh, kw]
    with ih = oh*STRIDE_H - PAD_H + kh*DIL_H, iw = ow*STRIDE_W - PAD_W + kw*DIL_W,
    W_b = sum_k a[b, k] * bank[k]

Stride-phase decomposition: input pixel (ih, iw) receives tap (kh, kw) only when
``ih + PAD_H - kh*DIL_H`` is a multiple of STRIDE_H (and likewise along w), so at stride s most
(pixel, tap) pairs contribute nothing (3/4 of them at stride 2 with a 3x3 kernel). The input
pixels are split into STRIDE_H x STRIDE_W phases (ih % STRIDE_H, iw % STRIDE_W); within a phase
exactly the taps ``kh = kh0 + j*TAP_STEP_H`` (TAP_STEP = stride / gcd(stride, dilation)) reach
every pixel, and each of them reads a dense, shifted grid of grad_y: the phase pixel
(qh, qw) = (ih // STRIDE_H, iw // STRIDE_W) reads output pixel (qh + oh0 - j*DIL_H*TAP_STEP_H /
STRIDE_H, ...). So each phase is a dense implicit GEMM over its valid taps only, masked at the
borders; a phase that no tap reaches (e.g. a 1x1 kernel at stride 2) writes zeros. At stride 1
there is one phase with every tap, the plain transposed implicit GEMM.

One program computes a BLOCK_M x BLOCK_N tile of grad_x for one sample and one phase (the phase
is a grid axis, folded into the first one): rows are the phase's pixels, columns are input
channels of one group; the reduction runs over the phase's taps and the group's output channels
in BLOCK_K chunks, as one loop. The per-sample kernel W_b is mixed from the K bank tiles in
registers inside the reduction loop, so it never exists in memory: the bank is repacked once
per call with input channels innermost (contiguous tile loads), K is a compile-time constant
and the experts are unrolled (``kernels/_experts.py``), so the pipeliner makes every bank tile
an asynchronous copy. Every grad_x element is written by exactly one program (no atomics:
deterministic).
"""

from __future__ import annotations

import math

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
def _phase_taps(r, KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                DIL: tl.constexpr, TAP_STEP: tl.constexpr):
    """The taps of one dimension that reach input phase ``r`` (input index = q * STRIDE + r):
    those k with ``(r + PAD - k * DIL) % STRIDE == 0``, which are ``k0 + j * TAP_STEP`` for
    ``j < n`` (TAP_STEP = STRIDE / gcd(STRIDE, DIL)); tap ``k0 + j * TAP_STEP`` reads output
    index ``q + off0 - j * (DIL * TAP_STEP / STRIDE)``. Returns (k0, n, off0); n = 0 when no tap
    reaches the phase (k0 and off0 are then meaningless)."""
    k0 = r * 0 + KSIZE  # "none" unless a residue below matches
    for c in tl.static_range(TAP_STEP):
        # r + PAD - c * DIL, shifted by the multiple c * DIL * STRIDE of STRIDE to stay >= 0.
        hit = (r + PAD + c * DIL * (STRIDE - 1)) % STRIDE == 0
        k0 = tl.where(hit, c, k0)  # at most one c < TAP_STEP matches
    n = tl.where(k0 < KSIZE, (KSIZE - 1 - k0) // TAP_STEP + 1, 0)
    off0 = (r + PAD - k0 * DIL) // STRIDE  # exact where n > 0
    return k0, n, off0


@triton.jit
def conv_bwd_dx_kernel(
    gy_ptr, bank_ptr, a_ptr, tap_ptr, gx_ptr,
    H, W, HO, WO, C_IN_G, C_OUT_G,
    gy_stride_b, gy_stride_c, gy_stride_h, gy_stride_w,
    bank_stride_k, bank_stride_h, bank_stride_w, bank_stride_o, bank_stride_c,
    a_stride_b, a_stride_k,
    tap_stride_b, tap_stride_h, tap_stride_w,
    gx_stride_b, gx_stride_c, gx_stride_h, gx_stride_w,
    HAS_TAP: tl.constexpr,
    NUM_EXPERTS: tl.constexpr, EXPERT_CHUNK: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TAP_STEP_H: tl.constexpr, TAP_STEP_W: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (B * STRIDE_H * STRIDE_W * cdiv(HQ * WQ, BLOCK_M), G * cdiv(C_IN_G, BLOCK_N)),
    HQ = cdiv(H, STRIDE_H), WQ = cdiv(W, STRIDE_W): per sample, one run of row tiles per
    stride phase. With HAS_TAP each step's mixed tile is scaled by the sample's tap scale
    ``tap[b, kh, kw]`` (ODConv; one scalar load per step)."""
    hq = (H + STRIDE_H - 1) // STRIDE_H
    wq = (W + STRIDE_W - 1) // STRIDE_W
    tiles_m = (hq * wq + BLOCK_M - 1) // BLOCK_M
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = pid0 // (tiles_m * (STRIDE_H * STRIDE_W))
    tile_m = pid0 % tiles_m
    if STRIDE_H * STRIDE_W == 1:
        phase = tile_m * 0
    else:
        phase = (pid0 // tiles_m) % (STRIDE_H * STRIDE_W)
    rh = phase // STRIDE_W
    rw = phase % STRIDE_W
    tiles_n = (C_IN_G + BLOCK_N - 1) // BLOCK_N
    g = pid1 // tiles_n
    tile_n = pid1 % tiles_n

    # Rows: the pixels (qh, qw) of the phase's grid, input pixel (qh * STRIDE_H + rh,
    # qw * STRIDE_W + rw). A phase smaller than HQ x WQ (H or W not a multiple of the stride)
    # masks its last row / column.
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qh = rows // wq
    qw = rows % wq
    ih = qh * STRIDE_H + rh
    iw = qw * STRIDE_W + rw
    row_ok = rows < hq * wq
    if STRIDE_H != 1:
        row_ok = row_ok & (ih < H)
    if STRIDE_W != 1:
        row_ok = row_ok & (iw < W)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within group g
    col_ok = cols < C_IN_G
    red = tl.arange(0, BLOCK_K)  # output channels within group g

    # The phase's taps: kh = kh0 + jh * TAP_STEP_H (jh < n_th) reads output row
    # qh + oh0 - jh * DIL_H * TAP_STEP_H / STRIDE_H, and likewise along w: a dense, shifted
    # grid of grad_y.
    kh0, n_th, oh0 = _phase_taps(rh, KH, STRIDE_H, PAD_H, DIL_H, TAP_STEP_H)
    kw0, n_tw, ow0 = _phase_taps(rw, KW, STRIDE_W, PAD_W, DIL_W, TAP_STEP_W)

    # 64-bit arithmetic only for the per-sample / per-group / per-expert base pointers; offsets
    # inside one sample (and inside one expert) are int32: fewer registers (the launcher checks
    # the spans).
    b64 = b.to(tl.int64)
    gy_base = gy_ptr + b64 * gy_stride_b + (g * C_OUT_G).to(tl.int64) * gy_stride_c
    bank_base = bank_ptr + (g * C_OUT_G).to(tl.int64) * bank_stride_o
    a_row = a_ptr + b64 * a_stride_b
    w_cols = cols[None, :] * bank_stride_c
    gy_rows = qh * gy_stride_h + qw * gy_stride_w  # loop-invariant part of the grad_y rows

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One step per (valid tap, output-channel chunk) of the phase: no step of a masked-out tap.
    n_steps = n_th * n_tw * tl.cdiv(C_OUT_G, BLOCK_K)
    # One pass of the reduction per chunk of experts (a single pass up to EXPERT_CHUNK experts);
    # one loop over (tap, output-channel chunk) per pass, so that the pipeliner overlaps the
    # loads of the next steps across taps. The (jh, jw, chunk) counters advance without
    # divisions.
    for e0 in range(0, NUM_EXPERTS, EXPERT_CHUNK):
        a_chunk = routing_chunk(a_row, a_stride_k, e0, EXPERT_CHUNK, NUM_EXPERTS)
        co0 = n_steps * 0
        jh = n_steps * 0
        jw = n_steps * 0
        for _ in range(0, n_steps):
            oh_off = oh0 - jh * (DIL_H * TAP_STEP_H // STRIDE_H)
            ow_off = ow0 - jw * (DIL_W * TAP_STEP_W // STRIDE_W)
            co = co0 + red
            co_ok = co < C_OUT_G
            oh = qh + oh_off
            ow = qw + ow_off
            # 0 <= oh < HO as one unsigned compare (a negative oh wraps past HO).
            ok_row = (row_ok & (oh.to(tl.uint32, bitcast=True) < HO)
                      & (ow.to(tl.uint32, bitcast=True) < WO))
            gy = tl.load(gy_base + ((gy_rows + (oh_off * gy_stride_h + ow_off * gy_stride_w))
                                    [:, None] + co[None, :] * gy_stride_c),
                         mask=ok_row[:, None] & co_ok[None, :], other=0.0)
            tap_w = ((kh0 + jh * TAP_STEP_H) * bank_stride_h
                     + (kw0 + jw * TAP_STEP_W) * bank_stride_w)
            w_offs = co[:, None] * bank_stride_o + w_cols + tap_w
            w = mixed_tile(bank_base, w_offs, co_ok[:, None] & col_ok[None, :], a_chunk,
                           bank_stride_k, e0, EXPERT_CHUNK, NUM_EXPERTS, BLOCK_K, BLOCK_N)
            if HAS_TAP:
                w = w * tl.load(tap_ptr + b64 * tap_stride_b
                                + (kh0 + jh * TAP_STEP_H) * tap_stride_h
                                + (kw0 + jw * TAP_STEP_W) * tap_stride_w).to(tl.float32)
            if DOT_FP32:
                acc = tl.dot(gy.to(tl.float32), w, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(gy, w.to(gy.dtype), acc, input_precision=INPUT_PRECISION)
            co0 += BLOCK_K
            next_tap = co0 >= C_OUT_G
            co0 = tl.where(next_tap, 0, co0)
            jw += next_tap.to(tl.int32)
            next_row = jw >= n_tw
            jw = tl.where(next_row, 0, jw)
            jh += next_row.to(tl.int32)

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
                out=None, interpreter=False, tap_scale=None):
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
        tap_scale: optional (B, kh, kw), ODConv's per-sample tap scale of the mixed kernels.

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
    tap = routing if tap_scale is None else tap_scale  # an unused pointer without a tap scale
    args = (
        grad_out, bank, routing, tap, out,
        height, width, ho, wo, in_per_group, out_per_group,
        *grad_out.stride(), *bank.stride(), *routing.stride(),
        *(tap.stride() if tap_scale is not None else (0, 0, 0)), *out.stride(),
    )
    meta = dict(
        HAS_TAP=tap_scale is not None, NUM_EXPERTS=num_experts,
        EXPERT_CHUNK=expert_chunk(num_experts),
        KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0],
        PAD_W=padding[1], DIL_H=dilation[0], DIL_W=dilation[1],
        TAP_STEP_H=stride[0] // math.gcd(stride[0], dilation[0]),
        TAP_STEP_W=stride[1] // math.gcd(stride[1], dilation[1]),
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )
    phases = stride[0] * stride[1]
    phase_pixels = triton.cdiv(height, stride[0]) * triton.cdiv(width, stride[1])

    def grid(m):
        return (batch * phases * triton.cdiv(phase_pixels, m["BLOCK_M"]),
                groups * triton.cdiv(in_per_group, m["BLOCK_N"]))

    conv_bwd_dx_tuned[grid](*args, **meta)
    return out
