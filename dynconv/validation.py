"""Argument checking and normalisation shared by the modules and the functional API.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
value, shape or device) with a message naming the argument, what was expected and what was
given. Nothing is broadcast, truncated or cast silently.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .geometry import ConvGeometry, same_tf_padding_total

GATES = ("softmax", "sigmoid")


def _as_int(value):
    """``value`` as a Python int if it is an integer (Python or NumPy, not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


_TUPLE_NAMES = {1: "a 1-tuple", 2: "a pair", 3: "a triple"}


def ntuple(value, name: str, minimum: int, n: int) -> tuple[int, ...]:
    """An int or ``n`` ints (NumPy integers too, as ``nn.Conv{n}d`` takes), each >= ``minimum``,
    as an n-tuple of Python ints: one per spatial axis."""
    what = f"an int or {_TUPLE_NAMES[n]} of ints"
    if _as_int(value) is not None:
        values = (_as_int(value),) * n
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n:
        values = tuple(_as_int(v) for v in value)
        if None in values:
            raise TypeError(f"{name} must be {what}, got {value!r}")
    else:
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (NumPy integers too, as ``nn.Conv2d`` takes), each >=
    ``minimum``, as a 2-tuple of Python ints."""
    return ntuple(value, name, minimum, 2)  # type: ignore[return-value]


def check_positive_int(value, name: str) -> int:
    """``value`` (a Python or NumPy integer, not bool) as a Python int >= 1."""
    as_int = _as_int(value)
    if as_int is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if as_int < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return as_int


# The spatial axes of an input of 1, 2 or 3 spatial dimensions, as the errors name them.
SPATIAL_AXES = {1: "L", 2: "H, W", 3: "D, H, W"}


def check_image(x: torch.Tensor, name: str = "x") -> None:
    """A non-empty batch needs a non-empty image (signal, volume), as ``F.conv2d`` requires
    (and a router's average over no pixels would be NaN)."""
    spatial = x.shape[2:]
    if x.shape[0] > 0 and math.prod(spatial) == 0:
        axes = SPATIAL_AXES.get(len(spatial), "the spatial sizes")
        raise ValueError(
            f"{name} must have {' > 0 and '.join(axes.split(', '))} > 0 when B > 0 (as "
            f"nn.Conv{len(spatial)}d requires), got shape {tuple(x.shape)}"
        )


def check_temperature(value, name: str = "temperature") -> float:
    """``value`` (an int, a float or a one-element tensor) as a finite float > 0; ``name`` is
    the argument the errors name."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_gate(gate) -> str:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    return gate


PADDING_MODES = ("same", "same_tf", "valid")


def check_padding(padding, stride: tuple[int, ...]):
    """``padding`` normalised: one of ``PADDING_MODES`` as given, else one int >= 0 per spatial
    axis (as many as ``stride`` has).

    ``"same"`` is ``nn.Conv2d``'s (stride 1 only); ``"same_tf"`` is TensorFlow's "SAME" (any
    stride; the padding depends on the input size, see
    :func:`dynconv.geometry.same_tf_padding_total`).
    """
    n = len(stride)
    if isinstance(padding, str):
        if padding not in PADDING_MODES:
            raise ValueError(
                f"padding must be an int, {_TUPLE_NAMES[n]}, 'same', 'same_tf' or 'valid', got "
                f"{padding!r}"
            )
        if padding == "same" and stride != (1,) * n:
            raise ValueError(
                f"padding='same' needs stride 1 (as in nn.Conv{n}d), got stride={stride}; "
                f"padding='same_tf' pads TensorFlow-style at any stride (output "
                f"ceil(size / stride))"
            )
        return padding
    return ntuple(padding, "padding", 0, n)


def resolve_padding(padding, kernel_size, stride, dilation, in_size):
    """(symmetric padding, extra padding) of a call on an input of spatial size ``in_size``,
    one int per spatial axis each, e.g. ((pad_h, pad_w), (extra_bottom, extra_right)).

    The second is the one more row / column (/ plane) that an odd total (``"same"`` with an
    even dilated kernel, ``"same_tf"``) needs at the end of the axis (bottom / right / back).
    """
    padding = check_padding(padding, stride)
    n = len(stride)
    if padding == "valid":
        return (0,) * n, (0,) * n
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    elif padding == "same_tf":
        totals = [same_tf_padding_total(*args)
                  for args in zip(in_size, kernel_size, stride, dilation)]
    else:
        return padding, (0,) * n
    return tuple(t // 2 for t in totals), tuple(t % 2 for t in totals)


def check_module_device(x: torch.Tensor, parameter: torch.Tensor, module: str) -> None:
    """x must be on the device of the module's parameters (named, rather than PyTorch's
    "Tensor on device meta is not on the expected device cpu!" from deep inside)."""
    if x.device == parameter.device:
        return
    if parameter.is_meta:
        remedy = (f"a module on the meta device has no values: give it a meta x to size it, or "
                  f"module.to_empty(device={str(x.device)!r}) and initialise it")
    else:
        remedy = (f"move one of them (module.to({str(x.device)!r}) or "
                  f"x.to({str(parameter.device)!r}))")
    raise ValueError(
        f"x is on {x.device} but the {module}'s parameters are on {parameter.device}; {remedy}"
    )


def check_input_dtype(x: torch.Tensor, parameter_dtype: torch.dtype, module: str,
                      autocast: bool = False) -> None:
    """x (B, C, *spatial) must be floating point and, outside autocast (``autocast`` True:
    the module casts its operands itself), of the dtype of the module's parameters.

    An integer or bool x (e.g. a uint8 image) is refused with a remedy that converts the input,
    never the module: a module cannot compute in an integer dtype.
    """
    if not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor (the {module} computes in {parameter_dtype}), "
            f"got dtype {x.dtype}; convert the input with x.to({parameter_dtype}) (integer "
            f"images usually want scaling too, e.g. x.to({parameter_dtype}) / 255)"
        )
    if x.dtype != parameter_dtype and not autocast:
        raise TypeError(
            f"x has dtype {x.dtype} but the {module}'s parameters are {parameter_dtype}; "
            f"convert one of them (module.to({x.dtype}) or x.to({parameter_dtype}))"
        )


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


# Geometries of arguments that passed every check, by _cache_key; emptied when full.
CHECKED_CACHE_SIZE = 512
_checked: dict = {}


def _plain(value):
    """A hashable stand-in for a stride / padding / dilation argument of exactly int, str or a
    tuple / list of 1 to 3 exactly ints (so that no bool, NumPy integer or float is ever
    mistaken for an int it equals), else None: such an argument is checked every time."""
    kind = type(value)
    if kind is int or kind is str:
        return value
    if ((kind is tuple or kind is list) and 1 <= len(value) <= 3
            and all(type(v) is int for v in value)):
        return tuple(value)
    return None


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _cache_key(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
               spatial_dims=2):
    """Everything check_conv_inputs reads, as a hashable key; None if it cannot be cached
    (under torch.compile, which traces the checks into guards; tensor subclasses such as fake
    tensors; arguments that are not plain)."""
    if (torch.compiler.is_compiling() or type(x) not in _PLAIN_TENSORS
            or type(weight_bank) not in _PLAIN_TENSORS or type(routing) not in _PLAIN_TENSORS
            or type(groups) is not int
            or not (bias_bank is None or type(bias_bank) in _PLAIN_TENSORS)):
        return None
    geometry = (_plain(stride), _plain(padding), _plain(dilation))
    if None in geometry:
        return None
    bias_key = None if bias_bank is None else (bias_bank.shape, bias_bank.dtype, bias_bank.device)
    return (x.shape, x.dtype, x.device, weight_bank.shape, weight_bank.dtype, weight_bank.device,
            routing.shape, routing.dtype, routing.device, bias_key, geometry, groups,
            spatial_dims)


def check_conv_inputs(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                      spatial_dims: int = 2):
    """Validate the arguments of :func:`dynconv.dynamic_conv2d` (``spatial_dims`` 2; 1 for
    ``dynamic_conv1d``, 3 for ``dynamic_conv3d``) and return a ConvGeometry (one int per
    spatial axis).

    Shapes: x (B, Cin, *spatial); weight_bank (K, Cout, Cin // groups, *kernel);
    routing (B, K); bias_bank (K, Cout) or None; e.g. x (B, Cin, H, W) and weight_bank
    (K, Cout, Cin // groups, kh, kw) in 2-D.

    The checks read only the tensors' types, shapes, dtypes and devices and the other
    arguments, so the geometry of arguments that passed them is remembered (plain tensors and
    plain int / str / pair arguments only): a repeated call skips them. Any argument that fails
    a check is never remembered, and raises every time.
    """
    key = _cache_key(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                     spatial_dims)
    if key is not None:
        geometry = _checked.get(key)
        if geometry is not None:
            return geometry
    geometry = _check_conv_inputs(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                                  groups, spatial_dims)
    if key is not None:
        if len(_checked) >= CHECKED_CACHE_SIZE:
            _checked.clear()
        _checked[key] = geometry
    return geometry


_KERNEL = {1: "k", 2: "kh, kw", 3: "kd, kh, kw"}


def _check_conv_inputs(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                       spatial_dims):
    n = spatial_dims
    check_tensor(x, "x")
    check_tensor(weight_bank, "weight_bank")
    check_tensor(routing, "routing")
    if x.dim() != n + 2:
        raise ValueError(f"x must be {n + 2}-D (B, C, {SPATIAL_AXES[n]}), got {x.dim()}-D "
                         f"with {_describe(x)}")
    check_image(x)
    if weight_bank.dim() != n + 3:
        raise ValueError(
            f"weight_bank must be {n + 3}-D (K, Cout, Cin // groups, {_KERNEL[n]}), got "
            f"{weight_bank.dim()}-D with {_describe(weight_bank)}"
        )
    if routing.dim() != 2:
        raise ValueError(
            f"routing must be 2-D (B, K), got {routing.dim()}-D with {_describe(routing)}"
        )
    tensors = {"x": x, "weight_bank": weight_bank, "routing": routing}
    if bias_bank is not None:
        check_tensor(bias_bank, "bias_bank")
        tensors["bias_bank"] = bias_bank
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(
                f"{name} is on {t.device} but x is on {x.device}; move them to one device"
            )
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match"
            )

    groups = check_positive_int(groups, "groups")
    batch, in_channels = x.shape[0], x.shape[1]
    num_experts, out_channels, in_per_group = weight_bank.shape[:3]
    kernel_size = tuple(weight_bank.shape[3:])
    if num_experts < 1 or out_channels < 1 or in_per_group < 1 or min(kernel_size) < 1:
        raise ValueError(f"weight_bank must have no empty dimension, got {_describe(weight_bank)}")
    if in_channels % groups != 0:
        raise ValueError(
            f"groups={groups} must divide the input channels of x, got Cin={in_channels}"
        )
    if out_channels % groups != 0:
        raise ValueError(
            f"groups={groups} must divide the output channels of weight_bank, "
            f"got Cout={out_channels}"
        )
    if in_per_group * groups != in_channels:
        raise ValueError(
            f"x has {in_channels} channels but weight_bank expects Cin // groups = {in_per_group} "
            f"with groups={groups} (Cin = {in_per_group * groups})"
        )
    if tuple(routing.shape) != (batch, num_experts):
        raise ValueError(
            f"routing must have shape (B, K) = ({batch}, {num_experts}) to match x and "
            f"weight_bank, got {tuple(routing.shape)}"
        )
    if bias_bank is not None and tuple(bias_bank.shape) != (num_experts, out_channels):
        raise ValueError(
            f"bias_bank must have shape (K, Cout) = ({num_experts}, {out_channels}), "
            f"got {tuple(bias_bank.shape)}"
        )
    stride = ntuple(stride, "stride", 1, n)
    dilation = ntuple(dilation, "dilation", 1, n)
    pad, extra = resolve_padding(padding, kernel_size, stride, dilation, x.shape[2:])
    for axis, size in enumerate(x.shape[2:]):
        reach = dilation[axis] * (kernel_size[axis] - 1) + 1
        if size + 2 * pad[axis] + extra[axis] < reach:
            raise ValueError(
                f"x's spatial size {tuple(x.shape[2:])} (padded by {pad}) is smaller than the "
                f"dilated kernel {tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel_size))}"
            )
    return ConvGeometry(stride, pad, dilation, groups, extra)


def check_scales(x, weight_bank, in_scale, out_scale, tap_scale) -> None:
    """Validate ODConv's optional per-sample scales of :func:`dynconv.dynamic_conv2d`:
    in_scale (B, Cin), out_scale (B, Cout), tap_scale (B, kh, kw), each a floating tensor in x's
    dtype on x's device (x and weight_bank already checked)."""
    batch, in_channels = x.shape[:2]
    out_channels, kernel = weight_bank.shape[1], tuple(weight_bank.shape[3:])
    expected = {
        "in_scale": ((batch, in_channels), "(B, Cin)"),
        "out_scale": ((batch, out_channels), "(B, Cout)"),
        "tap_scale": ((batch, *kernel), "(B, kh, kw)"),
    }
    for name, t in (("in_scale", in_scale), ("out_scale", out_scale), ("tap_scale", tap_scale)):
        if t is None:
            continue
        check_tensor(t, name)
        shape, described = expected[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {described} = {shape} to match x and "
                             f"weight_bank, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to "
                             f"one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must "
                            f"match")
