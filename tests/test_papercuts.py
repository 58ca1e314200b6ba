"""Small things that misled a user: converting nothing silently, an integer input told to turn
the module into integers, a bank of another K loaded without saying so, a misspelt backend
reported as a device problem."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dynconv
from dynconv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from dynconv.routing import RoutingMLP
from dynconv.train.cli import main as train_main

# --- converting nothing warns ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("convert", "model", "why"),
    [
        (dynconv.convert_conv2d, nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
         "it has no nn.Conv2d layer"),
        (dynconv.convert_conv1d, nn.Sequential(nn.Conv2d(2, 2, 3)), "it has no nn.Conv1d layer"),
        (dynconv.convert_conv3d, nn.Sequential(nn.Conv1d(2, 2, 3)), "it has no nn.Conv3d layer"),
    ],
)
def test_converting_a_model_without_convs_warns_and_returns_it_unchanged(convert, model, why):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="converted nothing") as record:
        result = convert(model, num_experts=2)
    assert result is model
    assert why in str(record[0].message) and convert.__name__ in str(record[0].message)
    # the warning points at the caller, not at dynconv's own files
    assert record[0].filename == __file__
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_filter_that_matches_no_layer_warns_with_the_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    with pytest.warns(UserWarning, match="none of its 2 nn.Conv2d layers passed filter"):
        dynconv.convert_conv2d(model, 2, filter=lambda name, conv: conv.in_channels > 100)
    assert all(type(m) is nn.Conv2d for m in model)
    with pytest.warns(UserWarning, match="none of its 1 nn.Conv2d layers passed filter"):
        conv = nn.Conv2d(3, 8, 3)
        assert dynconv.convert_conv2d(conv, 2, filter=lambda name, c: False) is conv


def test_converting_something_does_not_warn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynconv.convert_conv2d(model, 2)
        assert isinstance(dynconv.convert_conv2d(nn.Conv2d(3, 8, 3), 2), DynamicConv2d)
    assert isinstance(model[0], DynamicConv2d)


# --- an integer input is told to convert the input -------------------------------------------


@pytest.mark.parametrize("router", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_an_integer_input_is_told_to_convert_the_input_not_the_module(dtype, router):
    conv = DynamicConv2d(3, 4, 3, num_experts=2, router=router)
    x = torch.zeros(1, 3, 8, 8, dtype=dtype)
    routing = None if router else torch.full((1, 2), 0.5)
    with pytest.raises(TypeError) as error:
        conv(x, routing)
    message = str(error.value)
    assert f"module.to({dtype})" not in message
    assert f"got dtype {dtype}" in message and "x.to(torch.float32)" in message
    assert "DynamicConv2d" in message


@pytest.mark.parametrize("module", [DynamicConv1d(2, 2, 3), DynamicConv3d(2, 2, 1)])
def test_an_integer_input_of_a_1d_or_3d_module_is_told_the_same(module):
    x = torch.zeros(1, 2, *([4] * module.spatial_dims), dtype=torch.int32)
    with pytest.raises(TypeError, match=r"convert the input with x.to\(torch.float32\)"):
        module(x)


def test_a_router_on_its_own_is_told_to_convert_an_integer_input():
    router = RoutingMLP(3, 2)
    with pytest.raises(TypeError, match=r"convert the input with x.to\(torch.float32\)") as error:
        router(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert "module.to(" not in str(error.value) and "RoutingMLP" in str(error.value)


def test_a_float_input_of_another_dtype_still_offers_both_conversions():
    conv = DynamicConv2d(3, 4, 3, num_experts=2)
    with pytest.raises(TypeError, match=r"module.to\(torch.float64\) or x.to\(torch.float32\)"):
        conv(torch.zeros(1, 3, 8, 8, dtype=torch.float64))


def test_autocast_still_runs_a_float32_module_on_a_float32_input():
    conv = DynamicConv2d(3, 4, 3, num_experts=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(torch.randn(1, 3, 8, 8))
    assert y.dtype == torch.bfloat16


# --- a K mismatch on load names num_experts --------------------------------------------------


@pytest.mark.parametrize("router", [True, False])
def test_loading_a_bank_of_another_k_names_num_experts(router):
    saved = DynamicConv2d(3, 4, 3, num_experts=2, router=router).state_dict()
    module = DynamicConv2d(3, 4, 3, num_experts=4, router=router)
    before = module.weight.detach().clone()
    with pytest.raises(ValueError) as error:
        module.load_state_dict(saved)
    message = str(error.value)
    assert "num_experts: expected 4" in message and "got 2" in message
    assert "'weight'" in message
    assert torch.equal(module.weight, before)


def test_a_nested_bank_of_another_k_is_named_with_its_prefix():
    saved = nn.Sequential(DynamicConv1d(2, 2, 3, num_experts=3, bias=False)).state_dict()
    model = nn.Sequential(DynamicConv1d(2, 2, 3, num_experts=5, bias=False))
    with pytest.raises(ValueError, match=r"'0.weight'.*num_experts: expected 5.*got 3"):
        model.load_state_dict(saved, strict=False)


def test_a_bank_of_the_same_k_still_loads_and_other_mismatches_stay_pytorchs():
    saved = DynamicConv2d(3, 4, 3, num_experts=2).state_dict()
    DynamicConv2d(3, 4, 3, num_experts=2).load_state_dict(saved)
    # another kernel size, same K: PyTorch's own size-mismatch error
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        DynamicConv2d(3, 4, 5, num_experts=2).load_state_dict(saved)


# --- the training command names an unknown backend -------------------------------------------


def test_train_cli_calls_a_misspelt_backend_unknown(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--backend", "trition", "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --backend: unknown backend 'trition'" in err
    assert "auto, loop, grouped, native, triton" in err
    assert "cannot run" not in err
    assert not (tmp_path / "never").exists()
