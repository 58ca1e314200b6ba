"""Nothing silent, second round: what an independent battery of bad inputs still found.

1. ``fuse_conv_bn_eval`` folds in the parameters' precision (float64 stays float64).
2. ``DynamicBlock`` keeps its promise ceil(H / stride) for even kernels too.
3. A router temperature loaded from a state_dict is checked as the setter checks it.
4. ``TemperatureSchedule`` errors name ``start`` / ``end``.
5. A module called with x on another device names x and the module's device.
6. TF-style "same" padding (``padding="same_tf"``: per call, from the input size, the odd pixel
   at the bottom / right) as timm's ``Conv2dSame``, on every backend, compiled and exported.
"""

import math

import pytest
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
    reference_forward,
    reference_gradients,
    timm_pad_same,
    upstream_gradient,
)
from torch import nn
from torch._dynamo.testing import CompileCounter

import dynconv
from dynconv import (
    DynamicBlock,
    DynamicCNN,
    DynamicConv2d,
    RoutingMLP,
    TemperatureSchedule,
    dynamic_conv2d,
)
from dynconv.kernels._common import interpreter_enabled

FP64_EPS = torch.finfo(torch.float64).eps

# --- 1. fuse_conv_bn_eval in float64 ----------------------------------------------------------


def _eval_bn(channels, dtype):
    bn = nn.BatchNorm2d(channels, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("has_bias", [True, False])
def test_fuse_conv_bn_eval_keeps_float64_precision(has_bias):
    torch.manual_seed(0)
    conv = DynamicConv2d(4, 6, 3, padding=1, num_experts=3, bias=has_bias,
                         dtype=torch.float64)
    bn = _eval_bn(6, torch.float64)
    fused = dynconv.fuse_conv_bn_eval(conv, bn)
    assert fused.weight.dtype == fused.bias.dtype == torch.float64
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        got, want = fused(x), bn(conv(x))
    # Both sides round a 36-term reduction (Cin x 3 x 3), a 3-expert mix and a few elementwise
    # operations in float64: errors of a few tens of eps of the output's scale. A fold computed
    # in float32 (the defect) is off by ~1e-8, a million times more.
    tolerance = 100 * FP64_EPS
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max())


def test_fuse_conv_bn_eval_keeps_a_half_precision_dtype():
    conv = DynamicConv2d(4, 6, 3, padding=1, num_experts=2, dtype=torch.bfloat16)
    fused = dynconv.fuse_conv_bn_eval(conv, _eval_bn(6, torch.float32))
    assert fused.weight.dtype == fused.bias.dtype == torch.bfloat16


# --- 2. DynamicBlock: ceil(H / stride) for every kernel ----------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 4, (3, 4), (2, 5), 1, 2])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_block_output_is_ceil_of_size_over_stride(kernel_size, stride, dilation):
    block = DynamicBlock(4, 6, kernel_size, stride=stride, dilation=dilation, num_experts=2)
    for h, w in ((8, 8), (7, 7), (8, 7), (9, 10)):
        y = block(torch.randn(2, 4, h, w))
        assert tuple(y.shape) == (2, 6, math.ceil(h / stride), math.ceil(w / stride)), (h, w)


def _one_hot(batch, experts):
    return F.one_hot(torch.arange(batch) % experts, experts).double()


# The reference F.conv2d warns that padding="same" with an even kernel pads a copy.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_block_even_kernel_pads_as_nn_conv2d_same_at_stride_1_and_tf_same_above():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    routing = _one_hot(2, 2)  # sample b convolved with expert b alone
    for stride in (1, 2):
        block = DynamicBlock(4, 6, 4, stride=stride, num_experts=2, router=False,
                             dtype=torch.float64)
        y = block.conv(x, routing)
        for b in range(2):
            weight = block.conv.weight[b]
            if stride == 1:
                want = F.conv2d(x[b:b + 1], weight, padding="same")
            else:
                want = F.conv2d(timm_pad_same(x[b:b + 1], (4, 4), 2, 1), weight, stride=2)
            # One conv per side, the same 64-term reductions in float64.
            torch.testing.assert_close(y[b:b + 1], want, rtol=100 * FP64_EPS, atol=1e-13)
    # Odd kernels keep their symmetric padding (the function of existing models is unchanged).
    assert DynamicBlock(4, 6, 3, stride=2).conv.padding == (1, 1)
    assert DynamicBlock(4, 6, 4).conv.padding == "same"
    assert DynamicBlock(4, 6, 4, stride=2).conv.padding == "same_tf"
    assert DynamicBlock(4, 6, 3, padding=0).conv.padding == (0, 0)


# --- 3. temperatures loaded from a state_dict --------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("strict", [True, False])
def test_state_dict_with_a_bad_temperature_is_refused(bad, strict):
    model = DynamicCNN(num_experts=2, widths=(8, 8, 8), stem_channels=4, temperature=3.0)
    state = model.state_dict()
    key = "stages.1.conv.router.temperature_tensor"
    state[key] = torch.tensor(bad)
    with pytest.raises(ValueError, match=rf"'{key}'.*temperature must be finite and > 0"):
        model.load_state_dict(state, strict=strict)
    assert model.stages[1].conv.temperature == 3.0  # the router never held the bad value
    router = RoutingMLP(4, 2)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        router.load_state_dict({**router.state_dict(), "temperature_tensor": torch.tensor(bad)})


def test_state_dict_with_a_good_temperature_still_loads():
    model = DynamicConv2d(4, 6, 3)
    state = {**model.state_dict(), "router.temperature_tensor": torch.tensor(0.25)}
    model.load_state_dict(state)
    assert model.temperature == 0.25


# --- 4. TemperatureSchedule names start / end ---------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(start=0), r"start must be finite and > 0, got 0.0"),
    (dict(end=-1), r"end must be finite and > 0, got -1.0"),
    (dict(start=math.inf), r"start must be finite and > 0, got inf"),
])
def test_schedule_errors_name_start_and_end(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TemperatureSchedule(**kwargs)
    with pytest.raises(TypeError, match="end must be a float"):
        TemperatureSchedule(end="1")


# --- 5. x on another device than the module ---------------------------------------------------


@pytest.mark.parametrize("name, build, shape", [
    pytest.param("DynamicConv2d", lambda: DynamicConv2d(4, 6, 3, device="meta"), (2, 4, 8, 8),
                 id="conv"),
    # The block's error comes from the DynamicConv2d inside it.
    pytest.param("DynamicConv2d", lambda: DynamicBlock(4, 6, device="meta"), (2, 4, 8, 8),
                 id="block"),
    pytest.param("DynamicCNN", lambda: DynamicCNN(device="meta"), (2, 3, 16, 16), id="cnn"),
    pytest.param("RoutingMLP", lambda: RoutingMLP(4, 3, device="meta"), (2, 4, 8, 8),
                 id="router"),
])
def test_meta_module_called_with_a_cpu_tensor_names_both_devices(name, build, shape):
    with pytest.raises(ValueError, match=rf"x is on cpu but the {name}'s parameters are on meta"):
        build()(torch.randn(shape))


def test_meta_module_without_a_router_names_both_devices():
    conv = DynamicConv2d(4, 6, 3, device="meta", router=False)
    with pytest.raises(ValueError, match=r"x is on cpu but the DynamicConv2d's .* on meta"):
        conv(torch.randn(2, 4, 8, 8), torch.full((2, 4), 0.25))


# --- 6. padding="same_tf": TensorFlow's "SAME", as timm's Conv2dSame ---------------------------

# Odd and even sizes, odd and even (dilated) kernels, strides 1 and 2, dilation 2, groups.
SAME_TF_CASES = [
    Case(3, 4, 6, 7, 8, (3, 3), 2, "same_tf", 1, 1, 3, True),
    Case(3, 4, 6, 8, 7, (4, 4), 2, "same_tf", 1, 1, 3, True),
    Case(2, 4, 6, 7, 8, (4, 4), 1, "same_tf", 1, 2, 3, True),
    Case(2, 4, 4, 9, 6, (3, 3), 2, "same_tf", 2, 1, 2, False),
    Case(2, 6, 6, 8, 9, (2, 5), (2, 1), "same_tf", (1, 2), 3, 4, True, "channels_last"),
    Case(1, 2, 3, 5, 4, (1, 1), 2, "same_tf", 1, 1, 2, True),
    Case(2, 3, 5, 3, 4, (5, 4), 2, "same_tf", 2, 1, 3, True),  # padding larger than the input
]


def _check_against_timm(case, dtype, backend, device="cpu", atol=1e-6):
    """y and the gradients of x, the bank, the routing and the bias bank of ``backend`` against
    the float64 per-sample loop on an input padded by timm's rule (helpers.timm_pad_same), within
    the rounding bound of ``dtype``."""
    x, bank, routing, bias_bank = make_inputs(case, dtype, device)
    leaves = [t.requires_grad_(True) for t in (x, bank, routing, bias_bank) if t is not None]
    y = dynamic_conv2d(x, bank, routing, bias_bank, backend=backend, **case.geometry)
    grad_out = upstream_gradient(y.shape, dtype, device)
    y.backward(grad_out)
    want_y, y_scale = reference_forward(x, bank, routing, bias_bank, **case.geometry)
    want_grads, grad_scales = reference_gradients(grad_out, x, bank, routing, bias_bank,
                                                  **case.geometry)
    assert_within_bound(y, want_y, y_scale, dtype, forward_reduction_length(case), atol=atol)
    for name, leaf, want, scale in zip(("x", "bank", "routing", "bias bank"), leaves,
                                       want_grads, grad_scales):
        assert_within_bound(leaf.grad, want, scale, dtype, backward_reduction_length(case),
                            atol=atol, name=f"grad {name}")


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
@pytest.mark.parametrize("case", SAME_TF_CASES, ids=case_id)
def test_same_tf_matches_timm_conv2d_same_in_float64(case, backend):
    # atol: a few float64 ulps of 1, for outputs whose window lies in the padding only.
    _check_against_timm(case, torch.float64, backend, atol=1e-14)


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_enabled()),
                    reason="triton needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)")
@pytest.mark.usefixtures("fp32_dots")
@pytest.mark.parametrize("case", [SAME_TF_CASES[1], SAME_TF_CASES[3]], ids=case_id)
def test_same_tf_matches_timm_conv2d_same_on_triton(case):
    # Triton computes in float32 (it refuses float64): the float32 bound, tiny shapes for the
    # interpreter. atol: a few float32 ulps of 1.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_against_timm(case, torch.float32, "triton", device, atol=1e-6)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame`` as timm writes it (timm is no dependency): padding 0 in the module,
    x padded TF-style in forward."""

    __module__ = "timm.layers.conv2d_same"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        x = timm_pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 2, 1), (4, 2, 1), (3, 1, 2), (2, 3, 1)])
def test_from_conv2d_of_timm_conv2d_same_computes_the_same_function(kernel, stride, dilation):
    torch.manual_seed(0)
    timm_conv = Conv2dSame(4, 6, kernel, stride=stride, dilation=dilation, dtype=torch.float64)
    dynamic = DynamicConv2d.from_conv2d(timm_conv, num_experts=3)
    assert dynamic.padding == "same_tf" and "padding=same_tf" in repr(dynamic)
    converted = dynconv.convert_conv2d(nn.Sequential(timm_conv), num_experts=2)
    assert isinstance(converted[0], DynamicConv2d) and converted[0].padding == "same_tf"
    for h, w in ((7, 8), (8, 7), (9, 9)):
        x = torch.randn(2, 4, h, w, dtype=torch.float64)
        with torch.no_grad():
            want = timm_conv(x)
            # Softmax rows sum to 1 within a few eps: the mixed weight is timm's to ~1e-16.
            tolerance = 100 * FP64_EPS
            torch.testing.assert_close(dynamic(x), want, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(converted(x), want, rtol=tolerance, atol=tolerance)


def test_from_conv2d_refuses_a_subclass_with_its_own_forward():
    class StandardisedConv2d(nn.Conv2d):
        def forward(self, x):
            weight = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, weight, self.bias)

    with pytest.raises(TypeError, match=r"StandardisedConv2d, an nn.Conv2d subclass with a "
                                        r"forward of its own.*filter"):
        DynamicConv2d.from_conv2d(StandardisedConv2d(4, 6, 3))


def test_same_tf_in_the_modules():
    conv = DynamicConv2d(4, 6, 4, stride=2, padding="same_tf", num_experts=2)
    block = DynamicBlock(4, 6, 3, stride=2, padding="same_tf", num_experts=2)
    for h, w in ((7, 8), (8, 7), (1, 1)):
        x = torch.randn(2, 4, h, w)
        want = (2, 6, math.ceil(h / 2), math.ceil(w / 2))
        assert tuple(conv(x).shape) == want and tuple(block(x).shape) == want
    meta = DynamicConv2d(4, 6, 4, stride=2, padding="same_tf", device="meta")
    assert tuple(meta(torch.empty(3, 4, 9, 10, device="meta")).shape) == (3, 6, 5, 5)


def test_same_tf_does_not_recompile_for_a_new_batch_size():
    # The padding is computed from H and W under compile too (guards on their parity), never
    # from the batch.
    torch._dynamo.reset()
    counter = CompileCounter()
    model = DynamicConv2d(4, 6, 4, stride=2, padding="same_tf", num_experts=2)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for batch in (2, 3, 5):
        compiled(torch.randn(batch, 4, 9, 8))
    assert counter.frame_count == 1


def test_same_tf_compiles_with_dynamic_shapes_on_native():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DynamicConv2d(4, 6, 4, stride=2, padding="same_tf", num_experts=3, backend="native")
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch, h, w in ((2, 8, 8), (3, 9, 8), (4, 7, 9)):
        x = torch.randn(batch, 4, h, w)
        model.zero_grad()
        want = model(x)
        want.square().sum().backward()
        want_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        got = compiled(x)
        got.square().sum().backward()
        # Inductor reorders fp32 reductions (the router's pooling and linears): ~1e-6 relative.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for got_grad, want_grad in zip((p.grad for p in model.parameters()), want_grads):
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-4)
