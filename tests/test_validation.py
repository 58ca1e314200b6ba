"""Every bad input of DESIGN.md fails fast with an error naming the argument and the mismatch."""

import pytest
import torch

from dynconv import DynamicCNN, DynamicConv2d, dynamic_conv2d


def _good():
    x = torch.randn(2, 4, 6, 6)
    bank = torch.randn(3, 6, 2, 3, 3)  # K=3, Cout=6, Cin/groups=2 (groups=2)
    routing = torch.softmax(torch.randn(2, 3), dim=1)
    bias = torch.randn(3, 6)
    return x, bank, routing, bias


def _call(**overrides):
    x, bank, routing, bias = _good()
    args = dict(x=x, weight_bank=bank, routing=routing, bias_bank=bias, groups=2)
    args.update(overrides)
    return dynamic_conv2d(**args)


def test_good_call_works():
    assert _call().shape == (2, 6, 4, 4)


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(x=torch.randn(4, 6, 6)), ValueError, r"x must be 4-D .* got 3-D .*\(4, 6, 6\)"),
        (dict(weight_bank=torch.randn(6, 2, 3, 3)), ValueError, r"weight_bank must be 5-D"),
        (dict(routing=torch.randn(2, 3, 1)), ValueError, r"routing must be 2-D"),
        (dict(x=torch.randn(2, 5, 6, 6)), ValueError, r"groups=2 must divide the input channels"),
        (dict(x=torch.randn(2, 6, 6, 6)), ValueError, r"x has 6 channels .* Cin // groups = 2"),
        (dict(groups=4), ValueError, r"groups=4 must divide the output channels"),
        (dict(groups=0), ValueError, r"groups must be >= 1"),
        (dict(groups=2.0), TypeError, r"groups must be an int"),
        (
            dict(routing=torch.rand(3, 3)),
            ValueError,
            r"routing must have shape \(B, K\) = \(2, 3\)",
        ),
        (dict(routing=torch.rand(2, 4)), ValueError, r"routing must have shape .* got \(2, 4\)"),
        (dict(bias_bank=torch.randn(3, 5)), ValueError, r"bias_bank must have shape \(K, Cout\)"),
        (dict(bias_bank=torch.randn(2, 6)), ValueError, r"bias_bank must have shape"),
        (dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int64)), TypeError, r"x must be a floating"),
        (
            dict(routing=torch.rand(2, 3, dtype=torch.float64)),
            TypeError,
            r"routing has dtype torch.float64 but x has dtype torch.float32",
        ),
        (
            dict(weight_bank=torch.randn(3, 6, 2, 3, 3, device="meta")),
            ValueError,
            r"weight_bank is on meta but x is on cpu",
        ),
        (dict(stride=0), ValueError, r"stride must be >= 1"),
        (dict(stride=(1, 2, 3)), TypeError, r"stride must be an int or a pair"),
        (dict(padding=-1), ValueError, r"padding must be >= 0"),
        (
            dict(padding="full"),
            ValueError,
            r"padding must be an int, a pair, 'same', 'same_tf' or 'valid', got 'full'",
        ),
        (dict(padding="SAME"), ValueError, r"padding must be .* got 'SAME'"),
        (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1.*same_tf"),
        (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1"),
        (dict(x=torch.randn(2, 4, 2, 6)), ValueError, r"smaller than the dilated kernel"),
        (dict(backend="cuda"), ValueError, r"backend must be one of .* got 'cuda'"),
    ],
)
def test_bad_functional_input(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**overrides)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        ValueError, match=r"backend='triton' needs CUDA tensors .* got tensors on cpu"
    ):
        _call(backend="triton")


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(groups=3), ValueError, r"groups=3 must divide in_channels=4 and out_channels=6"),
        (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
        (dict(num_experts=0), ValueError, r"num_experts must be >= 1"),
        (dict(backend="fast"), ValueError, r"backend must be one of"),
        (dict(temperature=0.0), ValueError, r"temperature must be finite and > 0"),
        (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
        (dict(padding="tf_same"), ValueError, r"padding must be .* 'same_tf' .* got 'tf_same'"),
        (dict(padding=(1, 2, 3)), TypeError, r"padding must be an int or a pair"),
    ],
)
def test_bad_module_arguments(kwargs, error, pattern):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        DynamicConv2d(**args)


def test_module_rejects_wrong_input_channels():
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, H, W\), got \(2, 5, 6, 6\)"):
        DynamicConv2d(4, 6, 3)(torch.randn(2, 5, 6, 6))


def test_cnn_rejects_wrong_widths():
    with pytest.raises(ValueError, match="widths must give 3 stage widths"):
        DynamicCNN(widths=(8, 16))


def test_remembered_checks_still_reject_every_bad_call():
    # A valid call is remembered (dynconv.validation._checked); the same shapes with a bad
    # argument that equals a good one (a bool for an int, a float) must still raise, every time.
    from dynconv.validation import check_conv_inputs

    x, bank, routing = torch.randn(2, 4, 6, 6), torch.randn(3, 5, 4, 3, 3), torch.randn(2, 3)
    good = check_conv_inputs(x, bank, routing, None, 1, 1, 1, 1)
    assert check_conv_inputs(x, bank, routing, None, 1, 1, 1, 1) is good
    assert check_conv_inputs(x, bank, routing, None, [1, 1], (1, 1), 1, 1) == good
    for _ in range(2):
        with pytest.raises(TypeError, match="stride"):
            check_conv_inputs(x, bank, routing, None, True, 1, 1, 1)
        with pytest.raises(TypeError, match="padding"):
            check_conv_inputs(x, bank, routing, None, 1, 1.0, 1, 1)
        with pytest.raises(TypeError, match="groups"):
            check_conv_inputs(x, bank, routing, None, 1, 1, 1, True)
        with pytest.raises(TypeError, match="dtype"):
            check_conv_inputs(x, bank.double(), routing, None, 1, 1, 1, 1)
        with pytest.raises(ValueError, match="routing"):
            check_conv_inputs(x, bank, routing[:1], None, 1, 1, 1, 1)
        with pytest.raises(ValueError, match="padding='same'"):
            check_conv_inputs(x, bank, routing, None, 2, "same", 1, 1)
        with pytest.raises(TypeError, match="x must be a floating-point"):
            check_conv_inputs(x.long(), bank, routing, None, 1, 1, 1, 1)
