"""The ``triton`` backend's backward. Two strategies (:mod:`.strategy` chooses):

- ``per_sample``: grad_x from the ``conv_bwd_dx`` kernel, the bank, routing and bias gradients
  from the ``conv_bwd_dw`` kernel (:mod:`dynconv.kernels`): per-sample implicit GEMMs, the
  per-sample weights mixed tile by tile and the per-sample weight gradients contracted in the
  epilogue;
- ``spanning_torch``: the batch-spanning form's input and weight gradients on PyTorch's
  ``convolution_backward`` (:mod:`.spanning_torch`).

Pure tensor functions, no autograd. The kernels are imported on the first call, so that
importing the backend never imports Triton.
"""

from __future__ import annotations

import functools

import torch

from dynconv.geometry import output_memory_format
from dynconv.kernels._common import interpreter_enabled

from . import strategy as strategies

STRATEGIES = ("auto", *strategies.BACKWARD_STRATEGIES)


def triton_backward_impl(
    grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, output_mask,
    strategy: str = "auto", *, tap_scale=None,
):
    """Gradients (x, weight_bank, routing, bias_bank) for ``output_mask``, and the tap scale's
    fifth with ODConv's ``tap_scale`` (B, kh, kw) (then ``output_mask`` has five entries and
    only per_sample, whose kernels take it, runs).

    grad_out (B, Cout, Ho, Wo), any strides. Returns grad_x like x (same strides), grad_bank
    (K, Cout, Cin/g, kh, kw), grad_routing (B, K) and grad_bias (K, Cout), contiguous; an
    unrequested gradient (or grad_bias without a bias bank) is an empty tensor. ``strategy``:
    ``"per_sample"``, ``"spanning_torch"`` or ``"auto"`` (:mod:`.strategy`).
    """
    from dynconv.kernels.conv_bwd_dw import bias_gradients, conv_bwd_dw
    from dynconv.kernels.conv_bwd_dx import conv_bwd_dx

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    need_x, need_bank, need_routing, need_bias = output_mask[:4]
    need_tap = tap_scale is not None and len(output_mask) > 4 and output_mask[4]
    need_bias = need_bias and bias_bank is not None
    interpreter = x.device.type == "cpu" and interpreter_enabled()
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if tap_scale is not None:
        if strategy not in ("auto", "per_sample"):
            raise ValueError(f"strategy={strategy!r} cannot take ODConv's tap scale: only "
                             f"'per_sample' can")
        strategy = "per_sample"
    if strategy == "auto":
        strategy = _auto_strategy(grad_out, x, weight_bank, routing, bias_bank, stride, padding,
                                  dilation, groups, list(output_mask))
    if strategy == "spanning_torch":
        from .spanning_torch import spanning_torch_backward

        grads = spanning_torch_backward(grad_out, x, weight_bank, routing, bias_bank, stride,
                                        padding, dilation, groups,
                                        [need_x, need_bank, need_routing, need_bias],
                                        bias_gradients)
        return tuple(g if g is not None else x.new_empty(0) for g in grads)
    grad_x = grad_bank = grad_routing = grad_bias = grad_tap = None
    if groups < x.shape[1] and grad_out.stride(1) != 1:
        # grad_out with its channels innermost, once for both kernels: their grad_out tiles
        # then load as 16-byte rows along the output channels (cp.async) instead of per-element
        # gathers along the pixels (the compile-check's NCHW launches). Depthwise convs read
        # one channel per group and gain nothing.
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    if need_x:
        grad_x = conv_bwd_dx(grad_out, weight_bank, routing, x.shape, stride, padding, dilation,
                             groups, out=torch.empty_like(x), interpreter=interpreter,
                             tap_scale=tap_scale)
    if need_bank or need_routing or need_bias or need_tap:
        grad_bank, grad_routing, grad_bias, *tap_part = conv_bwd_dw(
            grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
            need_bank=need_bank, need_routing=need_routing, need_bias=need_bias,
            interpreter=interpreter, tap_scale=tap_scale, need_tap=need_tap,
        )
        grad_tap = tap_part[0] if tap_part else None
    grads = (grad_x, grad_bank, grad_routing, grad_bias)
    if tap_scale is not None:
        grads += (grad_tap,)
    # Outputs of a custom op may not alias each other: each missing gradient is its own tensor.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def strategy_runs(grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation,
                  groups, output_mask) -> tuple[str, tuple[str, ...], dict]:
    """(the call's key, its eligible strategies, {strategy: a zero-argument run of the
    backward with it}): what benchmark mode and the sweep time."""
    eligible = strategies.BACKWARD_STRATEGIES
    key = strategies.call_key(x.shape, weight_bank.shape, stride, padding, dilation, groups,
                              x.dtype, output_memory_format(x) == torch.channels_last,
                              bias_bank is not None, output_mask)
    runs = {name: functools.partial(triton_backward_impl, grad_out, x, weight_bank, routing,
                                    bias_bank, stride, padding, dilation, groups, output_mask,
                                    strategy=name)
            for name in eligible}
    return key, eligible, runs


def _auto_strategy(grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation,
                   groups, output_mask) -> str:
    """The strategy of an ``"auto"`` backward (:func:`.strategy.choose`; the rule: per_sample)."""
    key, eligible, runs = strategy_runs(grad_out, x, weight_bank, routing, bias_bank, stride,
                                        padding, dilation, groups, output_mask)
    return strategies.choose("backward", key, x.device, lambda: (eligible, runs),
                             lambda: strategies.DEFAULT_BACKWARD)
