"""Mix kernel: per-sample weights ``W[b] = sum_k a[b, k] bank[k]`` (and the bias) in one pass.

From the routing a (B, K), the packed bank (K, N_WEIGHT) (:func:`pack_bank`) and the bias bank
(K, C_out), a tiled (B x K) @ (K x N) product whose N columns are one sample's row of the
mixed buffer, laid out as the conv forward kernel reads it (reduction-major, output channels
contiguous)::

    row[b] = [ W[b] as (G, KH, KW, C_in/G, C_out/G) | pad | bias[b] (C_out) | pad ]

The packed bank's rows are in exactly that order (column n of the bank is column n of the
mixed row, its padding zeros), so every bank load is contiguous, 16-byte vectorised and free
of index math; the bias bank is read through its strides in the same pass. The writes, which
are B x |W| and dominate the traffic, are contiguous.

Traffic: :func:`pack_bank` costs one K x |W| read and one K x |W| write per forward call,
against the K x |W| that the mix reads per chunk of the batch anyway (once per BLOCK_B samples,
mostly from L2): those reads become whole 16-byte rows (cp.async) instead of per-element
gathers with a stride of KH x KW along C_in/G (2-byte scalar loads for bf16, index math per
column). Premix callers pack once per call and pass the packed bank to every chunk's
:func:`mix`; given the bank itself, :func:`mix` packs it on every call.

All expert counts take the tl.dot path (fewer than 16 experts are masked), so fp32 follows
``allow_tf32`` (tf32 or ieee) for every K.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import dot_settings
from .configs import (
    MIX_KEY,
    mix_configs,
    prune_mix_configs,
)
from .tuned_table import with_tuned_table

_ALIGN = 16  # elements: keeps each row and the bias section 16-element aligned


class MixedLayout(NamedTuple):
    """Where things live in one sample's row of the mixed buffer (in elements)."""

    n_weight: int  # |W| = C_out * C_in/G * KH * KW
    n_bias: int  # C_out, or 0 without a bias bank
    bias_offset: int  # column of bias[0]
    row_stride: int  # elements per sample row


def mixed_layout(weight_bank_shape, has_bias: bool) -> MixedLayout:
    """Row layout for a bank of shape (K, C_out, C_in/G, KH, KW)."""
    _, out_channels, in_per_group, kh, kw = weight_bank_shape
    n_weight = out_channels * in_per_group * kh * kw
    bias_offset = triton.cdiv(n_weight, _ALIGN) * _ALIGN
    n_bias = out_channels if has_bias else 0
    row_stride = bias_offset + triton.cdiv(n_bias, _ALIGN) * _ALIGN
    return MixedLayout(n_weight, n_bias, bias_offset, max(row_stride, _ALIGN))


def pack_bank(weight_bank: torch.Tensor, groups: int) -> torch.Tensor:
    """The bank (K, C_out, C_in/G, KH, KW), any strides, copied into the mixed rows' order,
    which the fused conv reads (tiles contiguous along C_out/G) and the mix kernel reads with
    unit stride: (K, row_stride), row k = bank[k] as (G, KH, KW, C_in/G, C_out/G) flattened,
    then zeros up to a multiple of 16 elements (they keep every expert's row 16-element aligned
    and mix to zeros in the mixed rows' padding).

    Read it as per-expert conv weights with ``mixed_views(packed, bank_shape, groups, False)``.
    """
    num_experts, out_channels, in_per_group, kh, kw = weight_bank.shape
    layout = mixed_layout(weight_bank.shape, False)
    packed = weight_bank.new_empty((num_experts, layout.row_stride))
    rows = packed[:, : layout.n_weight].view(num_experts, groups, kh, kw, in_per_group,
                                              out_channels // groups)
    bank = weight_bank.unflatten(1, (groups, out_channels // groups))
    rows.copy_(bank.permute(0, 1, 4, 5, 3, 2))
    packed[:, layout.n_weight :].zero_()
    return packed


def mixed_views(buffer: torch.Tensor, weight_bank_shape, groups: int, has_bias: bool):
    """Views of a mixed buffer (n, row_stride): weights and bias in logical order.

    Returns (weights (n, G, C_out/G, C_in/G, KH, KW), bias (n, C_out) or None); both are strided
    views into ``buffer``, no copy.
    """
    layout = mixed_layout(weight_bank_shape, has_bias)
    _, out_channels, in_per_group, kh, kw = weight_bank_shape
    n = buffer.shape[0]
    out_per_group = out_channels // groups
    weights = buffer[:, : layout.n_weight].view(n, groups, kh, kw, in_per_group, out_per_group)
    weights = weights.permute(0, 1, 5, 4, 2, 3)
    bias = None
    if has_bias:
        bias = buffer[:, layout.bias_offset : layout.bias_offset + out_channels]
    return weights, bias


@triton.jit
def mix_kernel(
    a_ptr, bank_ptr, bias_ptr, tap_ptr, out_ptr,
    BATCH, NUM_EXPERTS, N_WEIGHT, N_BIAS, N_COLS, TAP_PERIOD, TAPS,
    a_stride_b, a_stride_k,
    bank_stride_k,
    bias_stride_k, bias_stride_o,
    tap_stride_b, tap_stride_t,
    out_stride_b,
    HAS_BIAS: tl.constexpr, HAS_TAP: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[b, n] = sum_k a[b, k] * (bank[k, n] for n < N_WEIGHT, else bias[k, n - N_WEIGHT]),
    the weight columns times ``tap[b, (n // TAP_PERIOD) % TAPS]`` with HAS_TAP (ODConv's tap
    scale: in the packed order a tap's columns are TAP_PERIOD = C_in/G x C_out/G consecutive
    ones, TAPS = KH x KW of them per group).

    Columns n < N_COLS of the mixed rows: the packed bank's N_WEIGHT columns (a multiple of 16,
    padding included), then the N_BIAS bias columns and the bias section's padding (written as
    zeros). Source column = destination column: no index math, unit-stride loads and stores.

    Grid: (cdiv(N_COLS, BLOCK_N), cdiv(BATCH, BLOCK_B)).
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_b = offs_b < BATCH
    is_weight = offs_n < N_WEIGHT
    bias_col = offs_n - N_WEIGHT
    is_bias = (offs_n >= N_WEIGHT) & (bias_col < N_BIAS)
    bias_src = bias_col * bias_stride_o

    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    # Experts in chunks of BLOCK_E = 16 (tl.dot's minimum), the last one masked: with fewer
    # experts the dot multiplies zeros, still far fewer instructions than outer products (each
    # thread would hold one column of a row and load all BLOCK_B routing weights per expert).
    for e0 in range(0, NUM_EXPERTS, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < NUM_EXPERTS
        a = tl.load(
            a_ptr + offs_b[:, None] * a_stride_b + offs_e[None, :] * a_stride_k,
            mask=mask_b[:, None] & mask_e[None, :], other=0.0,
        )
        tile = tl.load(
            bank_ptr + offs_e[:, None] * bank_stride_k + offs_n[None, :],
            mask=mask_e[:, None] & is_weight[None, :], other=0.0,
        )
        if HAS_BIAS:
            tile += tl.load(
                bias_ptr + offs_e[:, None] * bias_stride_k + bias_src[None, :],
                mask=mask_e[:, None] & is_bias[None, :], other=0.0,
            )
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tile, acc, input_precision=INPUT_PRECISION)

    if HAS_TAP:
        # (BLOCK_B, BLOCK_N) gather of a (B, KH x KW) table: a few distinct addresses per row,
        # from L1; the bias columns keep a factor of 1.
        tap = (offs_n // TAP_PERIOD) % TAPS
        scale = tl.load(tap_ptr + offs_b[:, None] * tap_stride_b + tap[None, :] * tap_stride_t,
                        mask=mask_b[:, None] & is_weight[None, :], other=1.0)
        acc = acc * scale.to(tl.float32)
    out = out_ptr + offs_b.to(tl.int64)[:, None] * out_stride_b + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty),
             mask=mask_b[:, None] & (offs_n < N_COLS)[None, :])


# The persisted per-GPU tuned table is consulted first, then the autotuner.
mix_tuned = with_tuned_table("mix", triton.autotune(
    configs=mix_configs(), key=MIX_KEY,
    prune_configs_by={"early_config_prune": prune_mix_configs},
)(mix_kernel))


def mix(routing: torch.Tensor, weight_bank: torch.Tensor, bias_bank: torch.Tensor | None,
        groups: int, out: torch.Tensor | None = None, interpreter: bool = False,
        tap_scale: torch.Tensor | None = None, bank_shape=None) -> torch.Tensor:
    """Mixed per-sample weights (and bias) in the conv kernel's layout.

    Args:
        routing: (n, K).
        weight_bank: the packed bank (K, row_stride) of :func:`pack_bank` (pack it once per
            forward call and pass it to every chunk), or the bank (K, C_out, C_in/G, KH, KW),
            any strides, which is then packed here on every call.
        bias_bank: (K, C_out) or None. groups: G.
        out: optional (>= n, row_stride) buffer to write into (its first n rows are used).
        tap_scale: optional (n, KH, KW), ODConv's per-sample tap scale of the mixed weights
            (not of the bias); with a packed bank, ``bank_shape`` (K, C_out, C_in/G, KH, KW)
            tells where the taps are.

    Returns:
        (n, row_stride) buffer in routing's dtype, rows laid out as :func:`mixed_layout` (the
        padding written as zeros); read it through :func:`mixed_views`.
    """
    if weight_bank.dim() == 5:
        bank_shape = weight_bank.shape
        weight_bank = pack_bank(weight_bank, groups)
    if tap_scale is not None and bank_shape is None:
        raise ValueError("bank_shape: the bank's (K, C_out, C_in/G, KH, KW) is needed to place "
                         "tap_scale's taps in a packed bank, got None")
    if (weight_bank.dim() != 2 or weight_bank.shape[1] % _ALIGN
            or (weight_bank.stride(1) != 1 and weight_bank.shape[1] > 1)):
        raise ValueError(
            f"weight_bank: expected the bank (K, C_out, C_in/G, KH, KW) or pack_bank's "
            f"(K, row_stride) with unit column stride and row_stride a multiple of {_ALIGN}, "
            f"got shape {tuple(weight_bank.shape)} strides {weight_bank.stride()}"
        )
    n, num_experts = routing.shape
    n_weight = weight_bank.shape[1]
    n_bias = bias_bank.shape[1] if bias_bank is not None else 0
    n_cols = n_weight + triton.cdiv(n_bias, _ALIGN) * _ALIGN
    if out is None:
        out = routing.new_empty((n, n_cols))
    out = out[:n]
    dot_fp32, precision = dot_settings(routing.dtype, interpreter)
    bias = bias_bank if bias_bank is not None else weight_bank  # unused pointer when no bias
    tap_period = taps = 1
    tap = weight_bank  # unused pointer without a tap scale
    if tap_scale is not None:
        _, out_channels, in_per_group, kh, kw = bank_shape
        taps, tap_period = kh * kw, in_per_group * (out_channels // groups)
        tap = tap_scale.reshape(n, taps)
    grid = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_N"]), triton.cdiv(n, meta["BLOCK_B"]))
    mix_tuned[grid](
        routing, weight_bank, bias, tap, out,
        n, num_experts, n_weight, n_bias, n_cols, tap_period, taps,
        routing.stride(0), routing.stride(1),
        weight_bank.stride(0),
        bias.stride(0) if bias_bank is not None else 0,
        bias.stride(1) if bias_bank is not None else 0,
        tap.stride(0) if tap_scale is not None else 0,
        tap.stride(1) if tap_scale is not None else 0,
        out.stride(0),
        HAS_BIAS=bias_bank is not None, HAS_TAP=tap_scale is not None, DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
    )
    return out
