"""Randomized cross-checks: drawn geometries, every backend, output and all four gradients against
the float64 per-sample loop (tests/helpers.py) within the derived rounding bound.

A seeded generator (``random.Random``, no extra dependency) draws each case:

- kernel 1-7 per axis (square or not, odd or even), stride 1-3, dilation 1-3 (ints or pairs),
  padding an int or a pair 0-4, ``"same"`` (then stride 1, as ``nn.Conv2d`` requires),
  ``"same_tf"`` (TensorFlow's "SAME": any stride, the padding depends on H and W and its odd
  pixel goes to the bottom / right; the reference pads as timm's ``Conv2dSame``) or ``"valid"``;
- groups: dense, depthwise with a channel multiplier (Cout = m * Cin) or 2-4 groups with
  several channels each (Cout = m * groups); spatial sizes 1-13 (odd ones included), batch 0-5,
  experts K 1-17, with or without a bias bank;
- x NCHW, channels_last or strided (contiguous in no format); float32 or float64; routing rows
  of a softmax or signed values (sigmoid gates and hand-made routings need not sum to 1);
  the bank, routing and bias bank as non-contiguous views in a quarter of the draws; the
  upstream gradient NCHW, channels_last or strided;
- for ``native``, a formulation per part (grouped / per_sample / im2col) and a batch chunk
  forced by ``force_formulation`` half the time, the shape rule otherwise (``auto`` always
  takes the rule).

``triton`` (under the interpreter without a GPU) gets its own, fewer and tiny draws (H, W <= 7,
channels <= 8, batch 0-3, float32 only: it refuses float64 by design) with the forward strategy
(premix / fused / spanning) drawn too; every PyTorch backend runs on those draws as well.

A draw whose padded input is smaller than the dilated kernel is not a convolution: the valid
streams redraw, and a third stream keeps exactly those draws and checks that every backend
raises ValueError for them (and that ``F.conv2d`` refuses them too, so the oracle is PyTorch's).

Each test id names its backend, seed and the drawn case; ``DYNCONV_RANDOM_SEED=<seed>`` with
``DYNCONV_RANDOM_CASES=1`` (or ``DYNCONV_RANDOM_TRITON_CASES=1`` for a triton draw) replays one
draw. Sizes (the defaults take about half a minute on two CPU cores)::

    DYNCONV_RANDOM_SEED=0            first seed of every stream
    DYNCONV_RANDOM_CASES=80          draws for the PyTorch backends
    DYNCONV_RANDOM_TRITON_CASES=16   tiny draws for triton (and the PyTorch backends)
    DYNCONV_RANDOM_INVALID_CASES=40  draws that must raise ValueError
    DYNCONV_RANDOM_TRITON_SIZES=8,7,3  the triton draws' max channels, H and W, batch (larger
                                     ones reach several tiles of the kernels: on a GPU, or slowly)

A longer hunt (about 2 minutes per 3000 PyTorch draws and 5 per 300 triton draws, one thread
each, on the CPU), e.g.::

    export OMP_NUM_THREADS=1 DYNCONV_RANDOM_INVALID_CASES=1000
    DYNCONV_RANDOM_CASES=3000 DYNCONV_RANDOM_TRITON_CASES=300 pytest -q tests/test_randomized.py

Every failure found becomes an explicit case of ``REGRESSIONS`` below. A draw that crashes the
process inside PyTorch itself is listed in ``PYTORCH_CRASHES`` and runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    Case,
    assert_within_bound,
    backward_reduction_length,
    case_id,
    forward_reduction_length,
    make_inputs,
    output_hw,
    reference_forward,
    reference_gradients,
    upstream_gradient,
)

from dynconv import dynamic_conv2d
from dynconv.backends.native.formulations import FORMULATIONS
from dynconv.backends.native.op import force_formulation
from dynconv.backends.registry import BACKEND_NAMES
from dynconv.kernels._common import interpreter_enabled

TRITON = "triton"
TORCH_BACKENDS = tuple(name for name in BACKEND_NAMES if name != TRITON)
# Triton runs on CUDA tensors where there is a GPU, else on CPU tensors under the interpreter;
# every other backend, and the float64 reference, on the CPU.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNS = TRITON_DEVICE.type == "cuda" or interpreter_enabled()

pytestmark = [
    # The float64 reference's F.conv2d warns that padding="same" with an even kernel pads a copy.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
    # fp32 dots in ieee (tests/conftest.py), which the fp32 Triton kernels follow.
    pytest.mark.usefixtures("fp32_dots"),
]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


SEED = _env_int("DYNCONV_RANDOM_SEED", 0)
CASES = _env_int("DYNCONV_RANDOM_CASES", 80)
TRITON_CASES = _env_int("DYNCONV_RANDOM_TRITON_CASES", 16)
INVALID_CASES = _env_int("DYNCONV_RANDOM_INVALID_CASES", 40)
TRITON_SIZES = os.environ.get("DYNCONV_RANDOM_TRITON_SIZES", "").strip() or "8,7,3"

DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64"}
# Elements whose scale is ~0 (all-padding windows without bias) must come out ~0: a few ulps of 1.
ATOL = {torch.float32: 1e-6, torch.float64: 1e-14}


@dataclasses.dataclass(frozen=True)
class Draw:
    """One drawn test: the case and how it runs (everything a failure needs to be replayed)."""

    seed: int
    case: Case
    dtype: torch.dtype = torch.float32
    routing: str = "softmax"  # or "signed": standard normal values, rows not summing to 1
    # native only: None (the shape rule), else ((forward, input_grad, weight_grad), chunk).
    native_plan: tuple | None = None
    # triton only: the forward strategy, "premix", "fused" or "spanning" (None: the rule's
    # choice).
    triton_strategy: str | None = None
    # bank, routing and bias bank as non-contiguous views (x's layout is the case's).
    strided_operands: bool = False
    grad_layout: str = "nchw"  # the upstream gradient's layout, one of helpers.LAYOUTS

    def id(self, backend: str | None = None) -> str:
        """The test id: backend, seed, dtype, routing, the case, and what the backend forces."""
        text = f"seed{self.seed}-{DTYPE_NAMES[self.dtype]}-{self.routing}-{case_id(self.case)}"
        if self.strided_operands:
            text += "-strided_operands"
        if self.grad_layout != "nchw":
            text += f"-grad_{self.grad_layout}"
        if backend == "native" and self.native_plan is not None:
            (forward, input_grad, weight_grad), chunk = self.native_plan
            text += f"-plan_{forward}_{input_grad}_{weight_grad}-chunk{chunk}"
        if backend == TRITON and self.triton_strategy is not None:
            text += f"-{self.triton_strategy}"
        return text if backend is None else f"{backend}-{text}"


# --- the generator ----------------------------------------------------------------------------


def _int_or_pair(rng: random.Random, values):
    first, second = rng.choice(values), rng.choice(values)
    if first == second and rng.random() < 0.5:
        return first
    return (first, second)


def _as_pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def is_convolution(case: Case) -> bool:
    """Whether the padded input covers the dilated kernel on both axes (else it is no conv)."""
    if case.padding in ("same", "same_tf"):
        return True
    padding = (0, 0) if case.padding == "valid" else _as_pair(case.padding)
    dilation = _as_pair(case.dilation)
    return all(size + 2 * pad >= d * (k - 1) + 1 for size, pad, d, k in
               zip((case.h, case.w), padding, dilation, case.kernel))


def _draw_case(rng: random.Random, max_channels: int, largest: int, max_batch: int) -> Case:
    kind = rng.choice(("dense", "dense", "depthwise", "grouped"))
    if kind == "dense":
        groups, cin, cout = 1, rng.randint(1, max_channels), rng.randint(1, max_channels)
    elif kind == "depthwise":
        cin = rng.randint(1, max_channels // 2)
        groups, cout = cin, cin * rng.randint(1, max_channels // cin)
    else:
        groups = rng.randint(2, 4)
        cin = groups * rng.randint(1, max_channels // groups)
        cout = groups * rng.randint(1, max_channels // groups)
    if rng.random() < 0.5:
        kernel = (rng.randint(1, 7),) * 2
    else:
        kernel = (rng.randint(1, 7), rng.randint(1, 7))
    stride = _int_or_pair(rng, (1, 2, 3))
    dilation = _int_or_pair(rng, (1, 1, 2, 3))
    padding_kind = rng.choice(("int", "pair", "same", "valid"))
    if padding_kind == "int":
        padding = rng.randint(0, 4)
    elif padding_kind == "pair":
        padding = (rng.randint(0, 4), rng.randint(0, 4))
    else:
        padding = padding_kind
        # Half of the "same" draws are TF-style, at the drawn stride. (The extra draw is made
        # only here, so that every other seed draws what it drew before "same_tf" existed.)
        if padding == "same" and rng.random() < 0.5:
            padding = "same_tf"
        elif padding == "same":
            stride = 1
    batch = 0 if rng.random() < 0.08 else rng.randint(1, max_batch)
    experts = rng.randint(1, 4) if rng.random() < 0.5 else rng.randint(1, 17)
    return Case(batch, cin, cout, rng.randint(1, largest), rng.randint(1, largest), kernel,
                stride, padding, dilation, groups, experts, rng.random() < 0.5,
                rng.choice(("nchw", "channels_last", "strided")))


# (max channels, max H and W, max batch) of each stream.
SIZES = {"torch": (12, 13, 5), "invalid": (12, 13, 5),
         "triton": tuple(int(v) for v in TRITON_SIZES.split(","))}


def draw(seed: int, stream: str, sizes: tuple[int, int, int] | None = None) -> Draw:
    """The draw of ``seed`` in ``stream``: "torch" (full ranges), "triton" (tiny, float32) or
    "invalid" (a case that is no convolution); ``sizes`` overrides the stream's SIZES."""
    rng = random.Random(f"dynconv-{stream}-{seed}")
    sizes = SIZES[stream] if sizes is None else sizes
    want_valid = stream != "invalid"
    case = _draw_case(rng, *sizes)
    while is_convolution(case) != want_valid:
        case = _draw_case(rng, *sizes)
    dtype = torch.float32 if stream == "triton" else rng.choice((torch.float32, torch.float64))
    routing = rng.choice(("softmax", "softmax", "signed"))
    native_plan = None
    if rng.random() < 0.5:
        plan = tuple(rng.choice(FORMULATIONS) for _ in range(3))
        native_plan = (plan, rng.randint(1, max(1, case.batch)))
    strategy = rng.choice(("premix", "fused", "spanning")) if stream == "triton" else None
    strided_operands = rng.random() < 0.25
    grad_layout = rng.choice(("nchw", "nchw", "channels_last", "strided"))
    return Draw(seed, case, dtype, routing, native_plan, strategy, strided_operands,
                grad_layout)


# --- running one draw -------------------------------------------------------------------------


def _every_other_column(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` as a view of every other element of a wider last axis."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


def _with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A 4-d ``t`` (same values) NCHW, channels_last or strided (contiguous in no format)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return _every_other_column(t.transpose(1, 2)).transpose(1, 2)
    return t.contiguous()


def inputs(d: Draw, device="cpu"):
    """(x, bank, routing, bias_bank or None) of a draw, in its dtype and on ``device``."""
    x, bank, routing, bias_bank = make_inputs(d.case, d.dtype, device, seed=d.seed)
    if d.routing == "signed":
        gen = torch.Generator().manual_seed(d.seed + 2)
        routing = torch.randn(routing.shape, generator=gen, dtype=torch.float64).to(
            device, d.dtype)
    if d.strided_operands:
        bank = _every_other_column(bank)
        routing = routing.t().contiguous().t()
        bias_bank = None if bias_bank is None else _every_other_column(bias_bank)
    return x, bank, routing, bias_bank


def output_shape(case: Case) -> tuple[int, ...]:
    return (case.batch, case.cout, *output_hw(case))


@functools.lru_cache(maxsize=4)
def expected(d: Draw):
    """(upstream gradient, [(name, want, scale, n)] for y and the four gradients): the float64
    loop on the draw's (rounded) inputs. An empty batch has an empty output, empty x and routing
    gradients, and exact zeros for the bank and bias-bank gradients (sums over no samples)."""
    x, bank, routing, bias_bank = inputs(d)
    grad_out = upstream_gradient(output_shape(d.case), d.dtype, seed=d.seed + 1)
    names = ["y", "grad x", "grad bank", "grad routing", "grad bias bank"]
    if d.case.batch == 0:
        zeros = lambda t: torch.zeros(t.shape, dtype=torch.float64)  # noqa: E731
        wants = [zeros(grad_out)] + [zeros(t) for t in (x, bank, routing, bias_bank)
                                     if t is not None]
        scales = wants
    else:
        y, y_scale = reference_forward(x, bank, routing, bias_bank, **d.case.geometry)
        grads, grad_scales = reference_gradients(grad_out, x, bank, routing, bias_bank,
                                                 **d.case.geometry)
        wants, scales = [y, *grads], [y_scale, *grad_scales]
    lengths = [forward_reduction_length(d.case)] + [backward_reduction_length(d.case)] * 4
    return grad_out, list(zip(names, wants, scales, lengths))


def _backend_context(d: Draw, backend: str, monkeypatch):
    if backend == "native" and d.native_plan is not None:
        plan, chunk = d.native_plan
        return force_formulation(plan, chunk)
    if backend == TRITON and d.triton_strategy is not None:
        strategy = d.triton_strategy
        monkeypatch.setattr("dynconv.backends.triton.forward.choose_strategy",
                            lambda *args: strategy)
    return contextlib.nullcontext()


def check(d: Draw, backend: str, monkeypatch) -> None:
    """Output and the gradients of x, the bank, the routing and the bias bank of ``backend``
    against the float64 loop, within the rounding bound of the draw's dtype."""
    grad_out, wanted = expected(d)
    device = TRITON_DEVICE if backend == TRITON else torch.device("cpu")
    grad_out = grad_out.to(device)
    x, bank, routing, bias_bank = inputs(d, device)
    leaves = [t.requires_grad_(True) for t in (x, bank, routing, bias_bank) if t is not None]
    with _backend_context(d, backend, monkeypatch):
        y = dynamic_conv2d(*leaves[:3], leaves[3] if bias_bank is not None else None,
                           backend=backend, **d.case.geometry)
        assert y.shape == grad_out.shape, f"y: shape {tuple(y.shape)} != {tuple(grad_out.shape)}"
        if d.case.layout == "channels_last" and not x.is_contiguous():
            assert y.is_contiguous(memory_format=torch.channels_last), "y lost channels_last"
        y.backward(_with_layout(grad_out, d.grad_layout))
    got = [y] + [t.grad for t in leaves]
    for value, (name, want, scale, length) in zip(got, wanted):
        if want.numel() == 0:  # assert_within_bound's argmax needs an element
            assert value is not None, f"{name} missing"
            assert value.shape == want.shape and value.dtype == d.dtype, (
                f"{name}: {tuple(value.shape)} {value.dtype}, expected {tuple(want.shape)} "
                f"{d.dtype}")
            continue
        assert_within_bound(value, want, scale, d.dtype, length, atol=ATOL[d.dtype], name=name)


# --- the streams ------------------------------------------------------------------------------


def _params(draws, backends_of):
    return [pytest.param(d, backend, id=d.id(backend))
            for d in draws for backend in backends_of(d)]


def _backends(d: Draw):
    return TORCH_BACKENDS + ((TRITON,) if d.dtype == torch.float32 and d.triton_strategy else ())


TORCH_DRAWS = [draw(SEED + i, "torch") for i in range(CASES)]
TRITON_DRAWS = [draw(SEED + i, "triton") for i in range(TRITON_CASES)]
INVALID_DRAWS = [draw(SEED + i, "invalid") for i in range(INVALID_CASES)]

# Failures the generator found, kept as explicit cases (with what failed).
REGRESSIONS: list[Draw] = [
    # torch stream, seed 3216 (its native plan set to a per-sample forward here): segfault
    # inside F.conv2d (PyTorch 2.14.1, oneDNN 3.12, AVX-512 CPU) for "loop", and for "native"
    # with a per-sample forward, which make exactly that call:
    # fp32 channels_last x, groups 2, a bias, and every output column's window in the padding
    # (W = 2, padding 4, stride 3, dilation 3: the columns are bias only). Not the library's
    # bug: ``F.conv2d`` alone crashes on it (with a batch stride of 2 instead of 36, or NCHW,
    # or no bias, it does not), as ``nn.Conv2d`` would. See PYTORCH_CRASHES.
    Draw(3216, Case(1, 2, 6, 9, 2, (2, 2), (1, 3), (2, 4), (1, 3), 2, 1, True, "channels_last"),
         torch.float32, "signed", (("per_sample", "per_sample", "per_sample"), 1),
         strided_operands=True, grad_layout="strided"),
]

# Test ids whose run crashes the process inside PyTorch itself (not a Python error): they run
# in a subprocess, xfail while it dies by a signal and must pass once PyTorch is fixed.
PYTORCH_CRASHES = {
    REGRESSIONS[0].id("loop"): "F.conv2d segfaults (REGRESSIONS[0])",
    REGRESSIONS[0].id("native"): "F.conv2d segfaults (REGRESSIONS[0])",
}
# The same draw as found by the generator (torch stream): covered by REGRESSIONS[0].
RANDOM_DRAWS_COVERED = {
    "loop-seed3216-fp32-signed-B1-2to6-9x2-k2x2-s1x3-p2x4-d1x3-g2-K1-bias1-channels_last-"
    "strided_operands-grad_strided",
}


def _skip_triton(backend: str) -> None:
    if backend == TRITON and not TRITON_RUNS:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)")


def _skip_covered(d: Draw, backend: str) -> None:
    if d.id(backend) in RANDOM_DRAWS_COVERED:
        pytest.skip("crashes inside PyTorch: checked by test_regression in a subprocess")


def check_in_subprocess(index: int, backend: str, reason: str) -> None:
    """``check(REGRESSIONS[index], backend)`` in a fresh interpreter: xfail if PyTorch kills
    it by a signal, fail on any other error."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {tests!r}); import test_randomized as t; "
            f"t.check(t.REGRESSIONS[{index}], {backend!r}, None)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    if run.returncode < 0:
        pytest.xfail(f"{reason}: killed by signal {-run.returncode} ({torch.__version__})")
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize(("d", "backend"), _params(TORCH_DRAWS, _backends))
def test_random_draw(d, backend, monkeypatch):
    _skip_covered(d, backend)
    check(d, backend, monkeypatch)


@pytest.mark.parametrize(("d", "backend"), _params(TRITON_DRAWS, _backends))
def test_random_tiny_draw_with_triton(d, backend, monkeypatch):
    _skip_triton(backend)
    _skip_covered(d, backend)
    check(d, backend, monkeypatch)


@pytest.mark.parametrize(("d", "backend"), _params(REGRESSIONS, _backends))
def test_regression(d, backend, monkeypatch):
    _skip_triton(backend)
    reason = PYTORCH_CRASHES.get(d.id(backend))
    if reason is not None:
        check_in_subprocess(REGRESSIONS.index(d), backend, reason)
    else:
        check(d, backend, monkeypatch)


@pytest.mark.parametrize("d", INVALID_DRAWS, ids=lambda d: d.id())
def test_random_input_smaller_than_kernel_raises(d):
    case = d.case
    x, bank, routing, bias_bank = inputs(d)
    with pytest.raises(RuntimeError):  # PyTorch agrees that it is no convolution
        F.conv2d(torch.empty(1, case.cin, case.h, case.w, device="meta"),
                 torch.empty(bank.shape[1:], device="meta"), None, **case.geometry)
    for backend in BACKEND_NAMES:
        if backend == TRITON and not TRITON_RUNS:
            continue
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            dynamic_conv2d(x, bank, routing, bias_bank, backend=backend, **case.geometry)
