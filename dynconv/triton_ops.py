"""The ``triton`` backend as ``torch.library`` custom ops, trainable and ``torch.compile``-able.

- ``dynconv::triton_forward``: y from the Triton forward kernels
  (:func:`dynconv.triton_backend.triton_forward_impl`).
- ``dynconv::triton_backward``: the four gradients from the Triton dgrad / wgrad kernels
  (:mod:`dynconv.kernels.conv_dgrad`, :mod:`dynconv.kernels.conv_wgrad`).

Autograd saves x, the routing weights and the parameters only. The per-sample kernels
``W_b = sum_k a[b, k] bank[k]`` are never saved and never formed for the whole batch: dgrad mixes
them tile by tile in registers, and wgrad contracts each sample's weight gradient onto the bank,
the routing and the bias bank in its epilogue. No kernel uses atomics, so the gradients are
bit-identical run to run, which is what ``torch.use_deterministic_algorithms(True)`` asks for.

The ops mirror :mod:`dynconv.native` (same argument lists, same ``output_mask`` convention: an
unrequested gradient is an empty tensor of its own). Under ``torch.compile`` each op is one
opaque node whose fake implementation gives exactly the real output's sizes, strides and dtype.
"""

from __future__ import annotations

import torch

from .functional import triton_interpreter_enabled
from .op_autograd import call_forward, define_custom_ops
from .validation import ConvGeometry


def _interpreter(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and triton_interpreter_enabled()


def _forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups):
    """y (B, Cout, Ho, Wo) from x (B, Cin, H, W), bank (K, Cout, Cin/g, kh, kw), routing (B, K).

    y is channels_last when x is (:func:`dynconv.op_autograd.output_memory_format`).
    """
    from .triton_backend import triton_forward_impl

    return triton_forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                               groups)


def _backward_impl(
    grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups, output_mask
):
    """Gradients (x, weight_bank, routing, bias_bank) for ``output_mask``.

    grad_out (B, Cout, Ho, Wo), any strides. Returns grad_x like x (same strides), grad_bank
    (K, Cout, Cin/g, kh, kw), grad_routing (B, K) and grad_bias (K, Cout), contiguous; an
    unrequested gradient (or grad_bias without a bias bank) is an empty tensor.
    """
    from .kernels.conv_dgrad import conv_dgrad
    from .kernels.conv_wgrad import conv_wgrad

    need_x, need_bank, need_routing, need_bias = output_mask
    need_bias = need_bias and bias_bank is not None
    interpreter = _interpreter(x)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    grad_x = grad_bank = grad_routing = grad_bias = None
    if need_x:
        grad_x = conv_dgrad(grad_out, weight_bank, routing, x.shape, stride, padding, dilation,
                            groups, out=torch.empty_like(x), interpreter=interpreter)
    if need_bank or need_routing or need_bias:
        grad_bank, grad_routing, grad_bias = conv_wgrad(
            grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
            need_bank=need_bank, need_routing=need_routing, need_bias=need_bias,
            interpreter=interpreter,
        )
    # Outputs of a custom op may not alias each other: each missing gradient is its own tensor.
    return tuple(g if g is not None else x.new_empty(0)
                 for g in (grad_x, grad_bank, grad_routing, grad_bias))


triton_forward, triton_backward = define_custom_ops("triton", _forward_impl, _backward_impl)


def triton_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """Dispatch entry point: x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
    return call_forward(triton_forward, x, weight_bank, routing, bias_bank, geometry)
