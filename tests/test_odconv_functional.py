"""ODConv's per-sample scales of ``dynamic_conv2d`` (``in_scale`` (B, Cin), ``out_scale``
(B, Cout), ``tap_scale`` (B, kh, kw)) on every backend, against an independent float64
per-sample reference written from the formula, not from the library:

    M_b[o, i, t] = out_scale[b, o] * in_scale[b, g(o) * Cin / G + i] * tap_scale[b, t]
                   * sum_k a[b, k] W_k[o, i, t]
    y[b]         = conv2d(x[b], M_b, stride, padding, dilation, groups) + sum_k a[b, k] bias[k]

(the bias is not scaled; an absent scale is 1). Checked: y and the gradients of all seven
inputs over geometries (strides, int / pair / "same" / "same_tf" padding with odd totals,
dilations, groups, depthwise, 1x1, K = 1, batch 1, odd sizes), layouts (channels_last, which y
keeps, and non-contiguous), each scale alone and all together, the empty batch, double
backward, bad arguments, ``torch.compile``, what the native backend saves for backward, and
randomized draws (the geometry generator of test_randomized.py with scales added: a parallel
stream here, so that the draws of test_randomized.py stay what they were).

Tolerances are the project's rounding bound (helpers.assert_within_bound): each element within
``n * u`` (u the dtype's unit roundoff) of its scale, the sum of |terms| (the reference run on
absolute values), n the longest chain of roundings behind it. The scales add at most three
products to a chain, and a scale's gradient sums a per-sample gradient over the pixels of x or
y, so the chains of :func:`helpers.reduction_lengths` are lengthened accordingly (see
``_forward_length`` / ``_backward_length``).
"""

from __future__ import annotations

import dataclasses
import functools
import random

import pytest
import test_randomized as randomized
import torch
import torch.nn.functional as F
from helpers import (
    PYTORCH_BACKENDS,
    Case,
    assert_within_bound,
    backward_reduction_length,
    case_id,
    forward_reduction_length,
    make_inputs,
    output_hw,
    timm_pad_same,
    upstream_gradient,
)
from torch.autograd import gradcheck, gradgradcheck

from dynconv import dynamic_conv2d
from dynconv.backends.native import op as native
from dynconv.backends.registry import BACKEND_NAMES
from dynconv.kernels._common import interpreter_enabled

TRITON = "triton"
# Triton runs on CUDA tensors where there is a GPU, else on CPU tensors under the interpreter
# (switched on by conftest.py); everything else, and the reference, on the CPU.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNS = TRITON_DEVICE.type == "cuda" or interpreter_enabled()
# "auto" is native on the CPU; it is checked as a name of its own all the same.
CPU_BACKENDS = PYTORCH_BACKENDS  # loop, grouped, native, auto
FLOAT64_BACKENDS = tuple(name for name in PYTORCH_BACKENDS if name != "auto")

SCALES = ("in_scale", "out_scale", "tap_scale")
INPUT_NAMES = ("x", "weight_bank", "routing", "bias_bank", *SCALES)
# Elements whose scale is ~0 (all-padding windows without bias) must come out ~0: a few ulps
# of 1, as in test_randomized.py.
ATOL = {torch.float32: 1e-6, torch.float64: 1e-14}

pytestmark = [
    # The reference's F.conv2d warns that padding="same" with an even kernel pads a copy.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
    # fp32 dots in ieee (tests/conftest.py), which the fp32 Triton kernels follow.
    pytest.mark.usefixtures("fp32_dots"),
]


# --- the float64 reference, from the formula ---------------------------------------------------


def input_channel_of_weight(out_channels: int, in_per_group: int, groups: int) -> torch.Tensor:
    """(Cout, Cin/G) long: the input channel that weight (o, i) reads, g(o) * Cin/G + i with
    g(o) = o // (Cout / G) the group of output channel o."""
    per_group_out = out_channels // groups
    return torch.tensor([[(o // per_group_out) * in_per_group + i for i in range(in_per_group)]
                         for o in range(out_channels)], dtype=torch.long)


def reference_odconv2d(x, bank, routing, bias_bank, in_scale, out_scale, tap_scale, *, stride,
                       padding, dilation, groups):
    """One explicitly built M_b and one ``F.conv2d`` per sample (B >= 1), in the inputs' dtype.
    ``padding="same_tf"`` pads x as timm's ``Conv2dSame`` first."""
    if padding == "same_tf":
        x, padding = timm_pad_same(x, bank.shape[3:], stride, dilation), 0
    num_experts, out_channels, in_per_group = bank.shape[:3]
    channel = input_channel_of_weight(out_channels, in_per_group, groups)
    outputs = []
    for b in range(x.shape[0]):
        m = sum(routing[b, k] * bank[k] for k in range(num_experts))  # (Cout, Cin/G, kh, kw)
        if in_scale is not None:
            m = m * in_scale[b][channel][:, :, None, None]
        if out_scale is not None:
            m = m * out_scale[b][:, None, None, None]
        if tap_scale is not None:
            m = m * tap_scale[b][None, None]
        bias = None
        if bias_bank is not None:
            bias = sum(routing[b, k] * bias_bank[k] for k in range(num_experts))
        outputs.append(F.conv2d(x[b:b + 1], m, bias, stride, padding, dilation, groups))
    return torch.cat(outputs)


def _as_float64(t):
    return None if t is None else t.detach().double().cpu()


def reference_with_scales(tensors: dict, grad_out: torch.Tensor, geometry: dict):
    """([y, *grads], [their error scales]) in float64 for the (already rounded) ``tensors``
    (INPUT_NAMES -> tensor or None): autograd through the reference, then the same run on
    absolute values (each element's sum of |terms|, which rounding errors grow with)."""

    def run(transform):
        leaves = {name: None if t is None else transform(_as_float64(t)).requires_grad_(True)
                  for name, t in tensors.items()}
        y = reference_odconv2d(*(leaves[name] for name in INPUT_NAMES), **geometry)
        y.backward(transform(_as_float64(grad_out)))
        return [y.detach()] + [leaves[name].grad for name in INPUT_NAMES
                               if leaves[name] is not None]

    return run(lambda t: t), run(torch.abs)


def _forward_length(case: Case) -> int:
    # The plain chain, plus the three scale products.
    return forward_reduction_length(case) + 3


def _backward_length(case: Case) -> int:
    # A scale's gradient sums a per-sample gradient (a backward or forward chain) over the
    # pixels of x (in_scale) or y (out_scale), or over the weights (tap_scale); an upper bound
    # is the sum of the plain chains, the pixels of x and the scale products.
    return (forward_reduction_length(case) + backward_reduction_length(case)
            + case.h * case.w + 3)


# --- inputs ------------------------------------------------------------------------------------


def make_scales(case: Case, which=SCALES, dtype=torch.float64, device="cpu", seed: int = 7,
                signed: bool = False) -> dict:
    """{name: tensor or None} for the three scales of ``case``: the ones in ``which`` drawn in
    float64 (seeded), rounded to ``dtype``. ODConv's are sigmoids, in (0, 1); ``signed`` draws
    standard normal values instead (a sign or index error cannot hide behind positivity)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"in_scale": (case.batch, case.cin), "out_scale": (case.batch, case.cout),
              "tap_scale": (case.batch, *case.kernel)}
    scales = {}
    for name in SCALES:
        value = torch.randn(shapes[name], generator=gen, dtype=torch.float64)
        if not signed:
            value = torch.sigmoid(2 * value)
        scales[name] = value.to(device, dtype) if name in which else None
    return scales


def run_backend(backend: str, tensors: dict, grad_out, geometry: dict):
    """(y, [gradients of the given tensors, in INPUT_NAMES order]) of ``backend``."""
    leaves = {name: None if t is None else t.detach().requires_grad_(True)
              for name, t in tensors.items()}
    y = dynamic_conv2d(leaves["x"], leaves["weight_bank"], leaves["routing"],
                       leaves["bias_bank"], backend=backend, **geometry,
                       **{name: leaves[name] for name in SCALES})
    y.backward(grad_out)
    return y.detach(), [leaves[name].grad for name in INPUT_NAMES if leaves[name] is not None]


@functools.lru_cache(maxsize=8)
def _expected_of_case(case: Case, which: tuple[str, ...], dtype: torch.dtype, signed: bool):
    """(upstream gradient, [y, *grads], [their error scales]) of the reference on ``case``'s
    inputs rounded to ``dtype``: computed once for all the backends that check the case."""
    x, bank, routing, bias_bank = make_inputs(case, dtype)
    tensors = dict(zip(INPUT_NAMES[:4], (x, bank, routing, bias_bank)))
    tensors.update(make_scales(case, which, dtype, signed=signed))
    grad_out = upstream_gradient((case.batch, case.cout, *output_hw(case)), dtype)
    return (grad_out, *reference_with_scales(tensors, grad_out, case.geometry))


def check_against_reference(case: Case, backend: str, which=SCALES, dtype=torch.float32,
                            signed: bool = False) -> None:
    """y and every gradient of ``backend`` on ``case`` with the scales ``which`` against the
    float64 reference, within the rounding bound of ``dtype``; y keeps a channels_last x's
    layout."""
    device = TRITON_DEVICE if backend == TRITON else torch.device("cpu")
    grad_out, wants, scales = _expected_of_case(case, tuple(which), dtype, signed)
    x, bank, routing, bias_bank = make_inputs(case, dtype, device)
    tensors = dict(zip(INPUT_NAMES[:4], (x, bank, routing, bias_bank)))
    tensors.update(make_scales(case, which, dtype, device, signed=signed))
    y, grads = run_backend(backend, tensors, grad_out.to(device), case.geometry)
    if case.layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "y lost channels_last"
    names = ["y"] + [f"grad {name}" for name in INPUT_NAMES if tensors[name] is not None]
    lengths = [_forward_length(case)] + [_backward_length(case)] * (len(names) - 1)
    for got, want, scale, name, length in zip([y, *grads], wants, scales, names, lengths):
        assert_within_bound(got, want, scale, dtype, length, atol=ATOL[dtype], name=name)


# --- every backend against the reference -------------------------------------------------------

# Case(batch, cin, cout, H, W, (kh, kw), stride, padding, dilation, groups, K, bias[, layout])
CASES = [
    Case(2, 3, 5, 7, 6, (1, 1), 1, 0, 1, 1, 3, True),  # 1x1
    Case(3, 4, 6, 9, 7, (3, 3), 2, 1, 1, 2, 4, True),  # stride 2, groups 2
    Case(1, 5, 7, 8, 9, (3, 3), 1, "same", 2, 1, 1, False),  # batch 1, K = 1, dilation 2
    # depthwise with a channel multiplier of 2 (in_scale[b, o // 2]), channels_last
    Case(2, 3, 6, 7, 7, (3, 3), 1, 2, 2, 3, 3, True, "channels_last"),
    Case(2, 4, 6, 8, 7, (2, 2), 1, "same", 1, 2, 2, True),  # even kernel: an odd "same" total
    # TF "same" at a pair stride (odd totals on both axes), non-square kernel, non-contiguous x
    Case(2, 3, 4, 9, 8, (3, 2), (2, 3), "same_tf", (1, 2), 1, 3, True, "strided"),
    Case(2, 8, 4, 5, 6, (3, 3), (2, 1), (0, 1), 1, 4, 2, False),  # groups 4, pair geometry
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_all_scales_match_float64_reference(backend, case):
    check_against_reference(case, backend)


# Each scale alone (the others absent), on a grouped case with a bias (a bias must not be
# scaled by out_scale, nor dropped when the tap scale folds the bank) and signed scales.
ALONE_CASE = Case(2, 4, 6, 6, 5, (3, 2), 1, 1, (1, 2), 2, 3, True, "channels_last")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_each_scale_alone(backend, scale):
    check_against_reference(ALONE_CASE, backend, which=(scale,), signed=True)


def test_float64_all_scales_signed():
    # float64 on the backends that compute in it: the bound is ~1e-13 relative, so any
    # formula slip (e.g. the bias scaled, the in_scale of the wrong group) shows at once.
    for backend in FLOAT64_BACKENDS:
        check_against_reference(CASES[1], backend, dtype=torch.float64, signed=True)


# Tiny cases for triton (the interpreter without a GPU is slow): float32 only.
TRITON_CASES = [
    Case(2, 3, 4, 5, 5, (3, 3), 1, 1, 1, 1, 2, True),
    Case(2, 4, 4, 5, 4, (2, 2), 2, "same_tf", 1, 2, 2, True, "channels_last"),
    Case(1, 3, 6, 4, 5, (3, 1), 1, (1, 0), (2, 1), 3, 1, False, "strided"),  # depthwise, K = 1
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_all_scales_match_float64_reference(case):
    if not TRITON_RUNS:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)")
    check_against_reference(case, TRITON)


# --- the empty batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_empty_batch_with_all_scales(backend):
    if backend == TRITON and not TRITON_RUNS:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)")
    device = TRITON_DEVICE if backend == TRITON else torch.device("cpu")
    case = Case(0, 4, 6, 5, 5, (3, 3), 1, 1, 1, 2, 3, True)
    x, bank, routing, bias_bank = make_inputs(case, torch.float32, device)
    tensors = dict(zip(INPUT_NAMES[:4], (x, bank, routing, bias_bank)))
    tensors.update(make_scales(case, SCALES, torch.float32, device))
    grad_out = torch.empty(0, case.cout, 5, 5, device=device)
    y, grads = run_backend(backend, tensors, grad_out, case.geometry)
    assert y.shape == (0, case.cout, 5, 5) and y.dtype == torch.float32
    for name, grad in zip(INPUT_NAMES, grads):
        assert grad is not None, f"grad {name} missing"
        assert grad.shape == tensors[name].shape and grad.dtype == torch.float32, name
    # Sums over no samples: exact zeros for the bank and the bias bank.
    assert torch.equal(grads[1], torch.zeros_like(bank)), "grad weight_bank"
    assert torch.equal(grads[3], torch.zeros_like(bias_bank)), "grad bias_bank"


# --- double backward ---------------------------------------------------------------------------

TINY = Case(2, 4, 4, 4, 4, (3, 2), (2, 1), 1, (1, 2), 2, 2, True)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    x, bank, routing, bias_bank = make_inputs(TINY)
    scales = make_scales(TINY, signed=True)
    leaves = tuple(t.requires_grad_(True) for t in (x, bank, routing, bias_bank,
                                                    *scales.values()))

    def fn(x, bank, routing, bias_bank, in_scale, out_scale, tap_scale):
        return dynamic_conv2d(x, bank, routing, bias_bank, backend=backend, **TINY.geometry,
                              in_scale=in_scale, out_scale=out_scale, tap_scale=tap_scale)

    assert gradcheck(fn, leaves, fast_mode=True)
    assert gradgradcheck(fn, leaves, fast_mode=True)


# --- bad arguments -----------------------------------------------------------------------------

BAD_CASE = Case(2, 4, 6, 5, 5, (3, 2), 1, 1, 1, 2, 3, True)
B, CIN, COUT = BAD_CASE.batch, BAD_CASE.cin, BAD_CASE.cout
BAD_SCALES = [
    # (argument, value, error, message)
    ("in_scale", torch.ones(B, CIN // 2), ValueError,
     r"in_scale must have shape \(B, Cin\) = \(2, 4\) .* got \(2, 2\)"),  # Cin / groups
    ("in_scale", torch.ones(B + 1, CIN), ValueError, r"in_scale must have shape"),
    ("out_scale", torch.ones(B, COUT, 1, 1), ValueError,
     r"out_scale must have shape \(B, Cout\) = \(2, 6\) .* got \(2, 6, 1, 1\)"),
    ("out_scale", torch.ones(COUT), ValueError, r"out_scale must have shape"),  # no batch
    ("tap_scale", torch.ones(B, 6), ValueError,
     r"tap_scale must have shape \(B, kh, kw\) = \(2, 3, 2\) .* got \(2, 6\)"),  # flattened
    ("tap_scale", torch.ones(B, 2, 3), ValueError, r"tap_scale must have shape"),  # kw, kh
    ("out_scale", torch.ones(B, COUT, dtype=torch.float64), TypeError,
     r"out_scale has dtype torch.float64 but x has dtype torch.float32"),
    ("tap_scale", torch.ones(B, 3, 2, dtype=torch.int64), TypeError,
     r"tap_scale must be a floating-point tensor, got dtype torch.int64"),
    ("in_scale", torch.ones(B, CIN, dtype=torch.bool), TypeError,
     r"in_scale must be a floating-point tensor"),
    ("in_scale", [[1.0] * CIN] * B, TypeError, r"in_scale must be a torch.Tensor, got list"),
    ("tap_scale", torch.ones(B, 3, 2).numpy(), TypeError,
     r"tap_scale must be a torch.Tensor, got ndarray"),
    ("out_scale", 1.0, TypeError, r"out_scale must be a torch.Tensor, got float"),
    # A device that exists on every machine: meta (no values).
    ("in_scale", torch.ones(B, CIN, device="meta"), ValueError,
     r"in_scale is on meta but x is on cpu"),
]


@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_SCALES,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_SCALES)])
def test_bad_scale_is_refused_naming_it(name, value, error, message):
    x, bank, routing, bias_bank = make_inputs(BAD_CASE, torch.float32)
    good = make_scales(BAD_CASE, SCALES, torch.float32)
    for backend in BACKEND_NAMES:  # checked before any backend runs, the same for each
        with pytest.raises(error, match=message):
            dynamic_conv2d(x, bank, routing, bias_bank, backend=backend, **BAD_CASE.geometry,
                           **{**good, name: value})


# --- torch.compile ---------------------------------------------------------------------------


def test_compiled_native_with_all_scales_matches_eager():
    torch._dynamo.reset()
    case = Case(2, 4, 6, 6, 5, (3, 3), 1, 1, 1, 2, 3, True)
    x, bank, routing, bias_bank = make_inputs(case, torch.float32)
    scales = make_scales(case, SCALES, torch.float32)

    def fn(x, bank, routing, bias_bank, in_scale, out_scale, tap_scale):
        return dynamic_conv2d(x, bank, routing, bias_bank, backend="native", **case.geometry,
                              in_scale=in_scale, out_scale=out_scale, tap_scale=tap_scale)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    inputs = (x, bank, routing, bias_bank, *scales.values())
    eager_leaves = [t.clone().requires_grad_(True) for t in inputs]
    compiled_leaves = [t.clone().requires_grad_(True) for t in inputs]
    want, got = fn(*eager_leaves), compiled(*compiled_leaves)
    # Inductor may fuse and reorder the fp32 elementwise scaling and sums: agreement to fp32
    # rounding of sums of a few dozen O(1) terms (~1e-6), not bit for bit.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad_out = upstream_gradient(want.shape, torch.float32)
    want.backward(grad_out)
    got.backward(grad_out)
    for name, a, b in zip(INPUT_NAMES, compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


# --- memory: what the native backend saves for backward ---------------------------------------

# Above the saving threshold, max(SAVE_MIXED_MAX_FRACTION * x bytes, SAVE_MIXED_MIN_BYTES):
# |W| = 256 * 256 * 3 * 3 fp32 = 2.25 MiB, so B = 8 samples of mixed weights are 18 MiB, above
# the 16 MiB floor; x (8 x 256 x 4 x 4 fp32, 128 KiB) is far from it. The threshold is the
# library's default, not lowered: this is the layer size where the contract applies.
MEMORY_CASE = Case(8, 256, 256, 4, 4, (3, 3), 1, 1, 1, 1, 2, True)


@functools.lru_cache(maxsize=1)
def _saved_by_native_with_all_scales() -> tuple[int, list[tuple[tuple[int, ...], bool]]]:
    """(B x |W|, [(shape, whether it is one of the caller's tensors)] of what the native
    backend's forward on MEMORY_CASE, all three scales given, saves for backward)."""
    case = MEMORY_CASE
    x, bank, routing, bias_bank = make_inputs(case, torch.float32)
    weight_numel = case.cout * case.cin // case.groups * case.kernel[0] * case.kernel[1]
    mixed_numel = case.batch * weight_numel
    mixed_bytes = mixed_numel * x.element_size()
    assert mixed_bytes > max(native.SAVE_MIXED_MAX_FRACTION * x.numel() * x.element_size(),
                             native.SAVE_MIXED_MIN_BYTES), "MEMORY_CASE is below the threshold"
    scales = make_scales(case, SCALES, torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, bank, routing, bias_bank, *scales.values())]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dynamic_conv2d(*leaves[:4], backend="native", **case.geometry,
                           **dict(zip(SCALES, leaves[4:])))
    assert y.grad_fn is not None and saved, "nothing saved for backward"
    inputs = {t.data_ptr() for t in leaves}
    return mixed_numel, [(tuple(t.shape), t.data_ptr() in inputs) for t in saved]


def test_native_with_all_scales_saves_no_mixed_weights():
    # The B per-sample kernels (B x |W| elements, in any shape) are never kept.
    mixed_numel, saved = _saved_by_native_with_all_scales()
    mixed = [shape for shape, _ in saved if torch.Size(shape).numel() == mixed_numel]
    assert not mixed, f"saved for backward: B x |W| mixed weights {mixed}"


def test_native_with_all_scales_saves_nothing_as_large_as_mixed_weights():
    # Nothing of its own (the caller's x and bank cost nothing extra to keep) as large as the
    # B x |W| mixed weights that the saving threshold exists to avoid.
    mixed_numel, saved = _saved_by_native_with_all_scales()
    too_large = [shape for shape, is_input in saved
                 if torch.Size(shape).numel() >= mixed_numel and not is_input]
    assert not too_large, f"saved for backward, of at least B x |W| elements: {too_large}"


# --- randomized draws --------------------------------------------------------------------------
# test_randomized.py's generator draws the geometry, layouts, dtype, routing, native plan and
# triton strategy; the scales are drawn here from a stream of their own. Sizes (about 5 s on
# two CPU cores)::
#
#     DYNCONV_RANDOM_SEED=0                  first seed (as in test_randomized.py)
#     DYNCONV_RANDOM_ODCONV_CASES=12         draws for the PyTorch backends
#     DYNCONV_RANDOM_ODCONV_TRITON_CASES=3   tiny draws for triton (and the PyTorch backends)
#
# ``DYNCONV_RANDOM_SEED=<seed>`` with ``DYNCONV_RANDOM_ODCONV_CASES=1`` replays one draw.

ODCONV_CASES = randomized._env_int("DYNCONV_RANDOM_ODCONV_CASES", 12)
ODCONV_TRITON_CASES = randomized._env_int("DYNCONV_RANDOM_ODCONV_TRITON_CASES", 3)


@dataclasses.dataclass(frozen=True)
class ScaledDraw:
    """A test_randomized Draw and its scales: which are given, signed or sigmoid values."""

    draw: randomized.Draw
    which: tuple[str, ...]
    signed: bool

    def id(self, backend: str) -> str:
        present = "+".join(name.split("_")[0] for name in self.which)
        return f"{self.draw.id(backend)}-{present}{'-signed' if self.signed else ''}"


def scaled_draw(seed: int, stream: str) -> ScaledDraw:
    """The draw of ``seed``: the geometry from test_randomized's generator ("odconv": fresh
    full-size draws; "triton": the triton stream's tiny ones), then each scale present with
    probability 3/4 (at least one), signed in a third of the draws."""
    sizes = randomized.SIZES["torch"] if stream == "odconv" else None
    d = randomized.draw(seed, stream, sizes)
    rng = random.Random(f"dynconv-odconv-scales-{stream}-{seed}")
    which = tuple(name for name in SCALES if rng.random() < 0.75) or (rng.choice(SCALES),)
    return ScaledDraw(d, which, rng.random() < 1 / 3)


def _draw_tensors(sd: ScaledDraw, device="cpu") -> dict:
    """The draw's seven inputs (absent ones None), in its dtype and layouts, on ``device``."""
    d = sd.draw
    tensors = dict(zip(INPUT_NAMES[:4], randomized.inputs(d, device)))
    scales = make_scales(d.case, sd.which, d.dtype, device, seed=d.seed + 3, signed=sd.signed)
    if d.strided_operands:  # non-contiguous scales as well
        scales = {name: None if t is None else randomized._every_other_column(t)
                  for name, t in scales.items()}
    tensors.update(scales)
    return tensors


@functools.lru_cache(maxsize=4)
def _expected(sd: ScaledDraw):
    """(upstream gradient, names, wants, error scales, lengths) of a draw."""
    case, dtype = sd.draw.case, sd.draw.dtype
    tensors = _draw_tensors(sd)
    grad_out = upstream_gradient(randomized.output_shape(case), dtype, seed=sd.draw.seed + 1)
    present = [name for name in INPUT_NAMES if tensors[name] is not None]
    names = ["y"] + [f"grad {name}" for name in present]
    if case.batch == 0:  # an empty output; the bank gradients are exact zeros
        wants = [torch.zeros(grad_out.shape, dtype=torch.float64)] + [
            torch.zeros(tensors[name].shape, dtype=torch.float64) for name in present]
        scales = wants
    else:
        wants, scales = reference_with_scales(tensors, grad_out, case.geometry)
    lengths = [_forward_length(case)] + [_backward_length(case)] * len(present)
    return grad_out, names, wants, scales, lengths


def check_draw(sd: ScaledDraw, backend: str, monkeypatch) -> None:
    d = sd.draw
    grad_out, names, wants, scales, lengths = _expected(sd)
    device = TRITON_DEVICE if backend == TRITON else torch.device("cpu")
    tensors = _draw_tensors(sd, device)
    leaves = {name: None if t is None else t.requires_grad_(True) for name, t in tensors.items()}
    with randomized._backend_context(d, backend, monkeypatch):
        y = dynamic_conv2d(leaves["x"], leaves["weight_bank"], leaves["routing"],
                           leaves["bias_bank"], backend=backend, **d.case.geometry,
                           **{name: leaves[name] for name in SCALES})
        assert y.shape == grad_out.shape, f"y: shape {tuple(y.shape)} != {tuple(grad_out.shape)}"
        if d.case.layout == "channels_last" and not leaves["x"].is_contiguous():
            assert y.is_contiguous(memory_format=torch.channels_last), "y lost channels_last"
        y.backward(randomized._with_layout(grad_out.to(device), d.grad_layout))
    got = [y] + [leaves[name].grad for name in INPUT_NAMES if leaves[name] is not None]
    for value, want, scale, name, length in zip(got, wants, scales, names, lengths):
        if d.case.batch == 0:
            assert value is not None, f"{name} missing"
            assert value.shape == want.shape and value.dtype == d.dtype, name
            if name in ("grad weight_bank", "grad bias_bank"):
                assert torch.equal(value.cpu(), want.to(d.dtype)), f"{name} not exact zeros"
            continue
        assert_within_bound(value, want, scale, d.dtype, length, atol=ATOL[d.dtype], name=name)


def _backends_of(sd: ScaledDraw):
    d = sd.draw
    return CPU_BACKENDS + ((TRITON,) if d.dtype == torch.float32 and d.triton_strategy else ())


SEED = randomized.SEED
# The interpreter is slow and its cost grows with K x kh x kw (the experts of a bank folded per
# tap, where the tap scale is folded): the triton draws keep to those with at most
# MAX_TRITON_FOLDED (the PyTorch draws take any).
MAX_TRITON_FOLDED = 18


def _triton_draws(count: int) -> list[ScaledDraw]:
    draws, seed = [], SEED
    while len(draws) < count:
        sd = scaled_draw(seed, "triton")
        kernel = sd.draw.case.kernel
        if sd.draw.case.experts * kernel[0] * kernel[1] <= MAX_TRITON_FOLDED:
            draws.append(sd)
        seed += 1
    return draws


DRAWS = ([scaled_draw(SEED + i, "odconv") for i in range(ODCONV_CASES)]
         + _triton_draws(ODCONV_TRITON_CASES))


@pytest.mark.parametrize(("sd", "backend"), [
    pytest.param(sd, backend, id=sd.id(backend)) for sd in DRAWS for backend in _backends_of(sd)])
def test_random_draw_with_scales(sd, backend, monkeypatch):
    if backend == TRITON and not TRITON_RUNS:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)")
    check_draw(sd, backend, monkeypatch)


def test_input_channel_of_weight_follows_the_groups():
    # The reference's own index map, by hand: Cout 4, Cin 6, groups 2 (3 inputs per group).
    assert input_channel_of_weight(4, 3, 2).tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5],
                                                         [3, 4, 5]]
    # Depthwise with a multiplier of 2: output o reads channel o // 2.
    assert input_channel_of_weight(6, 1, 3).flatten().tolist() == [0, 0, 1, 1, 2, 2]
