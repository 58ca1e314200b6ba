"""Input gradient of dynamic convolution: a per-sample transposed implicit GEMM (dgrad).

For sample b of group g::

    grad_x[b, g*Cig + ci, ih, iw] = sum_{co, kh, kw} grad_y[b, g*Cog + co, oh, ow]
                                                      * W_b[g*Cog + co, ci, kh, kw]
    with ih = oh*sh - ph + kh*dh, iw = ow*sw - pw + kw*dw,  W_b = sum_k a[b, k] * bank[k]

One program computes a BLOCK_M x BLOCK_N tile of grad_x for one sample: rows are input pixels
(ih, iw), columns are input channels of one group; the reduction runs over (kh, kw) and the
group's output channels in BLOCK_K chunks. An input pixel receives a tap (kh, kw) only when
``ih + ph - kh*dh`` is a non-negative multiple of the stride that lands inside the output; the
other rows are masked. The per-sample kernel W_b is mixed from the K bank tiles in registers
inside the reduction loop, so it never exists in memory. Every grad_x element is written by
exactly one program (no atomics: deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import MIN_DOT_BLOCK, check_int32_spans, dot_settings, interpreter_enabled, span
from .configs import CompileCase, mnk_tile_configs
from .tuned_table import with_tuned_table

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N and BLOCK_K >= 16 for tl.dot.
_DGRAD_CANDIDATES = [
    (32, 16, 16, 2, 3),
    (64, 16, 32, 4, 3),
    (64, 32, 32, 4, 3),
    (64, 64, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (128, 128, 32, 8, 3),
]
# Interpreter: one config with large row tiles (its cost is per program and per op).
_DGRAD_INTERPRETER = (64, 16, 16, 4, 1)


def dgrad_configs(interpreter: bool | None = None) -> list[triton.Config]:
    """Candidate tile configs (one under the interpreter, which cannot time kernels)."""
    interpreter = interpreter_enabled() if interpreter is None else interpreter
    table = [_DGRAD_INTERPRETER] if interpreter else _DGRAD_CANDIDATES
    return mnk_tile_configs(table)


def _prune_dgrad(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (they only waste lanes); keep at least one."""
    cig, cog = named_args["CIG"], named_args["COG"]
    pixels = named_args["H"] * named_args["W"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= max(MIN_DOT_BLOCK, triton.next_power_of_2(cig))
        and c.kwargs["BLOCK_K"] <= max(MIN_DOT_BLOCK, triton.next_power_of_2(cog))
        and c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(pixels))
    ]
    return kept or configs[:1]


@triton.jit
def dgrad_kernel(
    gy_ptr, bank_ptr, a_ptr, gx_ptr,
    H, W, HO, WO, CIG, COG, NUM_EXPERTS,
    s_gy_b, s_gy_c, s_gy_h, s_gy_w,
    s_bk_k, s_bk_o, s_bk_i, s_bk_h, s_bk_w,
    s_a_b, s_a_k,
    s_gx_b, s_gx_c, s_gx_h, s_gx_w,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tiles_m = (H * W + BLOCK_M - 1) // BLOCK_M
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = pid0 // tiles_m
    tile_m = pid0 % tiles_m
    tiles_n = (CIG + BLOCK_N - 1) // BLOCK_N
    g = pid1 // tiles_n
    tile_n = pid1 % tiles_n

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels
    ih = rows // W
    iw = rows % W
    row_ok = rows < H * W
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within group g
    col_ok = cols < CIG
    red = tl.arange(0, BLOCK_K)  # output channels within group g

    # 64-bit arithmetic only for the per-sample / per-group base pointers; offsets inside one
    # sample (and inside the bank) are int32: fewer registers (the launcher checks the spans).
    b64 = b.to(tl.int64)
    gy_base = gy_ptr + b64 * s_gy_b + (g * COG).to(tl.int64) * s_gy_c
    bank_base = bank_ptr + (g * COG).to(tl.int64) * s_bk_o
    a_base = a_ptr + b64 * s_a_b

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        num_h = ih + PH - kh * DH
        oh = num_h // SH
        ok_h = (num_h >= 0) & (num_h % SH == 0) & (oh < HO)
        for kw in range(KW):
            num_w = iw + PW - kw * DW
            ow = num_w // SW
            ok_w = (num_w >= 0) & (num_w % SW == 0) & (ow < WO)
            ok_row = row_ok & ok_h & ok_w
            # Rows with ok_row False have meaningless (oh, ow); their loads are masked.
            pix_off = oh * s_gy_h + ow * s_gy_w
            tap_off = kh * s_bk_h + kw * s_bk_w
            for co0 in range(0, COG, BLOCK_K):
                co = co0 + red
                co_ok = co < COG
                gy = tl.load(gy_base + (pix_off[:, None] + co[None, :] * s_gy_c),
                             mask=ok_row[:, None] & co_ok[None, :], other=0.0)
                w_mask = co_ok[:, None] & col_ok[None, :]
                w_off = co[:, None] * s_bk_o + cols[None, :] * s_bk_i + tap_off
                w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
                for k in range(NUM_EXPERTS):
                    a_k = tl.load(a_base + k * s_a_k).to(tl.float32)
                    tile = tl.load(bank_base + k * s_bk_k + w_off, mask=w_mask, other=0.0)
                    w += a_k * tile.to(tl.float32)
                if UPCAST:
                    acc += tl.dot(gy.to(tl.float32), w, input_precision=INPUT_PRECISION)
                else:
                    acc += tl.dot(gy, w.to(gy.dtype), input_precision=INPUT_PRECISION)

    gx_base = gx_ptr + b64 * s_gx_b + (g * CIG).to(tl.int64) * s_gx_c
    gx_off = cols[None, :] * s_gx_c + ih[:, None] * s_gx_h + iw[:, None] * s_gx_w
    tl.store(gx_base + gx_off, acc.to(gx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


DGRAD_KEY = ["H", "W", "HO", "WO", "CIG", "COG", "NUM_EXPERTS", "KH", "KW", "SH", "SW",
             "PH", "PW", "DH", "DW", "UPCAST", "INPUT_PRECISION"]

# Every output element is written once by one program, so re-running a config while tuning
# leaves the right answer: no reset_to_zero needed.
dgrad_kernel_tuned = with_tuned_table("conv_dgrad", triton.autotune(
    configs=dgrad_configs(), key=DGRAD_KEY,
    prune_configs_by={"early_config_prune": _prune_dgrad},
)(dgrad_kernel))


def conv_dgrad(grad_out, weight_bank, routing, x_shape, stride, padding, dilation, groups,
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
    num_experts, out_channels, cig, kh, kw = weight_bank.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    if out is None:
        out = grad_out.new_empty((batch, in_channels, height, width))
    if out.numel() == 0:
        return out
    cog = out_channels // groups
    check_int32_spans(**{"one sample of grad_out": span(grad_out, 1),
                         "one sample of grad_x": span(out, 1), "weight_bank": span(weight_bank)})
    upcast, precision = dot_settings(grad_out.dtype, interpreter)
    args = (
        grad_out, weight_bank, routing, out,
        height, width, ho, wo, cig, cog, num_experts,
        *grad_out.stride(), *weight_bank.stride(), *routing.stride(), *out.stride(),
    )
    meta = dict(
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
        DH=dilation[0], DW=dilation[1], UPCAST=upcast,
        INPUT_PRECISION=precision,
    )

    def grid(m):
        return (batch * triton.cdiv(height * width, m["BLOCK_M"]),
                groups * triton.cdiv(cig, m["BLOCK_N"]))

    dgrad_kernel_tuned[grid](*args, **meta)
    return out


_INT_ARGS = [
    "H", "W", "HO", "WO", "CIG", "COG", "NUM_EXPERTS",
    "s_gy_b", "s_gy_c", "s_gy_h", "s_gy_w",
    "s_bk_k", "s_bk_o", "s_bk_i", "s_bk_h", "s_bk_w",
    "s_a_b", "s_a_k",
    "s_gx_b", "s_gx_c", "s_gx_h", "s_gx_w",
]
# (KH, KW, stride, padding, dilation) compiled by the compile-check: the common 3x3, stride 1
# and 2 (the geometry is constexpr, so each is its own binary; smaller kernels need less).
COMPILE_GEOMETRIES = [(3, 3, 1, 1, 1), (3, 3, 2, 1, 1)]


def compile_cases() -> list[CompileCase]:
    """Every dgrad config x {fp32 (tf32), fp16, bf16} x COMPILE_GEOMETRIES."""
    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        for kh, kw, stride, pad, dil in COMPILE_GEOMETRIES:
            for config in dgrad_configs(interpreter=False):
                signature = {name: f"*{dtype}" for name in ("gy_ptr", "bank_ptr", "a_ptr",
                                                            "gx_ptr")}
                signature.update({name: "i32" for name in _INT_ARGS})
                constexprs = {
                    "KH": kh, "KW": kw, "SH": stride, "SW": stride, "PH": pad, "PW": pad,
                    "DH": dil, "DW": dil, "UPCAST": False,
                    "INPUT_PRECISION": "tf32" if dtype == "fp32" else "ieee", **config.kwargs,
                }
                signature.update({name: "constexpr" for name in constexprs})
                kwargs = config.kwargs
                name = (f"conv_dgrad {dtype} k{kh}x{kw} s{stride} M{kwargs['BLOCK_M']} "
                        f"N{kwargs['BLOCK_N']} K{kwargs['BLOCK_K']} w{config.num_warps} "
                        f"s{config.num_stages}")
                cases.append(CompileCase(dgrad_kernel, signature, constexprs, config.num_warps,
                                         config.num_stages, name))
    return cases
