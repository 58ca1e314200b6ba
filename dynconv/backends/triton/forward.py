"""The ``triton`` backend's forward: strategy choice, batch chunking and kernel launches.

Pure tensor functions, no autograd: ``triton_forward_impl`` is what the custom ops build on.
Kernels live in ``dynconv.kernels`` (mix, conv_fwd).
"""

from __future__ import annotations

import torch

from dynconv.geometry import output_hw, output_memory_format
from dynconv.kernels._common import interpreter_enabled

# The most experts the fused kernels mix in one pass (dynconv.kernels.configs; repeated here so
# that importing the backend does not import Triton).
MAX_EXPERT_CHUNK = 8

STRATEGIES = ("auto", "premix", "fused")

# Bytes of mixed weights (plus bias) that premix keeps in memory at once; the batch is processed
# in chunks of as many samples as fit.
PREMIX_BUFFER_BYTES = 64 * 2**20

# Samples are the third grid axis of the conv kernel, which CUDA limits to 65535 programs.
MAX_SAMPLES_PER_LAUNCH = 65535

# Output rows per tile that the fused strategy's heuristic assumes (a typical BLOCK_M).
_FUSED_ROWS_PER_TILE = 64
# Fused re-mixes the bank once per output-row tile: it is chosen while that costs at most this
# many bank-tile loads and multiply-adds per weight element and sample (row tiles x K).
_FUSED_MAX_REMIX = 32


def choose_strategy(x_shape, weight_bank_shape, out_hw) -> str:
    """``"premix"`` or ``"fused"`` for one call, by a heuristic that has not been measured yet.

    Every output-row tile of a sample needs that sample's whole weight matrix. Premix mixes it
    once per sample (K x |W| multiply-adds), writes it (B x |W| to memory) and each row tile
    reads it back. Fused writes nothing but each row tile loads the K bank tiles (the bank is
    small and cache-resident) and mixes them again: ``ceil(HO*WO / 64) * K`` multiply-adds and
    tile loads per weight element and sample, on CUDA cores beside the tensor-core dot. So fused
    is chosen when a sample has few row tiles and at most MAX_EXPERT_CHUNK experts (late,
    low-resolution layers), premix otherwise. The threshold (``_FUSED_MAX_REMIX``) is a guess
    until measured on a GPU.
    """
    del x_shape  # the decision depends on the output size and K only, for now
    num_experts = weight_bank_shape[0]
    if num_experts > MAX_EXPERT_CHUNK:
        # Fused would mix the bank in several passes over the reduction, each reloading x.
        return "premix"
    row_tiles = -(-(out_hw[0] * out_hw[1]) // _FUSED_ROWS_PER_TILE)
    return "fused" if row_tiles * num_experts <= _FUSED_MAX_REMIX else "premix"


def premix_chunk_size(batch: int, row_elements: int, element_size: int,
                      budget_bytes: int | None = None) -> int:
    """Samples per premix chunk so that the mixed buffer fits ``budget_bytes``."""
    budget = PREMIX_BUFFER_BYTES if budget_bytes is None else budget_bytes
    return max(1, min(batch, budget // max(1, row_elements * element_size)))


def triton_forward_impl(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    routing: torch.Tensor,
    bias_bank: torch.Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    strategy: str = "auto",
    *,
    premix_buffer_bytes: int | None = None,
) -> torch.Tensor:
    """Dynamic convolution forward with the Triton kernels (no autograd).

    Args:
        x: (B, C_in, H, W), any strides (NCHW, channels_last, non-contiguous views).
        weight_bank: (K, C_out, C_in/groups, KH, KW). routing: (B, K).
        bias_bank: (K, C_out) or None. All in x's dtype and on x's device (already validated).
        stride, padding, dilation: (h, w) ints; padding symmetric.
        strategy: ``"premix"``, ``"fused"`` or ``"auto"`` (:func:`choose_strategy`).
        premix_buffer_bytes: bound on premix's mixed-weight buffer (default
            ``PREMIX_BUFFER_BYTES``); the batch is processed in chunks that fit it.

    Returns:
        y, (B, C_out, HO, WO) in x's dtype, channels_last when x is (as ``F.conv2d``).
    """
    from dynconv.kernels._common import check_int32_spans, span
    from dynconv.kernels.conv_fwd import conv_fwd
    from dynconv.kernels.mix import mix, mixed_layout, mixed_views, pack_bank

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    # The mix kernel and the fused conv step through the bank with 32-bit offsets.
    check_int32_spans(weight_bank=span(weight_bank))
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    batch = x.shape[0]
    num_experts, out_channels, in_per_group, kh, kw = weight_bank.shape
    height_out, width_out = output_hw(x.shape[2:], weight_bank.shape[3:], stride,
                                         padding, dilation)
    y = torch.empty((batch, out_channels, height_out, width_out), dtype=x.dtype,
                    device=x.device, memory_format=output_memory_format(x))
    if batch == 0 or y.numel() == 0:
        return y
    if strategy == "auto":
        strategy = choose_strategy(x.shape, weight_bank.shape, (height_out, width_out))
    interpreter = interpreter_enabled() and x.device.type == "cpu"

    if strategy == "fused":
        # The bank repacked once per call (K x |W|, small next to the B x |W| premix would
        # write) into the mixed rows' layout, so that the kernel's bank tiles are contiguous
        # along the output channels; viewed as per-expert conv weights (K, G, C_out/G, C_in/G,
        # KH, KW).
        bank, _ = mixed_views(pack_bank(weight_bank, groups), weight_bank.shape, groups, False)
        for start in range(0, batch, MAX_SAMPLES_PER_LAUNCH):
            count = min(MAX_SAMPLES_PER_LAUNCH, batch - start)
            conv_fwd(x, bank, bias_bank, routing, y, start, count, stride, padding, dilation,
                     interpreter=interpreter)
        return y

    layout = mixed_layout(weight_bank.shape, bias_bank is not None)
    chunk = premix_chunk_size(batch, layout.row_stride, x.element_size(), premix_buffer_bytes)
    chunk = min(chunk, MAX_SAMPLES_PER_LAUNCH)
    buffer = x.new_empty((chunk, layout.row_stride))
    for start in range(0, batch, chunk):
        count = min(chunk, batch - start)
        mixed = mix(routing[start : start + count], weight_bank, bias_bank, groups, out=buffer,
                    interpreter=interpreter)
        weights, bias = mixed_views(mixed, weight_bank.shape, groups, bias_bank is not None)
        conv_fwd(x, weights, bias, None, y, start, count, stride, padding, dilation,
                 interpreter=interpreter)
    return y

