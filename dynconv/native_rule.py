"""Which native formulation runs a given CPU convolution (placeholder until measured)."""

from __future__ import annotations

import torch


def choose_formulation(
    batch: int, in_channels: int, out_channels: int, in_hw: tuple[int, int],
    kernel: tuple[int, int], out_hw: tuple[int, int], groups: int, dtype: torch.dtype,
    channels_last: bool, threads: int,
) -> str:
    return "grouped"
