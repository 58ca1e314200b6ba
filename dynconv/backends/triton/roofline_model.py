"""The roofline bounds of the Triton forward's strategies: plain arithmetic, no Triton, no torch.

One model serves two callers: the ``auto`` rule of the forward (:func:`best_strategy`, by
:func:`dynconv.backends.triton.forward.choose_strategy`) and the perf tool ``python -m
dynconv.autotune roofline`` (``autotune/roofline.py``: tables over named shape sets, its
docstring explains each formula). Until ``gpu-check`` measures the strategies, these bounds are
what ``auto`` goes by.

Notation: ``F`` = the static conv's FLOPs, ``|W|`` = one weight's elements, ``e`` = bytes per
element, ``eff`` = the fraction of peak a conv kernel reaches, ``m_eff`` = useful / padded GEMM
rows, ``n_eff`` = useful / padded GEMM columns, ``w_eff`` = tiles / (waves x SMs); the
compute terms divide by ``eff peak m_eff n_eff w_eff``.

- static: ``max(F / (eff peak), e (x + y + |W|) / HBM)``
- premix: ``e (K|W| + B|W|) / HBM + max(F / (eff peak m_eff w_eff), e (x + y + B|W|) / HBM)``
- fused: ``max(F / (eff peak m_eff w_eff) + mix, e (x + y + K|W|) / HBM + re-reads / L2-or-HBM)``
- spanning: ``max(K F / (eff peak m_eff w_eff), e (x + y + K|W|) / HBM)``, rows span the batch
- grouped: premix's bound (reference only, never a candidate)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# --- device constants (H200) -------------------------------------------------------------------
# HBM bandwidth, SM count, L2 size and the CUDA-core fp32 rate are NVIDIA H200 (SXM) datasheet
# figures. The tensor-core peak is an assumed figure (790 TFLOP/s dense bf16/fp16; tf32 half of
# it), which is below the datasheet's 989 TFLOP/s dense: a sustained rate rather than boost
# clocks. Compute-bound ratios do not depend on it (static and strategies share it).
TENSOR_PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "fp32": 395e12}  # fp32 runs as tf32
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
HBM_BANDWIDTH = 4.8e12  # bytes/s
NUM_SMS = 132
L2_BYTES = 50e6
# Assumptions, not datasheet figures:
L2_BANDWIDTH = 3 * HBM_BANDWIDTH  # bytes/s, an L2 hit rate assumed ~3x HBM's
CUDA_CORE_FLOPS = 67e12  # fp32 FMA rate of the CUDA cores (the datasheet's FP32 figure)
CUDNN_EFFICIENCY = 0.6  # fraction of tensor peak cuDNN's static conv (and at best ours) reaches
BLOCKS = (64, 128)  # BLOCK_M / BLOCK_N choices of the implicit-GEMM tiles
# Narrowest column tile (tl.dot's minimum): fewer output channels per group than a BLOCKS tile
# take the narrowest power of two >= them, down to this.
MIN_BLOCK_N = 16

STRATEGIES = ("premix", "fused", "spanning", "grouped")
CANDIDATES = ("premix", "fused", "spanning")  # grouped is the reference, never "best"


@dataclass(frozen=True)
class Device:
    peak_flops: float
    hbm: float = HBM_BANDWIDTH
    l2: float = L2_BANDWIDTH
    l2_bytes: float = L2_BYTES
    sms: int = NUM_SMS
    cuda_core_flops: float = CUDA_CORE_FLOPS
    efficiency: float = CUDNN_EFFICIENCY


def h200(dtype: str = "bf16") -> Device:
    if dtype not in TENSOR_PEAK_FLOPS:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(TENSOR_PEAK_FLOPS)}")
    return Device(peak_flops=TENSOR_PEAK_FLOPS[dtype])


@dataclass(frozen=True)
class Tiling:
    block_m: int
    block_n: int
    m_eff: float  # useful / padded GEMM rows
    tiles: int
    wave_eff: float  # tiles / (waves x SMs)
    n_eff: float = 1.0  # useful / padded GEMM columns (depthwise: 1 of 16)

    @property
    def eff(self) -> float:
        return self.m_eff * self.n_eff * self.wave_eff


def tilings(rows_per_tile_group: int, tile_groups: int, cout_g: int, groups: int,
            sms: int) -> list[Tiling]:
    """Every (BLOCK_M, BLOCK_N) in ``BLOCKS`` for ``tile_groups`` independent GEMMs of
    ``rows_per_tile_group`` rows each (B samples for per-sample tiles, 1 for batch-spanning)
    and ``cout_g`` columns per conv group (a group narrower than the tile takes a tile of the
    narrowest power of two >= cout_g, at least MIN_BLOCK_N: ``n_eff``)."""
    out = []
    for bm in BLOCKS:
        for bn in BLOCKS:
            m_tiles = math.ceil(rows_per_tile_group / bm)
            m_eff = rows_per_tile_group / (m_tiles * bm)
            n_tiles = math.ceil(cout_g / bn)
            width = min(bn, max(MIN_BLOCK_N, 1 << max(0, cout_g - 1).bit_length()))
            n_eff = cout_g / (n_tiles * width)
            tiles = tile_groups * m_tiles * groups * n_tiles
            wave_eff = tiles / (math.ceil(tiles / sms) * sms)
            out.append(Tiling(bm, bn, m_eff, tiles, wave_eff, n_eff))
    return out


def tiling(rows_per_tile_group: int, tile_groups: int, cout_g: int, groups: int,
           sms: int) -> Tiling:
    """The tiling of :func:`tilings` with the best ``m_eff x wave_eff`` (first on ties)."""
    return max(tilings(rows_per_tile_group, tile_groups, cout_g, groups, sms),
               key=lambda t: t.eff)


@dataclass(frozen=True)
class Bounds:
    """Each strategy's time bound (seconds) for one call, and what the bounds are made of."""

    flops: int  # the static conv's
    min_bytes: int  # dynamic: x + y + K |W|
    static_bytes: int  # x + y + |W|
    static_s: float
    premix_s: float
    fused_s: float
    spanning_s: float
    grouped_s: float
    premix_eff: float  # m_eff x n_eff x wave_eff of the per-sample tiles
    spanning_eff: float
    fused_extra_bytes: int
    fused_extra_from: str  # "L2" or "HBM"
    premix_bound: str  # "compute" or "memory" (of the conv kernel)
    fused_bound: str
    spanning_bound: str

    def time(self, strategy: str) -> float:
        return getattr(self, f"{strategy}_s")


def strategy_bounds(batch: int, experts: int, cin: int, cout: int, h: int, w: int, ho: int,
                    wo: int, kh: int, kw: int, groups: int = 1, dtype: str = "bf16",
                    device: Device | None = None) -> Bounds:
    """The bounds of the module docstring for one conv: x (batch, cin, h, w), a bank of
    ``experts`` kernels (cout, cin/groups, kh, kw), output (ho, wo), in ``dtype``."""
    if batch < 1 or experts < 1:
        raise ValueError(f"batch and experts must be >= 1, got {batch} and {experts}")
    dev = device or h200(dtype)
    e = DTYPE_BYTES[dtype]
    hw_out = ho * wo
    cout_g = cout // groups
    x = batch * cin * h * w
    y = batch * cout * hw_out
    weight = cout * (cin // groups) * kh * kw
    flops = 2 * batch * cout * hw_out * (cin // groups) * kh * kw
    conv_rate = dev.efficiency * dev.peak_flops

    static_bytes = e * (x + y + weight)
    min_bytes = e * (x + y + experts * weight)
    static_s = max(flops / conv_rate, static_bytes / dev.hbm)

    # premix: per-sample M tiles; mix kernel (memory-bound), then the conv reads W_dyn back.
    per_sample = tiling(hw_out, batch, cout_g, groups, dev.sms)
    mix_s = e * (experts * weight + batch * weight) / dev.hbm
    premix_compute = flops / (conv_rate * per_sample.eff)
    premix_memory = e * (x + y + batch * weight) / dev.hbm
    premix_s = mix_s + max(premix_compute, premix_memory)

    # fused: the K bank tiles re-read (and mixed on CUDA cores) by every row tile; its own
    # tiling (a taller BLOCK_M means fewer re-reads), the one with the lowest bound.
    from_l2 = e * experts * weight <= dev.l2_bytes
    fused = []
    for t in tilings(hw_out, batch, cout_g, groups, dev.sms):
        row_tiles = batch * math.ceil(hw_out / t.block_m)
        extra = e * row_tiles * experts * weight
        compute = (flops / (conv_rate * t.eff)
                   + 2 * row_tiles * experts * weight / dev.cuda_core_flops)
        memory = min_bytes / dev.hbm + extra / (dev.l2 if from_l2 else dev.hbm)
        fused.append((max(compute, memory), extra, compute, memory))
    fused_s, extra, fused_compute, fused_memory = min(fused)

    # spanning: one static conv over K x Cin channels, rows span the batch.
    spanning_tiling = tiling(batch * hw_out, 1, cout_g, groups, dev.sms)
    spanning_compute = experts * flops / (conv_rate * spanning_tiling.eff)
    spanning_memory = min_bytes / dev.hbm
    spanning_s = max(spanning_compute, spanning_memory)

    # grouped trick: B small convs (per-sample tiles) + B x |W| written and read.
    grouped_s = mix_s + max(premix_compute, premix_memory)

    def bound(compute: float, memory: float) -> str:
        return "compute" if compute >= memory else "memory"

    return Bounds(
        flops=flops, min_bytes=min_bytes, static_bytes=static_bytes,
        static_s=static_s, premix_s=premix_s, fused_s=fused_s, spanning_s=spanning_s,
        grouped_s=grouped_s, premix_eff=per_sample.eff, spanning_eff=spanning_tiling.eff,
        fused_extra_bytes=extra, fused_extra_from="L2" if from_l2 else "HBM",
        premix_bound=bound(premix_compute, premix_memory),
        fused_bound=bound(fused_compute, fused_memory),
        spanning_bound=bound(spanning_compute, spanning_memory),
    )


def best_strategy(bounds: Bounds, candidates=CANDIDATES) -> str:
    """The candidate with the lowest bound (the first of ``candidates`` on a tie)."""
    return min(candidates, key=bounds.time)
