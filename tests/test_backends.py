"""Every PyTorch backend against an independent float64 per-sample loop: forward and the gradients
of x, the kernel bank, the bias bank and the routing weights."""

import pytest
import torch
from helpers import (
    PYTORCH_BACKENDS,
    Case,
    case_id,
    make_inputs,
    reference_dynamic_conv2d,
    upstream_gradient,
)

from dynconv import dynamic_conv2d

# "triton" has its own tests (test_triton_*.py), under the interpreter without a GPU.
BACKENDS = list(PYTORCH_BACKENDS)


# Case(batch, cin, cout, H, W, (kh, kw), stride, padding, dilation, groups, K, bias)
CASES = [
    Case(2, 3, 5, 7, 6, (1, 1), 1, 0, 1, 1, 3, True),
    Case(3, 4, 6, 9, 7, (3, 3), 1, 1, 1, 1, 4, True),
    Case(1, 5, 7, 8, 9, (3, 3), 2, 1, 1, 1, 2, False),  # batch 1, stride 2, odd channels
    Case(2, 6, 4, 11, 10, (5, 5), 1, 2, 1, 2, 5, True),  # groups 2
    Case(3, 6, 6, 9, 9, (3, 3), 1, 2, 2, 6, 3, True),  # depthwise, dilation 2
    Case(2, 4, 6, 7, 8, (1, 3), 1, "same", 1, 1, 8, False),  # 1x3, same
    Case(2, 4, 6, 7, 8, (2, 2), 1, "same", 1, 2, 2, True),  # even kernel: asymmetric same pad
    Case(2, 3, 5, 8, 7, (3, 3), 2, "valid", (2, 1), 1, 1, True),  # K = 1, valid
    Case(4, 8, 8, 5, 5, (3, 3), (2, 1), (0, 1), 1, 4, 6, True),  # pair stride/padding, groups 4
]


def _forward_and_grads(fn, x, bank, routing, bias_bank, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, bank, routing)]
    bias_leaf = None if bias_bank is None else bias_bank.detach().clone().requires_grad_(True)
    y = fn(leaves[0], leaves[1], leaves[2], bias_leaf)
    y.backward(upstream)
    grads = [t.grad for t in leaves] + ([] if bias_leaf is None else [bias_leaf.grad])
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_float64_reference(backend, case):
    x64, bank64, routing64, bias64 = make_inputs(case)
    geometry = case.geometry

    def reference(x, bank, routing, bias):
        return reference_dynamic_conv2d(x, bank, routing, bias, **geometry)

    y_ref = reference(x64, bank64, routing64, bias64)
    upstream64 = upstream_gradient(y_ref.shape)
    y_ref, grads_ref = _forward_and_grads(reference, x64, bank64, routing64, bias64, upstream64)

    def run(x, bank, routing, bias):
        return dynamic_conv2d(x, bank, routing, bias, backend=backend, **geometry)

    as32 = lambda t: None if t is None else t.float()
    y, grads = _forward_and_grads(
        run, as32(x64), as32(bank64), as32(routing64), as32(bias64), upstream64.float()
    )
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    # fp32 against fp64: sums of at most a few hundred O(1) products, so errors stay around
    # 1e-6 relative; 1e-4 leaves room for different summation orders and still catches any
    # wrong index, missing term or mis-scaled gradient.
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    names = ["x", "weight_bank", "routing", "bias_bank"]
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4, msg=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_strided_inputs(backend, layout):
    case = Case(3, 4, 6, 7, 9, (3, 3), 1, 1, 1, 2, 3, True)
    x64, bank64, routing64, bias64 = make_inputs(case)
    geometry = case.geometry
    y_ref = reference_dynamic_conv2d(x64, bank64, routing64, bias64, **geometry)
    x = make_inputs(case.replace(layout=layout), torch.float32)[0]
    torch.testing.assert_close(x, x64.float(), rtol=0, atol=0)
    if layout == "channels_last":
        assert x.is_contiguous(memory_format=torch.channels_last)
    else:
        assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    x.requires_grad_(True)
    y = dynamic_conv2d(
        x, bank64.float(), routing64.float(), bias64.float(), backend=backend, **geometry
    )
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    x_ref = x64.clone().requires_grad_(True)
    reference_dynamic_conv2d(x_ref, bank64, routing64, bias64, **geometry).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["native", "auto"])
def test_output_memory_format_follows_input(backend):
    case = Case(2, 4, 6, 5, 5, (3, 3), 1, 1, 1, 1, 2, True)
    x, bank, routing, bias = make_inputs(case)
    geometry = case.geometry
    y = dynamic_conv2d(
        x.contiguous(memory_format=torch.channels_last),
        bank,
        routing,
        bias,
        backend=backend,
        **geometry,
    )
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dynamic_conv2d(x, bank, routing, bias, backend=backend, **geometry).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    case = Case(2, 4, 4, 4, 5, (3, 2), 2, 1, (1, 2), 2, 3, True)
    inputs = tuple(t.clone().requires_grad_(True) for t in make_inputs(case))

    def fn(x, bank, routing, bias):
        return dynamic_conv2d(x, bank, routing, bias, backend=backend, **case.geometry)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_backends_agree_on_half_precision():
    # bf16 on CPU: every backend against the fp32 result; tolerance from bf16's 8-bit mantissa
    # (relative step 2**-8 ~ 4e-3) over sums of ~36 products.
    case = Case(2, 4, 6, 6, 6, (3, 3), 1, 1, 1, 1, 3, True)
    x, bank, routing, bias = make_inputs(case)
    geometry = case.geometry
    want = reference_dynamic_conv2d(x, bank, routing, bias, **geometry).float()
    for backend in BACKENDS:
        got = dynamic_conv2d(
            *(t.bfloat16() for t in (x, bank, routing, bias)), backend=backend, **geometry
        )
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_native_processes_large_batches_in_chunks(monkeypatch):
    from dynconv.backends.native import op as native

    case = Case(7, 3, 4, 5, 5, (3, 3), 1, 1, 1, 1, 2, True)
    x, bank, routing, bias = make_inputs(case)
    geometry = case.geometry
    weight_bytes = bank[0].numel() * x.element_size()
    monkeypatch.setattr(native, "MIXED_WEIGHT_BUDGET_BYTES", 3 * weight_bytes)  # chunks 3, 3, 1
    assert native.batch_chunk_size(7, bank[0].numel(), x.element_size()) == 3
    y_ref = reference_dynamic_conv2d(x, bank, routing, bias, **geometry)
    inputs = [t.clone().requires_grad_(True) for t in (x, bank, routing, bias)]
    y = dynamic_conv2d(*inputs, backend="native", **geometry)
    torch.testing.assert_close(y, y_ref)
    assert torch.autograd.gradcheck(
        lambda *a: dynamic_conv2d(*a, backend="native", **geometry), tuple(inputs)
    )
