"""timm interop: run timm's CondConv models (``efficientnet_cc_*``, ``tf_efficientnet_cc_*``)
on dynconv's backends.

timm's ``CondConv2d`` mixes its K experts per sample and convolves with the grouped-conv trick;
its blocks (``CondConvResidual``) compute one set of sigmoid routing weights and pass it
positionally to each of their CondConv2d layers. :func:`convert_timm` swaps every such layer for
a :class:`TimmCondConv2d`: a router-less :class:`~dynconv.DynamicConv2d` with the same weights
that takes the routing weights the same way, so timm's blocks run unchanged.

timm is not a dependency of dynconv: it is imported only when :func:`convert_timm` (or
:meth:`TimmCondConv2d.from_timm`) is called (``pip install "dynconv[timm]"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .convert import replace_modules
from .modules import DynamicConv2d


def _timm_cond_conv2d() -> type[nn.Module]:
    """timm's ``CondConv2d`` class (ImportError with the remedy if timm is not installed)."""
    try:
        from timm.layers import CondConv2d
    except ImportError as error:
        raise ImportError(
            'converting timm layers needs timm, which is not installed: pip install '
            '"dynconv[timm]" (or pip install timm)'
        ) from error
    return CondConv2d


class TimmCondConv2d(DynamicConv2d):
    """A :class:`~dynconv.DynamicConv2d` without a router that stands in for timm's
    ``CondConv2d``: ``forward(x, routing_weights)`` as timm's blocks call it, and timm's
    state_dict layout accepted on load.

    ``y[b] = conv2d(x[b], sum_k a[b, k] weight[k], sum_k a[b, k] bias[k])`` with ``a`` the
    routing weights (B, K) given to ``forward`` (positionally, as timm's blocks pass them, or as
    ``routing_weights=`` / ``routing=``). ``gate`` is ``"sigmoid"``, what timm's CondConv
    blocks compute: their routing rows do not sum to 1, so :func:`dynconv.fuse_conv_bn_eval`
    refuses these layers.

    Parameters: weight (K, Cout, Cin // groups, kh, kw), dynconv's bank layout; bias (K, Cout)
    or None. ``load_state_dict`` also takes timm's layout, each expert flattened:
    weight (K, Cout * Cin // groups * kh * kw). ``state_dict`` writes dynconv's layout
    (``weight.flatten(1)`` gives timm's back).

    Shapes: x (B, Cin, H, W), routing weights (B, K) -> y (B, Cout, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, num_experts=4, backend="auto", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, num_experts, gate="sigmoid", backend=backend,
                         device=device, dtype=dtype, router=False)

    @classmethod
    def from_timm(cls, conv: nn.Module, backend: str = "auto") -> TimmCondConv2d:
        """A TimmCondConv2d computing what timm's ``CondConv2d`` ``conv`` computes, with its
        weights (copied), device, dtype, training mode and ``requires_grad``.

        timm resolves its ``padding`` argument when the layer is built: ``''`` (its default)
        and a static ``'same'`` become a symmetric int per axis, ``((stride - 1) +
        dilation * (kernel - 1)) // 2``, which is kept as it is; ``'same'`` that cannot be
        static (stride > 1, or an odd dilated kernel extent) is TensorFlow's "SAME" computed
        from each input's size (``conv.dynamic_padding``), which becomes
        ``padding="same_tf"``; ``'valid'`` is 0.
        """
        kind = _timm_cond_conv2d()
        if not isinstance(conv, kind):
            raise TypeError(f"conv must be a timm.layers.CondConv2d, got {type(conv).__name__}")
        if type(conv).forward is not kind.forward:
            raise TypeError(
                f"conv is a {type(conv).__module__}.{type(conv).__qualname__}, a CondConv2d "
                f"subclass with a forward of its own that a TimmCondConv2d would not reproduce "
                f"(convert_timm's filter can leave it out)"
            )
        weight = conv.weight.detach()  # (K, Cout * Cin/g * kh * kw)
        padding = "same_tf" if conv.dynamic_padding else tuple(conv.padding)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                  conv.dilation, conv.groups, bias=conv.bias is not None,
                  num_experts=conv.num_experts, backend=backend, device=weight.device,
                  dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight.reshape(new.weight.shape))
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach())
        new.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        return new.train(conv.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            # timm's layout: (K, Cout * Cin/g * kh * kw), one flattened expert per row.
            expert_shape = tuple(self.weight.shape[1:])
            if value.shape[1] != math.prod(expert_shape):
                raise ValueError(
                    f"cannot load {key!r} into this {type(self).__name__}: a 2-D weight is "
                    f"read in timm's layout (K, Cout * Cin // groups * kh * kw) = "
                    f"({self.num_experts}, {math.prod(expert_shape)}) for experts of shape "
                    f"{expert_shape}, got shape {tuple(value.shape)}"
                )
            state_dict[key] = value.reshape(value.shape[0], *expert_shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None,
                return_routing: bool = False, *, routing: torch.Tensor | None = None):
        """y (B, Cout, Ho, Wo) from x (B, Cin, H, W) and the routing weights (B, K), given
        positionally (as timm's blocks do), as ``routing_weights=`` (timm's name) or as
        ``routing=`` (dynconv's)."""
        if routing_weights is not None and routing is not None:
            raise TypeError("give the routing weights once: routing_weights= (timm's name) or "
                            "routing= (dynconv's), not both")
        return super().forward(x, routing if routing_weights is None else routing_weights,
                               return_routing)


def convert_timm(model: nn.Module,
                 filter: Callable[[str, nn.Module], bool] | None = None,  # noqa: A002
                 backend: str = "auto") -> nn.Module:
    """Replace every timm ``CondConv2d`` of ``model`` by a :class:`TimmCondConv2d` holding
    the same weights; timm's own blocks then run on dynconv's backends unchanged.

    Like :func:`dynconv.convert_conv2d`: in place, the model returned (a bare CondConv2d is
    returned converted; a model in which nothing is converted is returned unchanged, with a
    ``UserWarning``). The converted model computes what the original does (to rounding) and
    loads timm's state_dicts strictly, pretrained checkpoints included.

    Args:
        model: a timm model with CondConv layers (e.g. ``efficientnet_cc_b0_4e``), or any
            module holding some.
        filter: ``filter(name, conv) -> bool`` chooses the layers (``name`` as in
            ``model.named_modules()``); None converts every one.
        backend: the ``backend`` of every converted layer (see :class:`~dynconv.DynamicConv2d`).
    """
    return replace_modules(model, _timm_cond_conv2d(),
                           lambda conv: TimmCondConv2d.from_timm(conv, backend=backend),
                           filter, "convert_timm")
