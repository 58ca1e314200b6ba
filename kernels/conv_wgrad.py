"""Weight-side gradients of dynamic convolution, contracted in the wgrad kernel's epilogue.

The per-sample weight gradient of group g is a GEMM over that sample's output pixels::

    gW_b[co, n] = sum_p grad_y[b, g*Cog + co, p] * x_unf[b, n, p]      n = (ci, kh, kw)

and the gradients the caller needs are contractions of it with the routing weights and the bank::

    grad_bank[k]    = sum_b a[b, k] * gW_b
    grad_a[b, k]    = <gW_b, bank[k]> + <gb_b, bias_bank[k]>,   gb_b[co] = sum_p grad_y[b, co, p]
    grad_bias[k]    = sum_b a[b, k] * gb_b

One program owns one (co, n) tile of gW for one group and one block of at most K_BLOCK experts,
and walks a run of samples. For each sample it forms that tile of gW_b in registers, then at once
adds ``a[b, k] * tile`` into a (K_BLOCK, BLOCK_M, BLOCK_N) register accumulator of grad_bank and
reduces ``tile . bank[k]`` to the tile's share of grad_a[b, k], for the block's experts k. So
gW_b never reaches memory, and nothing of size B x |W| exists. With more than K_BLOCK experts the
tile of gW_b is recomputed once per expert block (the accumulator must stay in registers).

Partial results are written, never accumulated, to small fp32 buffers:

- grad_bank: (S, K, Cout, Cin/g*kh*kw), one slice per run of samples (split) s;
- grad_a:    (T, B, K), one row block per (co, n) tile t;
- grad_bias: (S, K, Cout), written by the tiles with n-index 0.

The launcher sums them over the first axis with ``torch.sum``, a fixed-order reduction. No
atomics anywhere: results are bit-identical run to run, so this is also the deterministic path.
The tile shape (which fixes T) is chosen by the launcher from a register budget; autotuning only
varies BLOCK_P and the warp / stage counts (pruned by :func:`config_fits`, the rule the
compile-check's no-spill results follow), and every buffer element is written exactly once per
launch, so no reset_to_zero is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MIN_DOT_BLOCK, check_int32_spans, dot_settings, interpreter_enabled, span
from .configs import CompileCase
from .tuned_table import with_tuned_table

# Largest fp32 element count of the (K_BLOCK, BLOCK_M, BLOCK_N) grad_bank accumulator.
ACC_BUDGET = 4096
# Most experts one program accumulates (more are split over the grid's third axis).
MAX_K_BLOCK = 16
# Most accumulator elements (grad_bank's and gW's) per thread: past this, ptxas spills (measured
# for sm_80 / sm_90 by the compile-check).
MAX_ACC_PER_THREAD = 40
# (K_BLOCK, element size, BLOCK_P, num_warps, num_stages) that the rule above lets through but
# where ptxas still spilled a few bytes (sm_80 or sm_90; Triton 3.8's ptxas, compile-check of
# this kernel). A change to the kernel means re-running the compile-check and this list.
MEASURED_SPILLS = frozenset({
    (1, 4, 32, 8, 2),
    (8, 4, 16, 4, 1),
    (8, 2, 32, 8, 2),
    (16, 2, 32, 8, 2),
})
# Bytes allowed for the per-split grad_bank partials (S x K x |W| fp32).
PARTIAL_BUDGET_BYTES = 32 * 2**20
# Programs to aim for on a GPU when choosing how many splits of the batch to run.
TARGET_PROGRAMS = 512


# (BLOCK_P, num_warps, num_stages); BLOCK_P is tl.dot's reduction dimension (>= 16).
# Two stages at most: deeper pipelining of these gathered loads spills on sm_80 / sm_90.
_WGRAD_CANDIDATES = [
    (16, 4, 1),
    (32, 4, 1),
    (32, 4, 2),
    (16, 8, 1),
    (32, 8, 2),
    (64, 8, 2),
]
# Interpreter: one config, long pixel chunks (its cost is per program and per op).
_WGRAD_INTERPRETER = (64, 4, 1)


def wgrad_configs(interpreter: bool | None = None) -> list[triton.Config]:
    """Candidate BLOCK_P / warps / stages (one under the interpreter)."""
    interpreter = interpreter_enabled() if interpreter is None else interpreter
    table = [_WGRAD_INTERPRETER] if interpreter else _WGRAD_CANDIDATES
    return [triton.Config({"BLOCK_P": p}, num_warps=w, num_stages=st) for p, w, st in table]


def expert_block(num_experts: int) -> int:
    """K_BLOCK: experts accumulated per program (a power of two, at most MAX_K_BLOCK)."""
    return min(triton.next_power_of_2(num_experts), MAX_K_BLOCK)


def config_fits(config: triton.Config, k_block: int, element_size: int) -> bool:
    """Whether a config compiles without spills for every tile of a K_BLOCK (the compile-check's
    findings, judged at the largest tile :func:`tile_shape` gives that K_BLOCK).

    The accumulators take ``(K_BLOCK + 1) * BLOCK_M * BLOCK_N`` fp32 over ``32 * num_warps``
    threads; with 4-byte operands a 64-pixel chunk adds too many live loads; MEASURED_SPILLS
    lists the few combinations where ptxas spilled anyway.
    """
    block_m, block_n = tile_shape(k_block, 1 << 16, 1 << 16)
    block_p = config.kwargs["BLOCK_P"]
    threads = 32 * config.num_warps
    if (k_block + 1) * block_m * block_n > MAX_ACC_PER_THREAD * threads:
        return False
    if element_size == 4 and block_p > 32:
        return False
    measured = (k_block, element_size, block_p, config.num_warps, config.num_stages)
    return measured not in MEASURED_SPILLS


def _prune_wgrad(configs, named_args, **kwargs):
    element_size = named_args["x_ptr"].element_size()
    kept = [c for c in configs if config_fits(c, kwargs["K_BLOCK"], element_size)]
    return kept or configs[:1]


def tile_shape(num_experts: int, cog: int, nred: int,
               interpreter: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the gW tile: as large as the problem and the register budget allow.

    ``tl.dot`` needs each tile side >= 16 when compiled.
    """
    small = MIN_DOT_BLOCK
    if interpreter:
        # One program per group for the tiny test problems: the interpreter pays per program.
        return (max(small, triton.next_power_of_2(cog)),
                max(small, triton.next_power_of_2(nred)))
    k_block = expert_block(num_experts)
    block_m = min(64, max(small, triton.next_power_of_2(cog)))
    block_n = min(64, max(small, triton.next_power_of_2(nred)))
    while k_block * block_m * block_n > ACC_BUDGET and (block_m > small or block_n > small):
        if block_n >= block_m and block_n > small:
            block_n //= 2
        else:
            block_m //= 2
    return block_m, block_n


@triton.jit
def wgrad_kernel(
    gy_ptr, x_ptr, bank_ptr, a_ptr, bias_ptr,
    gbank_ptr, ga_ptr, gbias_ptr,
    BATCH, SAMPLES_PER_SPLIT, H, W, HO, WO, CIG, COG, COUT, NUM_EXPERTS,
    s_gy_b, s_gy_c, s_gy_h, s_gy_w,
    s_x_b, s_x_c, s_x_h, s_x_w,
    s_bk_k, s_bk_o, s_bk_i, s_bk_h, s_bk_w,
    s_a_b, s_a_k,
    s_bb_k, s_bb_o,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    K_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEED_BANK: tl.constexpr, NEED_ROUTING: tl.constexpr, NEED_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    NEED_GW: tl.constexpr = NEED_BANK or NEED_ROUTING
    BIAS_TERMS: tl.constexpr = HAS_BIAS and (NEED_BIAS or NEED_ROUTING)
    nred = CIG * KH * KW
    tiles_m = (COG + BLOCK_M - 1) // BLOCK_M
    tiles_n = (nred + BLOCK_N - 1) // BLOCK_N
    tile = tl.program_id(0)
    split = tl.program_id(1)
    g = tile // (tiles_m * tiles_n)
    tile_m = (tile // tiles_n) % tiles_m
    tile_n = tile % tiles_n

    co = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel within group g
    co_ok = co < COG
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
    g_co = (g * COG).to(tl.int64)
    x_n_off = ci * s_x_c + (kh * DH) * s_x_h + (kw * DW) * s_x_w
    gy_co_off = co * s_gy_c

    gbank_acc = tl.zeros((K_BLOCK, BLOCK_M, BLOCK_N), dtype=tl.float32)
    gbias_acc = tl.zeros((K_BLOCK, BLOCK_M), dtype=tl.float32)
    b_start = split * SAMPLES_PER_SPLIT
    b_stop = tl.minimum(b_start + SAMPLES_PER_SPLIT, BATCH)
    for b in range(b_start, b_stop):
        b64 = b_start.to(tl.int64) + (b - b_start)  # (the interpreter's loop yields a Python int)
        gy_base = gy_ptr + b64 * s_gy_b + g_co * s_gy_c
        x_base = x_ptr + b64 * s_x_b + (g * CIG).to(tl.int64) * s_x_c
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for p0 in range(0, pixels, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < pixels
            oh = p // WO
            ow = p % WO
            gy = tl.load(gy_base + (gy_co_off[:, None] + (oh * s_gy_h + ow * s_gy_w)[None, :]),
                         mask=co_ok[:, None] & p_ok[None, :], other=0.0)
            if NEED_GW:
                ih0 = oh * SH - PH
                iw0 = ow * SW - PW
                ih = ih0[:, None] + (kh * DH)[None, :]
                iw = iw0[:, None] + (kw * DW)[None, :]
                x_ok = (p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H)
                        & (iw >= 0) & (iw < W))
                xt = tl.load(x_base + ((ih0 * s_x_h + iw0 * s_x_w)[:, None] + x_n_off[None, :]),
                             mask=x_ok, other=0.0)
                if UPCAST:
                    acc += tl.dot(gy.to(tl.float32), xt.to(tl.float32),
                                  input_precision=INPUT_PRECISION)
                else:
                    acc += tl.dot(gy, xt, input_precision=INPUT_PRECISION)
            if BIAS_TERMS:
                gsum += tl.sum(gy.to(tl.float32), axis=1)

        a_row = tl.load(a_ptr + b64 * s_a_b + kk * s_a_k, mask=k_ok, other=0.0).to(tl.float32)
        if NEED_BANK:
            gbank_acc += a_row[:, None, None] * acc[None, :, :]
        if BIAS_TERMS:
            if NEED_BIAS:
                gbias_acc += a_row[:, None] * gsum[None, :]
        if NEED_ROUTING:
            # One scalar per expert, stored at once: no (K_BLOCK,) vector stays live.
            ga_row = ga_ptr + (tile.to(tl.int64) * BATCH + b64) * NUM_EXPERTS
            bank_base = bank_ptr + g_co * s_bk_o
            bank_off = (co[:, None] * s_bk_o + ci[None, :] * s_bk_i + kh[None, :] * s_bk_h
                        + kw[None, :] * s_bk_w)
            for k in range(k_start, k_stop):
                bank_k = tl.load(bank_base + k * s_bk_k + bank_off, mask=tile_mask,
                                 other=0.0).to(tl.float32)
                ga_k = tl.sum(tl.sum(bank_k * acc, axis=1), axis=0)
                if BIAS_TERMS:
                    # The bias term belongs to one tile per output channel: the n-index 0 one.
                    bias_k = tl.load(bias_ptr + g_co * s_bb_o + k * s_bb_k + co * s_bb_o,
                                     mask=co_ok & first_n, other=0.0).to(tl.float32)
                    ga_k += tl.sum(bias_k * gsum, axis=0)
                tl.store(ga_row + k, ga_k)

    co_glob = g_co + co
    split64 = split.to(tl.int64)
    if NEED_BANK:
        gbank_off = (((split64 * NUM_EXPERTS + kk[:, None, None]) * COUT + co_glob[None, :, None])
                     * nred + n[None, None, :])
        tl.store(gbank_ptr + gbank_off, gbank_acc,
                 mask=k_ok[:, None, None] & tile_mask[None, :, :])
    if BIAS_TERMS:
        if NEED_BIAS:
            gbias_off = (split64 * NUM_EXPERTS + kk[:, None]) * COUT + co_glob[None, :]
            tl.store(gbias_ptr + gbias_off, gbias_acc,
                     mask=k_ok[:, None] & co_ok[None, :] & first_n)


WGRAD_KEY = ["H", "W", "HO", "WO", "CIG", "COG", "NUM_EXPERTS", "SAMPLES_PER_SPLIT", "KH", "KW",
             "SH", "SW", "PH", "PW", "DH", "DW", "K_BLOCK", "HAS_BIAS", "NEED_BANK",
             "NEED_ROUTING", "NEED_BIAS", "UPCAST", "INPUT_PRECISION", "BLOCK_M", "BLOCK_N"]

# Every buffer element is written once per launch (stores, no accumulation into memory), so a
# config re-run while tuning leaves the right answer: no reset_to_zero needed.
wgrad_kernel_tuned = with_tuned_table("conv_wgrad", triton.autotune(
    configs=wgrad_configs(), key=WGRAD_KEY, prune_configs_by={"early_config_prune": _prune_wgrad},
)(wgrad_kernel))


def samples_per_split(batch: int, tiles: int, weight_numel: int, num_experts: int,
                      interpreter: bool = False) -> int:
    """Samples per program: enough splits to fill the GPU, few enough for the partial budget."""
    if interpreter:
        return max(1, batch)
    max_splits = max(1, PARTIAL_BUDGET_BYTES // (4 * num_experts * weight_numel))
    splits = max(1, min(batch, max_splits, triton.cdiv(TARGET_PROGRAMS, tiles)))
    return triton.cdiv(batch, splits)


def conv_wgrad(grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
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
    num_experts, out_channels, cig, kh, kw = weight_bank.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    need_bias = need_bias and bias_bank is not None
    if not (need_bank or need_routing or need_bias):
        return None, None, None
    cog = out_channels // groups
    nred = cig * kh * kw
    check_int32_spans(**{"one sample of grad_out": span(grad_out, 1),
                         "one sample of x": span(x, 1), "weight_bank": span(weight_bank)})
    k_block = expert_block(num_experts)
    block_m, block_n = tile_shape(num_experts, cog, nred, interpreter)
    tiles = groups * triton.cdiv(cog, block_m) * triton.cdiv(nred, block_n)
    weight_numel = out_channels * nred
    if samples_per_program is None:
        samples_per_program = samples_per_split(batch, tiles, weight_numel, num_experts,
                                                interpreter)
    samples_per_program = max(1, samples_per_program)
    splits = triton.cdiv(batch, samples_per_program)
    f32 = {"device": x.device, "dtype": torch.float32}
    gbank = torch.empty((splits, num_experts, out_channels, nred), **f32) if need_bank else None
    ga = torch.empty((tiles, batch, num_experts), **f32) if need_routing else None
    gbias = torch.empty((splits, num_experts, out_channels), **f32) if need_bias else None
    dummy = torch.empty(1, **f32)
    bias_arg = bias_bank if bias_bank is not None else dummy
    bias_strides = bias_bank.stride() if bias_bank is not None else (0, 0)
    args = (
        grad_out, x, weight_bank, routing, bias_arg,
        dummy if gbank is None else gbank, dummy if ga is None else ga,
        dummy if gbias is None else gbias,
        batch, samples_per_program, height, width, ho, wo, cig, cog, out_channels, num_experts,
        *grad_out.stride(), *x.stride(), *weight_bank.stride(), *routing.stride(), *bias_strides,
    )
    upcast, precision = dot_settings(x.dtype, interpreter)
    meta = dict(
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
        DH=dilation[0], DW=dilation[1], K_BLOCK=k_block,
        HAS_BIAS=bias_bank is not None, NEED_BANK=need_bank, NEED_ROUTING=need_routing,
        NEED_BIAS=need_bias, UPCAST=upcast, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    grid = (tiles, splits, triton.cdiv(num_experts, k_block))
    if batch > 0:
        wgrad_kernel_tuned[grid](*args, **meta)
    grad_bank = grad_routing = grad_bias = None
    if need_bank:
        grad_bank = gbank.sum(0).to(x.dtype).reshape(weight_bank.shape)
    if need_routing:
        grad_routing = ga.sum(0).to(x.dtype)
    if need_bias:
        grad_bias = gbias.sum(0).to(x.dtype)
    return grad_bank, grad_routing, grad_bias


_INT_ARGS = [
    "BATCH", "SAMPLES_PER_SPLIT", "H", "W", "HO", "WO", "CIG", "COG", "COUT", "NUM_EXPERTS",
    "s_gy_b", "s_gy_c", "s_gy_h", "s_gy_w",
    "s_x_b", "s_x_c", "s_x_h", "s_x_w",
    "s_bk_k", "s_bk_o", "s_bk_i", "s_bk_h", "s_bk_w",
    "s_a_b", "s_a_k",
    "s_bb_k", "s_bb_o",
]
_DTYPE_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}


def compile_cases() -> list[CompileCase]:
    """Every K_BLOCK x {fp32 (tf32), fp16, bf16} x every config that :func:`config_fits` allows,
    at the largest tile of that K_BLOCK (3x3, stride 1, a bias and all three gradients: the
    largest live state)."""
    cases = []
    for dtype, element_size in _DTYPE_SIZES.items():
        k_block = 1
        while k_block <= MAX_K_BLOCK:
            block_m, block_n = tile_shape(k_block, 1 << 16, 1 << 16)
            for config in wgrad_configs(interpreter=False):
                if not config_fits(config, k_block, element_size):
                    continue
                signature = {name: f"*{dtype}" for name in ("gy_ptr", "x_ptr", "bank_ptr",
                                                            "a_ptr", "bias_ptr")}
                signature.update({name: "*fp32" for name in ("gbank_ptr", "ga_ptr",
                                                             "gbias_ptr")})
                signature.update({name: "i32" for name in _INT_ARGS})
                constexprs = {
                    "KH": 3, "KW": 3, "SH": 1, "SW": 1, "PH": 1, "PW": 1, "DH": 1, "DW": 1,
                    "K_BLOCK": k_block, "HAS_BIAS": True, "NEED_BANK": True,
                    "NEED_ROUTING": True, "NEED_BIAS": True, "UPCAST": False,
                    "INPUT_PRECISION": "tf32" if dtype == "fp32" else "ieee",
                    "BLOCK_M": block_m, "BLOCK_N": block_n, **config.kwargs,
                }
                signature.update({name: "constexpr" for name in constexprs})
                name = (f"conv_wgrad {dtype} Kb{k_block} M{block_m} N{block_n} "
                        f"P{config.kwargs['BLOCK_P']} w{config.num_warps} s{config.num_stages}")
                cases.append(CompileCase(wgrad_kernel, signature, constexprs,
                                         config.num_warps, config.num_stages, name))
            k_block *= 2
    return cases
