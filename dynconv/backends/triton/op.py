"""The ``triton`` backend as ``torch.library`` custom ops, trainable and ``torch.compile``-able.

- ``dynconv::triton_forward``: y from the Triton forward kernels
  (:func:`.forward.triton_forward_impl`).
- ``dynconv::triton_backward``: the four gradients from the Triton dgrad / wgrad kernels
  (:func:`.backward.triton_backward_impl`).

Autograd saves x, the routing weights and the parameters only. The per-sample kernels
``W_b = sum_k a[b, k] bank[k]`` are never saved and never formed for the whole batch: dgrad mixes
them tile by tile in registers, and wgrad contracts each sample's weight gradient onto the bank,
the routing and the bias bank in its epilogue. No kernel uses atomics, so the gradients are
bit-identical run to run, which is what ``torch.use_deterministic_algorithms(True)`` asks for.

The ops mirror :mod:`dynconv.backends.native.op` (same argument lists, same ``output_mask``
convention: an unrequested gradient is an empty tensor of its own). Under ``torch.compile`` each
op is one opaque node whose fake implementation gives exactly the real output's sizes, strides
and dtype.
"""

from __future__ import annotations

import torch

from dynconv.geometry import ConvGeometry

from ..custom_op import call_forward, define_custom_ops, eager_autograd_function
from .backward import triton_backward_impl
from .forward import triton_forward_impl

triton_forward, triton_backward = define_custom_ops("triton", triton_forward_impl,
                                                    triton_backward_impl)
# The eager-mode twin: the same implementations and saved tensors without the custom op's
# dispatch and autograd wrapper, a fixed host cost per call (measured on this project's CPU
# VM: ~190 us per forward, ~170 us per forward+backward, against a small layer's ~40 us static
# forward on an H200).
_EagerTritonConv = eager_autograd_function("_EagerTritonConv", triton_forward_impl,
                                           triton_backward_impl)


def triton_dynamic_conv2d(x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                          tap_scale=None):
    """Dispatch entry point: x (B, Cin, H, W) -> (B, Cout, Ho, Wo); ``tap_scale`` (B, kh, kw)
    or None: ODConv's tap scale of each sample's mixed kernel. The custom op under
    torch.compile and for tensors that only describe data (fake or meta tensors: its fake gives
    the result's metadata), the eager twin otherwise."""
    if (torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or x.device.type == "meta"):
        return call_forward(triton_forward, x, weight_bank, routing, bias_bank, geometry,
                            tap_scale)
    return _EagerTritonConv.apply(x, weight_bank, routing, bias_bank, geometry.stride,
                                  geometry.padding, geometry.dilation, geometry.groups,
                                  tap_scale)
