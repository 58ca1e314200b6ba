"""Nothing lost, nothing silent: the router temperature is model state, meta tensors run through
the modules, empty and degenerate inputs behave alike on every backend, and small argument
papercuts get clear errors (or are accepted, as nn.Conv2d accepts them)."""

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import PYTORCH_BACKENDS, Case, make_inputs

import dynconv
from dynconv import DynamicCNN, DynamicConv2d, TemperatureSchedule, dynamic_conv2d


def _round_trip(model: torch.nn.Module, rebuilt: torch.nn.Module, **load_kwargs):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return rebuilt.load_state_dict(torch.load(buffer), **load_kwargs)


def test_temperature_round_trips_through_state_dict():
    torch.manual_seed(0)
    model = DynamicCNN(in_channels=3, num_classes=10, num_experts=4, temperature=30.0)
    dynconv.set_temperature(model, 1.0)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    rebuilt = DynamicCNN(in_channels=3, num_classes=10, num_experts=4, temperature=30.0).eval()
    _round_trip(model, rebuilt)
    routers = [m for m in rebuilt.modules() if isinstance(m, dynconv.RoutingMLP)]
    assert routers and all(router.temperature == 1.0 for router in routers)
    torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)


def test_checkpoint_without_temperature_keeps_the_built_value_and_warns_once(monkeypatch):
    import dynconv.routing as routing_module

    monkeypatch.setattr(routing_module, "_warned_missing_temperature", False)
    model = DynamicCNN(in_channels=3, num_classes=10, num_experts=4, temperature=7.0)
    old_state = {k: v for k, v in model.state_dict().items()
                 if not k.endswith("temperature_tensor")}
    assert len(old_state) < len(model.state_dict())
    rebuilt = DynamicCNN(in_channels=3, num_classes=10, num_experts=4, temperature=5.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rebuilt.load_state_dict(old_state)  # strict: must not raise
        rebuilt.load_state_dict(old_state)
    messages = [str(w.message) for w in caught if "temperature" in str(w.message)]
    assert len(messages) == 1, messages
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(m.temperature == 5.0 for m in rebuilt.modules()
               if isinstance(m, dynconv.RoutingMLP))


def test_strict_load_still_reports_other_missing_keys():
    model = DynamicConv2d(4, 6, 3, padding=1)
    state = model.state_dict()
    del state["weight"]
    with pytest.raises(RuntimeError, match="weight"):
        DynamicConv2d(4, 6, 3, padding=1).load_state_dict(state)


def test_schedule_state_round_trip_and_clear_errors():
    sched = TemperatureSchedule(start=30.0, end=1.0, steps=10)
    for _ in range(4):
        sched.step()
    restored = TemperatureSchedule()
    restored.load_state_dict(sched.state_dict())
    assert restored.temperature == sched.temperature and restored.step_count == 4
    with pytest.raises(ValueError, match=r"missing \['start', 'end', 'steps', 'step_count'\]"):
        TemperatureSchedule().load_state_dict({})
    with pytest.raises(TypeError, match="state must be a dict"):
        TemperatureSchedule().load_state_dict([1, 2])
    with pytest.raises(ValueError, match="step_count"):
        TemperatureSchedule().load_state_dict({**sched.state_dict(), "step_count": -1})


@pytest.mark.parametrize("module", ["conv", "block", "cnn"])
def test_module_forward_on_meta_device(module):
    if module == "conv":
        model, x = DynamicConv2d(8, 16, 3, padding=1, device="meta"), torch.empty(
            5, 8, 12, 12, device="meta")
        expected = (5, 16, 12, 12)
    elif module == "block":
        model = dynconv.DynamicBlock(8, 16, stride=2, device="meta")
        x, expected = torch.empty(5, 8, 12, 12, device="meta"), (5, 16, 6, 6)
    else:
        model = DynamicCNN(in_channels=3, num_classes=10, device="meta")
        x, expected = torch.empty(5, 3, 32, 32, device="meta"), (5, 10)
    y = model(x)
    assert y.device.type == "meta" and tuple(y.shape) == expected
    assert "temperature=nan" in repr(model) or module != "conv"


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_empty_batch_on_every_backend(backend, bias):
    case = Case(0, 4, 6, 6, 5, (3, 3), 1, 1, 1, 1, 3, bias)
    x, bank, routing, bias_bank = (None if t is None else t.requires_grad_()
                                   for t in make_inputs(case, torch.float32))
    y = dynamic_conv2d(x, bank, routing, bias_bank, **case.geometry, backend=backend)
    assert tuple(y.shape) == (0, 6, 6, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and routing.grad.shape == routing.shape
    assert torch.equal(bank.grad, torch.zeros_like(bank))
    if bias:
        assert torch.equal(bias_bank.grad, torch.zeros_like(bias_bank))


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
def test_channels_last_in_channels_last_out(backend):
    case = Case(3, 4, 8, 7, 6, (3, 3), 1, 1, 1, 1, 2, False, "channels_last")
    x, bank, routing, _ = make_inputs(case, torch.float32)
    y = dynamic_conv2d(x, bank, routing, **case.geometry, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
def test_empty_image_is_an_error_not_nan(backend):
    conv = DynamicConv2d(3, 4, 3, padding=2, backend=backend)
    with pytest.raises(ValueError, match=r"H > 0 and W > 0.*\(2, 3, 0, 0\)"):
        conv(torch.randn(2, 3, 0, 0))
    with pytest.raises(ValueError, match=r"H > 0 and W > 0"):
        dynamic_conv2d(torch.randn(2, 3, 0, 4), conv.weight, torch.full((2, 4), 0.25),
                       padding=2, backend=backend)


def test_wrong_input_dtype_names_both_dtypes():
    conv = DynamicConv2d(3, 4, 3)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64.*parameters are torch.float32"):
        conv(torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_autocast_still_accepts_other_input_dtypes():
    conv = DynamicConv2d(3, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(torch.randn(2, 3, 8, 8))
    assert y.dtype == torch.bfloat16


def test_numpy_integers_are_accepted_like_nn_conv2d():
    conv = DynamicConv2d(np.int64(4), np.int64(6), np.int64(3), stride=np.int64(2),
                         padding=(np.int32(1), np.int32(1)), groups=np.int64(2),
                         num_experts=np.int64(3))
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.groups == 2
    assert all(type(v) is int for v in (*conv.stride, *conv.padding, conv.groups))
    y = dynamic_conv2d(torch.randn(2, 4, 9, 9), conv.weight.detach(),
                       torch.full((2, 3), 1 / 3), stride=np.int64(2), padding=np.int64(1),
                       dilation=np.int64(1), groups=np.int64(2))
    assert tuple(y.shape) == (2, 6, 5, 5)
    with pytest.raises(TypeError, match="stride"):
        DynamicConv2d(4, 6, 3, stride=np.float64(2.0))


def test_train_help_shows_defaults():
    result = subprocess.run([sys.executable, "-m", "dynconv.train", "--help"],
                            capture_output=True, text=True, check=True)
    assert "(default: 18)" in result.stdout and "(default: 0.1 with sgd, 0.002 with adamw)" in (
        " ".join(result.stdout.split()))
