"""nn.Module front ends: DynamicConv1d / DynamicConv2d / DynamicConv3d on one shared base
(``_base``), the networks built of them (``blocks``: DynamicBlock, DynamicCNN), and ODConv
(``odconv``: ODConv2d and its router)."""

from ._base import DynamicConvNd
from .blocks import DynamicBlock, DynamicCNN
from .conv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from .odconv import ODConv2d, ODConvAttention, ODConvRouter

__all__ = ["DynamicBlock", "DynamicCNN", "DynamicConv1d", "DynamicConv2d", "DynamicConv3d",
           "DynamicConvNd", "ODConv2d", "ODConvAttention", "ODConvRouter"]
