"""nn.Module front ends: DynamicConv1d / DynamicConv2d / DynamicConv3d on one shared base
(``_base``), and the networks built of them (``blocks``: DynamicBlock, DynamicCNN)."""

from ._base import DynamicConvNd
from .blocks import DynamicBlock, DynamicCNN
from .conv import DynamicConv1d, DynamicConv2d, DynamicConv3d

__all__ = ["DynamicBlock", "DynamicCNN", "DynamicConv1d", "DynamicConv2d", "DynamicConv3d",
           "DynamicConvNd"]
