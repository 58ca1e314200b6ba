"""Bring your own model: turn its ``nn.Conv2d`` (``nn.Conv1d``, ``nn.Conv3d``) layers into dynamic
convs, and fold an eval-mode BatchNorm into a dynamic conv's bank for inference."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .modules import DynamicConv1d, DynamicConv2d, DynamicConv3d, DynamicConvNd, ODConv2d

# convert_conv2d's kinds: the layer each converted nn.Conv2d becomes.
CONV2D_KINDS = {"dynamic": DynamicConv2d, "odconv": ODConv2d}


def convert_conv2d(
    model: nn.Module,
    num_experts: int = 4,
    filter: Callable[[str, nn.Conv2d], bool] | None = None,  # noqa: A002 (the documented name)
    *,
    kind: str = "dynamic",
    **kwargs,
) -> nn.Module:
    """Replace ``nn.Conv2d`` layers of ``model`` by :meth:`DynamicConv2d.from_conv2d` copies
    (``kind="odconv"``: :meth:`ODConv2d.from_conv2d` copies).

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: the layers are replaced in place and the
    model is returned (a bare ``nn.Conv2d`` given as ``model`` is returned converted; a model
    in which nothing is converted is returned unchanged, with a ``UserWarning``). Each new
    layer's experts start from the old weight, so with softmax gates the converted model
    computes the same function (to rounding) until it trains; an ODConv2d does not (its
    attentions scale the kernel), so a model converted to ODConv needs fine-tuning.

    Args:
        model: any module.
        num_experts: K of every converted layer.
        filter: ``filter(name, conv) -> bool`` chooses the layers (``name`` is the qualified
            name from ``model.named_modules()``); None converts every ``nn.Conv2d``. E.g. keep
            the stem and the 1x1 layers static with
            ``lambda name, conv: conv.in_channels > 3 and conv.kernel_size != (1, 1)``.
        kind: ``"dynamic"`` (:class:`DynamicConv2d`) or ``"odconv"`` (:class:`ODConv2d`).
        kwargs: passed to ``from_conv2d``: for DynamicConv2d temperature, gate, reduction,
            backend, router, perturb, generator; for ODConv2d reduction, min_channels,
            temperature, backend, perturb, generator.
    """
    if not isinstance(kind, str) or kind not in CONV2D_KINDS:
        raise ValueError(f"kind must be one of {tuple(CONV2D_KINDS)}, got {kind!r}")
    return _convert(model, nn.Conv2d, CONV2D_KINDS[kind].from_conv2d, num_experts, filter,
                    kwargs, "convert_conv2d")


def convert_conv1d(model: nn.Module, num_experts: int = 4,
                   filter: Callable[[str, nn.Conv1d], bool] | None = None,  # noqa: A002
                   **kwargs) -> nn.Module:
    """Replace ``nn.Conv1d`` layers of ``model`` by :meth:`DynamicConv1d.from_conv1d` copies:
    as :func:`convert_conv2d`."""
    return _convert(model, nn.Conv1d, DynamicConv1d.from_conv1d, num_experts, filter, kwargs,
                    "convert_conv1d")


def convert_conv3d(model: nn.Module, num_experts: int = 4,
                   filter: Callable[[str, nn.Conv3d], bool] | None = None,  # noqa: A002
                   **kwargs) -> nn.Module:
    """Replace ``nn.Conv3d`` layers of ``model`` by :meth:`DynamicConv3d.from_conv3d` copies:
    as :func:`convert_conv2d`."""
    return _convert(model, nn.Conv3d, DynamicConv3d.from_conv3d, num_experts, filter, kwargs,
                    "convert_conv3d")


def _convert(model, conv_type, convert_one, num_experts, filter, kwargs,  # noqa: A002
             function: str):
    """Replace every ``conv_type`` layer of ``model`` chosen by ``filter`` by
    ``convert_one(layer, num_experts, **kwargs)``; ``function`` is the public name (for the
    messages)."""
    return replace_modules(model, conv_type, lambda conv: convert_one(conv, num_experts, **kwargs),
                           filter, function, stacklevel=4)


def replace_modules(model: nn.Module, kind: type[nn.Module],
                    convert_one: Callable[[nn.Module], nn.Module],
                    filter: Callable[[str, nn.Module], bool] | None,  # noqa: A002
                    function: str, stacklevel: int = 3) -> nn.Module:
    """The walk behind the ``convert_*`` functions: every ``kind`` module of ``model`` for which
    ``filter(name, module)`` holds (None: every one) replaced in place by ``convert_one(module)``;
    ``model`` itself converted and returned if it is one. Converting nothing warns (a filter that
    matches no layer, or a model without such layers, is almost always a mistake); ``function``
    is the public name the errors and the warning give, ``stacklevel`` the warning's (3: the
    caller of a public function that calls this one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be a callable (name, conv) -> bool, got {filter!r}")

    def chosen(name: str, module: nn.Module) -> bool:
        return isinstance(module, kind) and (filter is None or bool(filter(name, module)))

    if chosen("", model):
        return convert_one(model)
    # Collect first, then replace: the module tree must not change while it is walked.
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, kind)]
    targets = [(name, module) for name, module in candidates if name and chosen(name, module)]
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, convert_one(module))
    if not targets:
        kind_name = (f"nn.{kind.__qualname__}" if kind.__module__.startswith("torch.nn.")
                     else f"{kind.__module__.split('.')[0]}'s {kind.__qualname__}")
        why = (f"none of its {len(candidates)} {kind_name} layers passed filter" if candidates
               else f"it has no {kind_name} layer")
        warnings.warn(f"{function} converted nothing in the {type(model).__name__} it was given: "
                      f"{why}; the model is returned unchanged", UserWarning, stacklevel=stacklevel)
    return model


_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def fuse_conv_bn_eval(conv: DynamicConvNd | ODConv2d,
                      bn: nn.modules.batchnorm._BatchNorm) -> DynamicConvNd | ODConv2d:
    """A copy of ``conv`` (a DynamicConv2d, or 1d / 3d with a BatchNorm1d / 3d, or an ODConv2d)
    with the eval-mode ``bn`` that follows it folded into every expert.

    Each expert k becomes ``W_k * s`` with bias ``(b_k - mean) * s + beta``, where
    ``s = gamma / sqrt(running_var + eps)`` per output channel (a conv without a bias gets a
    bias bank). Mixing is linear, so ``BN(conv(x))`` equals the fused conv exactly whenever the
    routing weights of each sample sum to 1: always for softmax gates (the default), for
    ``router=False`` when the routing given to ``forward`` does. Sigmoid gates do not sum to 1,
    so they are refused. For an ODConv2d it is exact too: its kernel attention is a softmax (or
    the one expert's 1), ``s`` commutes with its output-channel scale, and its bias is not
    scaled by the attentions; the router (and its own BatchNorm) is copied unchanged.
    """
    if not isinstance(conv, (DynamicConvNd, ODConv2d)):
        raise TypeError(f"conv must be a DynamicConv2d (or 1d / 3d) or an ODConv2d, got "
                        f"{type(conv).__name__}")
    spatial_dims = 2 if isinstance(conv, ODConv2d) else conv.spatial_dims
    norm = _BATCH_NORMS[spatial_dims]
    if not isinstance(bn, norm):
        raise TypeError(f"bn must be an nn.{norm.__name__} (after a {type(conv).__name__}), got "
                        f"{type(bn).__name__}")
    if bn.training:
        raise ValueError("bn must be in eval mode (bn.eval()): training-mode BatchNorm uses the "
                         "batch's statistics, which cannot be folded into weights")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics (track_running_stats=True) to be "
                         "folded")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features ({bn.num_features}) must equal conv.out_channels "
                         f"({conv.out_channels})")
    if isinstance(conv, DynamicConvNd) and conv.gate != "softmax":
        raise ValueError(
            f"conv has gate={conv.gate!r}: folding BatchNorm into the experts is exact only "
            f"when each sample's routing weights sum to 1 (gate='softmax')"
        )
    if bn.running_var.device != conv.weight.device:
        raise ValueError(f"bn is on {bn.running_var.device} but conv is on {conv.weight.device}; "
                         f"move them to one device")
    # Fold in the widest dtype involved, at least float32: a float64 model keeps float64's
    # precision, a half-precision one is folded in float32 and rounded once at the end.
    dtype = functools.reduce(torch.promote_types,
                             [t.dtype for t in (conv.weight, bn.running_var, bn.running_mean,
                                                bn.weight, bn.bias) if t is not None],
                             torch.float32)
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)  # (Cout,)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dtype)
        shift = -bn.running_mean.to(dtype) * scale  # (Cout,)
        if bn.bias is not None:
            shift = shift + bn.bias.to(dtype)
        # (K, Cout, Cin/g, *kernel), scaled per output channel
        bank = conv.weight.to(dtype) * scale.view(1, -1, *([1] * (conv.weight.dim() - 2)))
        fused.weight.copy_(bank)
        bias = shift.expand(conv.num_experts, -1)  # (K, Cout)
        if conv.bias is not None:
            bias = conv.bias.to(dtype) * scale + shift
        fused.bias = nn.Parameter(bias.to(conv.weight.dtype).clone())
    return fused
