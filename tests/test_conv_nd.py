"""1-D and 3-D dynamic convolution: the whole contract, on every backend.

``dynamic_conv1d`` runs on the 2-D backends through an H = 1 view, ``dynamic_conv3d`` as one 2-D
dynamic convolution per depth tap over the folded (batch, output depth) planes; both are checked
here against an independent float64 per-sample ``F.conv1d`` / ``F.conv3d`` loop (written from
the formula, no code of the library), y and the gradients of x, the bank, the bias bank and the
routing, over fixed and randomly drawn geometries; then empty batches, layouts, double
backward, meta tensors, NumPy integers, errors, torch.compile, torch.export and ONNX, and the
modules (router, shared routing, from_conv, convert, BatchNorm folding, state).
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv import (
    DynamicConv1d,
    DynamicConv3d,
    convert_conv1d,
    convert_conv3d,
    dynamic_conv1d,
    dynamic_conv3d,
)

FUNCTIONAL = {1: dynamic_conv1d, 3: dynamic_conv3d}
TORCH_CONV = {1: F.conv1d, 3: F.conv3d}
PYTORCH_BACKENDS = ("loop", "grouped", "native", "auto")


# --- the reference -----------------------------------------------------------------------------


def _tf_same_pad(x, kernel, stride, dilation):
    """x padded as TensorFlow's "SAME" (timm's Conv2dSame, on n axes): total per axis
    max((ceil(s / stride) - 1) * stride + (k - 1) * d + 1 - s, 0), the odd pixel at the end."""
    pads = []
    for size, k, s, d in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride),
                             reversed(dilation)):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def reference(x, bank, routing, bias, stride, padding, dilation, groups):
    """Per sample: W_b = sum_k a[b, k] bank[k] (and its bias), then F.conv{n}d, in float64."""
    n = x.dim() - 2
    as_tuple = (lambda v: (v,) * n if isinstance(v, int) else tuple(v))
    stride, dilation = as_tuple(stride), as_tuple(dilation)
    outs = []
    for b in range(x.shape[0]):
        weight = sum(routing[b, k] * bank[k] for k in range(bank.shape[0]))
        b_bias = None if bias is None else sum(routing[b, k] * bias[k]
                                               for k in range(bank.shape[0]))
        sample = x[b:b + 1]
        pad = padding
        if padding == "same_tf":
            sample, pad = _tf_same_pad(sample, bank.shape[3:], stride, dilation), 0
        outs.append(TORCH_CONV[n](sample, weight, b_bias, stride, pad, dilation, groups))
    if not outs:
        return None
    return torch.cat(outs)


# float64 throughout: every value is a sum of at most a few hundred products, each rounded at
# 2**-53; 1e-10 relative leaves a margin of ~1e4 over that and catches any wrong term.
F64 = {"rtol": 1e-10, "atol": 1e-10}
# float32 through the Triton interpreter's fp32 dots (ieee) against the float64 reference: a few
# hundred products at 2**-24 each.
F32 = {"rtol": 2e-5, "atol": 2e-5}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t.transpose(1, 2).contiguous().transpose(1, 2)  # 1-D: channels innermost
    if layout == "strided":  # every other position of the last axis: contiguous in no format
        wide = torch.repeat_interleave(t, 2, dim=-1)
        return wide[..., ::2]
    return t.contiguous()


def inputs(n, batch, cin, cout, size, kernel, groups, experts, bias, dtype=torch.float64,
           layout="nchw", seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial = (size,) * n if isinstance(size, int) else tuple(size)
    kernel = (kernel,) * n if isinstance(kernel, int) else tuple(kernel)
    x = torch.randn(batch, cin, *spatial, generator=generator, dtype=torch.float64)
    bank = torch.randn(experts, cout, cin // groups, *kernel, generator=generator,
                       dtype=torch.float64) * 0.3
    routing = torch.softmax(torch.randn(batch, experts, generator=generator,
                                        dtype=torch.float64), dim=1)
    bias_bank = (torch.randn(experts, cout, generator=generator, dtype=torch.float64)
                 if bias else None)
    tensors = [_layout(x.to(dtype), layout), bank.to(dtype), routing.to(dtype),
               None if bias_bank is None else bias_bank.to(dtype)]
    return [None if t is None else t.requires_grad_(True) for t in tensors]


def check(n, backend, args, geometry, tolerance=F64):
    """y and every gradient of the backend against the float64 reference."""
    stride, padding, dilation, groups = geometry
    leaves = [t for t in args if t is not None]
    y = FUNCTIONAL[n](*args, stride, padding, dilation, groups, backend=backend)
    doubles = [None if t is None else t.detach().double().requires_grad_(True) for t in args]
    want = reference(*doubles, stride, padding, dilation, groups)
    assert y.shape == want.shape, (y.shape, want.shape)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, grad_out.to(y.dtype))
    wanted = torch.autograd.grad(want, [t for t in doubles if t is not None], grad_out)
    torch.testing.assert_close(y.double(), want, **tolerance, msg="y")
    for name, g, w in zip(("x", "bank", "routing", "bias"), got, wanted):
        torch.testing.assert_close(g.double(), w, **tolerance, msg=f"grad {name}")
    return y


# --- fixed geometries --------------------------------------------------------------------------

CASES_1D = [
    # (batch, cin, cout, length, kernel, stride, padding, dilation, groups, experts, bias, layout)
    (3, 6, 8, 17, 5, 1, 2, 1, 2, 4, True, "nchw"),
    (1, 4, 4, 9, 3, 2, 1, 2, 4, 3, False, "channels_last"),  # depthwise, batch 1
    (2, 6, 4, 11, 4, 1, "same", 1, 1, 17, True, "strided"),  # even kernel: asymmetric pad
    (3, 4, 6, 10, 3, 3, "same_tf", 1, 2, 2, True, "channels_last"),
    (2, 4, 4, 8, 3, 1, "valid", 3, 1, 1, True, "nchw"),
    (2, 3, 5, 7, 1, 2, 0, 1, 1, 4, True, "nchw"),
]
CASES_3D = [
    # (batch, cin, cout, (d, h, w), kernel, stride, padding, dilation, groups, experts, bias,
    #  layout)
    (2, 4, 6, (5, 7, 6), 3, 1, 1, 1, 2, 3, True, "nchw"),
    (1, 4, 4, (6, 5, 5), (2, 3, 1), (2, 1, 2), (1, 2, 0), (1, 2, 1), 4, 2, False,
     "channels_last"),
    (3, 2, 4, (4, 6, 5), (2, 2, 2), 1, "same", (2, 1, 1), 1, 4, True, "strided"),
    (2, 3, 3, (5, 5, 4), 3, 2, "same_tf", 1, 3, 2, True, "channels_last"),
    (2, 2, 4, (3, 3, 3), 1, 1, 0, 1, 1, 5, True, "nchw"),
]


def _case_id(case):
    return "-".join(str(v).replace(" ", "") for v in case)


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
@pytest.mark.parametrize("case", CASES_1D, ids=_case_id)
def test_conv1d_matches_the_reference(case, backend):
    batch, cin, cout, length, k, s, p, d, g, experts, bias, layout = case
    args = inputs(1, batch, cin, cout, length, k, g, experts, bias, layout=layout)
    y = check(1, backend, args, (s, p, d, g))
    if layout == "channels_last":  # a channels-innermost x gives a channels-innermost y
        assert y.stride(1) == 1


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
@pytest.mark.parametrize("case", CASES_3D, ids=_case_id)
def test_conv3d_matches_the_reference(case, backend):
    batch, cin, cout, size, k, s, p, d, g, experts, bias, layout = case
    args = inputs(3, batch, cin, cout, size, k, g, experts, bias, layout=layout)
    y = check(3, backend, args, (s, p, d, g))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("n, case", [(1, CASES_1D[0]), (1, CASES_1D[3]), (3, CASES_3D[0]),
                                     (3, CASES_3D[1])], ids=["1d-a", "1d-b", "3d-a", "3d-b"])
def test_triton_under_the_interpreter(n, case):
    """float32 (the kernels take no float64), the same reference; tiny shapes."""
    batch, cin, cout, size, k, s, p, d, g, experts, bias, layout = case
    args = inputs(n, batch, cin, cout, size, k, g, experts, bias, dtype=torch.float32,
                  layout=layout)
    check(n, "triton", args, (s, p, d, g), tolerance=F32)


# --- randomized draws --------------------------------------------------------------------------

RANDOM_CASES = int(os.environ.get("DYNCONV_RANDOM_ND_CASES", "24"))
RANDOM_SEED = int(os.environ.get("DYNCONV_RANDOM_SEED", "0"))


def draw(seed: int):
    """One 1-D or 3-D geometry (spatial sizes, kernel, stride, padding, dilation, groups, K,
    bias, layout), valid (the padded input holds the dilated kernel)."""
    rng = random.Random(seed)
    while True:
        n = rng.choice((1, 3))
        size = tuple(rng.randint(1, 12 if n == 1 else 6) for _ in range(n))
        kernel = tuple(rng.randint(1, 5 if n == 1 else 3) for _ in range(n))
        dilation = tuple(rng.randint(1, 2) for _ in range(n))
        stride = tuple(rng.randint(1, 3) for _ in range(n))
        padding = rng.choice(["int", "same", "same_tf", "valid"])
        if padding == "same":
            stride = (1,) * n
        elif padding == "int":
            padding = tuple(rng.randint(0, 2) for _ in range(n))
        groups = rng.choice((1, 2))
        cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
        case = (n, rng.randint(0, 3), cin, cout, size, kernel, stride, padding, dilation,
                groups, rng.randint(1, 5), rng.random() < 0.5,
                rng.choice(("nchw", "channels_last", "strided")))
        pad = (0,) * n if isinstance(padding, str) else padding
        if padding in ("same", "same_tf") or all(
                s + 2 * p >= d * (k - 1) + 1 for s, p, d, k in zip(size, pad, dilation, kernel)):
            return case


@pytest.mark.parametrize("seed", range(RANDOM_SEED, RANDOM_SEED + RANDOM_CASES))
def test_random_nd_draw(seed):
    """Every backend on the draw: the PyTorch ones in float64, triton (under the interpreter
    without a GPU; it takes no float64) in float32."""
    n, batch, cin, cout, size, k, s, p, d, g, experts, bias, layout = draw(seed)
    for backend in (*PYTORCH_BACKENDS, "triton"):
        dtype, tolerance = (torch.float32, F32) if backend == "triton" else (torch.float64, F64)
        args = inputs(n, batch, cin, cout, size, k, g, experts, bias, dtype=dtype,
                      layout=layout, seed=seed)
        if batch == 0:
            y = FUNCTIONAL[n](*args, s, p, d, g, backend=backend)
            assert y.shape[0] == 0
            continue
        check(n, backend, args, (s, p, d, g), tolerance=tolerance)


# --- edges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", (1, 3))
def test_empty_batch_and_meta_tensors(n):
    for backend in PYTORCH_BACKENDS:
        x, bank, routing, bias = inputs(n, 0, 4, 6, 5, 3, 1, 3, True)
        y = FUNCTIONAL[n](x, bank, routing, bias, 1, 1, backend=backend)
        assert y.shape == (0, 6) + (5,) * n
        y.sum().backward()
        assert bank.grad is not None and torch.count_nonzero(bank.grad) == 0
    meta = [t.detach().to("meta") for t in inputs(n, 2, 4, 6, 7, 3, 2, 3, True)]
    y = FUNCTIONAL[n](*meta, 2, "same_tf", 1, 2)
    assert y.device.type == "meta" and y.shape == (2, 6) + (4,) * n


@pytest.mark.parametrize("n", (1, 3))
def test_double_backward(n):
    """Second derivatives through the native backend equal the reference's."""
    args = inputs(n, 2, 4, 4, 5, 3, 2, 2, True)
    leaves = [t for t in args if t is not None]
    y = FUNCTIONAL[n](*args, 1, 1, 1, 2, backend="native")
    grads = torch.autograd.grad((y ** 2).sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum((g ** 2).sum() for g in grads), leaves)
    want_y = reference(*args, 1, 1, 1, 2)
    want_grads = torch.autograd.grad((want_y ** 2).sum(), leaves, create_graph=True)
    want = torch.autograd.grad(sum((g ** 2).sum() for g in want_grads), leaves)
    for g, w in zip(second, want):
        torch.testing.assert_close(g, w, **F64)


def test_numpy_integers_are_ints():
    x, bank, routing, bias = [t.detach() for t in inputs(1, 2, 4, 4, 9, 3, 2, 2, True)]
    y = dynamic_conv1d(x, bank, routing, bias, np.int64(2), (np.int32(1),), np.int64(1),
                       np.int64(2))
    torch.testing.assert_close(y, dynamic_conv1d(x, bank, routing, bias, 2, 1, 1, 2))


@pytest.mark.parametrize("call, error, message", [
    (lambda: dynamic_conv1d(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 4, 3),
                            torch.rand(2, 3)), ValueError, r"x must be 3-D \(B, C, L\)"),
    (lambda: dynamic_conv1d(torch.randn(2, 4, 9), torch.randn(3, 4, 4, 3, 3),
                            torch.rand(2, 3)), ValueError,
     r"weight_bank must be 4-D \(K, Cout, Cin // groups, k\)"),
    (lambda: dynamic_conv3d(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 4, 3, 3, 3),
                            torch.rand(2, 3)), ValueError, r"x must be 5-D \(B, C, D, H, W\)"),
    (lambda: dynamic_conv3d(torch.randn(2, 4, 5, 5, 5), torch.randn(3, 4, 4, 3, 3),
                            torch.rand(2, 3)), ValueError,
     r"weight_bank must be 6-D \(K, Cout, Cin // groups, kd, kh, kw\)"),
    (lambda: dynamic_conv3d(torch.randn(2, 4, 5, 5, 5), torch.randn(3, 4, 4, 3, 3, 3),
                            torch.rand(2, 3), stride=(1, 2)), TypeError,
     r"stride must be an int or a triple of ints, got \(1, 2\)"),
    (lambda: dynamic_conv1d(torch.randn(2, 4, 9), torch.randn(3, 4, 4, 3), torch.rand(2, 3),
                            padding=(1, 1)), TypeError,
     r"padding must be an int or a 1-tuple of ints"),
    (lambda: dynamic_conv1d(torch.randn(2, 4, 9), torch.randn(3, 4, 4, 3), torch.rand(2, 3),
                            stride=2, padding="same"), ValueError,
     r"padding='same' needs stride 1 \(as in nn.Conv1d\)"),
    (lambda: dynamic_conv3d(torch.randn(2, 4, 2, 5, 5), torch.randn(3, 4, 4, 3, 3, 3),
                            torch.rand(2, 3)), ValueError, "smaller than the dilated kernel"),
    (lambda: dynamic_conv1d(torch.randn(2, 4, 0), torch.randn(3, 4, 4, 1), torch.rand(2, 3)),
     ValueError, r"x must have L > 0 when B > 0"),
    (lambda: dynamic_conv1d(torch.randn(2, 4, 9), torch.randn(3, 4, 4, 3), torch.rand(2, 4)),
     ValueError, r"routing must have shape \(B, K\) = \(2, 3\)"),
])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- compile, export ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", (1, 3))
def test_torch_compile_fullgraph_dynamic(n):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = (DynamicConv1d(4, 6, 3, padding="same_tf", stride=2) if n == 1
             else DynamicConv3d(4, 6, 3, padding=1))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (2, 5):
        x = torch.randn(batch, 4, *((9,) if n == 1 else (4, 5, 6)), requires_grad=True)
        y = compiled(x)
        want = model(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)  # fp32, ~40-term sums
        (g,) = torch.autograd.grad(y.sum(), x)
        (w,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", (1, 3))
def test_onnx_export_with_a_dynamic_batch(n, tmp_path):
    torch.manual_seed(0)
    model = (DynamicConv1d(4, 6, 5, padding=2) if n == 1
             else DynamicConv3d(4, 6, 3, padding=1, groups=2)).eval()
    spatial = (11,) if n == 1 else (4, 6, 5)
    path = str(tmp_path / "model.onnx")
    program = torch.onnx.export(model, (torch.randn(2, 4, *spatial),), dynamo=True,
                                verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    program.save(path)
    ops = collections.Counter(node.domain or "ai.onnx" for node in onnx.load(path).graph.node)
    assert set(ops) == {"ai.onnx"}, ops
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 3, 8):
        x = torch.randn(batch, 4, *spatial)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        # fp32 through onnxruntime's kernels: rounding differences only
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", (1, 3))
def test_torch_export_with_a_dynamic_batch_saves_and_loads(n, tmp_path):
    torch.manual_seed(0)
    model = (DynamicConv1d(4, 6, 3, padding=1) if n == 1
             else DynamicConv3d(4, 6, 3, padding=1)).eval()
    spatial = (9,) if n == 1 else (4, 5, 5)
    program = torch.export.export(model, (torch.randn(2, 4, *spatial),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = tmp_path / "conv.pt2"
    torch.export.save(program, path)
    x = torch.randn(5, 4, *spatial)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = (f"import torch, dynconv; p = torch.export.load({str(path)!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"y = torch.load({str(tmp_path / 'y.pt')!r}); "
            f"torch.testing.assert_close(p.module()(x), y); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ), timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# --- modules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", (1, 3))
def test_modules_route_share_routing_and_save_temperature(n):
    torch.manual_seed(0)
    cls = DynamicConv1d if n == 1 else DynamicConv3d
    conv = cls(4, 6, 3, padding=1, num_experts=3, temperature=5.0)
    assert conv.weight.shape == (3, 6, 4) + (3,) * n
    x = torch.randn(2, 4, *((9,) if n == 1 else (4, 5, 5)))
    y, routing = conv(x, return_routing=True)
    assert routing.shape == (2, 3) and y.shape == (2, 6) + x.shape[2:]
    torch.testing.assert_close(routing.sum(1), torch.ones(2))
    torch.testing.assert_close(y, FUNCTIONAL[n](x, conv.weight, routing, conv.bias, 1, 1))
    shared = cls(4, 6, 3, padding=1, num_experts=3, router=False)
    with pytest.raises(ValueError, match="routing is required"):
        shared(x)
    assert shared(x, routing=routing).shape == y.shape
    conv.temperature = 2.5
    copy = cls(4, 6, 3, padding=1, num_experts=3)
    copy.load_state_dict(conv.state_dict())
    assert copy.temperature == 2.5
    with pytest.raises(ValueError, match="x must have shape"):
        conv(torch.randn(2, 5, *x.shape[2:]))


@pytest.mark.parametrize("n", (1, 3))
def test_from_conv_and_convert_keep_the_function(n):
    torch.manual_seed(0)
    static = (nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2) if n == 1
              else nn.Conv3d(4, 6, 3, padding=(1, 0, 1), dilation=(1, 2, 1)))
    x = torch.randn(3, 4, *((12,) if n == 1 else (5, 7, 6)))
    dynamic = (DynamicConv1d.from_conv1d(static, 4) if n == 1
               else DynamicConv3d.from_conv3d(static, 4))
    # a softmax mix of K copies of one kernel is that kernel: rounding differences only (fp32)
    torch.testing.assert_close(dynamic(x), static(x), rtol=1e-5, atol=1e-5)
    model = nn.Sequential(static, nn.ReLU())
    converted = convert_conv1d(model, 2) if n == 1 else convert_conv3d(model, 2)
    assert isinstance(converted[0], DynamicConv1d if n == 1 else DynamicConv3d)
    torch.testing.assert_close(converted(x), torch.relu(static(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=f"conv must be an nn.Conv{n}d"):
        (DynamicConv1d.from_conv1d if n == 1 else DynamicConv3d.from_conv3d)(nn.Conv2d(4, 6, 3))


@pytest.mark.parametrize("n", (1, 3))
def test_batchnorm_folds_into_the_bank(n):
    torch.manual_seed(0)
    conv = (DynamicConv1d if n == 1 else DynamicConv3d)(4, 6, 3, padding=1, dtype=torch.float64)
    bn = (nn.BatchNorm1d if n == 1 else nn.BatchNorm3d)(6, dtype=torch.float64)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.eval()
    x = torch.randn(2, 4, *((9,) if n == 1 else (3, 4, 5)), dtype=torch.float64)
    fused = dynconv.fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(fused(x), bn(conv(x)), **F64)
    with pytest.raises(TypeError, match=f"bn must be an nn.BatchNorm{n}d"):
        dynconv.fuse_conv_bn_eval(conv, nn.BatchNorm2d(6))
