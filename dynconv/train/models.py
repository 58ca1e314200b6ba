"""The two networks ``dynconv.train`` compares, and how their size and cost are counted.

``StaticCNN`` is :class:`dynconv.DynamicCNN` with an ``nn.Conv2d`` in place of each dynamic
convolution: the same stem, stage widths, strides, padding, BatchNorm, ReLU and head.
"""

from __future__ import annotations

import torch
from torch import nn

from dynconv.modules import DynamicCNN, DynamicConv2d, ODConv2d


class StaticCNN(nn.Module):
    """Static twin of :class:`dynconv.DynamicCNN`: stem conv, three stride-2 conv stages, head.

    Each stage is ``Conv2d(3x3, stride 2, padding 1, bias=False) -> BatchNorm2d -> ReLU``, as a
    ``DynamicBlock`` is with its dynamic conv. Shapes: x (B, in_channels, H, W) -> (B, num_classes).
    """

    def __init__(self, in_channels=3, num_classes=10, widths=(32, 64, 128), stem_channels=16):
        super().__init__()
        widths = tuple(widths)
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        stage_in = (stem_channels,) + widths[:-1]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )
            for cin, cout in zip(stage_in, widths, strict=True)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


def build_models(in_channels: int, num_classes: int, widths, num_experts: int, backend: str,
                 temperature: float) -> tuple[StaticCNN, DynamicCNN]:
    """A static CNN and a DynamicCNN of the same widths (each initialised from the current RNG)."""
    static = StaticCNN(in_channels, num_classes, widths)
    dynamic = DynamicCNN(in_channels, num_classes, num_experts=num_experts, widths=widths,
                         temperature=temperature, backend=backend)
    return static, dynamic


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds per image of one forward pass, counted analytically from layer shapes.

    Counted: every ``nn.Conv2d`` (``Cout * Cin/groups * kh * kw`` per output pixel), every
    ``nn.Linear`` (``in * out``, which covers each router's two layers and the head), and for a
    :class:`DynamicConv2d` its per-sample convolution plus the kernel mixing
    ``W_b = sum_k a[b, k] bank[k]`` (``K * |W|``, and ``K * Cout`` for a bias bank); for an
    :class:`ODConv2d` the same plus ``|W|`` for each of its input-channel, output-channel and
    tap attentions that scales the mixed kernel (as the published formulation does; its router's
    layers are ``nn.Linear``, counted as such).
    Not counted: BatchNorm (foldable into the conv at inference), ReLU, pooling sums, softmax and
    bias additions. The layer output sizes come from one forward pass of a zero batch of
    ``input_shape`` (one image, (C, H, W)) in eval mode.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}")
    total = 0

    def conv_hook(module, args, output):
        nonlocal total
        if isinstance(output, tuple):  # return_routing / return_attention=True
            output = output[0]
        pixels = output.shape[-2] * output.shape[-1]
        weight = module.weight
        per_kernel = weight.shape[-4:].numel()  # Cout * Cin/groups * kh * kw
        total += per_kernel * pixels
        if isinstance(module, (DynamicConv2d, ODConv2d)):
            total += weight.shape[0] * per_kernel
            if module.bias is not None:
                total += module.bias.numel()
        if isinstance(module, ODConv2d):
            router = module.router
            scales = 1 + (router.out_fc is not None) + (router.tap_fc is not None)
            total += scales * per_kernel

    def linear_hook(module, args, output):
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, DynamicConv2d, ODConv2d)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    parameter = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total
