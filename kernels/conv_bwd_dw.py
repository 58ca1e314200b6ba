"""Weight-side gradients of dynamic convolution: per-sample wgrad tiles on tensor cores,
contracted onto the bank and the routing weights in registers.

Inputs: grad_y (B, C_out, HO, WO), x (B, C_in, H, W), the bank (K, C_out, C_in/G, KH, KW), the
routing a (B, K) and the bias bank (K, C_out). With G groups (C_IN_G = C_in/G, C_OUT_G =
C_out/G), the per-sample weight gradient of group g is a GEMM over that sample's output pixels::

    gW_b[co, n] = sum_p grad_y[b, g*C_OUT_G + co, p] * x_unf[b, n, p]    n = (kh, kw, ci)

and what the caller needs are its contractions with the routing weights and the bank::

    grad_bank[k] = sum_b a[b, k] gW_b                          (K, C_out, C_in/G, KH, KW)
    grad_a[b, k] = <gW_b, bank[k]> + <gb_b, bias_bank[k]>      (B, K)
    grad_bias[k] = sum_b a[b, k] gb_b                          (K, C_out)

with gb_b = sum_p grad_y[b, :, p] (B, C_out).

ODConv's tap scale s (B, KH, KW) (``HAS_TAP``) multiplies sample b's mixed kernel at tap t by
s[b, t], so the weight gradient reaching the bank is s_b gW_b, and the routing and the tap
scale share one contraction per expert, C[b, k, n] = sum_co gW_b[co, n] bank[k][co, n] (a
column sum): grad_a[b, k] = sum_n s[b, tap(n)] C[b, k, n] and grad_s[b, t] = sum_k a[b, k]
sum_{tap(n) = t} C[b, k, n], the latter's columns (sum over k) stored per (expert block,
tile, sample) and summed per tap by the launcher.

Design (why per-sample, not batch-spanning). Write F for the static conv's wgrad FLOPs
(2 B C_out |n| HO WO). The batch-spanning form (grad_bank as one GEMM of the routing-scaled
grad_y against im2col(x), M = K C_out, reduction over B HO WO) costs K F on the tensor cores,
and grad_a, which needs each sample's gW_b, costs another K F on top (as
<grad_y_b, conv(x_b, bank[k])>). The per-sample form costs F on the tensor cores plus
2 K B |W| multiply-adds on the CUDA cores (a[b, k] gW_b into grad_bank, gW_b . bank[k] into
grad_a), i.e. (1 + c K / (HO WO)) F with c ~ 14 on an H200 (tensor-core / CUDA-core rate);
that beats 2 K F for every HO WO above ~ 8 (ResNet-18's smallest is 49). So this kernel keeps
the FLOP-optimal per-sample form and makes it tensor-core shaped:

- one program owns a (BLOCK_M = output channels, BLOCK_N = reduction columns) tile of one
  group and a block of K_BLOCK experts, and walks a run of samples; per sample the tile of gW_b
  is a pipelined ``tl.dot`` loop over BLOCK_P-pixel chunks (wgmma on sm_90 from BLOCK_M = 64
  per warpgroup, both operands fetched with cp.async into ``num_stages`` buffers);
- the K_BLOCK grad_bank accumulators are separate 2-D fp32 tiles in the dot's own register
  layout (no (K_BLOCK, BLOCK_M, BLOCK_N) tensor, no layout conversion through shared memory);
  the bank tiles for grad_a are loaded once per program and stay in registers;
- the reduction columns are ordered (kh, kw, ci) with ci innermost, so channels_last x tiles
  are contiguous along n (16-byte cp.async); the result is stored in the bank's own
  (ci, kh, kw) order, so no permute pass is needed. On a GPU the launcher copies an NCHW x or
  grad_y to channels_last once (an NCHW im2col tile is a scalar gather along the pixels);
- the pixel index (oh, ow) is carried from chunk to chunk (no integer division in the loop), and
  grad_y is addressed as a flat pixel plane (the launcher copies the rare grad_y whose (HO, WO)
  plane is not flat);
- the bias terms are not in the kernel at all: gb = grad_y summed over pixels is one cheap
  torch reduction in the launcher, and grad_bias = a^T gb, grad_a += gb bias_bank^T are
  (B, K, C_out)-sized products. (Summing grad_y inside the pixel loop cost 40-48 shuffles per
  step.)

The register budget fixes the tile: (K_BLOCK + 1) BLOCK_M BLOCK_N fp32 accumulator elements
over 32 num_warps threads (``dynconv.kernels.configs``); more than CONV_BWD_DW_MAX_K_BLOCK
experts are split over the grid's third axis (each block recomputes gW_b).

Partial results are written, never accumulated, to small fp32 buffers:

- grad_bank: (S, K, C_out, C_in/G, KH, KW), one slice per run of samples (split) s;
- grad_a:    (T, B, K), one row block per (co, n) tile t.

The launcher sums them over the first axis with ``torch.sum``, a fixed-order reduction. No
atomics anywhere: results are bit-identical run to run, so this is also the deterministic path.
Every buffer element is written exactly once per launch, so no reset_to_zero is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_int32_spans, dot_settings, span
from .configs import (
    CONV_BWD_DW_KEY,
    conv_bwd_dw_configs,
    conv_bwd_dw_expert_block,
    conv_bwd_dw_tile_shape,
    prune_conv_bwd_dw_configs,
)
from .tuned_table import with_tuned_table

# Bytes allowed for the per-split grad_bank partials (S x K x |W| fp32).
PARTIAL_BUDGET_BYTES = 32 * 2**20
# Programs to aim for on a GPU when choosing how many splits of the batch to run.
TARGET_PROGRAMS = 512


@triton.jit
def _bank_tile(bank_ptr, k, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
               NEED_ROUTING: tl.constexpr):
    """Expert k's (BLOCK_M, BLOCK_N) tile of the bank (zeros past the last expert, and a
    constant unused zero tile without NEED_ROUTING)."""
    if NEED_ROUTING:
        tile = tl.load(bank_ptr + k * bank_stride_k + bank_off,
                       mask=tile_mask & (k < NUM_EXPERTS), other=0.0)
    else:
        tile = tl.zeros_like(bank_off).to(bank_ptr.dtype.element_ty)
    return tile


@triton.jit
def _contract(gbank, bank_k, acc, k, a_row, a_stride_k, ga_row, NUM_EXPERTS,
              NEED_BANK: tl.constexpr, NEED_ROUTING: tl.constexpr):
    """For expert k and the current sample's gW tile ``acc``: grad_bank tile += a[b, k] acc,
    and grad_a[b, k]'s share of this tile, <acc, bank[k]>, stored to its row."""
    k_ok = k < NUM_EXPERTS
    if NEED_BANK:
        a_k = tl.load(a_row + k * a_stride_k, mask=k_ok, other=0.0).to(tl.float32)
        gbank += a_k * acc
    if NEED_ROUTING:
        ga_k = tl.sum(tl.sum(acc * bank_k.to(tl.float32), axis=1), axis=0)
        tl.store(ga_row + k, ga_k, mask=k_ok)
    return gbank


@triton.jit
def _contract_taps(w_cols, bank_k, acc, s_cols, k, a_row, a_stride_k, ga_row, NUM_EXPERTS):
    """With a tap scale, for expert k and the sample's unscaled gW tile ``acc``: grad_a[b, k]'s
    share, <acc, bank[k]> weighted per column by the tap scale ``s_cols``, stored to its row;
    returns ``w_cols`` + a[b, k] x the column sums of acc * bank[k] (grad_s's columns)."""
    k_ok = k < NUM_EXPERTS
    col = tl.sum(acc * bank_k.to(tl.float32), axis=0)
    tl.store(ga_row + k, tl.sum(col * s_cols, axis=0), mask=k_ok)
    a_k = tl.load(a_row + k * a_stride_k, mask=k_ok, other=0.0).to(tl.float32)
    return w_cols + a_k * col


@triton.jit
def _store_bank_grad(gbank_ptr, gbank, k, split64, NUM_EXPERTS, WEIGHT_NUMEL, out_off,
                     tile_mask):
    """Store expert k's grad_bank tile into split ``split64``'s partial (bank layout)."""
    base = gbank_ptr + (split64 * NUM_EXPERTS + k) * WEIGHT_NUMEL
    tl.store(base + out_off, gbank, mask=tile_mask & (k < NUM_EXPERTS))


@triton.jit
def conv_bwd_dw_kernel(
    gy_ptr, x_ptr, bank_ptr, a_ptr, tap_ptr,
    gbank_ptr, ga_ptr, gs_ptr,
    BATCH, SAMPLES_PER_SPLIT, H, W, HO, WO, C_IN_G, C_OUT_G, C_OUT, NUM_EXPERTS,
    gy_stride_b, gy_stride_c, gy_stride_p,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    bank_stride_k, bank_stride_o, bank_stride_c, bank_stride_h, bank_stride_w,
    a_stride_b, a_stride_k,
    tap_stride_b, tap_stride_t,
    HAS_TAP: tl.constexpr, NEED_TAP: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    K_BLOCK: tl.constexpr, NEED_BANK: tl.constexpr, NEED_ROUTING: tl.constexpr,
    PLAIN_ROUTING: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid: (G * cdiv(C_OUT_G, BLOCK_M) * cdiv(C_IN_G * KH * KW, BLOCK_N), splits of the batch,
    cdiv(NUM_EXPERTS, K_BLOCK)). grad_y's (HO, WO) plane is flat: pixel p at p * gy_stride_p.
    NEED_ROUTING: the bank tiles are loaded (for grad_a, and with HAS_TAP for grad_s too);
    PLAIN_ROUTING: grad_a without a tap scale (with one it comes from the tap contractions)."""
    tl.static_assert(K_BLOCK <= 8)
    nred = C_IN_G * KH * KW
    tiles_m = (C_OUT_G + BLOCK_M - 1) // BLOCK_M
    tiles_n = (nred + BLOCK_N - 1) // BLOCK_N
    tile = tl.program_id(0)
    split = tl.program_id(1)
    g = tile // (tiles_m * tiles_n)
    tile_m = (tile // tiles_n) % tiles_m
    tile_n = tile % tiles_n
    k0 = tl.program_id(2) * K_BLOCK

    co = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel within group g
    co_ok = co < C_OUT_G
    n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (kh, kw, ci), ci innermost
    n_ok = n < nred
    tap = n // C_IN_G
    ci = n - tap * C_IN_G
    kh_d = (tap // KW) * DIL_H
    kw_d = (tap % KW) * DIL_W
    tile_mask = co_ok[:, None] & n_ok[None, :]
    # 64-bit arithmetic only for base pointers; offsets inside one sample (and inside the bank)
    # are int32: fewer registers (the launcher checks the spans).
    g_co = (g * C_OUT_G).to(tl.int64)
    x_n_off = ci * x_stride_c + kh_d * x_stride_h + kw_d * x_stride_w
    bank_off = (co[:, None] * bank_stride_o + ci[None, :] * bank_stride_c
                + (tap // KW)[None, :] * bank_stride_h + (tap % KW)[None, :] * bank_stride_w)
    bank_base = bank_ptr + g_co * bank_stride_o

    # The bank tiles of this program's experts, loaded once (grad_a's right-hand sides).
    bank0 = _bank_tile(bank_base, k0, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                       NEED_ROUTING)
    bank1 = bank0
    bank2 = bank0
    bank3 = bank0
    bank4 = bank0
    bank5 = bank0
    bank6 = bank0
    bank7 = bank0
    if K_BLOCK > 1:
        bank1 = _bank_tile(bank_base, k0 + 1, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                           NEED_ROUTING)
    if K_BLOCK > 2:
        bank2 = _bank_tile(bank_base, k0 + 2, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                           NEED_ROUTING)
    if K_BLOCK > 3:
        bank3 = _bank_tile(bank_base, k0 + 3, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                           NEED_ROUTING)
    if K_BLOCK > 4:
        bank4 = _bank_tile(bank_base, k0 + 4, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                           NEED_ROUTING)
    if K_BLOCK > 5:
        bank5 = _bank_tile(bank_base, k0 + 5, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                           NEED_ROUTING)
    if K_BLOCK > 6:
        bank6 = _bank_tile(bank_base, k0 + 6, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                           NEED_ROUTING)
    if K_BLOCK > 7:
        bank7 = _bank_tile(bank_base, k0 + 7, bank_stride_k, bank_off, tile_mask, NUM_EXPERTS,
                           NEED_ROUTING)

    gb0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb4 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb5 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb6 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb7 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    pixels = HO * WO
    # First chunk's pixel coordinates and the step between chunks: (oh, ow) are then carried
    # with one compare instead of a division per element and step.
    p_first = tl.arange(0, BLOCK_P)
    oh_first = p_first // WO
    ow_first = p_first % WO
    step_h = BLOCK_P // WO
    step_w = BLOCK_P % WO
    gy_tile_off = co[:, None] * gy_stride_c + p_first[None, :] * gy_stride_p
    b_start = split * SAMPLES_PER_SPLIT
    b_stop = tl.minimum(b_start + SAMPLES_PER_SPLIT, BATCH)
    for b in range(b_start, b_stop):
        b64 = b_start.to(tl.int64) + (b - b_start)  # (the interpreter's loop yields a Python int)
        gy_ptrs = gy_ptr + b64 * gy_stride_b + g_co * gy_stride_c + gy_tile_off
        x_base = x_ptr + b64 * x_stride_b + (g * C_IN_G).to(tl.int64) * x_stride_c
        p = p_first
        oh = oh_first
        ow = ow_first
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, pixels, BLOCK_P):
            p_ok = p < pixels
            gy = tl.load(gy_ptrs, mask=co_ok[:, None] & p_ok[None, :], other=0.0)
            ih = (oh * STRIDE_H - PAD_H)[:, None] + kh_d[None, :]
            iw = (ow * STRIDE_W - PAD_W)[:, None] + kw_d[None, :]
            x_ok = (p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H)
                    & (iw >= 0) & (iw < W))
            x_pix_off = (oh * STRIDE_H - PAD_H) * x_stride_h + (ow * STRIDE_W - PAD_W) * x_stride_w
            xt = tl.load(x_base + (x_pix_off[:, None] + x_n_off[None, :]), mask=x_ok, other=0.0)
            if DOT_FP32:
                acc = tl.dot(gy.to(tl.float32), xt.to(tl.float32), acc,
                             input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(gy, xt, acc, input_precision=INPUT_PRECISION)
            gy_ptrs += BLOCK_P * gy_stride_p
            p += BLOCK_P
            ow += step_w
            wrap = ow >= WO
            ow = tl.where(wrap, ow - WO, ow)
            oh += step_h + wrap.to(tl.int32)

        a_row = a_ptr + b64 * a_stride_b
        ga_row = ga_ptr + (tile.to(tl.int64) * BATCH + b64) * NUM_EXPERTS
        if HAS_TAP:
            # The contractions with the bank on the unscaled gW tile, then acc *= the tap scale
            # of each column: what grad_bank accumulates below.
            s_cols = tl.load(tap_ptr + b64 * tap_stride_b + tap * tap_stride_t, mask=n_ok,
                             other=0.0).to(tl.float32)
            w_cols = tl.zeros((BLOCK_N,), dtype=tl.float32)
            w_cols = _contract_taps(w_cols, bank0, acc, s_cols, k0, a_row, a_stride_k, ga_row,
                                    NUM_EXPERTS)
            if K_BLOCK > 1:
                w_cols = _contract_taps(w_cols, bank1, acc, s_cols, k0 + 1, a_row, a_stride_k,
                                        ga_row, NUM_EXPERTS)
            if K_BLOCK > 2:
                w_cols = _contract_taps(w_cols, bank2, acc, s_cols, k0 + 2, a_row, a_stride_k,
                                        ga_row, NUM_EXPERTS)
            if K_BLOCK > 3:
                w_cols = _contract_taps(w_cols, bank3, acc, s_cols, k0 + 3, a_row, a_stride_k,
                                        ga_row, NUM_EXPERTS)
            if K_BLOCK > 4:
                w_cols = _contract_taps(w_cols, bank4, acc, s_cols, k0 + 4, a_row, a_stride_k,
                                        ga_row, NUM_EXPERTS)
            if K_BLOCK > 5:
                w_cols = _contract_taps(w_cols, bank5, acc, s_cols, k0 + 5, a_row, a_stride_k,
                                        ga_row, NUM_EXPERTS)
            if K_BLOCK > 6:
                w_cols = _contract_taps(w_cols, bank6, acc, s_cols, k0 + 6, a_row, a_stride_k,
                                        ga_row, NUM_EXPERTS)
            if K_BLOCK > 7:
                w_cols = _contract_taps(w_cols, bank7, acc, s_cols, k0 + 7, a_row, a_stride_k,
                                        ga_row, NUM_EXPERTS)
            if NEED_TAP:
                # grad_s's columns, summed per tap by the launcher (a reduction inside the
                # program, one per tap, cost registers: ptxas spilled)
                gs_row = gs_ptr + ((tl.program_id(2) * tl.num_programs(0) + tile).to(tl.int64)
                                   * BATCH + b64) * BLOCK_N
                tl.store(gs_row + tl.arange(0, BLOCK_N), w_cols)
            acc = acc * s_cols[None, :]
        gb0 = _contract(gb0, bank0, acc, k0, a_row, a_stride_k, ga_row, NUM_EXPERTS, NEED_BANK,
                        PLAIN_ROUTING)
        if K_BLOCK > 1:
            gb1 = _contract(gb1, bank1, acc, k0 + 1, a_row, a_stride_k, ga_row, NUM_EXPERTS,
                            NEED_BANK, PLAIN_ROUTING)
        if K_BLOCK > 2:
            gb2 = _contract(gb2, bank2, acc, k0 + 2, a_row, a_stride_k, ga_row, NUM_EXPERTS,
                            NEED_BANK, PLAIN_ROUTING)
        if K_BLOCK > 3:
            gb3 = _contract(gb3, bank3, acc, k0 + 3, a_row, a_stride_k, ga_row, NUM_EXPERTS,
                            NEED_BANK, PLAIN_ROUTING)
        if K_BLOCK > 4:
            gb4 = _contract(gb4, bank4, acc, k0 + 4, a_row, a_stride_k, ga_row, NUM_EXPERTS,
                            NEED_BANK, PLAIN_ROUTING)
        if K_BLOCK > 5:
            gb5 = _contract(gb5, bank5, acc, k0 + 5, a_row, a_stride_k, ga_row, NUM_EXPERTS,
                            NEED_BANK, PLAIN_ROUTING)
        if K_BLOCK > 6:
            gb6 = _contract(gb6, bank6, acc, k0 + 6, a_row, a_stride_k, ga_row, NUM_EXPERTS,
                            NEED_BANK, PLAIN_ROUTING)
        if K_BLOCK > 7:
            gb7 = _contract(gb7, bank7, acc, k0 + 7, a_row, a_stride_k, ga_row, NUM_EXPERTS,
                            NEED_BANK, PLAIN_ROUTING)

    if NEED_BANK:
        # The partial is stored in the bank's (ci, kh, kw) order: no permute afterwards.
        out_off = ((g_co + co)[:, None] * nred
                   + (ci * (KH * KW) + (tap // KW) * KW + tap % KW)[None, :])
        split64 = split.to(tl.int64)
        numel = C_OUT * nred
        _store_bank_grad(gbank_ptr, gb0, k0, split64, NUM_EXPERTS, numel, out_off,
                         tile_mask)
        if K_BLOCK > 1:
            _store_bank_grad(gbank_ptr, gb1, k0 + 1, split64, NUM_EXPERTS, numel,
                             out_off, tile_mask)
        if K_BLOCK > 2:
            _store_bank_grad(gbank_ptr, gb2, k0 + 2, split64, NUM_EXPERTS, numel,
                             out_off, tile_mask)
        if K_BLOCK > 3:
            _store_bank_grad(gbank_ptr, gb3, k0 + 3, split64, NUM_EXPERTS, numel,
                             out_off, tile_mask)
        if K_BLOCK > 4:
            _store_bank_grad(gbank_ptr, gb4, k0 + 4, split64, NUM_EXPERTS, numel,
                             out_off, tile_mask)
        if K_BLOCK > 5:
            _store_bank_grad(gbank_ptr, gb5, k0 + 5, split64, NUM_EXPERTS, numel,
                             out_off, tile_mask)
        if K_BLOCK > 6:
            _store_bank_grad(gbank_ptr, gb6, k0 + 6, split64, NUM_EXPERTS, numel,
                             out_off, tile_mask)
        if K_BLOCK > 7:
            _store_bank_grad(gbank_ptr, gb7, k0 + 7, split64, NUM_EXPERTS, numel,
                             out_off, tile_mask)


# The persisted per-GPU tuned table is consulted first, then the autotuner. Every buffer element
# is written once per launch (stores, no accumulation into memory), so a config re-run while
# tuning leaves the right answer: no reset_to_zero needed.
conv_bwd_dw_tuned = with_tuned_table("conv_bwd_dw", triton.autotune(
    configs=conv_bwd_dw_configs(), key=CONV_BWD_DW_KEY,
    prune_configs_by={"early_config_prune": prune_conv_bwd_dw_configs},
)(conv_bwd_dw_kernel))


def samples_per_split(batch: int, tiles: int, weight_numel: int, num_experts: int,
                      interpreter: bool = False) -> int:
    """Samples per program: enough splits to fill the GPU, few enough for the partial budget."""
    if interpreter:
        return max(1, batch)
    max_splits = max(1, PARTIAL_BUDGET_BYTES // (4 * num_experts * weight_numel))
    splits = max(1, min(batch, max_splits, triton.cdiv(TARGET_PROGRAMS, tiles)))
    return triton.cdiv(batch, splits)


def _flat_pixel_stride(grad_out: torch.Tensor) -> int | None:
    """The stride between consecutive output pixels if grad_out's (HO, WO) plane is flat
    (NCHW-contiguous, channels_last and most views), else None."""
    _, _, ho, wo = grad_out.shape
    stride_h, stride_w = grad_out.stride(2), grad_out.stride(3)
    if ho == 1:
        return stride_w
    if wo == 1:
        return stride_h
    return stride_w if stride_h == wo * stride_w else None


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its channels are already innermost (stride 1), else a channels_last
    copy."""
    return t if t.stride(1) == 1 else t.contiguous(memory_format=torch.channels_last)


def bias_gradients(grad_out, routing, bias_bank, need_routing, need_bias):
    """The bias terms, in torch: gb = grad_out summed over pixels (B, C_out) in fp32, then
    grad_bias = a^T gb (K, C_out) and grad_a's bias part gb bias_bank^T (B, K).

    Elementwise products and sums (fixed-order reductions, no cuBLAS), so deterministic.
    Returns (grad_a's bias part or None, grad_bias or None).
    """
    gb = grad_out.sum(dim=(2, 3), dtype=torch.float32)
    ga_bias = grad_bias = None
    if need_routing:
        ga_bias = (gb[:, None, :] * bias_bank.to(torch.float32)[None]).sum(-1)
    if need_bias:
        grad_bias = (routing.to(torch.float32)[:, :, None] * gb[:, None, :]).sum(0)
    return ga_bias, grad_bias


def conv_bwd_dw(grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                need_bank=True, need_routing=True, need_bias=True, samples_per_program=None,
                interpreter=False, tap_scale=None, need_tap=False):
    """grad_bank, grad_routing, grad_bias of dynamic convolution, without forming gW per batch
    (and grad_tap_scale with a tap scale).

    Args:
        grad_out: (B, Cout, Ho, Wo); x: (B, Cin, H, W); any strides, same dtype.
        weight_bank: (K, Cout, Cin // groups, kh, kw); routing: (B, K);
        bias_bank: (K, Cout) or None.
        stride, padding, dilation: pairs of ints (symmetric padding); groups: int.
        need_bank / need_routing / need_bias: which gradients to compute.
        samples_per_program: samples each program walks (the batch split); default from the
            GPU size and PARTIAL_BUDGET_BYTES.
        interpreter: whether the kernel runs under the Triton interpreter (CPU tensors).
        tap_scale: optional (B, kh, kw), ODConv's per-sample tap scale of the mixed kernels;
            need_tap: whether its gradient is computed.

    Returns:
        (grad_bank (K, Cout, Cin // groups, kh, kw) contiguous, grad_routing (B, K),
        grad_bias (K, Cout)), each in x's dtype, or None where not requested (grad_bias is
        None when bias_bank is None); with a tap scale a fourth, grad_tap_scale (B, kh, kw)
        or None.
    """
    batch, in_channels, height, width = x.shape
    num_experts, out_channels, in_per_group, kh, kw = weight_bank.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    need_bias = need_bias and bias_bank is not None
    need_tap = need_tap and tap_scale is not None
    tap_grads = () if tap_scale is None else (None,)
    if not (need_bank or need_routing or need_bias or need_tap):
        return (None, None, None) + tap_grads
    out_per_group = out_channels // groups
    reduction = in_per_group * kh * kw
    if not interpreter and groups < in_channels:
        # Channels innermost makes both operand tiles contiguous (16-byte cp.async); an NCHW
        # im2col tile is a gather along the pixels. One copy each, for this kernel only.
        x = _channels_last(x)
        grad_out = _channels_last(grad_out)
    pixel_stride = _flat_pixel_stride(grad_out)
    if pixel_stride is None:  # a view whose pixel plane is not flat: one copy
        grad_out = grad_out.contiguous(memory_format=torch.channels_last
                                       if grad_out.stride(1) == 1 else torch.contiguous_format)
        pixel_stride = _flat_pixel_stride(grad_out)
    check_int32_spans(**{"one sample of grad_out": span(grad_out, 1),
                         "one sample of x": span(x, 1), "weight_bank": span(weight_bank)})
    ga_bias, grad_bias = (None, None)
    if need_bias or (need_routing and bias_bank is not None):
        ga_bias, grad_bias = bias_gradients(grad_out, routing, bias_bank,
                                            need_routing and bias_bank is not None, need_bias)

    gbank = ga = gs = None
    if need_bank or need_routing or need_tap:
        k_block = conv_bwd_dw_expert_block(num_experts)
        block_m, block_n = conv_bwd_dw_tile_shape(num_experts, out_per_group, reduction,
                                                  interpreter, x.element_size(),
                                                  has_tap=tap_scale is not None)
        tiles = groups * triton.cdiv(out_per_group, block_m) * triton.cdiv(reduction, block_n)
        weight_numel = out_channels * reduction
        if samples_per_program is None:
            samples_per_program = samples_per_split(batch, tiles, weight_numel, num_experts,
                                                    interpreter)
        samples_per_program = max(1, samples_per_program)
        splits = triton.cdiv(batch, samples_per_program)
        f32 = {"device": x.device, "dtype": torch.float32}
        gbank = (torch.empty((splits, *weight_bank.shape), **f32) if need_bank else None)
        # With a tap scale grad_a's rows are written whenever the bank tiles are contracted.
        contract = need_routing or need_tap
        ga = torch.empty((tiles, batch, num_experts), **f32) if contract else None
        expert_blocks = triton.cdiv(num_experts, k_block)
        gs = (torch.empty((expert_blocks, tiles, batch, block_n), **f32) if need_tap
              else None)
        dummy = torch.empty(1, **f32)
        tap = None if tap_scale is None else tap_scale.reshape(batch, kh * kw)
        args = (
            grad_out, x, weight_bank, routing, dummy if tap is None else tap,
            dummy if gbank is None else gbank, dummy if ga is None else ga,
            dummy if gs is None else gs,
            batch, samples_per_program, height, width, ho, wo, in_per_group, out_per_group,
            out_channels, num_experts,
            grad_out.stride(0), grad_out.stride(1), pixel_stride, *x.stride(),
            *weight_bank.stride(), *routing.stride(),
            *((0, 0) if tap is None else tap.stride()),
        )
        dot_fp32, precision = dot_settings(x.dtype, interpreter)
        meta = dict(
            KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0],
            PAD_W=padding[1], DIL_H=dilation[0], DIL_W=dilation[1], K_BLOCK=k_block,
            HAS_TAP=tap is not None, NEED_TAP=need_tap,
            NEED_BANK=need_bank, NEED_ROUTING=contract,
            PLAIN_ROUTING=need_routing and tap is None, DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
        )
        grid = (tiles, splits, expert_blocks)
        if batch > 0:
            conv_bwd_dw_tuned[grid](*args, **meta)

    grad_bank = grad_routing = None
    if need_bank:
        grad_bank = gbank.sum(0).to(x.dtype)
    if need_routing:
        grad_routing = ga.sum(0)
        if ga_bias is not None:
            grad_routing = grad_routing + ga_bias
        grad_routing = grad_routing.to(x.dtype)
    if need_bias:
        grad_bias = grad_bias.to(x.dtype)
    if tap_scale is not None:
        grad_tap = None
        if need_tap:
            # (blocks, (G, tiles_m, tiles_n), B, BLOCK_N) -> columns n = (tap, ci) per group
            tiles_m, tiles_n = triton.cdiv(out_per_group, block_m), triton.cdiv(reduction, block_n)
            columns = gs.view(expert_blocks, groups, tiles_m, tiles_n, batch, block_n).sum((0, 2))
            columns = columns.permute(2, 0, 1, 3).reshape(batch, groups, tiles_n * block_n)
            columns = columns[:, :, :reduction]
            grad_tap = columns.reshape(batch, groups, kh * kw, in_per_group).sum((1, 3))
            grad_tap = grad_tap.view(batch, kh, kw).to(x.dtype)
        return grad_bank, grad_routing, grad_bias, grad_tap
    return grad_bank, grad_routing, grad_bias
