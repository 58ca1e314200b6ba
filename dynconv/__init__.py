"""dynconv: dynamic convolution (CondConv / DyConv style) for PyTorch."""

from . import _source_tree  # noqa: F401  (first: a source tree without an install)
from .backends.benchmark import set_benchmark
from .backends.triton.strategy import use_strategy
from .convert import convert_conv1d, convert_conv2d, convert_conv3d, fuse_conv_bn_eval
from .export import export_onnx, fold_batchnorm, onnx_export_form
from .functional import dynamic_conv1d, dynamic_conv2d, dynamic_conv3d
from .modules import (
    DynamicBlock,
    DynamicCNN,
    DynamicConv1d,
    DynamicConv2d,
    DynamicConv3d,
    ODConv2d,
)
from .optim import param_groups
from .routing import RoutingMLP
from .schedule import TemperatureSchedule, set_temperature
from .timm_interop import convert_timm

__all__ = [
    "DynamicBlock",
    "DynamicCNN",
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "ODConv2d",
    "RoutingMLP",
    "TemperatureSchedule",
    "convert_conv1d",
    "convert_conv2d",
    "convert_conv3d",
    "convert_timm",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
    "export_onnx",
    "fold_batchnorm",
    "fuse_conv_bn_eval",
    "onnx_export_form",
    "param_groups",
    "set_benchmark",
    "set_temperature",
    "use_strategy",
]
__version__ = "0.1.0"
