"""Conv forward, premix strategy on Hopper's TMA: every main-loop operand is a descriptor load.

Computes y (B, C_out, HO, WO) = conv2d(x[b] (C_in, H, W), W_b, bias_b) for every sample b of a
launch, with W_b the mix kernel's per-sample weights (:mod:`.mix`: one row of the mixed buffer
per sample, laid out (KH, KW, C_in, C_out) then the bias). Only the case TMA can address:
groups 1, stride 1, 2-byte dtypes (bf16 / fp16), x and y channels_last with C_in and C_out
multiples of 8 (every non-unit stride a multiple of 16 bytes). Padding and dilation are free.

One program computes a (BLOCK_H x BLOCK_W pixels) x BLOCK_N tile of one sample::

    y[b, n0 + n, oh0 + p, ow0 + q] = bias_b[n0 + n]
        + sum_{i, j, c} x[b, c, oh0 + p - pad_h + i dil_h, ow0 + q - pad_w + j dil_w]
                        * W_b[(i, j, c), n0 + n]

The tensors are read through TMA descriptors (built on the host, block shapes set per config by
the autotuner's ``pre_hook``, :func:`dynconv.kernels.configs.set_conv_fwd_tma_block_shapes`):

- x as the NHWC view [B, H, W, C_in], box [1, BLOCK_H, BLOCK_W, BLOCK_K]: tap (i, j) and channel
  chunk c0 is the box at [b, oh0 - pad_h + i dil_h, ow0 - pad_w + j dil_w, c0]. TMA fills
  elements outside the tensor (negative coordinates included) with zeros, so padding, the
  image's right and bottom edges and a partial last channel chunk need no mask.
- the mixed weights as [n, KH * KW, C_in, C_out], box [1, 1, BLOCK_K, BLOCK_N]: rows past C_in
  (a partial chunk) are zeros too, so the product over them is exactly 0.
- y as the NHWC view [B, HO, WO, C_out], box [1, BLOCK_H, BLOCK_W, BLOCK_N]: the store drops the
  parts of the box outside y.

The reduction walks the taps and, per tap, C_in in BLOCK_K chunks, as one loop (the tap and
chunk are counters carried by the loop), accumulating in fp32; the bias (from the mixed buffer)
is added in the epilogue.

The program accumulates the transposed tile, y^T (BLOCK_N x pixels) += W^T x^T, so that the x
box is the dot's B operand. Flattening the box [1, BLOCK_H, BLOCK_W, BLOCK_K] to (pixels,
BLOCK_K) is then a view of the shared-memory buffer TMA wrote (a memdesc reshape), and wgmma
reads both operands from shared memory. As the A operand (y = x W) the same reshape made Triton
3.6 and 3.8 load the x tile into registers every step (ldmatrix, with a CTA barrier and fence
before the buffer's reuse): 122 (3.8) and 125 (3.6) SASS instructions per step at 128 x 128 x
64 instead of 94.
BLOCK_N is therefore wgmma's M side: a multiple of 64 on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import dot_settings
from ._taps import next_tap_step
from .configs import (
    CONV_FWD_TMA_KEY,
    conv_fwd_tma_capability_ok,
    conv_fwd_tma_configs,
    prune_conv_fwd_tma_configs,
    set_conv_fwd_tma_block_shapes,
)
from .tuned_table import TunedKernel

# TMA: every stride but the innermost, and the base address, a multiple of 16 bytes.
_TMA_ALIGN_BYTES = 16


@triton.jit(do_not_specialize=["BATCH_START"])
def conv_fwd_tma_kernel(
    x_desc, w_desc, y_desc, bias_ptr,
    BATCH_START,
    C_IN, C_OUT, H, W, HO, WO, KH, KW,
    pad_h, pad_w, dil_h, dil_w,
    bias_stride_e, bias_stride_o,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(HO, BLOCK_H) * cdiv(WO, BLOCK_W), cdiv(C_OUT, BLOCK_N), samples in this
    launch). Sample ``BATCH_START + program_id(2)`` of x and y, row ``program_id(2)`` of the
    mixed weights."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2)
    tiles_w = tl.cdiv(WO, BLOCK_W)
    oh0 = (pid_m // tiles_w) * BLOCK_H
    ow0 = (pid_m % tiles_w) * BLOCK_W
    n0 = pid_n * BLOCK_N
    b = BATCH_START + pid_b
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T: see the module docstring
    c_chunks = tl.cdiv(C_IN, BLOCK_K)
    i = 0
    j = 0
    c0 = 0
    for _ in range(0, KH * KW * c_chunks):
        x_tile = x_desc.load([b, oh0 - pad_h + i * dil_h, ow0 - pad_w + j * dil_w, c0])
        x_tile = x_tile.reshape(BLOCK_M, BLOCK_K)
        w_tile = w_desc.load([pid_b, i * KW + j, c0, n0]).reshape(BLOCK_K, BLOCK_N)
        if DOT_FP32:
            acc = tl.dot(w_tile.T.to(tl.float32), x_tile.T.to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(w_tile.T, x_tile.T, acc)
        i, j, c0 = next_tap_step(i, j, c0, C_IN, KW, BLOCK_K)

    if HAS_BIAS:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        bias = tl.load(bias_ptr + pid_b.to(tl.int64) * bias_stride_e + offs_n * bias_stride_o,
                       mask=offs_n < C_OUT, other=0.0)
        acc += bias.to(tl.float32)[:, None]
    out = acc.T.to(y_desc.dtype).reshape(1, BLOCK_H, BLOCK_W, BLOCK_N)
    y_desc.store([b, oh0, ow0, n0], out)


class _DescriptorTunedKernel(TunedKernel):
    """A tuned-table entry is rebuilt from JSON without the config's ``pre_hook``, which sets the
    descriptors' block shapes: put it back before launching."""

    def _run(self, config, grid, args, kwargs):
        if config.pre_hook is None:
            config = triton.Config(config.kwargs, num_warps=config.num_warps,
                                   num_stages=config.num_stages,
                                   pre_hook=set_conv_fwd_tma_block_shapes)
        return super()._run(config, grid, args, kwargs)


# The persisted per-GPU tuned table is consulted first, then the autotuner.
conv_fwd_tma_tuned = _DescriptorTunedKernel("conv_fwd_tma", triton.autotune(
    configs=conv_fwd_tma_configs(), key=CONV_FWD_TMA_KEY,
    prune_configs_by={"early_config_prune": prune_conv_fwd_tma_configs},
)(conv_fwd_tma_kernel))


def _nhwc_strides(t: torch.Tensor) -> list[int]:
    """The (batch, row, column) strides of a (B, C, H, W) tensor: its NHWC descriptor's
    non-unit strides."""
    return [t.stride(0), t.stride(2), t.stride(3)]


def _tma_addressable(t: torch.Tensor, strides) -> bool:
    """Base address and ``strides`` (a descriptor's all but innermost) multiples of 16 bytes.
    Meta tensors have address 0, as CUDA allocations are aligned."""
    size = t.element_size()
    return (t.data_ptr() % _TMA_ALIGN_BYTES == 0
            and all((s * size) % _TMA_ALIGN_BYTES == 0 for s in strides))


def conv_fwd_tma_unsupported(x: torch.Tensor, weight_bank_shape, stride, groups: int,
                             interpreter: bool = False) -> str | None:
    """Why the TMA forward cannot run this convolution (a message naming the argument), or
    None if it can. ``weight_bank_shape`` is (K, C_out, C_in/G, KH, KW)."""
    out_channels = weight_bank_shape[1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x: the TMA forward takes bf16 or fp16, got {x.dtype}"
    if groups != 1:
        return f"groups: the TMA forward takes groups=1, got {groups}"
    if tuple(stride) != (1, 1):
        return (f"stride: the TMA forward takes stride (1, 1) (TMA boxes cannot stride), got "
                f"{stride}")
    if x.shape[1] % 8 or out_channels % 8:
        return (f"x / weight_bank: the TMA forward needs C_in and C_out multiples of 8 "
                f"(16-byte rows), got C_in={x.shape[1]}, C_out={out_channels}")
    if x.stride(1) != 1 or not _tma_addressable(x, _nhwc_strides(x)):
        return (f"x: the TMA forward needs a channels_last x with 16-byte aligned strides, got "
                f"strides {tuple(x.stride())}")
    if x.device.type == "cpu" and not interpreter:
        return "x: the TMA forward runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1)"
    if not conv_fwd_tma_capability_ok(x.device):
        return "x: the TMA forward needs a GPU of compute capability 9.0 or more (Hopper)"
    return None


def conv_fwd_tma_supported(x: torch.Tensor, weight_bank_shape, stride, groups: int,
                           interpreter: bool = False) -> bool:
    """Whether :func:`conv_fwd_tma` can run this convolution (for dispatch)."""
    return conv_fwd_tma_unsupported(x, weight_bank_shape, stride, groups, interpreter) is None


def conv_fwd_tma(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    batch_start: int,
    batch_count: int,
    padding, dilation,
    interpreter: bool = False,
) -> None:
    """Write ``y[batch_start : batch_start + batch_count]`` (stride 1).

    Args:
        x: (B, C_in, H, W) channels_last, bf16 / fp16. y: (B, C_out, HO, WO) channels_last,
            x's dtype, written in place.
        weights: the mix kernel's rows for these samples, viewed by
            :func:`dynconv.kernels.mix.mixed_views` with groups 1: (n >= batch_count, 1, C_out,
            C_in, KH, KW), row e for sample batch_start + e.
        bias: (n, C_out) from the same buffer, or None.
        padding, dilation: (h, w) pairs; padding symmetric.
        interpreter: running under TRITON_INTERPRET (bf16 dots are upcast there).

    Raises:
        ValueError naming the argument outside what TMA can address
        (:func:`conv_fwd_tma_unsupported`, and y / weights not in the layout above).
    """
    num_rows, groups, out_channels, in_channels, kh, kw = weights.shape
    reason = conv_fwd_tma_unsupported(x, (num_rows, out_channels, in_channels, kh, kw), (1, 1),
                                      groups, interpreter)
    if reason is None and (y.stride(1) != 1 or not _tma_addressable(y, _nhwc_strides(y))
                           or y.dtype != x.dtype):
        reason = (f"y: the TMA forward writes a channels_last y of x's dtype with 16-byte "
                  f"aligned strides, got {y.dtype} strides {tuple(y.stride())}")
    # The mixed rows: (KH, KW, C_in, C_out) with C_out contiguous, so taps merge into one axis.
    w_strides = [weights.stride(0), weights.stride(5), weights.stride(3)]
    if reason is None and (weights.stride(2) != 1 or weights.stride(4) != kw * weights.stride(5)
                           or not _tma_addressable(weights, w_strides)
                           or weights.dtype != x.dtype):
        reason = (f"weights: the TMA forward reads the mix kernel's rows (mixed_views) in x's "
                  f"dtype, got {weights.dtype} strides {tuple(weights.stride())}")
    if reason is None and (in_channels, out_channels) != (x.shape[1], y.shape[1]):
        reason = (f"weights: (C_out, C_in) = {(out_channels, in_channels)}, x has "
                  f"{x.shape[1]} channels and y {y.shape[1]}")
    if reason is None and batch_count > num_rows:
        reason = f"weights: {num_rows} rows for batch_count={batch_count} samples"
    if reason is not None:
        raise ValueError(reason)
    height_out, width_out = y.shape[2], y.shape[3]
    dot_fp32, _ = dot_settings(x.dtype, interpreter)

    # The NHWC views; block shapes are placeholders until the config's pre_hook sets them.
    placeholder = [1, 1, 1, 1]
    x_desc = TensorDescriptor(x, [x.shape[0], x.shape[2], x.shape[3], in_channels],
                              [*_nhwc_strides(x), 1], placeholder)
    w_desc = TensorDescriptor(weights, [batch_count, kh * kw, in_channels, out_channels],
                              [*w_strides, 1], placeholder)
    y_desc = TensorDescriptor(y, [y.shape[0], height_out, width_out, out_channels],
                              [*_nhwc_strides(y), 1], placeholder)
    bias_arg = bias if bias is not None else y
    grid = lambda meta: (
        triton.cdiv(height_out, meta["BLOCK_H"]) * triton.cdiv(width_out, meta["BLOCK_W"]),
        triton.cdiv(out_channels, meta["BLOCK_N"]),
        batch_count,
    )
    conv_fwd_tma_tuned[grid](
        x_desc, w_desc, y_desc, bias_arg,
        batch_start,
        in_channels, out_channels, x.shape[2], x.shape[3], height_out, width_out, kh, kw,
        padding[0], padding[1], dilation[0], dilation[1],
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        HAS_BIAS=bias is not None, DOT_FP32=dot_fp32,
    )
