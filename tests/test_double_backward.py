"""Double backward (``create_graph=True``: gradient penalties, Hessian-vector products) gives the
true second derivatives on every backend, checked by ``gradgradcheck`` in float64 where the
backend computes in float64 and against the float64 loop otherwise."""

import pytest
import torch
from helpers import PYTORCH_BACKENDS, Case, make_inputs
from torch.autograd import gradgradcheck

from dynconv import DynamicConv2d, dynamic_conv2d
from dynconv.backends.native.op import native_forward

FLOAT64_BACKENDS = list(PYTORCH_BACKENDS)

# Case(batch, cin, cout, H, W, (kh, kw), stride, padding, dilation, groups, K, bias[, layout])
GEOMETRIES = [
    Case(2, 3, 4, 5, 5, (3, 3), 1, 1, 1, 1, 3, True),
    Case(2, 4, 4, 6, 5, (3, 3), 2, 1, 1, 2, 2, False),  # stride 2, groups 2
    Case(1, 3, 3, 6, 6, (3, 3), 1, 2, 2, 3, 2, True, "channels_last"),  # depthwise, dilation
]


def _inputs(case: Case):
    """The case's float64 tensors (bias bank only if it has one), requiring grad."""
    return [t.requires_grad_() for t in make_inputs(case) if t is not None]


def _conv(backend, case: Case):
    def run(x, bank, routing, bias_bank=None):
        return dynamic_conv2d(x, bank, routing, bias_bank, **case.geometry, backend=backend)

    return run


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["plain", "s2-g2", "dw-d2-nhwc"])
def test_gradgradcheck(backend, geometry):
    assert gradgradcheck(_conv(backend, geometry), _inputs(geometry))


def test_gradgradcheck_of_the_native_custom_op():
    """The op torch.compile sees has the same differentiable backward as the eager path."""
    x, bank, routing, bias_bank = _inputs(GEOMETRIES[0])
    op = lambda *t: native_forward(*t, [1, 1], [1, 1], [1, 1], 1)
    assert gradgradcheck(op, (x, bank, routing, bias_bank))


def test_input_gradient_depends_on_the_bank_and_routing():
    """The symptom of a detached backward: d(grad_x)/d(bank) came back as None."""
    x, bank, routing, bias_bank = _inputs(GEOMETRIES[0])
    second = {}
    for backend in FLOAT64_BACKENDS:
        y = _conv(backend, GEOMETRIES[0])(x, bank, routing, bias_bank)
        (grad_x,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        second[backend] = torch.autograd.grad(grad_x.sum(), (bank, routing), allow_unused=True)
        assert all(g is not None for g in second[backend]), backend
    for backend in FLOAT64_BACKENDS:
        for got, want in zip(second[backend], second["loop"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_module_gradient_penalty_trains():
    """An R1-style penalty through DynamicConv2d (router included) reaches every parameter."""
    torch.manual_seed(0)
    conv = DynamicConv2d(3, 4, 3, padding=1, num_experts=3).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(conv(x).pow(2).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


def test_triton_second_derivatives_match_the_loop():
    """Triton computes in fp32 at most (no float64), so its second derivatives are compared to
    the float64 loop: fp32 rounding of sums of a few hundred terms stays far below 1e-4."""
    if not torch.cuda.is_available():
        from dynconv.kernels._common import interpreter_enabled

        assert interpreter_enabled(), "conftest switches the Triton interpreter on without a GPU"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    geometry = GEOMETRIES[1]
    results = {}
    for backend, dtype in (("loop", torch.float64), ("triton", torch.float32)):
        tensors = [t.detach().to(device, dtype).requires_grad_() for t in _inputs(geometry)]
        y = _conv(backend, geometry)(*tensors)
        grads = torch.autograd.grad(y.pow(2).sum(), tensors, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results[backend] = torch.autograd.grad(penalty, tensors)
    for got, want in zip(results["triton"], results["loop"]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
