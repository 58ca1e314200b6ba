"""The backends of ``dynamic_conv2d``, by name: the one place that lists them.

A backend is a function ``(x, weight_bank, routing, bias_bank, geometry) -> y`` over validated
arguments (x (B, Cin, H, W), weight_bank (K, Cout, Cin // groups, kh, kw), routing (B, K),
bias_bank (K, Cout) or None, a :class:`dynconv.geometry.ConvGeometry` with symmetric padding)
plus where it can run. ``"auto"`` is not a backend but a choice between them:
:func:`resolve` makes it.

Importing a backend never imports Triton: the Triton backend imports its kernels on its first
call.
"""

from __future__ import annotations

import contextvars
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynconv.kernels._common import interpreter_enabled, interpreter_mismatch

from .native.op import native_dynamic_conv2d
from .reference import (
    auto_onnx_form,
    grouped_dynamic_conv2d,
    loop_dynamic_conv2d,
    matmul_dynamic_conv2d,
    scan_dynamic_conv2d,
    spanning_dynamic_conv2d,
)
from .triton.op import triton_dynamic_conv2d

AUTO = "auto"

# The dtypes the Triton kernels compute in (fp32 accumulation); float64 stays on "native".
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_importable() -> bool:
    """Whether the ``triton`` package can be imported (checked once)."""
    global _triton_importable
    if _triton_importable is None:
        _triton_importable = importlib.util.find_spec("triton") is not None
    return _triton_importable


_triton_importable: bool | None = None


def _triton_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if not triton_importable():
        return "backend='triton' needs the triton package, which is not installed"
    if dtype not in TRITON_DTYPES:
        return (f"backend='triton' supports dtypes {TRITON_DTYPES}, got {dtype}; use "
                f"backend='native' (or 'auto', which picks it) for {dtype}")
    if device.type == "cpu" and interpreter_enabled():
        mismatch = interpreter_mismatch()
        if mismatch is not None:
            return f"backend='triton' on CPU tensors cannot run: {mismatch}"
        _warn_interpreter_once()
        return None
    if device.type == "cuda":
        return None
    return (f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported), got tensors on {device}")


_interpreter_warned = False


def _warn_interpreter_once() -> None:
    global _interpreter_warned
    if not _interpreter_warned:
        _interpreter_warned = True
        warnings.warn("dynconv: backend='triton' on CPU tensors runs Triton's interpreter, a "
                      "correctness tool about 1000x slower than the kernels on a GPU; "
                      "backend='native' (what 'auto' picks on the CPU) is the fast CPU path",
                      RuntimeWarning, stacklevel=4)


@dataclass(frozen=True)
class Backend:
    """One way of computing a dynamic convolution.

    name: what users pass as ``backend=``. function: the implementation,
    ``(x, weight_bank, routing, bias_bank, geometry) -> y``. unavailable:
    ``(device, dtype) -> reason or None``; None means the backend runs on every device and
    floating dtype. takes_tap_scale: whether ``function`` also takes ``tap_scale=``.
    """

    name: str
    function: Callable
    summary: str
    unavailable: Callable[[torch.device, torch.dtype], str | None] | None = None
    # Whether ``function`` takes ODConv's ``tap_scale=`` (B, kh, kw) and scales the kernels it
    # mixes; the others run on a folded bank (:func:`dynconv.backends.scales.fold_tap_scale`).
    takes_tap_scale: bool = False

    def check_can_run(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise a ValueError saying why this backend cannot run on ``device`` / ``dtype``."""
        reason = None if self.unavailable is None else self.unavailable(device, dtype)
        if reason is not None:
            raise ValueError(reason)


_BACKENDS = {
    backend.name: backend
    for backend in (
        Backend("loop", loop_dynamic_conv2d,
                "one F.conv2d per sample, plain autograd (the readable reference)",
                takes_tap_scale=True),
        Backend("grouped", grouped_dynamic_conv2d,
                "the grouped-conv trick (batch folded into groups), plain autograd",
                takes_tap_scale=True),
        Backend("native", native_dynamic_conv2d,
                "PyTorch's own kernels with a lean custom backward (the CPU path)",
                takes_tap_scale=True),
        Backend("triton", triton_dynamic_conv2d,
                "Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)", _triton_unavailable,
                takes_tap_scale=True),
    )
}

# Every name ``backend=`` accepts.
BACKEND_NAMES = (AUTO, *_BACKENDS)

# The forms the library's own paths can be recorded in under ONNX export: standard ops only, the
# batch a dynamic dimension (the custom ops have no ONNX form, and the grouped trick bakes the
# batch into ``groups``). ``python -m dynconv.autotune onnx`` times them in onnxruntime.
ONNX_FORMS = {
    form.name: form
    for form in (
        Backend("auto", auto_onnx_form,
                "per layer: scan, or spanning for an ungrouped conv with a one-pixel output "
                "(scan with a tap scale)", takes_tap_scale=True),
        Backend("scan", scan_dynamic_conv2d,
                "each sample's kernel mixed, then one Conv per sample in an ONNX Scan",
                takes_tap_scale=True),
        Backend("spanning", spanning_dynamic_conv2d,
                "one static conv over K x Cin routing-scaled channels (K x the FLOPs)"),
        Backend("matmul", matmul_dynamic_conv2d,
                "patches by a one-hot conv, then a batched MatMul with the mixed kernels",
                takes_tap_scale=True),
    )
}
# What ``torch.onnx.export`` records when no form is chosen: the fastest measured in onnxruntime
# on ImageNet-sized inputs at batch 1 and 8 (perf_reports/onnx/README.md).
ONNX_EXPORT = ONNX_FORMS["auto"]
_RECORDED_IN_ONNX_FORM = (AUTO, "native", "triton")
# The form chosen for the exports in this context (set by ``dynconv.onnx_export_form``); None:
# ONNX_EXPORT.
CHOSEN_ONNX_FORM: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "dynconv_onnx_form", default=None)
# Forms that record a Scan: TorchScript's exporter (``dynamo=False``) traces by running the code,
# which would unroll the scan to the example's batch size, so there they give way to spanning.
_SCAN_FORMS = ("auto", "scan")


def onnx_form(name) -> Backend:
    """The ONNX export form called ``name`` (one of :data:`ONNX_FORMS`), else a ValueError."""
    if not isinstance(name, str) or name not in ONNX_FORMS:
        raise ValueError(f"form must be one of {tuple(ONNX_FORMS)}, got {name!r}")
    return ONNX_FORMS[name]


def current_onnx_form() -> Backend:
    """The form the library's own paths record in the ONNX export in progress."""
    form = CHOSEN_ONNX_FORM.get() or ONNX_EXPORT
    if form.name in _SCAN_FORMS and torch.jit.is_tracing():
        return ONNX_FORMS["spanning"]
    return form


def check_backend_name(name) -> str:
    """``name`` if ``backend=name`` is accepted, else a ValueError listing the choices."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (not ``"auto"``: see :func:`resolve`)."""
    check_backend_name(name)
    if name == AUTO:
        raise ValueError("'auto' is resolved per input: call resolve(name, x)")
    return _BACKENDS[name]


def auto_backend_name(device: torch.device, dtype: torch.dtype) -> str:
    """What ``"auto"`` means for tensors on ``device`` of ``dtype``: Triton on CUDA (in the
    dtypes its kernels support), ``"native"`` everywhere else."""
    if device.type == "cuda" and dtype in TRITON_DTYPES and triton_importable():
        return "triton"
    return "native"


def resolve(name: str, x: torch.Tensor) -> Backend:
    """The backend that ``backend=name`` runs for input ``x``, checked to be able to run.

    Under ``torch.onnx.export`` the library's own paths (``auto``, ``native``, ``triton``) run
    an ONNX form instead (:func:`current_onnx_form`: :data:`ONNX_EXPORT` unless one is chosen);
    ``loop`` and ``grouped`` are recorded as they are.
    """
    check_backend_name(name)
    if name in _RECORDED_IN_ONNX_FORM and torch.onnx.is_in_onnx_export():
        return current_onnx_form()
    if name == AUTO:
        name = auto_backend_name(x.device, x.dtype)
    backend = _BACKENDS[name]
    backend.check_can_run(x.device, x.dtype)
    return backend
