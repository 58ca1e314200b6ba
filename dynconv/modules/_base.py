"""The shared base of the dynamic convolution modules (1-D, 2-D, 3-D): the bank, its bias,
the router, the temperature, ``from_conv`` and ``forward``. A family is a subclass that names
its number of spatial axes, its ``nn.Conv{n}d`` and its functional form."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..backends.registry import check_backend_name
from ..routing import RoutingMLP, autocast_enabled
from ..validation import (
    check_gate,
    check_input_dtype,
    check_module_device,
    check_padding,
    check_positive_int,
    ntuple,
)


class DynamicConvNd(nn.Module):
    """A convolution on ``spatial_dims`` axes whose kernel is mixed per sample from a bank of K
    kernels: ``y[b] = conv(x[b], sum_k a[b, k] weight[k], sum_k a[b, k] bias[k])`` with
    ``a = router(x)``, or with routing weights ``a`` (B, K) given to ``forward`` (which is how
    one router drives several convs: build those with ``router=False``).

    Subclasses set ``spatial_dims``, ``conv_type`` (the ``nn.Conv{n}d`` they generalise, for
    ``from_conv``) and ``functional`` (``dynconv.dynamic_conv{n}d``).
    """

    spatial_dims: int
    conv_type: type[nn.Module]
    functional: Callable[..., torch.Tensor]

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
        n = self.spatial_dims
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
        self.kernel_size = ntuple(kernel_size, "kernel_size", 1, n)
        self.stride = ntuple(stride, "stride", 1, n)
        self.dilation = ntuple(dilation, "dilation", 1, n)
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
        """Each bank kernel like ``nn.Conv{n}d``'s weight: kaiming uniform a=sqrt(5) on one
        kernel's fan-in (not on the whole bank)."""
        fan_in = math.prod(self.weight.shape[2:])
        for expert in self.weight.data:  # one (Cout, Cin/g, *kernel) kernel at a time
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
                f"this {type(self).__name__} was built with router=False, so it has no {what}: "
                f"the router that computes its routing weights owns it"
            )
        return self.router

    @classmethod
    def _padding_of(cls, conv) -> tuple | str:
        """The ``padding`` argument of a module of this class that convolves as ``conv`` does
        (a subclass with a forward of its own is refused: see :func:`plain_conv_padding`)."""
        return plain_conv_padding(conv, cls.conv_type)

    @classmethod
    def _from_conv(cls, conv, num_experts: int, perturb: float, generator, kwargs, method: str):
        """The body of ``from_conv{n}d`` (its docstring says what it does); ``method`` is the
        public name (for error messages)."""
        kind = cls.conv_type
        if not isinstance(conv, kind):
            raise TypeError(f"conv must be an nn.{kind.__name__}, got {type(conv).__name__}")
        padding = cls._padding_of(conv)
        kwargs.setdefault("router_init", "small")
        return bank_module_from_conv(cls, conv, padding, num_experts, perturb, generator, kwargs,
                                     method)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        refuse_other_expert_count(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor, routing: torch.Tensor | None = None,
                return_routing: bool = False):
        """y (B, Cout, *spatial_out) from x (B, Cin, *spatial); ``routing`` (B, K), if given,
        is used instead of this module's router (and is required when it was built with
        ``router=False``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_module_device(x, self.weight, type(self).__name__)
        check_input_dtype(x, self.weight.dtype, type(self).__name__,
                          autocast_enabled(x.device.type))
        if routing is None:
            if self.router is None:
                raise ValueError(
                    f"routing is required: this {type(self).__name__} was built with "
                    f"router=False, so pass routing weights of shape (B, K) to forward (from a "
                    f"shared router)"
                )
            routing = self.router(x)
        weight, bias = self.weight, self.bias
        if autocast_enabled(x.device.type):
            # Autocast leaves our custom ops alone: cast all operands to the autocast dtype here.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, routing = x.to(dtype), weight.to(dtype), routing.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        y = type(self).functional(x, weight, routing, bias, self.stride, self.padding,
                                  self.dilation, self.groups, backend=self.backend)
        return (y, routing) if return_routing else y

    def extra_repr(self) -> str:
        n = self.spatial_dims
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, num_experts={self.num_experts}"
        )
        if self.dilation != (1,) * n:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.router is None:
            text += f", gate={self.gate!r}, router=False"
        return text + f", backend={self.backend!r}"


def plain_conv_padding(conv: nn.Module, conv_type: type[nn.Module]):
    """``conv.padding`` if ``conv`` convolves as ``conv_type`` does; a subclass with a forward
    of its own is refused (a dynamic conv would not compute what it does)."""
    kind = type(conv)
    if (kind.forward, kind._conv_forward) == (conv_type.forward, conv_type._conv_forward):
        return conv.padding
    name = conv_type.__name__
    raise TypeError(
        f"conv is a {kind.__module__}.{kind.__qualname__}, an nn.{name} subclass with a forward "
        f"of its own that a Dynamic{name} would not reproduce; convert plain nn.{name} layers "
        f"(convert_{name.lower()}'s filter can leave this one out)"
    )


def bank_module_from_conv(cls, conv, padding, num_experts: int, perturb: float, generator,
                          kwargs: dict, method: str):
    """A ``cls`` (a module with a (K, Cout, Cin // groups, *kernel) ``weight`` bank and a
    (K, Cout) ``bias`` or None) built with ``conv``'s geometry, bias, device and dtype and
    ``padding``, every expert a copy of ``conv``'s weight (and bias), plus zero-mean Gaussian
    noise across the experts of ``perturb`` times the weight's standard deviation (drawn from
    ``generator`` if given); ``kwargs`` are the other constructor arguments, ``method`` the
    public name (for error messages)."""
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
        raise TypeError(f"{method} takes {sorted(forbidden)} from conv, not as arguments")
    weight = conv.weight.detach()
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


def refuse_other_expert_count(module: nn.Module, state_dict, prefix: str) -> None:
    """Raise a ValueError naming num_experts if ``state_dict`` holds a ``weight`` / ``bias``
    bank for ``module`` with another K (PyTorch would list size mismatches of the bank, the
    bias bank and the router's last layer without saying why)."""
    for name in ("weight", "bias"):
        value = state_dict.get(prefix + name)
        own = getattr(module, name)
        if (isinstance(value, torch.Tensor) and own is not None and value.dim() == own.dim()
                and value.shape[0] != module.num_experts):
            raise ValueError(
                f"cannot load {prefix + name!r} into this {type(module).__name__}: "
                f"num_experts: expected {module.num_experts} (the module's), got "
                f"{value.shape[0]} (the state_dict's {name} of shape {tuple(value.shape)}); "
                f"build the module with num_experts={value.shape[0]} to load it"
            )
