"""Optimiser parameter groups for models with dynamic convolutions."""

from __future__ import annotations

import math

from torch import nn

from .modules import DynamicConvNd, ODConv2d
from .routing import Router


def param_groups(model: nn.Module, weight_decay: float = 0.05,
                 decay_routers: bool = False) -> list[dict]:
    """Two optimiser parameter groups: ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": not_decayed, "weight_decay": 0.0}]``, in the spirit of timm's
    ``param_groups_weight_decay``.

    Not decayed: every 1-D parameter (biases, normalisation scales and shifts), the bias banks
    of the dynamic conv layers (DynamicConv1d / 2d / 3d, ODConv2d: (K, Cout), biases, though
    2-D), and, unless ``decay_routers``, every parameter of a router (a :class:`RoutingMLP`, an
    ODConv2d's :class:`dynconv.modules.ODConvRouter`: weight decay pulls the router's logits
    towards zero, that is towards a uniform, input-independent mix, and ODConv's sigmoid
    attentions towards 0.5). Everything else (kernels, kernel banks, linear weights) is
    decayed. Parameters that do not require gradients are left out; each trainable parameter is
    in exactly one group, once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
            math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, Router) and not decay_routers:
            no_decay_ids.update(id(p) for p in module.parameters())
        if isinstance(module, (DynamicConvNd, ODConv2d)) and module.bias is not None:
            no_decay_ids.add(id(module.bias))
    decay, no_decay, seen = [], [], set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.ndim <= 1 or id(parameter) in no_decay_ids:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]
