"""Networks of dynamic convolutions: DynamicBlock (conv -> BN -> ReLU) and DynamicCNN."""

from __future__ import annotations

import torch
from torch import nn

from ..validation import check_module_device, check_positive_int, pair
from .conv import DynamicConv2d
from .odconv import ODConv2d

CONV_KINDS = ("dynamic", "odconv")


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

    ``conv="odconv"`` builds an :class:`ODConv2d` (K experts, four attentions from its
    :class:`ODConvRouter`, ODConv's own router width and initialisation) in place of the
    DynamicConv2d; ``gate``, ``reduction``, ``router_init`` and ``router=False`` are the
    RoutingMLP's and must stay at their defaults then, and ``forward`` takes no ``routing``.
    The routing it returns is ODConv's kernel attention (B, K).

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
        conv="dynamic",
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        k = pair(kernel_size, "kernel_size", 1)
        d = pair(dilation, "dilation", 1)
        if padding is None:
            padding = _ceil_padding(k, pair(stride, "stride", 1), d)
        _check_conv_kind(conv, gate, reduction, router_init, router)
        if conv == "odconv":
            self.conv = ODConv2d(in_channels, out_channels, k, stride, padding, d, groups,
                                 bias=False, num_experts=num_experts, temperature=temperature,
                                 backend=backend, **factory)
        else:
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
        if isinstance(self.conv, ODConv2d):
            if routing is not None:
                raise ValueError("an ODConv2d block computes its own attentions: routing must "
                                 "be None")
            y, attention = self.conv(x, return_attention=True)
            routing = attention.routing
        else:
            y, routing = self.conv(x, routing, return_routing=True)
        y = self.act(self.bn(y))
        return (y, routing) if return_routing else y


def _check_conv_kind(conv, gate, reduction, router_init, router) -> None:
    """``conv`` is one of CONV_KINDS; ODConv's router is its own (no RoutingMLP options)."""
    if conv not in CONV_KINDS:
        raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")
    if conv == "odconv":
        given = {name: value for name, value, default in (
            ("gate", gate, "softmax"), ("reduction", reduction, 4),
            ("router_init", router_init, "dyconv"), ("router", router, True))
            if value != default or type(value) is not type(default)}
        if given:
            raise ValueError(
                f"conv='odconv' builds ODConv's own router (a softmax kernel head, hidden width "
                f"max(Cin / 16, 16), the paper's initialisation): {sorted(given)} apply only to "
                f"conv='dynamic' and must keep their defaults")


def _ceil_padding(kernel_size, stride, dilation):
    """DynamicBlock's default padding (see its docstring): output ceil(H / stride)."""
    totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    if all(total % 2 == 0 for total in totals):
        return tuple(total // 2 for total in totals)
    return "same" if stride == (1, 1) else "same_tf"


class DynamicCNN(nn.Module):
    """A small classifier: static stem conv, three stride-2 DynamicBlocks, GAP + linear head.

    ``conv="odconv"``: every stage's conv an :class:`ODConv2d` (see :class:`DynamicBlock`);
    the routing tensors are then ODConv's kernel attentions.

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
        conv="dynamic",
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        check_positive_int(in_channels, "in_channels")
        _check_conv_kind(conv, gate, reduction, router_init, True)
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
                conv=conv,
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
