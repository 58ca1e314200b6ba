"""Which formulation (:mod:`.formulations`) runs each part of a native CPU conv.

The forward, the input gradient and the per-sample weight gradient are separate PyTorch calls,
so each gets its own formulation. The rule, in order (the constants below name the thresholds):

- a 1x1 kernel without groups is a batched matmul: ``im2col`` for every part;
- grouped and depthwise convolutions: ``grouped`` for every part;
- otherwise ``grouped``, except:

  - ``per_sample`` forward and input gradient when both channel counts are at least
    ``PER_SAMPLE_MIN_CHANNELS``, one sample's convolution has at least
    ``PER_SAMPLE_MIN_MACS_PER_2_THREADS`` multiply-adds per two threads (per-sample calls
    parallelise inside each sample, so more threads need more work per sample), and the batch
    has at least ``PER_SAMPLE_MIN_BATCH`` samples (any batch from
    ``PER_SAMPLE_ANY_BATCH_CHANNELS`` input channels);
  - ``im2col`` weight gradient when the reduction Cin * kh * kw is at least
    ``IM2COL_MIN_REDUCTION``, and then an ``im2col`` forward too when the output has at most
    ``IM2COL_FORWARD_MAX_PIXELS`` pixels.

  - bf16 in channels_last on a CPU without native bf16 convolutions (oneDNN's
    ``_is_mkldnn_bf16_supported()`` false: no AVX512-BF16 / AMX), where the rule above gives
    ``grouped`` for every part: ``per_sample`` forward and weight gradient (the grouped
    convolution's fallback there is 2-3x slower than per-sample ones), the input gradient
    staying ``grouped`` (4x faster there than per-sample).

  A strided convolution's input gradient stays with the weight gradient's formulation (it was
  ``im2col`` for any stride until the second pass: faster alone in the parts benchmark with one
  thread, but the whole forward+backward lost to the grouped trick with 1 and 2 threads, as it
  splits the one ``convolution_backward`` call that computes both gradients into two).

With benchmark mode on (``dynconv.set_benchmark``), a call whose shape is within CLOSE_FRACTION
of a threshold times the plans on both sides on its first occurrence (:func:`close_plans`) and
keeps the fastest, so that the user's CPU decides there instead of the one the rule was measured
on. The thresholds come from ``python -m dynconv.autotune.cpu_formulations --parts`` (each part of
each formulation timed against the same part of the static ``F.conv2d``, 1 and 2 threads). The
figures behind each branch, and what is extrapolated, are in ``perf_reports/cpu_native/README.md``
("The rule, branch by branch").
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class FormulationPlan(NamedTuple):
    """The formulation (a name of ``formulations.FORMULATIONS``) of each part."""

    forward: str
    input_grad: str
    weight_grad: str


# Multiply-adds of one sample's convolution, per 2 threads, from which per-sample convolutions
# beat the grouped one in the forward and the input gradient.
PER_SAMPLE_MIN_MACS_PER_2_THREADS = 32 * 2**20
# Both operands of those convolutions need at least this many channels.
PER_SAMPLE_MIN_CHANNELS = 128
# ... and a batch of at least this many samples, except from this many input channels.
PER_SAMPLE_MIN_BATCH = 16
PER_SAMPLE_ANY_BATCH_CHANNELS = 512
# Reduction length (Cin/g * kh * kw) from which the weight gradient is a batched matmul.
IM2COL_MIN_REDUCTION = 256 * 9
# Output pixels up to which a forward with such a reduction is a batched matmul too.
IM2COL_FORWARD_MAX_PIXELS = 64


def native_bf16_convolutions() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN's check; True where it cannot
    be asked, the rule then being the fp32 one). Asked once."""
    global _native_bf16
    if _native_bf16 is None:
        try:
            _native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _native_bf16 = True
    return _native_bf16


_native_bf16: bool | None = None


class Thresholds(NamedTuple):
    """The rule's thresholds (the module constants by default)."""

    per_sample_min_macs_per_2_threads: float = PER_SAMPLE_MIN_MACS_PER_2_THREADS
    per_sample_min_channels: float = PER_SAMPLE_MIN_CHANNELS
    per_sample_min_batch: float = PER_SAMPLE_MIN_BATCH
    per_sample_any_batch_channels: float = PER_SAMPLE_ANY_BATCH_CHANNELS
    im2col_min_reduction: float = IM2COL_MIN_REDUCTION
    im2col_forward_max_pixels: float = IM2COL_FORWARD_MAX_PIXELS


# How near a threshold counts as close: within this fraction of it, a machine other than the
# one the rule was measured on may well decide the other way (benchmark mode times both).
CLOSE_FRACTION = 0.10


def close_plans(*args) -> list[FormulationPlan]:
    """The rule's plan for a call (``choose_formulations``' arguments), then every other plan
    the rule gives when one of its thresholds moves by CLOSE_FRACTION either way: the
    alternatives benchmark mode times on the call's first occurrence. One plan: not close."""
    plans = [choose_formulations(*args)]
    defaults = Thresholds()
    for index, value in enumerate(defaults):
        for factor in (1 - CLOSE_FRACTION, 1 + CLOSE_FRACTION):
            moved = defaults._replace(**{defaults._fields[index]: value * factor})
            plan = choose_formulations(*args, thresholds=moved)
            if plan not in plans:
                plans.append(plan)
    return plans


def choose_formulations(
    batch: int, in_channels: int, out_channels: int, in_hw: tuple[int, int],
    kernel: tuple[int, int], out_hw: tuple[int, int], groups: int, dtype: torch.dtype,
    channels_last: bool, threads: int, stride: tuple[int, int],
    thresholds: Thresholds | None = None,
) -> FormulationPlan:
    """The formulation of each part for x (batch, in_channels, *in_hw) -> (batch, out_channels,
    *out_hw).

    ``threads`` is ``torch.get_num_threads()`` at the call, ``stride`` the convolution's. The
    dtype and memory format do not change the choice today (wider bf16 / channels_last layers
    follow the fp32 NCHW branches); they are in the signature so that a rule for them needs no
    change of callers, except bf16 channels_last on a CPU without native bf16 convolutions
    (measured on one such CPU, an AMD EPYC (Zen 2) VM; on a Xeon with AMX the fp32 branches
    held). At batch 1 the grouped and the per-sample formulations make the same call.
    """
    t = thresholds or Thresholds()
    if groups == 1 and tuple(kernel) == (1, 1):
        return FormulationPlan("im2col", "im2col", "im2col")
    if groups != 1:
        return FormulationPlan("grouped", "grouped", "grouped")
    forward = input_grad = weight_grad = "grouped"
    pixels = out_hw[0] * out_hw[1]
    reduction = in_channels * kernel[0] * kernel[1]
    macs = out_channels * reduction * pixels
    if (min(in_channels, out_channels) >= t.per_sample_min_channels
            and macs >= t.per_sample_min_macs_per_2_threads * max(2, threads) / 2
            and (batch >= t.per_sample_min_batch
                 or in_channels >= t.per_sample_any_batch_channels)):
        forward = input_grad = "per_sample"
    if reduction >= t.im2col_min_reduction:
        weight_grad = "im2col"
        if pixels <= t.im2col_forward_max_pixels:
            forward = "im2col"
    if ((forward, input_grad, weight_grad) == ("grouped",) * 3 and dtype == torch.bfloat16
            and channels_last and not native_bf16_convolutions()):
        forward = weight_grad = "per_sample"
    return FormulationPlan(forward, input_grad, weight_grad)
