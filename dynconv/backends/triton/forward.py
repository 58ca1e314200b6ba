"""The ``triton`` backend's forward: strategy choice, batch chunking and kernel launches.

Pure tensor functions, no autograd: ``triton_forward_impl`` is what the custom ops build on.
Kernels live in ``dynconv.kernels`` (mix, conv_fwd, conv_fwd_spanning, conv_fwd_tma); the
``spanning_torch`` strategy runs on PyTorch's convolution (:mod:`.spanning_torch`). Which
strategy runs a call: :mod:`.strategy` (forced, measured, benchmarked, else the rule,
:func:`choose_strategy`).
"""

from __future__ import annotations

import functools

import torch

from dynconv.geometry import output_hw, output_memory_format
from dynconv.kernels._common import MIN_DOT_BLOCK, interpreter_enabled

from . import strategy as strategies
from .roofline_model import best_strategy, strategy_bounds

# The most experts the fused kernels mix in one pass (dynconv.kernels.configs; repeated here so
# that importing the backend does not import Triton).
MAX_EXPERT_CHUNK = 8

# "premix_tma" (premix on Hopper's TMA descriptors, kernels/conv_fwd_tma.py) and
# "spanning_torch" are never picked by the rule: only forced, or where measured (the tuned
# table, benchmark mode).
STRATEGIES = ("auto", *strategies.FORWARD_STRATEGIES)
# The strategies whose kernels take ODConv's tap scale (the mix kernel folds it in).
TAP_SCALE_STRATEGIES = ("premix", "premix_tma")

# Bytes of mixed weights (plus bias) that premix keeps in memory at once; the batch is processed
# in chunks of as many samples as fit.
PREMIX_BUFFER_BYTES = 64 * 2**20

# Samples are the third grid axis of the conv kernel, which CUDA limits to 65535 programs.
MAX_SAMPLES_PER_LAUNCH = 65535

# The roofline model's names of the dtypes (fp32 runs as tf32 or ieee: the model assumes tf32).
_MODEL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.lru_cache(maxsize=1024)
def _modelled_best(batch, experts, cin, cout, h, w, ho, wo, kh, kw, groups, dtype,
                   candidates) -> str:
    bounds = strategy_bounds(batch, experts, cin, cout, h, w, ho, wo, kh, kw, groups, dtype)
    return best_strategy(bounds, candidates)


def choose_strategy(x_shape, weight_bank_shape, out_hw, groups: int = 1,
                    dtype: torch.dtype | None = None) -> str:
    """``"premix"``, ``"fused"`` or ``"spanning"`` for one call: the strategy with the lowest
    time bound in the H200 roofline model (:mod:`.roofline_model`, the model of ``python -m
    dynconv.autotune roofline``), until measured data replaces it.

    In the model premix pays for writing and re-reading B x |W| mixed weights and for
    per-sample row tiles; fused for re-reading and re-mixing the K bank tiles in every row tile
    (CUDA-core work beside the dot) and per-sample row tiles; spanning for K x the FLOPs, with
    rows spanning the batch (full tiles and a full grid at small images). Fused is never chosen
    past MAX_EXPERT_CHUNK experts (it would mix the bank in several passes over the reduction,
    each reloading x: the model does not see that). ``dtype`` defaults to bf16.
    """
    batch, in_channels, height, width = x_shape
    num_experts, out_channels, _, kh, kw = weight_bank_shape
    candidates = ("premix", "fused", "spanning")
    if num_experts > MAX_EXPERT_CHUNK:
        candidates = ("premix", "spanning")
    model_dtype = _MODEL_DTYPES.get(dtype, "bf16")
    return _modelled_best(max(1, batch), num_experts, in_channels, out_channels, height, width,
                          out_hw[0], out_hw[1], kh, kw, groups, model_dtype, candidates)


def eligible_strategies(x: torch.Tensor, weight_bank_shape, stride, groups: int,
                        interpreter: bool) -> tuple[str, ...]:
    """The forward strategies that can run this call (premix_tma only where TMA can)."""
    from dynconv.kernels.conv_fwd_tma import conv_fwd_tma_supported

    return tuple(s for s in strategies.FORWARD_STRATEGIES
                 if s != "premix_tma" or conv_fwd_tma_supported(x, weight_bank_shape, stride,
                                                                 groups, interpreter))


def _call_key(x, weight_bank, bias_bank, stride, padding, dilation, groups) -> str:
    return strategies.call_key(x.shape, weight_bank.shape, stride, padding, dilation, groups,
                               x.dtype, output_memory_format(x) == torch.channels_last,
                               bias_bank is not None)


def _candidates(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups
                ) -> tuple[tuple[str, ...], dict]:
    """(the strategies that can run this call, {strategy: a zero-argument run of the forward
    with it})."""
    interpreter = interpreter_enabled() and x.device.type == "cpu"
    eligible = eligible_strategies(x, weight_bank.shape, stride, groups, interpreter)
    runs = {name: functools.partial(triton_forward_impl, x, weight_bank, routing, bias_bank,
                                    stride, padding, dilation, groups, strategy=name)
            for name in eligible}
    return eligible, runs


def strategy_runs(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups
                  ) -> tuple[str, tuple[str, ...], dict]:
    """(the call's key, its eligible strategies, {strategy: a zero-argument run of the
    forward with it}): what benchmark mode and the sweep time."""
    args = (x, weight_bank, routing, bias_bank, stride, padding, dilation, groups)
    return (_call_key(x, weight_bank, bias_bank, stride, padding, dilation, groups),
            *_candidates(*args))


def _auto_strategy(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                   out_hw) -> str:
    """The strategy of an ``"auto"`` call (:func:`.strategy.choose`)."""
    args = (x, weight_bank, routing, bias_bank, stride, padding, dilation, groups)
    # Positional arguments: tools and tests replace the rule by ``lambda *args: name``.
    return strategies.choose(
        "forward", _call_key(x, weight_bank, bias_bank, stride, padding, dilation, groups),
        x.device, lambda: _candidates(*args),
        lambda: choose_strategy(x.shape, weight_bank.shape, out_hw, groups, x.dtype))


def premix_chunk_size(batch: int, row_elements: int, element_size: int,
                      budget_bytes: int | None = None, min_samples: int = 1) -> int:
    """Samples per premix chunk: as many as the mixed buffer's ``budget_bytes`` allows, but at
    least ``min_samples`` (those that fill one wave of the GPU), at most the batch."""
    budget = PREMIX_BUFFER_BYTES if budget_bytes is None else budget_bytes
    fitting = budget // max(1, row_elements * element_size)
    return max(1, min(batch, max(fitting, min_samples)))


# Streaming multiprocessors assumed where the device has none to ask (meta tensors of the
# compile-check): an H100 / H200's.
ASSUMED_SM_COUNT = 132
# The conv tile a wave is counted in (kernels/configs.py): a sample gives at least
# cdiv(HO * WO, 128) x cdiv(C_out/G, 128) x G programs. The 128 x 256 premix tiles of sm_90 are
# not counted: where they apply (C_out >= 256) a wave of them would double a buffer that is
# already past its byte budget (512 channels at 7x7: 33 samples, 156 MB in bf16).
_LARGEST_TILE = 128


def samples_per_wave(device: torch.device, groups: int, out_per_group: int,
                     out_pixels: int) -> int:
    """Samples whose conv programs (largest tiles) fill every SM of ``device`` once."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = ASSUMED_SM_COUNT
    tiles = (groups * -(-out_per_group // _LARGEST_TILE) * -(-out_pixels // _LARGEST_TILE))
    return -(-sms // tiles)


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
    tap_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dynamic convolution forward with the Triton kernels (no autograd).

    Args:
        x: (B, C_in, H, W), any strides (NCHW, channels_last, non-contiguous views).
        weight_bank: (K, C_out, C_in/groups, KH, KW). routing: (B, K).
        bias_bank: (K, C_out) or None. All in x's dtype and on x's device (already validated).
        stride, padding, dilation: (h, w) ints; padding symmetric.
        strategy: ``"premix"``, ``"fused"``, ``"spanning"``, ``"premix_tma"`` (premix with
            TMA descriptors: sm_90+, stride 1, groups 1, 2-byte channels_last; ValueError where
            it cannot run), ``"spanning_torch"`` (the batch-spanning form on PyTorch's
            convolution) or ``"auto"`` (:mod:`.strategy`: forced, measured, else
            :func:`choose_strategy`).
        premix_buffer_bytes: bound on premix's mixed-weight buffer (default
            ``PREMIX_BUFFER_BYTES``); the batch is processed in chunks that fit it.
        tap_scale: optional (B, KH, KW), ODConv's per-sample tap scale, folded into the mixed
            weights by the mix kernel: only premix and premix_tma take it (fused and spanning
            mix the bank inside the conv's reduction, which has no per-tap factor), so
            ``"auto"`` runs premix (premix_tma where it is forced) and another strategy is a
            ValueError.

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
    interpreter = interpreter_enabled() and x.device.type == "cpu"
    if strategy == "auto" and tap_scale is not None:
        strategy = "premix_tma" if strategies.forced("forward") == "premix_tma" else "premix"
    elif strategy == "auto":
        strategy = _auto_strategy(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                                  groups, (height_out, width_out))
    if tap_scale is not None and strategy not in TAP_SCALE_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} cannot take ODConv's tap scale: the strategies "
                         f"that can are {TAP_SCALE_STRATEGIES}")
    if strategy == "spanning_torch":
        from .spanning_torch import spanning_torch_forward

        return spanning_torch_forward(x, weight_bank, routing, bias_bank, stride, padding,
                                      dilation, groups, out=y)
    if strategy != "premix_tma" and in_per_group >= MIN_DOT_BLOCK and x.stride(1) != 1:
        # Tap-major tiles are contiguous along the channels only in channels_last: every x tile
        # is then a 16-byte cp.async row instead of per-element gathers (2-byte ones for bf16,
        # not asynchronous): about half the instructions per step and no register spills
        # (compile-check). One copy of x per call; y keeps x's memory format (allocated above).
        # premix_tma takes a channels_last x as given, or refuses.
        x = x.contiguous(memory_format=torch.channels_last)
    tma = strategy == "premix_tma"
    if tma:
        from dynconv.kernels.conv_fwd_tma import conv_fwd_tma, conv_fwd_tma_unsupported

        reason = conv_fwd_tma_unsupported(x, weight_bank.shape, stride, groups, interpreter)
        if reason is not None:
            raise ValueError(f"strategy='premix_tma' cannot run this convolution: {reason}")
    # Every strategy reads the bank packed once per call (K x |W|, small next to the B x |W|
    # premix writes) into the mixed rows' order (pack_bank): the fused and spanning kernels'
    # bank tiles and the mix kernel's rows are then contiguous along the output channels
    # (16-byte loads, no index math) instead of gathered.
    packed = pack_bank(weight_bank, groups)

    if strategy == "spanning":
        from dynconv.kernels.conv_fwd_spanning import conv_fwd_spanning

        # One GEMM whose rows span the batch, the packed bank (viewed as per-expert conv weights)
        # as the shared operand, the routing applied per expert.
        bank, _ = mixed_views(packed, weight_bank.shape, groups, False)
        conv_fwd_spanning(x, bank, bias_bank, routing, y, stride, padding, dilation,
                          interpreter=interpreter)
        return y

    if strategy == "fused":
        # The packed bank viewed as per-expert conv weights (K, G, C_out/G, C_in/G, KH, KW).
        bank, _ = mixed_views(packed, weight_bank.shape, groups, False)
        for start in range(0, batch, MAX_SAMPLES_PER_LAUNCH):
            count = min(MAX_SAMPLES_PER_LAUNCH, batch - start)
            conv_fwd(x, bank, bias_bank, routing, y, start, count, stride, padding, dilation,
                     interpreter=interpreter)
        return y

    # premix (and premix_tma): the batch mixed chunk by chunk into one buffer, each chunk's
    # rows read by the conv kernel (through TMA descriptors for premix_tma).
    layout = mixed_layout(weight_bank.shape, bias_bank is not None)
    # A chunk smaller than one wave of the GPU leaves SMs idle in every launch (512 channels
    # at 7x7 in bf16: 14 samples fit 64 MiB, 56 programs of 132 at 128 x 128 tiles); one
    # wave's worth may pass the budget.
    wave = 1 if interpreter else samples_per_wave(
        x.device, groups, out_channels // groups, height_out * width_out)
    chunk = premix_chunk_size(batch, layout.row_stride, x.element_size(), premix_buffer_bytes,
                              wave)
    chunk = min(chunk, MAX_SAMPLES_PER_LAUNCH)
    buffer = x.new_empty((chunk, layout.row_stride))
    for start in range(0, batch, chunk):
        count = min(chunk, batch - start)
        mixed = mix(routing[start : start + count], packed, bias_bank, groups, out=buffer,
                    interpreter=interpreter, bank_shape=weight_bank.shape,
                    tap_scale=None if tap_scale is None else tap_scale[start : start + count])
        weights, bias = mixed_views(mixed, weight_bank.shape, groups, bias_bank is not None)
        if tma:
            conv_fwd_tma(x, weights, bias, y, start, count, padding, dilation,
                         interpreter=interpreter)
        else:
            conv_fwd(x, weights, bias, None, y, start, count, stride, padding, dilation,
                     interpreter=interpreter)
    return y
