"""The dynconv::triton_forward / dynconv::triton_backward custom ops: torch.library.opcheck,
fake tensors with the real op's sizes, strides and dtype, and torch.compile of a DynamicCNN with
backend="triton" (fullgraph, dynamic shapes) against eager.

Runs the compiled kernels on CUDA when a GPU is present, else the Triton interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import OP_CASE, op_args, upstream_gradient
from torch._subclasses.fake_tensor import FakeTensorMode

import dynconv
from dynconv.backends.triton.op import triton_backward, triton_forward
from dynconv.kernels._common import interpreter_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type != "cuda" and not interpreter_enabled():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)", allow_module_level=True)


OPCHECK_CASES = {
    "groups2-bias": OP_CASE,
    "channels_last-nobias": OP_CASE.replace(layout="channels_last", bias=False, groups=1,
                                            stride=(1, 1)),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_forward(name):
    """Schema, fake tensor, autograd registration and aot dispatch (dynamic shapes)."""
    torch.library.opcheck(triton_forward, op_args(OPCHECK_CASES[name], device=DEVICE))


@pytest.mark.parametrize("mask", [[True, True, True, True], [False, True, False, True]])
def test_opcheck_backward(mask):
    args = op_args(OP_CASE.replace(layout="channels_last"), device=DEVICE, requires_grad=False)
    with torch.no_grad():
        y = triton_forward(*args)
    grad_out = upstream_gradient(y.shape, torch.float32, DEVICE)
    torch.library.opcheck(triton_backward, (grad_out, *args, mask))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fake_matches_real_metadata(channels_last, bias):
    """register_fake gives exactly the real outputs' sizes, strides and dtype."""
    layout = "channels_last" if channels_last else "nchw"
    args = op_args(OP_CASE.replace(bias=bias, layout=layout), device=DEVICE, requires_grad=False)
    with torch.no_grad():
        y = triton_forward(*args)
        grad_out = torch.randn_like(y)
        mask = [True, True, True, True]
        real = [y, *triton_backward(grad_out, *args, mask)]
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_y = triton_forward(*fake_args)
        fake = [fake_y, *triton_backward(mode.from_tensor(grad_out), *fake_args, mask)]
    for r, f in zip(real, fake):
        assert (tuple(f.shape), f.stride(), f.dtype) == (tuple(r.shape), r.stride(), r.dtype)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_torch_compile_dynamic_cnn_matches_eager():
    """fullgraph=True (a graph break raises), dynamic=True; outputs and every gradient."""
    torch.manual_seed(0)
    net = dynconv.DynamicCNN(in_channels=3, num_classes=5, num_experts=2, widths=(4, 6, 8),
                             stem_channels=4, backend="triton").to(DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(model):
        net.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    # Training mode: BatchNorm normalises with batch statistics, so the running statistics that
    # the first run updates do not change what the second run computes.
    eager_out, eager_grads = run(net)
    torch._dynamo.reset()
    compiled_out, compiled_grads = run(torch.compile(net, fullgraph=True, dynamic=True))
    # Same Triton kernels on the same inputs; Inductor only reorders the float ops around them
    # (BatchNorm, ReLU, pooling, the head), a few fp32 ulps per op.
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for (name, _), got, want in zip(net.named_parameters(), compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
