"""Weight-side gradients of dynamic convolution, contracted in the kernel's epilogue.

Inputs: grad_y (B, C_out, HO, WO), x (B, C_in, H, W), the bank (K, C_out, C_in/G, KH, KW), the
routing a (B, K) and the bias bank (K, C_out). The per-sample weight gradient of group g
(C_IN_G = C_in/G, C_OUT_G = C_out/G) is a GEMM over that sample's output pixels::

    gW_b[co, n] = sum_p grad_y[b, g*C_OUT_G + co, p] * x_unf[b, n, p]      n = (ci, kh, kw)

and the gradients the caller needs are contractions of it with the routing weights and the bank::

    grad_bank[k] = sum_b a[b, k] * gW_b                        (K, C_out, C_in/G, KH, KW)
    grad_a[b, k] = <gW_b, bank[k]> + <gb_b, bias_bank[k]>      (B, K)
    grad_bias[k] = sum_b a[b, k] * gb_b                        (K, C_out)

with gb_b[co] = sum_p grad_y[b, co, p].

One program owns one (co, n) tile of gW for one group and one block of at most K_BLOCK experts,
and walks a run of samples. For each sample it forms that tile of gW_b in registers, then at once
adds ``a[b, k] * tile`` into a (K_BLOCK, BLOCK_M, BLOCK_N) register accumulator of grad_bank and
reduces ``tile . bank[k]`` to the tile's share of grad_a[b, k], for the block's experts k. So
gW_b never reaches memory, and nothing of size B x |W| exists. With more than K_BLOCK experts the
tile of gW_b is recomputed once per expert block (the accumulator must stay in registers).

Partial results are written, never accumulated, to small fp32 buffers:

- grad_bank: (S, K, C_out, C_in/G*KH*KW), one slice per run of samples (split) s;
- grad_a:    (T, B, K), one row block per (co, n) tile t;
- grad_bias: (S, K, C_out), written by the tiles with n-index 0.

The launcher sums them over the first axis with ``torch.sum``, a fixed-order reduction. No
atomics anywhere: results are bit-identical run to run, so this is also the deterministic path.
The tile shape (which fixes T) and K_BLOCK follow the register budget in
``dynconv.kernels.configs``; autotuning only varies BLOCK_P and the warp / stage counts (pruned
by ``conv_bwd_dw_config_fits``, the rule the compile-check's no-spill results follow), and every
buffer element is written exactly once per launch, so no reset_to_zero is needed.
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
def conv_bwd_dw_kernel(
    gy_ptr, x_ptr, bank_ptr, a_ptr, bias_ptr,
    gbank_ptr, ga_ptr, gbias_ptr,
    BATCH, SAMPLES_PER_SPLIT, H, W, HO, WO, C_IN_G, C_OUT_G, C_OUT, NUM_EXPERTS,
    gy_stride_b, gy_stride_c, gy_stride_h, gy_stride_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    bank_stride_k, bank_stride_o, bank_stride_c, bank_stride_h, bank_stride_w,
    a_stride_b, a_stride_k,
    bias_stride_k, bias_stride_o,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    K_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEED_BANK: tl.constexpr, NEED_ROUTING: tl.constexpr, NEED_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid: (G * cdiv(C_OUT_G, BLOCK_M) * cdiv(C_IN_G * KH * KW, BLOCK_N), splits of the batch,
    cdiv(NUM_EXPERTS, K_BLOCK))."""
    NEED_GW: tl.constexpr = NEED_BANK or NEED_ROUTING
    BIAS_TERMS: tl.constexpr = HAS_BIAS and (NEED_BIAS or NEED_ROUTING)
    nred = C_IN_G * KH * KW
    tiles_m = (C_OUT_G + BLOCK_M - 1) // BLOCK_M
    tiles_n = (nred + BLOCK_N - 1) // BLOCK_N
    tile = tl.program_id(0)
    split = tl.program_id(1)
    g = tile // (tiles_m * tiles_n)
    tile_m = (tile // tiles_n) % tiles_m
    tile_n = tile % tiles_n

    co = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel within group g
    co_ok = co < C_OUT_G
    n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (ci, kh, kw) flattened, as in the bank
    n_ok = n < nred
    ci = n // (KH * KW)
    kh = (n // KW) % KH
    kw = n % KW
    k_start = tl.program_id(2) * K_BLOCK
    k_stop = tl.minimum(k_start + K_BLOCK, NUM_EXPERTS)
    kk = k_start + tl.arange(0, K_BLOCK)
    k_ok = kk < NUM_EXPERTS
    tile_mask = co_ok[:, None] & n_ok[None, :]
    first_n = tile_n == 0
    pixels = HO * WO
    # 64-bit arithmetic only for base pointers; offsets inside one sample (and inside the bank)
    # are int32: fewer registers (the launcher checks the spans).
    g_co = (g * C_OUT_G).to(tl.int64)
    x_n_off = ci * x_stride_c + (kh * DIL_H) * x_stride_h + (kw * DIL_W) * x_stride_w
    gy_co_off = co * gy_stride_c

    gbank_acc = tl.zeros((K_BLOCK, BLOCK_M, BLOCK_N), dtype=tl.float32)
    gbias_acc = tl.zeros((K_BLOCK, BLOCK_M), dtype=tl.float32)
    b_start = split * SAMPLES_PER_SPLIT
    b_stop = tl.minimum(b_start + SAMPLES_PER_SPLIT, BATCH)
    for b in range(b_start, b_stop):
        b64 = b_start.to(tl.int64) + (b - b_start)  # (the interpreter's loop yields a Python int)
        gy_base = gy_ptr + b64 * gy_stride_b + g_co * gy_stride_c
        x_base = x_ptr + b64 * x_stride_b + (g * C_IN_G).to(tl.int64) * x_stride_c
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for p0 in range(0, pixels, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < pixels
            oh = p // WO
            ow = p % WO
            gy_pix_off = oh * gy_stride_h + ow * gy_stride_w
            gy = tl.load(gy_base + (gy_co_off[:, None] + gy_pix_off[None, :]),
                         mask=co_ok[:, None] & p_ok[None, :], other=0.0)
            if NEED_GW:
                ih0 = oh * STRIDE_H - PAD_H
                iw0 = ow * STRIDE_W - PAD_W
                ih = ih0[:, None] + (kh * DIL_H)[None, :]
                iw = iw0[:, None] + (kw * DIL_W)[None, :]
                x_ok = (p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H)
                        & (iw >= 0) & (iw < W))
                x_pix_off = ih0 * x_stride_h + iw0 * x_stride_w
                xt = tl.load(x_base + (x_pix_off[:, None] + x_n_off[None, :]), mask=x_ok,
                             other=0.0)
                if DOT_FP32:
                    acc += tl.dot(gy.to(tl.float32), xt.to(tl.float32),
                                  input_precision=INPUT_PRECISION)
                else:
                    acc += tl.dot(gy, xt, input_precision=INPUT_PRECISION)
            if BIAS_TERMS:
                gsum += tl.sum(gy.to(tl.float32), axis=1)

        if BIAS_TERMS:
            # One use of the pixel loop's reduction (Triton 3.6's thread-locality pass asserts
            # that a reduced loop result has a single user).
            gsum = tl.where(co_ok, gsum, 0.0)
        a_row = tl.load(a_ptr + b64 * a_stride_b + kk * a_stride_k, mask=k_ok,
                        other=0.0).to(tl.float32)
        if NEED_BANK:
            gbank_acc += a_row[:, None, None] * acc[None, :, :]
        if BIAS_TERMS:
            if NEED_BIAS:
                gbias_acc += a_row[:, None] * gsum[None, :]
        if NEED_ROUTING:
            # One scalar per expert, stored at once: no (K_BLOCK,) vector stays live.
            ga_row = ga_ptr + (tile.to(tl.int64) * BATCH + b64) * NUM_EXPERTS
            bank_base = bank_ptr + g_co * bank_stride_o
            bank_off = (co[:, None] * bank_stride_o + ci[None, :] * bank_stride_c
                        + kh[None, :] * bank_stride_h + kw[None, :] * bank_stride_w)
            for k in range(k_start, k_stop):
                bank_k = tl.load(bank_base + k * bank_stride_k + bank_off, mask=tile_mask,
                                 other=0.0).to(tl.float32)
                ga_k = tl.sum(tl.sum(bank_k * acc, axis=1), axis=0)
                if BIAS_TERMS:
                    # The bias term belongs to one tile per output channel: the n-index 0 one.
                    bias_k = tl.load(bias_ptr + g_co * bias_stride_o + k * bias_stride_k
                                     + co * bias_stride_o,
                                     mask=co_ok & first_n, other=0.0).to(tl.float32)
                    ga_k += tl.sum(bias_k * gsum, axis=0)
                tl.store(ga_row + k, ga_k)

    co_glob = g_co + co
    split64 = split.to(tl.int64)
    if NEED_BANK:
        gbank_off = (((split64 * NUM_EXPERTS + kk[:, None, None]) * C_OUT + co_glob[None, :, None])
                     * nred + n[None, None, :])
        tl.store(gbank_ptr + gbank_off, gbank_acc,
                 mask=k_ok[:, None, None] & tile_mask[None, :, :])
    if BIAS_TERMS:
        if NEED_BIAS:
            gbias_off = (split64 * NUM_EXPERTS + kk[:, None]) * C_OUT + co_glob[None, :]
            tl.store(gbias_ptr + gbias_off, gbias_acc,
                     mask=k_ok[:, None] & co_ok[None, :] & first_n)


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


def conv_bwd_dw(grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                need_bank=True, need_routing=True, need_bias=True, samples_per_program=None,
                interpreter=False):
    """grad_bank, grad_routing, grad_bias of dynamic convolution, without forming gW per batch.

    Args:
        grad_out: (B, Cout, Ho, Wo); x: (B, Cin, H, W); any strides, same dtype.
        weight_bank: (K, Cout, Cin // groups, kh, kw); routing: (B, K);
        bias_bank: (K, Cout) or None.
        stride, padding, dilation: pairs of ints (symmetric padding); groups: int.
        need_bank / need_routing / need_bias: which gradients to compute.
        samples_per_program: samples each program walks (the batch split); default from the
            GPU size and PARTIAL_BUDGET_BYTES.
        interpreter: whether the kernel runs under the Triton interpreter (CPU tensors).

    Returns:
        (grad_bank (K, Cout, Cin // groups, kh, kw) contiguous, grad_routing (B, K),
        grad_bias (K, Cout)), each in x's dtype, or None where not requested (grad_bias is
        None when bias_bank is None).
    """
    batch, in_channels, height, width = x.shape
    num_experts, out_channels, in_per_group, kh, kw = weight_bank.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    need_bias = need_bias and bias_bank is not None
    if not (need_bank or need_routing or need_bias):
        return None, None, None
    out_per_group = out_channels // groups
    reduction = in_per_group * kh * kw
    check_int32_spans(**{"one sample of grad_out": span(grad_out, 1),
                         "one sample of x": span(x, 1), "weight_bank": span(weight_bank)})
    k_block = conv_bwd_dw_expert_block(num_experts)
    block_m, block_n = conv_bwd_dw_tile_shape(num_experts, out_per_group, reduction, interpreter)
    tiles = groups * triton.cdiv(out_per_group, block_m) * triton.cdiv(reduction, block_n)
    weight_numel = out_channels * reduction
    if samples_per_program is None:
        samples_per_program = samples_per_split(batch, tiles, weight_numel, num_experts,
                                                interpreter)
    samples_per_program = max(1, samples_per_program)
    splits = triton.cdiv(batch, samples_per_program)
    f32 = {"device": x.device, "dtype": torch.float32}
    gbank = (torch.empty((splits, num_experts, out_channels, reduction), **f32)
             if need_bank else None)
    ga = torch.empty((tiles, batch, num_experts), **f32) if need_routing else None
    gbias = torch.empty((splits, num_experts, out_channels), **f32) if need_bias else None
    dummy = torch.empty(1, **f32)
    bias_arg = bias_bank if bias_bank is not None else dummy
    bias_strides = bias_bank.stride() if bias_bank is not None else (0, 0)
    args = (
        grad_out, x, weight_bank, routing, bias_arg,
        dummy if gbank is None else gbank, dummy if ga is None else ga,
        dummy if gbias is None else gbias,
        batch, samples_per_program, height, width, ho, wo, in_per_group, out_per_group,
        out_channels, num_experts,
        *grad_out.stride(), *x.stride(), *weight_bank.stride(), *routing.stride(), *bias_strides,
    )
    dot_fp32, precision = dot_settings(x.dtype, interpreter)
    meta = dict(
        KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0],
        PAD_W=padding[1], DIL_H=dilation[0], DIL_W=dilation[1], K_BLOCK=k_block,
        HAS_BIAS=bias_bank is not None, NEED_BANK=need_bank, NEED_ROUTING=need_routing,
        NEED_BIAS=need_bias, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    grid = (tiles, splits, triton.cdiv(num_experts, k_block))
    if batch > 0:
        conv_bwd_dw_tuned[grid](*args, **meta)
    grad_bank = grad_routing = grad_bias = None
    if need_bank:
        grad_bank = gbank.sum(0).to(x.dtype).reshape(weight_bank.shape)
    if need_routing:
        grad_routing = ga.sum(0).to(x.dtype)
    if need_bias:
        grad_bias = gbias.sum(0).to(x.dtype)
    return grad_bank, grad_routing, grad_bias
