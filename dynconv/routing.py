"""The routers: per-sample mixing weights from a globally pooled input (RoutingMLP), on a base
that keeps the temperature as model state (Router; ODConv's router is another,
:class:`dynconv.modules.odconv.ODConvRouter`)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .validation import (
    SPATIAL_AXES,
    check_gate,
    check_image,
    check_input_dtype,
    check_module_device,
    check_positive_int,
    check_temperature,
)


class Router(nn.Module):
    """The base of dynconv's routers: a temperature T > 0 that every head divides its logits by,
    kept as model state.

    T is the persistent float32 buffer ``temperature_tensor`` (a buffer, not a Python float:
    torch.compile then treats a changing temperature, e.g. an anneal, as data instead of
    recompiling for each value), read and set as the float :attr:`temperature`.
    :func:`dynconv.set_temperature` and :class:`dynconv.TemperatureSchedule` set every
    ``Router`` of a model. A state_dict without the buffer (an older checkpoint) still loads:
    the router keeps the temperature it was built with, and a warning says so once; a
    non-finite or non-positive one is refused.

    A subclass calls :meth:`_init_temperature` in its ``__init__``.
    """

    def _init_temperature(self, temperature, device=None) -> None:
        self.register_buffer(
            "temperature_tensor",
            torch.tensor(check_temperature(temperature), device=device, dtype=torch.float32),
        )

    @property
    def temperature(self) -> float:
        """T as a float (NaN on the meta device, where the buffer has no value)."""
        if self.temperature_tensor.is_meta:
            return math.nan
        return float(self.temperature_tensor)

    @temperature.setter
    def temperature(self, value) -> None:
        with torch.no_grad():
            self.temperature_tensor.fill_(check_temperature(value))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "temperature_tensor"
        had_temperature = key in state_dict
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and not value.is_meta and value.numel() == 1:
            # Refused before anything of this router is loaded, as the setter would refuse it:
            # T = 0 gives NaN routing, T < 0 silently reverses it. (Another shape is left to
            # PyTorch's size-mismatch error.)
            try:
                check_temperature(value)
            except (TypeError, ValueError) as error:
                raise type(error)(f"cannot load {key!r} from the state_dict: {error}") from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not had_temperature and key in missing_keys:
            # A checkpoint from before the temperature was saved: keep this router's own value.
            missing_keys.remove(key)
            _warn_missing_temperature_once(self.temperature_tensor)


class RoutingMLP(Router):
    """GAP -> Linear -> ReLU -> Linear -> softmax(logits / T) (or sigmoid gates).

    Args:
        in_channels: C of the input (B, C, H, W), or (B, C, L) / (B, C, D, H, W).
        num_experts: K, the number of kernels mixed.
        reduction: hidden width is ``max(in_channels // reduction, 4)``.
        temperature: T > 0; low -> near one-hot choice, high -> near-uniform mix.
        gate: ``"softmax"`` (rows sum to 1, DyConv) or ``"sigmoid"`` (independent gates, CondConv).
        init: how :meth:`reset_parameters` initialises the two layers, one of ``INIT_SCHEMES``:

            - ``"small"``: ``nn.Linear``'s default for the hidden layer; output weights
              N(0, 0.01^2) and zero bias, so the logits start near 0 and the mix near uniform
              whatever the input;
            - ``"linear"``: ``nn.Linear``'s default (uniform in +-1/sqrt(fan_in)) for both;
            - ``"dyconv"`` (the default): Kaiming normal (fan_out, ReLU gain) weights and zero
              biases for both, as DyConv's reference implementations initialise their
              attention branch. The logits start at the scale of the input features, so the
              mix depends on the input from the start (soften it with the temperature). The
              routing ablations (``perf_reports/training/ablation``) found it the one
              initialisation after which the routing does not stay uniform.

    Shapes: x (B, C, H, W) (or (B, C, L), (B, C, D, H, W)) -> routing (B, K).
    """

    INIT_SCHEMES = ("small", "linear", "dyconv")

    def __init__(
        self,
        in_channels,
        num_experts=4,
        reduction=4,
        temperature=1.0,
        gate="softmax",
        init="dyconv",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.init = _check_init(init)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.reduction = check_positive_int(reduction, "reduction")
        self.gate = check_gate(gate)
        hidden = max(in_channels // reduction, 4)
        self.fc1 = nn.Linear(in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, num_experts, **factory)
        self._init_temperature(temperature, device)  # a buffer: see Router
        self.reset_parameters()

    def reset_parameters(self, init: str | None = None) -> None:
        """Initialise both layers by ``init`` (one of ``INIT_SCHEMES``; None: the module's own
        ``init``, given at construction). A scheme given here becomes the module's own."""
        if init is not None:
            self.init = _check_init(init)
        if self.init == "dyconv":
            for layer in (self.fc1, self.fc2):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            return
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        if self.init == "small":
            nn.init.normal_(self.fc2.weight, std=1e-2)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_module_device(x, self.fc1.weight, type(self).__name__)
        if x.dim() not in (3, 4, 5) or x.shape[1] != self.in_channels:
            spatial = SPATIAL_AXES.get(x.dim() - 2, SPATIAL_AXES[2])
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, {spatial}), got {tuple(x.shape)}"
            )
        check_image(x)
        check_input_dtype(x, self.fc1.weight.dtype, type(self).__name__,
                          autocast_enabled(x.device.type))
        pooled = x.mean(dim=tuple(range(2, x.dim())))  # global average over every spatial axis
        logits = self.fc2(torch.relu(self.fc1(pooled)))
        scaled = logits / self.temperature_tensor.to(logits.dtype)
        if self.gate == "softmax":
            return torch.softmax(scaled, dim=1)
        return torch.sigmoid(scaled)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_experts={self.num_experts}, "
            f"reduction={self.reduction}, temperature={self.temperature:g}, gate={self.gate!r}, "
            f"init={self.init!r}"
        )


def _check_init(init) -> str:
    if init not in RoutingMLP.INIT_SCHEMES:
        raise ValueError(f"init must be one of {RoutingMLP.INIT_SCHEMES}, got {init!r}")
    return init


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False where autocast does not exist, e.g. the
    meta device, on which ``torch.is_autocast_enabled`` raises)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


_warned_missing_temperature = False


def _warn_missing_temperature_once(temperature: torch.Tensor) -> None:
    global _warned_missing_temperature
    if _warned_missing_temperature:
        return
    _warned_missing_temperature = True
    value = "unknown (meta)" if temperature.is_meta else f"{float(temperature):g}"
    warnings.warn(
        "loading a state_dict without the router temperature (saved by an older dynconv): each "
        f"router keeps the temperature it was built with (e.g. {value}); set it with "
        "dynconv.set_temperature(model, T) if the checkpoint was annealed",
        stacklevel=4,
    )
