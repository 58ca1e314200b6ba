"""The Triton kernels' ODConv tap scale, kernel by kernel: the mix kernel's scaled columns, the
input gradient's scaled steps and the weight gradient's routing / tap-scale contractions, each
against torch in float64; and the strategies that can and cannot take a tap scale.

Runs the compiled kernels on CUDA when a GPU is present, else the Triton interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). Shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dynconv
from dynconv.backends.triton.backward import triton_backward_impl
from dynconv.backends.triton.forward import triton_forward_impl
from dynconv.kernels._common import interpreter_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type != "cuda" and not interpreter_enabled():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)", allow_module_level=True)

# fp32 dots in ieee (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fp32_dots")

# fp32 kernels against a float64 reference over sums of at most a few hundred terms of order 1:
# a few hundred ulps of fp32 (1.2e-7 each) relative to the largest result.
RTOL = 1e-5


def _close(got, want):
    scale = want.abs().max().clamp_min(1e-30)
    assert (got.double() - want).abs().max() <= RTOL * scale, (got, want)


def _inputs(groups=2, kernel=(3, 2), experts=3, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cin, cout = 4, 6
    x = torch.randn(batch, cin, 7, 6, generator=gen)
    bank = torch.randn(experts, cout, cin // groups, *kernel, generator=gen)
    routing = torch.rand(batch, experts, generator=gen)
    bias = torch.randn(experts, cout, generator=gen)
    tap = torch.rand(batch, *kernel, generator=gen) + 0.5
    return [t.to(DEVICE) for t in (x, bank, routing, bias, tap)]


def _reference_y(x, bank, routing, bias, tap, stride, padding, groups):
    mixed = torch.einsum("bk,koihw->boihw", routing.double(), bank.double())
    mixed = mixed * tap.double()[:, None, None]
    return torch.cat([F.conv2d(x[b:b + 1].double(), mixed[b], routing[b].double() @ bias.double(),
                               stride, padding, 1, groups) for b in range(x.shape[0])])


@pytest.mark.parametrize("groups,kernel", [(1, (3, 2)), (2, (3, 3)), (2, (1, 1))])
def test_premix_scales_the_mixed_taps_not_the_bias(groups, kernel):
    x, bank, routing, bias, tap = _inputs(groups, kernel)
    padding = (kernel[0] // 2, kernel[1] // 2)
    y = triton_forward_impl(x, bank, routing, bias, (2, 1), padding, (1, 1), groups,
                            strategy="premix", tap_scale=tap)
    _close(y, _reference_y(x, bank, routing, bias, tap, (2, 1), padding, groups))


@pytest.mark.parametrize("need", [(True, True, True, True, True), (False, False, False, False,
                                                                    True),
                                  (False, True, True, False, False)])
def test_backward_kernels_give_the_tap_scale_gradient(need):
    x, bank, routing, bias, tap = _inputs(groups=2, kernel=(3, 3), experts=9)
    geometry = ((1, 2), (1, 1), (1, 1), 2)
    leaves = [t.double().requires_grad_() for t in (x, bank, routing, bias, tap)]
    y = _reference_y(*leaves, geometry[0], geometry[1], geometry[3])
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64).to(DEVICE)
    want = torch.autograd.grad(y, leaves, grad_out)
    got = triton_backward_impl(grad_out.float(), x, bank, routing, bias, *geometry, list(need),
                               tap_scale=tap)
    assert len(got) == 5
    for g, w, needed in zip(got, want, need):
        if needed:
            _close(g, w)
        else:
            assert g.numel() == 0


def test_strategies_that_cannot_take_a_tap_scale_say_so():
    x, bank, routing, bias, tap = _inputs()
    for strategy in ("fused", "spanning", "spanning_torch"):
        with pytest.raises(ValueError, match=f"strategy='{strategy}' cannot take ODConv's tap"):
            triton_forward_impl(x, bank, routing, bias, (1, 1), (1, 1), (1, 1), 2,
                                strategy=strategy, tap_scale=tap)
    grad_out = torch.ones(3, 6, 7, 5, device=DEVICE)
    with pytest.raises(ValueError, match="strategy='spanning_torch' cannot take ODConv's tap"):
        triton_backward_impl(grad_out, x, bank, routing, bias, (1, 1), (1, 1), (1, 1), 2,
                             [True] * 5, "spanning_torch", tap_scale=tap)


def test_auto_takes_premix_with_a_tap_scale_even_where_another_is_forced():
    x, bank, routing, bias, tap = _inputs()
    tap.requires_grad_()
    want = _reference_y(x, bank, routing, bias, tap.double(), (1, 1), (1, 1), 2)
    with dynconv.use_strategy(forward="fused", backward="spanning_torch"):
        y = dynconv.dynamic_conv2d(x, bank, routing, bias, 1, 1, 1, 2, backend="triton",
                                   tap_scale=tap)
        (grad,) = torch.autograd.grad(y.sum(), tap)
    _close(y, want)
    _close(grad, torch.autograd.grad(want.sum(), tap)[0])
