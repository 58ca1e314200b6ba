"""ODConv's per-sample scales around any backend.

    M_b[o, i, t] = out_scale[b, o] * in_scale[b, c(o, i)] * tap_scale[b, t] * W_b[o, i, t]
    y[b] = conv2d(x[b], M_b) + sum_k a[b, k] bias_bank[k],   W_b = sum_k a[b, k] W_k

The input- and output-channel scales act on activations: ``conv(x * in_scale, W) * out_scale``
is the same sum (the input channel c(o, i) of weight (o, i) is the one it multiplies), an
elementwise pass over x and over y that autograd differentiates; it keeps x- and y-sized
tensors for backward, never a weight-sized one. The tap scale acts on the weights: a backend
that mixes per-sample kernels itself takes it (``Backend.takes_tap_scale``) and scales them
after mixing; any other runs on :func:`fold_tap_scale`'s bank of K x kh x kw experts.
"""

from __future__ import annotations

import torch

from dynconv.geometry import ConvGeometry


def fold_tap_scale(weight_bank: torch.Tensor, routing: torch.Tensor, tap_scale: torch.Tensor):
    """(bank', routing') with ``sum_j routing'[b, j] bank'[j] = tap_scale[b] * sum_k routing[b,
    k] weight_bank[k]`` for every sample: expert (k, t) is expert k with every tap but t zeroed,
    routed by ``routing[b, k] * tap_scale[b, t]``.

    weight_bank (K, Cout, Cin/g, kh, kw), routing (B, K), tap_scale (B, kh, kw) ->
    bank' (K * kh * kw, Cout, Cin/g, kh, kw), routing' (B, K * kh * kw). Exact, and its
    gradients come from autograd on these small tensors; it costs kh x kw times the mixing of
    the plain bank (the bank' is K x kh x kw kernels, tiny next to activations).
    """
    num_experts, out_channels, in_per_group, kh, kw = weight_bank.shape
    taps = kh * kw
    one_hot = torch.eye(taps, dtype=weight_bank.dtype, device=weight_bank.device)
    bank = weight_bank.unsqueeze(1) * one_hot.view(1, taps, 1, 1, kh, kw)
    bank = bank.reshape(num_experts * taps, out_channels, in_per_group, kh, kw)
    folded = routing.unsqueeze(2) * tap_scale.reshape(routing.shape[0], 1, taps)
    return bank, folded.reshape(routing.shape[0], num_experts * taps)


def scaled_conv2d(backend, x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                  in_scale=None, out_scale=None, tap_scale=None) -> torch.Tensor:
    """y (B, Cout, Ho, Wo) of :func:`dynconv.dynamic_conv2d` with any of ODConv's scales
    (in_scale (B, Cin), out_scale (B, Cout), tap_scale (B, kh, kw); validated) on ``backend``
    (a :class:`dynconv.backends.registry.Backend`)."""
    if in_scale is not None:
        x = x * in_scale[:, :, None, None]
    # The bias is not scaled by out_scale, and the folded bank has no bias of its own: in
    # those cases it is added last.
    bias_inside = out_scale is None and (tap_scale is None or backend.takes_tap_scale)
    inner_bias = bias_bank if bias_inside else None
    if tap_scale is None:
        y = backend.function(x, weight_bank, routing, inner_bias, geometry)
    elif backend.takes_tap_scale:
        y = backend.function(x, weight_bank, routing, inner_bias, geometry, tap_scale=tap_scale)
    else:
        y = backend.function(x, *fold_tap_scale(weight_bank, routing, tap_scale), None,
                             geometry)
    if out_scale is not None:
        y = y * out_scale[:, :, None, None]
    if bias_bank is not None and not bias_inside:
        y = y + (routing @ bias_bank)[:, :, None, None]
    return y
