"""Triton helpers of the kernels that mix bank tiles inside their reduction loop (the fused
forward, the input gradient): W_b tile = sum_k a[b, k] * bank[k] tile, with the experts unrolled.

The expert count is a compile-time constant (``NUM_EXPERTS``) and the experts are walked in
chunks of ``EXPERT_CHUNK`` (:func:`dynconv.kernels.configs.expert_chunk`): a kernel makes one
pass of its reduction loop per chunk, ``for e0 in range(0, NUM_EXPERTS, EXPERT_CHUNK)`` (a
single pass, folded away by the compiler, up to EXPERT_CHUNK experts). Within a pass the
chunk's experts are unrolled, so each bank tile is a load of the reduction loop itself, which
Triton's pipeliner turns into an asynchronous copy with the loop's stages; the chunk bounds how
many bank tiles one stage buffers in shared memory. The passes stay a runtime loop: unrolled,
the compiler would keep the index math it shares across passes live (register spills).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def routing_chunk(a_row_ptr, a_stride_k, e0, EXPERT_CHUNK: tl.constexpr,
                  NUM_EXPERTS: tl.constexpr):
    """The routing weights a[b, e0 + kk], kk < EXPERT_CHUNK, as a tuple of fp32 scalars (loaded
    once per pass, before the reduction loop); 0 past the last expert."""
    a_chunk = ()
    for kk in tl.static_range(EXPERT_CHUNK):
        if NUM_EXPERTS % EXPERT_CHUNK == 0:
            a_k = tl.load(a_row_ptr + (e0 + kk) * a_stride_k)
        else:
            a_k = tl.load(a_row_ptr + (e0 + kk) * a_stride_k, mask=e0 + kk < NUM_EXPERTS,
                          other=0.0)
        a_chunk = a_chunk + (a_k.to(tl.float32),)
    return a_chunk


@triton.jit
def mixed_tile(bank_base, offs, mask, a_chunk, bank_stride_k, e0, EXPERT_CHUNK: tl.constexpr,
               NUM_EXPERTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R, BLOCK_C) fp32 tile: sum over kk < EXPERT_CHUNK of ``a_chunk[kk] * bank[e0 +
    kk]`` at element offsets ``offs`` (masked: 0) from ``bank_base`` (expert 0's tile origin;
    expert e is ``e * bank_stride_k`` further, in int64).

    Past the last expert (a last pass shorter than EXPERT_CHUNK) the last expert's tile is
    loaded again and weighted by a_chunk[kk] = 0: the loads stay unmasked along the experts.
    """
    mixed = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for kk in tl.static_range(EXPERT_CHUNK):
        expert = e0 + kk
        if NUM_EXPERTS % EXPERT_CHUNK != 0:
            expert = tl.minimum(expert, NUM_EXPERTS - 1)
        expert_base = bank_base + tl.cast(bank_stride_k, tl.int64) * expert
        tile = tl.load(expert_base + offs, mask=mask, other=0.0)
        mixed += a_chunk[kk] * tile.to(tl.float32)
    return mixed
