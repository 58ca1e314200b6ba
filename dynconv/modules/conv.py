"""The dynamic convolution modules, one per number of spatial axes, on one base
(:class:`._base.DynamicConvNd`)."""

from __future__ import annotations

import torch
from torch import nn

from ..functional import dynamic_conv1d, dynamic_conv2d, dynamic_conv3d
from ._base import DynamicConvNd

_SHARED_DOC = """
    Parameters:
        weight: (K, Cout, Cin // groups, *kernel_size), each of the K kernels initialised like
            the ``nn.Conv{n}d`` weight. bias: (K, Cout) or None. router: a :class:`RoutingMLP`
            (global average pool over every spatial axis), or None when built with
            ``router=False``; ``router_init`` is its initialisation (see :class:`RoutingMLP`):
            ``"dyconv"`` by default, the one of the routing ablations in
            ``perf_reports/training/ablation`` that made the routing depend on the input.

    ``padding`` is an int, one int per axis, ``"same"``, ``"valid"`` (as in ``nn.Conv{n}d``) or
    ``"same_tf"``: TensorFlow's "SAME" at any stride, computed per call from the input size
    (timm's ``Conv2dSame``; see :func:`dynconv.dynamic_conv2d`).
"""


class DynamicConv2d(DynamicConvNd):
    __doc__ = """A 2-D convolution whose kernel is mixed per sample from a bank of K kernels.

    ``y[b] = conv2d(x[b], sum_k a[b, k] weight[k], sum_k a[b, k] bias[k])`` with
    ``a = router(x)``, or with routing weights ``a`` (B, K) given to ``forward`` (which is how
    one router drives several convs: build those with ``router=False``).
    """ + _SHARED_DOC.format(n=2) + """
    Shapes: x (B, Cin, H, W) -> y (B, Cout, Ho, Wo); with ``return_routing=True`` also a (B, K).
    """

    spatial_dims = 2
    conv_type = nn.Conv2d
    functional = staticmethod(dynamic_conv2d)

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
        return cls._from_conv(conv, num_experts, perturb, generator, kwargs, "from_conv2d")

    @classmethod
    def _padding_of(cls, conv: nn.Conv2d):
        kind = type(conv)
        if kind.__name__ == "Conv2dSame" and kind.__module__.split(".")[0] == "timm":
            # timm's Conv2dSame: padding 0 in the module, TF "same" padding of x in forward.
            return "same_tf"
        return super()._padding_of(conv)


class DynamicConv1d(DynamicConvNd):
    __doc__ = """A 1-D convolution whose kernel is mixed per sample from a bank of K kernels
    (audio, speech, time series): :class:`DynamicConv2d` on one spatial axis, run by the same
    backends and kernels (:func:`dynconv.dynamic_conv1d`).
    """ + _SHARED_DOC.format(n=1) + """
    Shapes: x (B, Cin, L) -> y (B, Cout, Lo); with ``return_routing=True`` also a (B, K).
    """

    spatial_dims = 1
    conv_type = nn.Conv1d
    functional = staticmethod(dynamic_conv1d)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, num_experts: int = 4, *, perturb: float = 0.0,
                    generator: torch.Generator | None = None, **kwargs) -> DynamicConv1d:
        """A DynamicConv1d whose K experts all start as ``conv``'s weight (and bias): as
        :meth:`DynamicConv2d.from_conv2d`."""
        return cls._from_conv(conv, num_experts, perturb, generator, kwargs, "from_conv1d")


class DynamicConv3d(DynamicConvNd):
    __doc__ = """A 3-D convolution whose kernel is mixed per sample from a bank of K kernels
    (video, volumes): :func:`dynconv.dynamic_conv3d`, which runs it as one 2-D dynamic
    convolution per depth tap on every backend.
    """ + _SHARED_DOC.format(n=3) + """
    Shapes: x (B, Cin, D, H, W) -> y (B, Cout, Do, Ho, Wo); with ``return_routing=True`` also
    a (B, K).
    """

    spatial_dims = 3
    conv_type = nn.Conv3d
    functional = staticmethod(dynamic_conv3d)

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d, num_experts: int = 4, *, perturb: float = 0.0,
                    generator: torch.Generator | None = None, **kwargs) -> DynamicConv3d:
        """A DynamicConv3d whose K experts all start as ``conv``'s weight (and bias): as
        :meth:`DynamicConv2d.from_conv2d`."""
        return cls._from_conv(conv, num_experts, perturb, generator, kwargs, "from_conv3d")
