"""ODConv (omni-dimensional dynamic convolution, Li, Zhou and Yao, ICLR 2022): a bank of K kernels
and a router with four attentions, one per dimension of the kernel space (input channels, output
channels, kernel taps, experts), run by :func:`dynconv.dynamic_conv2d`'s per-sample scales."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..backends.registry import check_backend_name
from ..functional import dynamic_conv2d
from ..routing import Router, autocast_enabled
from ..validation import (
    check_image,
    check_input_dtype,
    check_module_device,
    check_padding,
    check_positive_int,
    ntuple,
)
from ._base import bank_module_from_conv, refuse_other_expert_count
from .conv import DynamicConv2d


class ODConvAttention(NamedTuple):
    """ODConv's four attentions for a batch of B samples; None where the head is absent.

    - in_scale (B, Cin): the input-channel attention (sigmoid).
    - out_scale (B, Cout): the output-channel attention (sigmoid); None for a depthwise conv
      (in_channels == groups == out_channels), whose out and in channels are the same.
    - tap_scale (B, kh, kw): the spatial attention (sigmoid); None for a 1x1 kernel.
    - routing (B, K): the kernel attention (softmax: rows sum to 1); None for K = 1.
    """

    in_scale: torch.Tensor
    out_scale: torch.Tensor | None
    tap_scale: torch.Tensor | None
    routing: torch.Tensor | None


class ODConvRouter(Router):
    """ODConv's attention branch: GAP -> Linear (no bias) -> BatchNorm -> ReLU -> four heads.

    The hidden width is ``max(int(in_channels * reduction), min_channels)``. Each head is a
    Linear with bias from the hidden features; its logits are divided by the temperature T, then
    passed through a sigmoid (in-channel, out-channel and spatial heads) or a softmax over the
    experts (kernel head). A head that would be constant is not built (see
    :class:`ODConvAttention`): ``out_fc`` for a depthwise conv, ``tap_fc`` for a 1x1 kernel,
    ``kernel_fc`` for K = 1. The paper's code calls the layers ``fc``, ``bn``, ``channel_fc``,
    ``filter_fc``, ``spatial_fc`` and ``kernel_fc`` (1x1 convs there, Linear layers here: the
    same weights, without the two trailing unit axes).

    As the BatchNorm of any network, the router's normalises over the batch in training mode,
    so it needs more than one sample per batch there (PyTorch raises otherwise).

    Initialised as the paper's code does: Kaiming normal (fan_out, ReLU gain) weights and zero
    biases for the Linear layers, BatchNorm weight 1 and bias 0.

    Shapes: x (B, Cin, H, W) -> :class:`ODConvAttention`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, groups=1, num_experts=4,
                 reduction=0.0625, min_channels=16, temperature=1.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.groups = check_positive_int(groups, "groups")
        self.kernel_size = ntuple(kernel_size, "kernel_size", 1, 2)
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.reduction = _check_reduction(reduction)
        self.min_channels = check_positive_int(min_channels, "min_channels")
        hidden = max(int(in_channels * reduction), min_channels)
        taps = math.prod(self.kernel_size)
        depthwise = in_channels == groups == out_channels
        self.fc = nn.Linear(in_channels, hidden, bias=False, **factory)
        self.bn = nn.BatchNorm1d(hidden, **factory)
        self.in_fc = nn.Linear(hidden, in_channels, **factory)
        self.out_fc = None if depthwise else nn.Linear(hidden, out_channels, **factory)
        self.tap_fc = None if taps == 1 else nn.Linear(hidden, taps, **factory)
        self.kernel_fc = None if num_experts == 1 else nn.Linear(hidden, num_experts, **factory)
        self._init_temperature(temperature, device)  # a buffer: see Router
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal (fan_out, ReLU gain) weights, zero biases; BatchNorm weight 1, bias 0
        and fresh running statistics."""
        for layer in (self.fc, self.in_fc, self.out_fc, self.tap_fc, self.kernel_fc):
            if layer is None:
                continue
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.bn.reset_parameters()

    def forward(self, x: torch.Tensor) -> ODConvAttention:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_module_device(x, self.fc.weight, type(self).__name__)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        check_image(x)
        check_input_dtype(x, self.fc.weight.dtype, type(self).__name__,
                          autocast_enabled(x.device.type))
        hidden = torch.relu(self.bn(self.fc(x.mean(dim=(2, 3)))))  # (B, hidden)
        temperature = self.temperature_tensor

        def head(layer: nn.Linear) -> torch.Tensor:
            logits = layer(hidden)
            return logits / temperature.to(logits.dtype)

        batch = x.shape[0]
        in_scale = torch.sigmoid(head(self.in_fc))
        out_scale = None if self.out_fc is None else torch.sigmoid(head(self.out_fc))
        tap_scale = (None if self.tap_fc is None
                     else torch.sigmoid(head(self.tap_fc)).reshape(batch, *self.kernel_size))
        routing = None if self.kernel_fc is None else torch.softmax(head(self.kernel_fc), dim=1)
        return ODConvAttention(in_scale, out_scale, tap_scale, routing)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, groups={self.groups}, "
            f"num_experts={self.num_experts}, hidden={self.fc.out_features}, "
            f"temperature={self.temperature:g}"
        )


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic convolution (ODConv, ICLR 2022): a bank of K kernels mixed per
    sample, and the mixed kernel scaled per sample along its input channels, output channels and
    taps, all four attentions from one :class:`ODConvRouter`:

        M_b[o, i, t] = out_scale[b, o] * in_scale[b, c] * tap_scale[b, t] * W_b[o, i, t]
        W_b = sum_k a[b, k] W_k                      (a = routing, the kernel attention)
        y[b] = conv2d(x[b], M_b, stride, padding, dilation, groups) + sum_k a[b, k] bias[k]

    (c the input channel that weight (o, i) reads; the bias is not scaled). It runs on
    :func:`dynconv.dynamic_conv2d` with ``in_scale`` / ``out_scale`` / ``tap_scale``, so on every
    backend, and never builds the B x K x |W| tensor of the paper's code.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as in ``nn.Conv2d``.
        padding: an int, a pair, ``"same"``, ``"valid"`` or ``"same_tf"`` (as
            :class:`DynamicConv2d`).
        bias: whether to keep a bias bank (K, Cout), mixed by the kernel attention; ODConv's
            code has none (the default).
        num_experts: K; with K = 1 there is no kernel attention (the one kernel is scaled only).
        reduction, min_channels: the router's hidden width is
            ``max(int(in_channels * reduction), min_channels)`` (ODConv's 1/16 and 16).
        temperature: T > 0, dividing the logits of every head (state: saved in the state_dict,
            set by :func:`dynconv.set_temperature` and :class:`dynconv.TemperatureSchedule`).
        backend: as in :func:`dynconv.dynamic_conv2d`.

    Parameters:
        weight: (K, Cout, Cin // groups, kh, kw), each expert initialised as ODConv's code does:
            Kaiming normal, fan_out, ReLU gain (not ``nn.Conv2d``'s uniform); bias: (K, Cout),
            zeros, or None. router: an :class:`ODConvRouter`.

    In training mode the router's BatchNorm needs more than one sample per batch.

    Shapes: x (B, Cin, H, W) -> y (B, Cout, Ho, Wo); with ``return_attention=True`` also an
    :class:`ODConvAttention` (in_scale (B, Cin), out_scale (B, Cout), tap_scale (B, kh, kw),
    routing (B, K); None where the head is absent).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, num_experts=4, reduction=0.0625, min_channels=16,
                 temperature=1.0, backend="auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.groups = check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        self.kernel_size = ntuple(kernel_size, "kernel_size", 1, 2)
        self.stride = ntuple(stride, "stride", 1, 2)
        self.dilation = ntuple(dilation, "dilation", 1, 2)
        self.padding = check_padding(padding, self.stride)
        self.num_experts = check_positive_int(num_experts, "num_experts")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {type(bias).__name__} {bias!r}")
        self.backend = check_backend_name(backend)
        self.weight = nn.Parameter(torch.empty(
            num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = (
            nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        )
        self.router = ODConvRouter(in_channels, out_channels, self.kernel_size, groups,
                                   num_experts, reduction, min_channels, temperature, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert Kaiming normal (fan_out, ReLU gain) on one kernel's shape, as ODConv's
        code does; the bias bank zeros; the router as :meth:`ODConvRouter.reset_parameters`."""
        for expert in self.weight.data:  # one (Cout, Cin/g, kh, kw) kernel at a time
            nn.init.kaiming_normal_(expert, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.router.reset_parameters()

    @property
    def temperature(self) -> float:
        """The router's temperature T (every head's logits are divided by it)."""
        return self.router.temperature

    @temperature.setter
    def temperature(self, value) -> None:
        self.router.temperature = value

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, num_experts: int = 4, *, perturb: float = 0.0,
                    generator: torch.Generator | None = None, **kwargs) -> ODConv2d:
        """An ODConv2d whose K experts all start as ``conv``'s weight (and bias).

        Unlike :meth:`DynamicConv2d.from_conv2d`, the result does **not** compute what ``conv``
        does: ODConv's attentions scale the kernel (each sigmoid starts near 0.5 and depends on
        the input), so the converted layer starts from the trained kernel, not from the trained
        function, and needs fine-tuning.

        Stride, padding, dilation, groups, bias, device and dtype are ``conv``'s (timm's
        ``Conv2dSame`` gives ``padding="same_tf"``; another ``nn.Conv2d`` subclass with a
        forward of its own is refused); ``kwargs`` are the other constructor arguments
        (reduction, min_channels, temperature, backend). ``perturb`` > 0 adds to each expert
        Gaussian noise of ``perturb`` times the weight's standard deviation, zero-mean across
        the experts (drawn from ``generator`` if given), so that the experts can drift apart
        from the first step.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        # The same padding rule as DynamicConv2d's (timm's Conv2dSame, other subclasses refused).
        return bank_module_from_conv(cls, conv, DynamicConv2d._padding_of(conv), num_experts,
                                     perturb, generator, kwargs, "from_conv2d")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        refuse_other_expert_count(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """y (B, Cout, Ho, Wo) from x (B, Cin, H, W); with ``return_attention=True``,
        ``(y, attention)``, the :class:`ODConvAttention` the kernels were scaled by."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_module_device(x, self.weight, type(self).__name__)
        check_input_dtype(x, self.weight.dtype, type(self).__name__,
                          autocast_enabled(x.device.type))
        attention = self.router(x)
        # K = 1: no kernel head; the one expert has weight 1.
        routing = (x.new_ones((x.shape[0], 1), dtype=self.weight.dtype)
                   if attention.routing is None else attention.routing)
        weight, bias = self.weight, self.bias
        if autocast_enabled(x.device.type):
            # Autocast leaves our custom ops alone: cast all operands to the autocast dtype here.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, routing = x.to(dtype), weight.to(dtype), routing.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            attention = ODConvAttention(*(None if t is None else t.to(dtype) for t in attention))
        y = dynamic_conv2d(x, weight, routing, bias, self.stride, self.padding, self.dilation,
                           self.groups, backend=self.backend, in_scale=attention.in_scale,
                           out_scale=attention.out_scale, tap_scale=attention.tap_scale)
        return (y, attention) if return_attention else y

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, num_experts={self.num_experts}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is not None:
            text += ", bias=True"
        return text + f", backend={self.backend!r}"


def _check_reduction(value) -> float:
    """The router's width ratio: a finite float > 0 (ODConv's 1/16)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"reduction must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"reduction must be finite and > 0, got {value!r}")
    return float(value)
