"""Which native formulation (:mod:`dynconv.native_formulations`) runs a CPU convolution.

The rule is measured, not guessed: ``python -m dynconv.autotune.cpu_formulations`` times every
formulation, forced, against the static ``F.conv2d`` of the same shape (interleaved runs, median
of the per-round ratios) on the shapes of project issue 5 and the perf harness's CPU set; the
figures behind each branch are in ``perf_reports/cpu_native/`` (README.md there). In short, on
the 2-core reference machine:

- ``grouped`` was the fastest formulation, or within 15% of it, on every shape with a kernel
  larger than 1x1, with one thread and CPU time (the robust measurement on a shared machine);
  where another one led, a neighbouring row (same shape, other K or batch) had grouped ahead,
  so those leads are run-to-run noise, not a shape effect. On the depthwise layer im2col is 4x
  slower than grouped (its patches are pure copies there);
- a 1x1 kernel is a batched matmul: ``im2col`` (whose patches are then a plain strided copy)
  beat ``grouped`` there (1.53 vs 1.66 of the static conv with one thread, 0.7-1.0 vs 2.1-3.2
  with two);
- a grouped convolution spreads its work over the samples of a chunk, so with fewer samples
  than threads ``per_sample`` (each convolution parallelised over its own pixels) keeps every
  thread busy.

Formulation choice and thread count interact only through that last branch: with one thread
the per-shape differences elsewhere were within the noise of the machine.
"""

from __future__ import annotations

import torch


def choose_formulation(
    batch: int, in_channels: int, out_channels: int, in_hw: tuple[int, int],
    kernel: tuple[int, int], out_hw: tuple[int, int], groups: int, dtype: torch.dtype,
    channels_last: bool, threads: int,
) -> str:
    """The formulation for x (batch, in_channels, *in_hw) -> (batch, out_channels, *out_hw).

    ``threads`` is ``torch.get_num_threads()`` at the call; dtype and memory format are part of
    the signature so that a measured difference can be added here without changing callers.
    """
    if groups == 1 and tuple(kernel) == (1, 1):
        return "im2col"
    if batch < threads:
        return "per_sample"
    return "grouped"
