"""timm interop: ``dynconv.convert_timm`` runs timm's CondConv models on dynconv's backends with
the same numbers, loads timm's state_dicts strictly, trains and compiles; and timm's own
CondConv2d is a provider of the perf harness."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv.timm_interop import TimmCondConv2d

timm = pytest.importorskip("timm")
from timm.layers import CondConv2d  # noqa: E402  (after the importorskip)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _timm_layer(*args, seed=0, **kwargs) -> CondConv2d:
    torch.manual_seed(seed)
    return CondConv2d(*args, **kwargs)


# --- one layer: every kind of padding, stride, dilation, groups, bias ------------------------

LAYERS = [
    # (in, out, kernel, stride, padding, dilation, groups, bias): timm's padding argument
    pytest.param(4, 6, 3, 1, "", 1, 1, False, id="k3-default"),
    pytest.param(4, 6, 3, 2, "", 1, 1, True, id="k3-s2-default-bias"),
    pytest.param(4, 6, 4, 1, "", 1, 1, False, id="k4-default"),
    pytest.param(4, 6, 5, 2, "same", 1, 2, True, id="k5-s2-same-dynamic"),
    pytest.param(4, 4, 3, 1, "same", 2, 4, False, id="k3-d2-same-static-depthwise"),
    pytest.param(4, 6, 4, 1, "same", 1, 1, False, id="k4-same-dynamic"),
    pytest.param(4, 6, 3, 2, "valid", 1, 1, True, id="k3-s2-valid"),
    pytest.param(4, 6, 1, 1, 0, 1, 1, False, id="k1-int"),
    pytest.param(4, 6, (3, 5), (2, 1), (1, 2), 1, 1, True, id="k3x5-pair"),
]


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "padding", "dilation", "groups",
                          "bias"), LAYERS)
def test_a_converted_layer_computes_what_timms_computes(cin, cout, kernel, stride, padding,
                                                        dilation, groups, bias):
    timm_conv = _timm_layer(cin, cout, kernel, stride, padding, dilation, groups, bias,
                            num_experts=3, dtype=torch.float64)
    converted = dynconv.convert_timm(timm_conv)
    assert isinstance(converted, TimmCondConv2d) and converted.router is None
    # timm's padding resolved when the layer was built: dynamic "same" is TF's SAME per call
    assert converted.padding == ("same_tf" if timm_conv.dynamic_padding else timm_conv.padding)
    generator = torch.Generator().manual_seed(1)
    for height, width in ((9, 9), (10, 7)):  # odd and even sizes: the SAME padding differs
        x = torch.randn(2, cin, height, width, generator=generator, dtype=torch.float64)
        routing = torch.sigmoid(torch.randn(2, 3, generator=generator, dtype=torch.float64))
        want = timm_conv(x, routing)
        # float64 on both sides: only the order of the sums differs (a few eps of the output)
        torch.testing.assert_close(converted(x, routing), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(converted(x, routing_weights=routing), want, rtol=1e-12,
                                   atol=1e-12)


def test_the_weights_are_timms_reshaped_and_the_layer_keeps_its_state():
    timm_conv = _timm_layer(4, 6, 3, 2, "", 1, 2, True, num_experts=5)
    timm_conv.eval().weight.requires_grad_(False)
    layer = TimmCondConv2d.from_timm(timm_conv, backend="loop")
    assert layer.weight.shape == (5, 6, 2, 3, 3) and layer.bias.shape == (5, 6)
    assert torch.equal(layer.weight.flatten(1), timm_conv.weight)
    assert torch.equal(layer.bias, timm_conv.bias)
    assert layer.weight.data_ptr() != timm_conv.weight.data_ptr()  # a copy
    assert not layer.training and not layer.weight.requires_grad and layer.bias.requires_grad
    assert layer.backend == "loop" and layer.gate == "sigmoid"
    assert "router=False" in repr(layer)


def test_routing_is_given_once():
    layer = TimmCondConv2d.from_timm(_timm_layer(4, 6, 3, num_experts=2))
    x, routing = torch.randn(1, 4, 5, 5), torch.full((1, 2), 0.5)
    torch.testing.assert_close(layer(x, routing=routing), layer(x, routing))
    y, returned = layer(x, routing_weights=routing, return_routing=True)
    assert returned is routing and y.shape == (1, 6, 5, 5)
    with pytest.raises(TypeError, match="routing_weights=.*routing=.*not both"):
        layer(x, routing, routing=routing)
    with pytest.raises(ValueError, match="routing is required"):
        layer(x)


# --- state_dicts -------------------------------------------------------------------------------


def test_a_converted_layer_loads_timms_flat_layout_and_its_own():
    source = _timm_layer(4, 6, 3, 1, "", 1, 1, True, num_experts=3, seed=1)
    layer = TimmCondConv2d.from_timm(_timm_layer(4, 6, 3, 1, "", 1, 1, True, num_experts=3))
    layer.load_state_dict(source.state_dict(), strict=True)  # (K, Cout * Cin * kh * kw)
    assert torch.equal(layer.weight.flatten(1), source.weight)
    own = copy.deepcopy(layer.state_dict())
    assert own["weight"].shape == (3, 6, 4, 3, 3)  # dynconv's layout on save
    fresh = TimmCondConv2d(4, 6, 3, padding=1, bias=True, num_experts=3)
    fresh.load_state_dict(own, strict=True)
    assert torch.equal(fresh.weight, layer.weight)


def test_a_timm_state_dict_of_another_k_or_layer_is_refused_by_name():
    layer = TimmCondConv2d.from_timm(_timm_layer(4, 6, 3, num_experts=4))
    with pytest.raises(ValueError, match=r"num_experts: expected 4.*got 2"):
        layer.load_state_dict(_timm_layer(4, 6, 3, num_experts=2).state_dict())
    with pytest.raises(ValueError, match=r"timm's layout.*\(4, 216\).*got shape \(4, 120\)"):
        layer.load_state_dict(_timm_layer(4, 6, (5, 1), num_experts=4).state_dict())


# --- a whole timm model: efficientnet_cc_b0_4e with random weights ----------------------------


@pytest.fixture(scope="module")
def timm_model():
    """timm's efficientnet_cc_b0_4e (24 CondConv2d layers in CondConvResidual blocks), random
    weights, no dropout (so that a training step is deterministic)."""
    torch.manual_seed(0)
    return timm.create_model("efficientnet_cc_b0_4e", pretrained=False, drop_rate=0.0)


def _cond_convs(model):
    return [m for m in model.modules() if isinstance(m, CondConv2d)]


def test_every_cond_conv_of_efficientnet_cc_is_converted(timm_model):
    model = dynconv.convert_timm(copy.deepcopy(timm_model))
    assert len(_cond_convs(timm_model)) == 24
    assert _cond_convs(model) == []
    converted = [m for m in model.modules() if isinstance(m, TimmCondConv2d)]
    assert len(converted) == 24
    assert all(m.backend == "auto" and m.num_experts == 4 for m in converted)


@pytest.mark.parametrize("training", [False, True])
def test_a_converted_efficientnet_cc_computes_what_timms_computes(timm_model, training):
    model = dynconv.convert_timm(copy.deepcopy(timm_model)).train(training)
    reference = copy.deepcopy(timm_model).train(training)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features, want_features = model.forward_features(x), reference.forward_features(x)
        logits, want_logits = model.forward_head(features), reference.forward_head(want_features)
    # float32 through 16 blocks and ~80 convolutions, whose per-sample sums run in another
    # order than timm's grouped conv: measured ~100 eps of the largest value (train mode's
    # BatchNorm divides by small batch deviations); 1000 eps leaves headroom.
    for got, want in ((features, want_features), (logits, want_logits)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=1000 * _eps(torch.float32) * scale)


def test_tf_efficientnet_cc_pads_tensorflow_style_after_conversion():
    """timm's tf_ port builds its layers with padding='same': its stride-2 5x5 depthwise
    CondConv2d pads each input by its size (TF's SAME), which becomes padding="same_tf"."""
    torch.manual_seed(0)
    reference = timm.create_model("tf_efficientnet_cc_b0_4e", pretrained=False).eval()
    model = dynconv.convert_timm(copy.deepcopy(reference))
    same_tf = [name for name, m in model.named_modules()
               if isinstance(m, TimmCondConv2d) and m.padding == "same_tf"]
    assert same_tf == ["blocks.5.0.conv_dw"]
    x = torch.randn(1, 3, 65, 63, generator=torch.Generator().manual_seed(7))  # odd sizes
    with torch.no_grad():
        got, want = model.forward_features(x), reference.forward_features(x)
    # float32, as in the test above
    torch.testing.assert_close(got, want, rtol=0,
                               atol=1000 * _eps(torch.float32) * want.abs().max().item())


def test_a_converted_model_loads_timms_state_dict_strictly(timm_model):
    torch.manual_seed(3)
    other = timm.create_model("efficientnet_cc_b0_4e", pretrained=False, drop_rate=0.0).eval()
    model = dynconv.convert_timm(copy.deepcopy(timm_model)).eval()
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = model.forward_features(x), other.forward_features(x)
    torch.testing.assert_close(got, want, rtol=0,
                               atol=1000 * _eps(torch.float32) * want.abs().max().item())
    # and the converted model's own state_dict reloads into a converted copy
    copy_model = dynconv.convert_timm(copy.deepcopy(timm_model))
    copy_model.load_state_dict(model.state_dict(), strict=True)


def test_one_training_step_matches_timms(timm_model):
    """Loss, every gradient and every updated parameter of one SGD step, converted vs timm
    (float32; the single-layer tests above check the algebra in float64)."""
    dtype = torch.float32
    reference = copy.deepcopy(timm_model).to(dtype).train()
    model = dynconv.convert_timm(copy.deepcopy(reference))
    generator = torch.Generator().manual_seed(5)
    # 64 x 64: the last stages are 2 x 2. Smaller inputs leave train-mode BatchNorm one pixel
    # of two samples per channel, which turns rounding differences into different outputs.
    x = torch.randn(2, 3, 64, 64, generator=generator, dtype=dtype)
    target = torch.tensor([1, 7])
    losses = []
    for net in (reference, model):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # as the forward: measured ~200 eps of the largest gradient
    tolerance = 1000 * _eps(dtype)
    assert losses[1] == pytest.approx(losses[0], rel=tolerance)
    largest = max(p.grad.abs().max().item() for p in reference.parameters())
    pairs = list(zip(reference.named_parameters(), model.named_parameters()))
    assert len(pairs) == len(list(reference.parameters())) == len(list(model.parameters()))
    for (name, want), (other_name, got) in pairs:
        assert name == other_name
        torch.testing.assert_close(got.grad, want.grad.reshape(got.shape), rtol=0,
                                   atol=tolerance * largest, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(got.detach(), want.detach().reshape(got.shape), rtol=0,
                                   atol=0.1 * tolerance * largest
                                   + 2 * _eps(dtype) * want.detach().abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_a_converted_timm_block_compiles_fullgraph(timm_model):
    """One CondConvResidual block of the converted model (router, three converted layers,
    BatchNorms, SiLU, residual) under torch.compile(fullgraph=True, dynamic=True): forward and
    backward.
    (The whole EfficientNet compiles too, but takes minutes on a 2-core machine.)"""
    model = dynconv.convert_timm(copy.deepcopy(timm_model)).train()
    block = model.blocks[4][1]
    assert type(block).__name__ == "CondConvResidual"
    assert isinstance(block.conv_dw, TimmCondConv2d) and block.conv_dw.groups > 1
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    x = torch.randn(2, block.conv_pw.in_channels, 6, 6,
                    generator=torch.Generator().manual_seed(6), requires_grad=True)
    got = compiled(x)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    want = block(x)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    # float32, a handful of layers; the compiled graph fuses the pointwise ops differently
    for a, b in ((got, want), (grad_got, grad_want)):
        torch.testing.assert_close(a, b, rtol=0,
                                   atol=1000 * _eps(torch.float32) * b.abs().max().item())


# --- convert_timm's edges ----------------------------------------------------------------------


def test_convert_timm_filter_and_nothing_to_convert():
    model = nn.Sequential(_timm_layer(4, 6, 3, num_experts=2), _timm_layer(6, 6, 1,
                                                                           num_experts=2))
    dynconv.convert_timm(model, filter=lambda name, conv: conv.kernel_size == (3, 3),
                         backend="grouped")
    assert isinstance(model[0], TimmCondConv2d) and model[0].backend == "grouped"
    assert type(model[1]) is CondConv2d
    with pytest.warns(UserWarning, match="convert_timm converted nothing.*timm's CondConv2d"):
        dynconv.convert_timm(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_convert_timm_refuses_what_it_would_not_reproduce():
    class Custom(CondConv2d):
        def forward(self, x, routing_weights):
            return super().forward(x, routing_weights) * 2

    with pytest.raises(TypeError, match="forward of its own"):
        dynconv.convert_timm(nn.Sequential(Custom(4, 4, 3)))
    with pytest.raises(TypeError, match="conv must be a timm.layers.CondConv2d, got Conv2d"):
        TimmCondConv2d.from_timm(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        dynconv.convert_timm(_timm_layer(4, 4, 3), backend="trition")


def test_convert_timm_without_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.layers", None)
    with pytest.raises(ImportError, match=r'pip install "dynconv\[timm\]"'):
        dynconv.convert_timm(nn.Sequential())


# --- the perf harness's timm provider -------------------------------------------------------


def _layer_case(spatial_dims=2):
    from dynconv.autotune.bench import Case
    from dynconv.autotune.shapes import ConvShape

    if spatial_dims == 1:
        shape = ConvShape("t1", 4, 4, 1, 12, 1, 3, 1, 1, spatial_dims=1)
    else:
        shape = ConvShape("t", 4, 6, 6, 6, 3, 3, 2, 1, groups=2)
    return Case("layers", shape, 2, experts=3, memory=False)


def test_the_timm_provider_computes_the_same_conv_as_the_others():
    from dynconv.autotune.bench import forward_fn, make_inputs

    case = _layer_case()
    tensors = make_inputs(case, "cpu")
    timm_forward, timm_leaves = forward_fn("timm", case, tensors)
    loop_forward, _ = forward_fn("loop", case, tensors)
    torch.testing.assert_close(timm_forward(), loop_forward(), rtol=1e-5, atol=1e-5)
    assert timm_leaves[0] is tensors["x"] and timm_leaves[2] is tensors["routing"]


def test_the_timm_provider_is_timed_on_layers_and_skipped_with_a_note_without_timm(monkeypatch):
    from dynconv.autotune import bench
    from dynconv.autotune.measure import Timer

    timer = Timer("cpu", rep_ms=1.0)
    rows = bench.measure_case(_layer_case(), ["static", "timm"], "cpu", 1, timer, False)
    timm_rows = [r for r in rows if r["provider"] == "timm"]
    assert [r["mode"] for r in timm_rows] == list(bench.MODES)
    assert all(r["status"] == "ok" and r["time_ms"] > 0 for r in timm_rows), timm_rows
    # 1-D: skipped with a note; another group: not timed at all
    rows = bench.measure_case(_layer_case(1), ["static", "timm"], "cpu", 1, timer, False)
    assert {r["note"] for r in rows if r["provider"] == "timm"} == {
        "timm's CondConv2d is 2-D only"}
    other_group = bench.replace(_layer_case(), group="batch")
    rows = bench.measure_case(other_group, ["static", "timm"], "cpu", 1, timer, False)
    assert {r["provider"] for r in rows} == {"static"}
    # without timm: skipped rows that say why, never silently absent
    monkeypatch.setitem(sys.modules, "timm", None)  # find_spec("timm") is then None
    rows = bench.measure_case(_layer_case(), ["static", "timm"], "cpu", 1, timer, False)
    timm_rows = [r for r in rows if r["provider"] == "timm"]
    assert len(timm_rows) == len(bench.MODES)
    assert all(r["status"] == "skipped" and "timm is not installed" in r["note"]
               for r in timm_rows)



def test_the_quick_preset_times_timm_on_its_layers():
    from dynconv.autotune import bench

    assert "timm" in bench.DEFAULT_PROVIDERS
    cases = bench.preset_cases("quick", "cpu")
    timed = [c for c in cases if bench.provider_applies("timm", c)]
    assert timed and all(c.group == "layers" for c in timed)
    assert len(timed) == sum(c.group == "layers" for c in cases)
