"""What the tests share (not a test module): one case type, one input builder, the independent
float64 per-sample loop reference, and one bound-based assert.

Test modules import it by name (``from helpers import ...``): pyproject's pytest config puts
tests/ on the path.

The reference mixes each sample's kernel by an explicit sum over the bank, then runs one
``F.conv2d`` per sample: no code of the library is involved.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import torch
import torch.nn.functional as F

from dynconv.autotune.tolerance import ROUNDINGS, reduction_lengths, relative_tolerance
from dynconv.backends.registry import BACKEND_NAMES

LAYOUTS = ("nchw", "channels_last", "strided")
# Every backend that runs on CPU tensors as they are, in any floating dtype: all but "triton"
# (CUDA or the interpreter, and no float64), which has its own tests.
PYTORCH_BACKENDS = tuple(name for name in BACKEND_NAMES if name != "triton")


def env_without_interpreter(**changes) -> dict:
    """This process's environment without TRITON_INTERPRET, for subprocesses that capture or
    compile kernels (the interpreter, which conftest switches on, does not compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(changes)
    return env


@dataclasses.dataclass(frozen=True)
class Case:
    """One dynamic convolution: x (batch, cin, h, w), bank (experts, cout, cin/groups, *kernel),
    routing (batch, experts), bias bank (experts, cout) if ``bias``.

    The fields are in the order of the old case tuples, so a case reads
    ``Case(batch, cin, cout, h, w, (kh, kw), stride, padding, dilation, groups, experts, bias)``.
    stride / padding / dilation take what ``dynamic_conv2d`` takes (an int, a pair, and for
    padding ``"same"`` / ``"same_tf"`` / ``"valid"``); the Triton launchers and the custom ops
    need pairs, which the defaults are. ``layout`` is x's memory layout: ``"nchw"`` (contiguous),
    ``"channels_last"`` or ``"strided"`` (every other column of a wider tensor with the channel
    axis permuted: contiguous in no format).
    """

    batch: int = 3
    cin: int = 6
    cout: int = 4
    h: int = 7
    w: int = 5
    kernel: tuple[int, int] = (3, 3)
    stride: int | tuple[int, int] = (1, 1)
    padding: int | str | tuple[int, int] = (1, 1)
    dilation: int | tuple[int, int] = (1, 1)
    groups: int = 1
    experts: int = 5
    bias: bool = True
    layout: str = "nchw"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def geometry(self) -> dict:
        """The keyword arguments ``dynamic_conv2d`` and the reference take besides tensors."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)


def _short(value) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def case_id(case: Case) -> str:
    """A pytest id naming every field of ``case`` (the layout only when it is not NCHW)."""
    text = (f"B{case.batch}-{case.cin}to{case.cout}-{case.h}x{case.w}-k{_short(case.kernel)}"
            f"-s{_short(case.stride)}-p{_short(case.padding)}-d{_short(case.dilation)}"
            f"-g{case.groups}-K{case.experts}-bias{int(case.bias)}")
    return text if case.layout == "nchw" else f"{text}-{case.layout}"


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed: int = 0):
    """(x, weight_bank, routing, bias_bank or None) of ``case``.

    Drawn from a seeded generator in float64 (so the values of a seed do not depend on
    ``dtype``), then rounded to ``dtype`` and moved to ``device``; x gets the case's layout.
    The bank is scaled by 1/sqrt(fan-in) so that outputs are O(1); routing rows are a softmax.
    """
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    fan_in = case.cin // case.groups * case.kernel[0] * case.kernel[1]
    x = draw(case.batch, case.cin, case.h, case.w)
    bank = draw(case.experts, case.cout, case.cin // case.groups, *case.kernel) / fan_in**0.5
    routing = torch.softmax(draw(case.batch, case.experts), dim=1)
    bias_bank = draw(case.experts, case.cout) if case.bias else None
    move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    x, bank, routing, bias_bank = move(x), move(bank), move(routing), move(bias_bank)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case.layout == "strided":
        wide = x.new_zeros(case.batch, case.h, case.cin, 2 * case.w)
        wide[..., ::2] = x.permute(0, 2, 1, 3)
        x = wide[..., ::2].permute(0, 2, 1, 3)
    return x, bank, routing, bias_bank


def upstream_gradient(shape, dtype=torch.float64, device="cpu", seed: int = 1) -> torch.Tensor:
    """A seeded grad_out of ``shape`` (drawn in float64, then rounded to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


# The small case the custom-op tests (opcheck, fakes) run on: groups 2, a pair stride and a pair
# dilation, bias; variants by ``OP_CASE.replace(...)``.
OP_CASE = Case(2, 4, 4, 5, 6, (3, 3), (2, 1), (1, 1), (1, 2), 2, 3, True)


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def op_args(case: Case, dtype=torch.float32, device="cpu", requires_grad: bool = True) -> tuple:
    """The arguments of a ``dynconv::<backend>_forward`` custom op for ``case``: the tensors of
    :func:`make_inputs` then stride, padding and dilation as lists, and groups."""
    if isinstance(case.padding, str):
        raise ValueError("the custom ops take numeric padding: the dispatcher resolves strings")
    tensors = make_inputs(case, dtype, device)
    for t in tensors:
        if t is not None:
            t.requires_grad_(requires_grad)
    return (*tensors, _pair(case.stride), _pair(case.padding), _pair(case.dilation), case.groups)


# --- the float64 reference --------------------------------------------------------------------


def timm_pad_same(x, kernel, stride, dilation):
    """x (B, C, H, W) zero-padded as timm's ``pad_same`` (``Conv2dSame``; TensorFlow's "SAME"),
    written from the rule and not from dynconv: per axis of size i, with kernel k, stride s and
    dilation d, total = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0); total // 2 before,
    the rest after (the odd pixel at the bottom / right)."""
    pads = []
    for i, k, s, d in zip(x.shape[2:], kernel, _pair(stride), _pair(dilation)):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


def reference_dynamic_conv2d(x, bank, routing, bias_bank, stride, padding, dilation, groups):
    """x (B, Cin, H, W), bank (K, Cout, Cin/g, kh, kw), routing (B, K), bias_bank (K, Cout):
    one explicitly mixed kernel and one ``F.conv2d`` per sample, in the inputs' dtype (tests
    pass float64). ``padding="same_tf"`` pads x with :func:`timm_pad_same` first, as timm's
    ``Conv2dSame`` does."""
    if padding == "same_tf":
        x, padding = timm_pad_same(x, bank.shape[3:], stride, dilation), 0
    outputs = []
    for b in range(x.shape[0]):
        weight = sum(routing[b, k] * bank[k] for k in range(bank.shape[0]))
        bias = None
        if bias_bank is not None:
            bias = sum(routing[b, k] * bias_bank[k] for k in range(bank.shape[0]))
        outputs.append(F.conv2d(x[b : b + 1], weight, bias, stride, padding, dilation, groups))
    return torch.cat(outputs)


def _as_float64(t):
    return None if t is None else t.detach().double().cpu()


def reference_forward(x, bank, routing, bias_bank, stride, padding, dilation, groups):
    """(y, scale): the float64 reference output of these (already rounded) inputs, on the CPU,
    and each element's error scale, sum_k |a_k| (|x| * |bank_k|) (+ the bias terms).

    The scale is the same computation on absolute values: the sum of |terms| of each output
    element, which rounding errors grow with (see :func:`relative_tolerance`).
    """
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    tensors = [_as_float64(t) for t in (x, bank, routing, bias_bank)]
    y = reference_dynamic_conv2d(*tensors, **geometry)
    scale = reference_dynamic_conv2d(*(None if t is None else t.abs() for t in tensors),
                                     **geometry)
    return y, scale


def reference_gradients(grad_out, x, bank, routing, bias_bank, stride, padding, dilation, groups):
    """(grads, scales): float64 gradients of (x, bank, routing[, bias_bank]) under ``grad_out``
    (autograd through the reference loop) and their error scales.

    Every gradient element is a sum of products of the operands; the same autograd run on
    their absolute values gives the sum of |products| of each element.
    """
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def grads(transform):
        leaves = [transform(_as_float64(t)).requires_grad_(True)
                  for t in (x, bank, routing, bias_bank) if t is not None]
        bias = leaves[3] if bias_bank is not None else None
        y = reference_dynamic_conv2d(leaves[0], leaves[1], leaves[2], bias, **geometry)
        y.backward(transform(_as_float64(grad_out)))
        return [t.grad for t in leaves]

    return grads(lambda t: t), grads(torch.abs)


# --- the bound and its assert -----------------------------------------------------------------

def output_hw(case: Case) -> tuple[int, int]:
    """(Ho, Wo) of ``case`` (PyTorch's own shape rule, run on meta tensors)."""
    x = torch.empty(1, case.cin, case.h, case.w, device="meta")
    weight = torch.empty(case.cout, case.cin // case.groups, *case.kernel, device="meta")
    geometry = case.geometry
    if case.padding == "same_tf":
        x = timm_pad_same(x, case.kernel, case.stride, case.dilation)
        geometry = {**geometry, "padding": 0}
    return tuple(F.conv2d(x, weight, None, **geometry).shape[2:])


def _reduction_lengths(case: Case) -> tuple[int, int]:
    ho, wo = output_hw(case)
    return reduction_lengths(case.batch, case.cin, case.cout, tuple(case.kernel), case.groups,
                             case.experts, ho * wo)


def forward_reduction_length(case: Case) -> int:
    """Longest chain of roundings behind an output (:func:`reduction_lengths`)."""
    return _reduction_lengths(case)[0]


def backward_reduction_length(case: Case) -> int:
    """Longest chain of roundings behind a gradient element, over the four gradients
    (:func:`reduction_lengths`)."""
    return _reduction_lengths(case)[1]


def assert_within_bound(got, want, scale, dtype, reduction_length, *, tf32=False,
                        roundings=ROUNDINGS, atol=1e-6, name="output"):
    """``got`` (in ``dtype``, any device) within ``relative_tolerance(...) * scale + atol`` of the
    float64 ``want`` everywhere (and finite, of ``want``'s shape).

    atol: a few fp32 ulps of 1, for elements whose scale is ~0 (all-padding windows, no bias).
    """
    assert got is not None, f"{name} missing"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{name}: not finite"
    if got.numel() == 0:  # an empty batch: nothing to bound
        return
    rtol = relative_tolerance(dtype, reduction_length, tf32, roundings)
    error = (got.detach().double().cpu() - want.double().cpu()).abs()
    bound = rtol * scale.double().cpu() + atol
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (
        f"{name}: error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"(rtol {rtol:.3g} of the sum of |terms|, n = {reduction_length}; "
        f"max error {error.max():.3g})"
    )


def onnx_ops(model) -> collections.Counter:
    """(domain, op type) of every node of an ``onnx.ModelProto``, the bodies of Scans / Loops /
    Ifs included."""
    counts = collections.Counter()

    def walk(graph):
        for node in graph.node:
            counts[(node.domain or "ai.onnx", node.op_type)] += 1
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                    walk(subgraph)

    walk(model.graph)
    return counts


def onnxruntime_errors(path, model, shape, batches=(1, 3, 8)) -> list[float]:
    """Largest |onnxruntime - PyTorch| over the largest |PyTorch|, per batch size, for the
    exported ``model`` at ``path`` on inputs (batch, *shape). Imports onnxruntime on use."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    for batch in batches:
        x = torch.randn(batch, *shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        errors.append(float((torch.from_numpy(got) - want).abs().max() / want.abs().max()))
    return errors
