"""Which formulation (:mod:`.formulations`) runs each part of a native CPU conv.

The three parts of a dynamic convolution, the forward, the input gradient and the per-sample
weight gradient, are chosen separately: they are separate PyTorch calls, and the measurements
disagree on which formulation suits each one. The rule is measured, not guessed:
``python -m dynconv.autotune.cpu_formulations --parts`` times every formulation's part on the
shapes of project issue 5 and the perf harness's CPU set, as a ratio to the same part of the
static ``F.conv2d`` (interleaved runs, median of the per-round ratios); the figures are in
``perf_reports/cpu_native/`` (``cpu_parts_*.csv``, README.md there). In short, on the 2-core
reference machine, with 1 and with 2 threads:

- ``grouped`` (one convolution over the whole chunk, the batch folded into groups) is the
  fastest part, or within noise of it, for every layer with 64 channels or fewer (including
  the bf16 and channels_last variants measured, all at 64 channels), every depthwise/grouped
  layer, and small spatial sizes (7x7, 8x8) below
  256 input channels (there the weight gradient as ``im2col`` won some runs and lost others,
  e.g. 128 channels at 7x7, batch 16: 1.78 against 2.37 with one thread, 2.34 against 1.93
  with two);
- a 1x1 kernel is a batched matmul: ``im2col`` (whose patches are then a plain strided copy)
  wins every part (0.4-0.7x the static conv against 1.1-1.9x for grouped);
- with many channels, enough pixels and a batch of 16 or more, one ``F.conv2d`` per sample
  beats the grouped convolution in the forward and the input gradient (128 channels at 16x16,
  batch 64: 1.3-1.7 against 1.6-2.1; 256 at 14x14, batch 16: 1.3-1.5 against 2.0-2.3; 512 at
  7x7, input gradient, batch 4 too: 1.8 against 1.9-3.9), but not at 128 channels and 14x14 or
  less (1.7-2.3 against 1.3-1.5) nor for 256 channels at batch 4 (1.3-1.4 against 1.25-1.33);
- with a long reduction (256 input channels or more at 3x3, i.e. Cin * kh * kw >= 2304) the
  weight gradient is fastest as one batched matmul of the patches (``im2col``: 512 at 7x7: 1.3
  against 3.0-4.9; 256 at 14x14: 1.1-1.9 against 1.2-2.6), and so is the forward when the
  output has few pixels (512 at 7x7: 1.6 against 1.7-4.2);
- a strided convolution's input gradient is slow as a grouped transposed convolution (64->128
  stride 2 at 56x56: 1.3-1.5 against 1.0-1.2 for ``im2col`` in the first runs; 1.45-1.53
  against 1.14-1.59 in the runs kept in perf_reports: with two threads there it lost).

The 1- and 2-thread runs agree on these branches (single rows differ by up to ~15% either
way, which is also how much a row moves between two runs here). Per-sample
convolutions parallelise inside each sample, so with more threads than were measured the
per-sample branch keeps at least the work per thread it had at 2 threads (an extrapolation:
no machine with more cores was measured).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class FormulationPlan(NamedTuple):
    """The formulation (a name of ``native_formulations.FORMULATIONS``) of each part."""

    forward: str
    input_grad: str
    weight_grad: str


# Multiply-adds of one sample's convolution from which per-sample convolutions beat the grouped
# one in the forward and the input gradient (measured: 37.7M at 128 channels, 16x16 won; 28.9M
# at 128 channels, 14x14 lost), per 2 threads.
PER_SAMPLE_MIN_MACS_PER_2_THREADS = 32 * 2**20
# Both operands of those convolutions need at least this many channels (64-channel layers of the
# same work, e.g. 64 at 56x56, stayed faster grouped).
PER_SAMPLE_MIN_CHANNELS = 128
# ... and a batch of at least this many samples: a grouped convolution over a few samples was as
# fast (256 channels at 14x14, batch 4: 1.25-1.33 against 1.30-1.39), except with 512 input
# channels, where it stays slow at any batch (512 at 7x7, batch 4, input gradient: 1.9-3.9
# against 1.8).
PER_SAMPLE_MIN_BATCH = 16
PER_SAMPLE_ANY_BATCH_CHANNELS = 512
# Reduction length (Cin/g * kh * kw) from which the weight gradient is a batched matmul.
IM2COL_MIN_REDUCTION = 256 * 9
# Output pixels up to which a forward with such a reduction is a batched matmul too.
IM2COL_FORWARD_MAX_PIXELS = 64


def choose_formulations(
    batch: int, in_channels: int, out_channels: int, in_hw: tuple[int, int],
    kernel: tuple[int, int], out_hw: tuple[int, int], groups: int, dtype: torch.dtype,
    channels_last: bool, threads: int, stride: tuple[int, int],
) -> FormulationPlan:
    """The formulation of each part for x (batch, in_channels, *in_hw) -> (batch, out_channels,
    *out_hw).

    ``threads`` is ``torch.get_num_threads()`` at the call, ``stride`` the convolution's. The
    dtype and memory format are part of the signature so that a measured difference can be
    added here without changing callers: bf16 and channels_last were only measured at 64
    channels, so wider bf16 / channels_last layers follow the fp32 NCHW branches unmeasured.
    (At batch 1 the grouped and the per-sample formulations make the same single call.)
    """
    if groups == 1 and tuple(kernel) == (1, 1):
        return FormulationPlan("im2col", "im2col", "im2col")
    if groups != 1:
        return FormulationPlan("grouped", "grouped", "grouped")
    forward = input_grad = weight_grad = "grouped"
    pixels = out_hw[0] * out_hw[1]
    reduction = in_channels * kernel[0] * kernel[1]
    macs = out_channels * reduction * pixels
    if (min(in_channels, out_channels) >= PER_SAMPLE_MIN_CHANNELS
            and macs >= PER_SAMPLE_MIN_MACS_PER_2_THREADS * max(2, threads) / 2
            and (batch >= PER_SAMPLE_MIN_BATCH or in_channels >= PER_SAMPLE_ANY_BATCH_CHANNELS)):
        forward = input_grad = "per_sample"
    if reduction >= IM2COL_MIN_REDUCTION:
        weight_grad = "im2col"
        if pixels <= IM2COL_FORWARD_MAX_PIXELS:
            forward = "im2col"
    if max(stride) > 1:
        input_grad = "im2col"
    return FormulationPlan(forward, input_grad, weight_grad)
