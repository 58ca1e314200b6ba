"""nn.Module front ends: DynamicConv2d, DynamicBlock (conv -> BN -> ReLU) and DynamicCNN."""

from __future__ import annotations

import math

import torch
from torch import nn

from .backends.registry import check_backend_name
from .functional import dynamic_conv2d
from .routing import RoutingMLP, autocast_enabled
from .validation import (
    check_gate,
    check_module_device,
    check_padding,
    check_positive_int,
    pair,
)


class DynamicConv2d(nn.Module):
    """A convolution whose kernel is mixed per sample from a bank of K kernels.

    ``y[b] = conv2d(x[b], sum_k a[b, k] weight[k], sum_k a[b, k] bias[k])`` with
    ``a = router(x)``, or with routing weights ``a`` (B, K) given to ``forward`` (which is how
    one router drives several convs: build those with ``router=False``).

    Parameters:
        weight: (K, Cout, Cin // groups, kh, kw), each of the K kernels initialised like an
            ``nn.Conv2d`` weight. bias: (K, Cout) or None. router: a :class:`RoutingMLP`, or
            None when built with ``router=False``; ``router_init`` is its initialisation (see
            :class:`RoutingMLP`): ``"dyconv"`` by default, the one of the routing ablations in
            ``perf_reports/training/ablation`` that made the routing depend on the input.

    ``padding`` is an int, a pair, ``"same"``, ``"valid"`` (as in ``nn.Conv2d``) or
    ``"same_tf"``: TensorFlow's "SAME" at any stride, computed per call from the input size
    (timm's ``Conv2dSame``; see :func:`dynconv.dynamic_conv2d`).

    Shapes: x (B, Cin, H, W) -> y (B, Cout, Ho, Wo); with ``return_routing=True`` also a (B, K).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        num_experts=4,
        temperature=1.0,
        gate="softmax",
        reduction=4,
        backend="auto",
        device=None,
        dtype=None,
        router=True,
        router_init="dyconv",
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(router, bool):
            raise TypeError(f"router must be True or False, got {type(router).__name__} "
                            f"{router!r}")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.groups = check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.dilation = pair(dilation, "dilation", 1)
        self.padding = check_padding(padding, self.stride)
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.backend = check_backend_name(backend)
        self.weight = nn.Parameter(
            torch.empty(
                num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory
            )
        )
        self.bias = (
            nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        )
        self.gate = check_gate(gate)
        self.router = (
            RoutingMLP(in_channels, num_experts, reduction, temperature, gate, router_init,
                       **factory)
            if router else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each bank kernel like ``nn.Conv2d``: kaiming uniform a=sqrt(5) on one kernel's fan-in."""
        fan_in = self.weight.shape[2] * self.weight.shape[3] * self.weight.shape[4]
        for (
            expert
        ) in self.weight.data:  # init per (Cout, Cin/g, kh, kw) kernel, not on the 5-D bank
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.router is not None:
            self.router.reset_parameters()

    @property
    def temperature(self) -> float:
        return self._own_router("temperature").temperature

    @temperature.setter
    def temperature(self, value) -> None:
        self._own_router("temperature").temperature = value

    def _own_router(self, what: str) -> RoutingMLP:
        if self.router is None:
            # Not AttributeError: nn.Module would replace the message with a generic one.
            raise RuntimeError(
                f"this DynamicConv2d was built with router=False, so it has no {what}: the "
                f"router that computes its routing weights owns it"
            )
        return self.router

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, num_experts: int = 4, *, perturb: float = 0.0,
                    generator: torch.Generator | None = None, **kwargs) -> DynamicConv2d:
        """A DynamicConv2d whose K experts all start as ``conv``'s weight (and bias).

        Stride, padding, dilation, groups, bias, device and dtype are ``conv``'s (timm's
        ``Conv2dSame``, which pads TensorFlow-style in its forward, gives
        ``padding="same_tf"``; any other subclass with a forward of its own is refused, since
        a DynamicConv2d would not compute what it does); ``kwargs``
        are the other arguments of the constructor (temperature, gate, reduction, backend,
        router, router_init). With softmax gates (rows summing to 1) the result computes the
        same function as ``conv`` (to rounding). The router starts with ``router_init="small"``
        unless told otherwise (a near-uniform mix, so that perturbed experts stay close to
        ``conv`` at first). ``perturb`` > 0 adds to each expert Gaussian noise of
        ``perturb`` times the weight's standard deviation, made zero-mean across the experts so
        that a uniform mix still gives ``conv``'s weight exactly (and a near-uniform one, as
        the router starts, nearly): the experts can then drift apart from the first step.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        padding = _padding_of(conv)
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"conv.padding_mode must be 'zeros' (dynamic convolution pads with zeros), got "
                f"{conv.padding_mode!r}"
            )
        if isinstance(perturb, bool) or not isinstance(perturb, (int, float)) or not (
                math.isfinite(perturb) and perturb >= 0):
            raise ValueError(f"perturb must be a finite float >= 0, got {perturb!r}")
        forbidden = {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups", "bias", "device", "dtype"} & set(kwargs)
        if forbidden:
            raise TypeError(f"from_conv2d takes {sorted(forbidden)} from conv, not as arguments")
        weight = conv.weight.detach()
        kwargs.setdefault("router_init", "small")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                  num_experts=num_experts, device=weight.device, dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            new.weight.copy_(weight.unsqueeze(0).expand_as(new.weight))
            if perturb > 0 and num_experts > 1:
                noise = torch.randn(new.weight.shape, generator=generator, dtype=weight.dtype,
                                    device="cpu" if generator is None else generator.device)
                noise = noise.to(weight.device)
                noise -= noise.mean(dim=0, keepdim=True)
                new.weight.add_(noise * (perturb * weight.float().std().item()))
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach().unsqueeze(0).expand_as(new.bias))
        return new

    def forward(self, x: torch.Tensor, routing: torch.Tensor | None = None,
                return_routing: bool = False):
        """y (B, Cout, Ho, Wo) from x (B, Cin, H, W); ``routing`` (B, K), if given, is used
        instead of this module's router (and is required when it was built with
        ``router=False``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_module_device(x, self.weight, type(self).__name__)
        if routing is None:
            if self.router is None:
                raise ValueError(
                    "routing is required: this DynamicConv2d was built with router=False, so "
                    "pass routing weights of shape (B, K) to forward (from a shared router)"
                )
            routing = self.router(x)
        weight, bias = self.weight, self.bias
        if autocast_enabled(x.device.type):
            # Autocast leaves our custom ops alone: cast all operands to the autocast dtype here.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, routing = x.to(dtype), weight.to(dtype), routing.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        y = dynamic_conv2d(
            x,
            weight,
            routing,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            backend=self.backend,
        )
        return (y, routing) if return_routing else y

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, num_experts={self.num_experts}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.router is None:
            text += f", gate={self.gate!r}, router=False"
        return text + f", backend={self.backend!r}"


def _padding_of(conv: nn.Conv2d):
    """The ``padding`` argument of a DynamicConv2d that convolves as ``conv`` does."""
    forward_of = type(conv).forward, type(conv)._conv_forward
    if forward_of == (nn.Conv2d.forward, nn.Conv2d._conv_forward):
        return conv.padding
    kind = type(conv)
    if kind.__name__ == "Conv2dSame" and kind.__module__.split(".")[0] == "timm":
        # timm's Conv2dSame: padding 0 in the module, TF "same" padding of x in forward.
        return "same_tf"
    raise TypeError(
        f"conv is a {kind.__module__}.{kind.__qualname__}, an nn.Conv2d subclass with a forward "
        f"of its own that a DynamicConv2d would not reproduce; convert plain nn.Conv2d layers "
        f"(convert_conv2d's filter can leave this one out)"
    )


class DynamicBlock(nn.Module):
    """DynamicConv2d (no bias, "same"-style padding) -> BatchNorm2d -> ReLU.

    By default (``padding=None``) the output is ceil(H / stride) x ceil(W / stride) for every
    kernel and stride:

    - a kernel whose dilated extent is odd (``d * (k - 1)`` even, e.g. 3x3) is padded
      ``d * (k - 1) / 2`` on every side, as ResNets do;
    - otherwise (e.g. 4x4) the total ``d * (k - 1)`` is odd and its extra pixel goes to the
      bottom / right: ``padding="same"`` at stride 1 (as ``nn.Conv2d``), ``"same_tf"`` at a
      larger stride (TensorFlow's "SAME": the same rule at stride 1, computed per call from H
      and W).

    Any ``padding`` that DynamicConv2d takes may be given instead; the output size is then that
    convolution's.

    Shapes: x (B, Cin, H, W) -> (B, Cout, ceil(H / stride), ceil(W / stride)) by default;
    ``routing`` (B, K) given to ``forward`` replaces the conv's router (``router=False`` builds
    none).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size=3,
        stride=1,
        num_experts=4,
        dilation=1,
        groups=1,
        temperature=1.0,
        gate="softmax",
        reduction=4,
        backend="auto",
        device=None,
        dtype=None,
        router=True,
        router_init="dyconv",
        padding=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        k = pair(kernel_size, "kernel_size", 1)
        d = pair(dilation, "dilation", 1)
        if padding is None:
            padding = _ceil_padding(k, pair(stride, "stride", 1), d)
        self.conv = DynamicConv2d(
            in_channels,
            out_channels,
            k,
            stride,
            padding,
            d,
            groups,
            bias=False,
            num_experts=num_experts,
            temperature=temperature,
            gate=gate,
            reduction=reduction,
            backend=backend,
            router=router,
            router_init=router_init,
            **factory,
        )
        self.bn = nn.BatchNorm2d(out_channels, **factory)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, routing: torch.Tensor | None = None,
                return_routing: bool = False):
        y, routing = self.conv(x, routing, return_routing=True)
        y = self.act(self.bn(y))
        return (y, routing) if return_routing else y


def _ceil_padding(kernel_size, stride, dilation):
    """DynamicBlock's default padding (see its docstring): output ceil(H / stride)."""
    totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    if all(total % 2 == 0 for total in totals):
        return tuple(total // 2 for total in totals)
    return "same" if stride == (1, 1) else "same_tf"


class DynamicCNN(nn.Module):
    """A small classifier: static stem conv, three stride-2 DynamicBlocks, GAP + linear head.

    Shapes: x (B, in_channels, H, W) -> logits (B, num_classes); with ``return_routing=True``
    also a list of three (B, K) routing tensors, one per dynamic stage.
    """

    def __init__(
        self,
        in_channels=3,
        num_classes=10,
        num_experts=4,
        widths=(32, 64, 128),
        stem_channels=16,
        temperature=1.0,
        gate="softmax",
        reduction=4,
        backend="auto",
        device=None,
        dtype=None,
        router_init="dyconv",
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        widths = tuple(widths)
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False, **factory),
            nn.BatchNorm2d(stem_channels, **factory),
            nn.ReLU(inplace=True),
        )
        stage_in = (stem_channels,) + widths[:-1]
        self.stages = nn.ModuleList(
            DynamicBlock(
                cin,
                cout,
                3,
                stride=2,
                num_experts=num_experts,
                temperature=temperature,
                gate=gate,
                reduction=reduction,
                backend=backend,
                router_init=router_init,
                **factory,
            )
            for cin, cout in zip(stage_in, widths)
        )
        self.head = nn.Linear(widths[-1], num_classes, **factory)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_module_device(x, self.head.weight, type(self).__name__)
        x = self.stem(x)
        routings = []
        for stage in self.stages:
            x, routing = stage(x, return_routing=True)
            routings.append(routing)
        logits = self.head(x.mean(dim=(2, 3)))
        return (logits, routings) if return_routing else logits
