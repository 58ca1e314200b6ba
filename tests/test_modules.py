"""RoutingMLP, DynamicConv2d, DynamicBlock, DynamicCNN and the temperature tools."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv import (
    DynamicBlock,
    DynamicCNN,
    DynamicConv2d,
    RoutingMLP,
    TemperatureSchedule,
    dynamic_conv2d,
    set_temperature,
)


def _spread_router(**kwargs):
    """A router whose logits differ clearly between experts (the default init is near uniform)."""
    torch.manual_seed(0)
    router = RoutingMLP(8, num_experts=5, **kwargs)
    with torch.no_grad():
        router.fc2.weight.normal_(0, 1.0)
        router.fc2.bias.copy_(torch.arange(5.0))
    return router


def test_softmax_rows_sum_to_one():
    a = _spread_router()(torch.randn(6, 8, 5, 5))
    assert a.shape == (6, 5)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(6))
    assert (a > 0).all()


def test_temperature_controls_sharpness():
    router = _spread_router()
    x = torch.randn(4, 8, 5, 5)
    router.temperature = 1e-3
    assert router(x).max(dim=1).values.min() > 0.99  # near one-hot
    router.temperature = 1e4
    a = router(x)
    assert (a - 0.2).abs().max() < 1e-3  # near uniform


def test_small_init_starts_near_uniform_and_the_default_depends_on_the_input():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6)
    small = RoutingMLP(16, num_experts=4, init="small")(x)
    assert (small - 0.25).abs().max() < 0.05
    default = RoutingMLP(16, num_experts=4)  # "dyconv": logits at the features' scale
    assert default.init == "dyconv"
    assert float(default(x).std(dim=0).mean()) > 0.02  # varies between the samples
    assert DynamicConv2d(16, 8, 3).router.init == "dyconv"
    assert DynamicCNN(1, 10, router_init="small").stages[0].conv.router.init == "small"
    assert DynamicConv2d.from_conv2d(nn.Conv2d(16, 8, 3)).router.init == "small"


def test_sigmoid_gate_is_in_open_unit_interval():
    a = _spread_router(gate="sigmoid")(torch.randn(4, 8, 3, 3))
    assert ((a > 0) & (a < 1)).all()
    assert not torch.allclose(a.sum(dim=1), torch.ones(4))  # independent gates, not a softmax


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_temperature_rejected(bad):
    with pytest.raises(ValueError, match="temperature"):
        RoutingMLP(8, temperature=bad)
    router = RoutingMLP(8)
    with pytest.raises(ValueError, match="temperature"):
        router.temperature = bad
    with pytest.raises(ValueError, match="temperature"):
        set_temperature(nn.Sequential(router), bad)
    assert router.temperature == 1.0


def test_temperature_wrong_type_and_unknown_gate():
    with pytest.raises(TypeError, match="temperature"):
        RoutingMLP(8, temperature="hot")
    with pytest.raises(ValueError, match="gate"):
        RoutingMLP(8, gate="relu")
    with pytest.raises(ValueError, match="gate"):
        DynamicConv2d(4, 4, 3, gate="tanh")


def test_router_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        RoutingMLP(8)(torch.randn(2, 7, 4, 4))


def test_conv_parameters_shapes_and_init():
    conv = DynamicConv2d(6, 10, (3, 1), groups=2, num_experts=5)
    assert conv.weight.shape == (5, 10, 3, 3, 1)
    assert conv.bias.shape == (5, 10)
    fan_in = 3 * 3 * 1
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) on one kernel's fan-in
    assert conv.weight.abs().max() <= bound
    assert conv.weight.abs().max() > 0.8 * bound  # not the tighter bound of a 5-D fan-in
    assert conv.bias.abs().max() <= bound
    assert not torch.equal(conv.weight[0], conv.weight[1])  # independently initialised
    assert DynamicConv2d(4, 4, 3, bias=False).bias is None


def test_conv_factory_kwargs_and_extra_repr():
    conv = DynamicConv2d(
        4, 6, 3, padding="same", dilation=2, groups=2, num_experts=3, dtype=torch.float64
    )
    assert all(p.dtype == torch.float64 for p in conv.parameters())
    text = repr(conv)
    for piece in [
        "4, 6",
        "kernel_size=(3, 3)",
        "padding=same",
        "num_experts=3",
        "dilation=(2, 2)",
        "groups=2",
        "temperature=1",
        "gate='softmax'",
    ]:
        assert piece in text, piece
    y = conv(torch.randn(2, 4, 7, 9, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), ((2, 5), (1, 2)), (3, 2)])
@pytest.mark.parametrize("padding", ["same", "valid", 1, (2, 0)])
def test_padding_modes_match_nn_conv2d(kernel, dilation, padding):
    torch.manual_seed(0)
    conv = DynamicConv2d(
        3, 4, kernel, padding=padding, dilation=dilation, num_experts=1, backend="native"
    )
    static = nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation)
    with torch.no_grad():  # with K = 1 the dynamic conv is exactly a static one
        static.weight.copy_(conv.weight[0])
        static.bias.copy_(conv.bias[0])
    x = torch.randn(2, 3, 9, 10)
    torch.testing.assert_close(conv(x), static(x), rtol=1e-5, atol=1e-5)


def test_return_routing_and_temperature_delegation():
    conv = DynamicConv2d(4, 6, 3, padding=1, num_experts=3, temperature=7.0)
    assert conv.temperature == 7.0 and conv.router.temperature == 7.0
    conv.temperature = 2.5
    assert conv.router.temperature == 2.5
    x = torch.randn(2, 4, 5, 5)
    y, a = conv(x, return_routing=True)
    assert y.shape == (2, 6, 5, 5) and a.shape == (2, 3)
    torch.testing.assert_close(y, dynamic_conv2d(x, conv.weight, a, conv.bias, padding=1))


def test_block_shapes():
    block = DynamicBlock(4, 8, kernel_size=3, stride=2, num_experts=3)
    y, a = block(torch.randn(2, 4, 9, 9), return_routing=True)
    assert y.shape == (2, 8, 5, 5) and a.shape == (2, 3)
    assert (y >= 0).all()  # ends in ReLU


def test_cnn_routing_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = DynamicCNN(in_channels=3, num_classes=10, num_experts=4)
    logits, routings = net(torch.randn(4, 3, 32, 32), return_routing=True)
    assert logits.shape == (4, 10)
    assert len(routings) == 3 and all(a.shape == (4, 4) for a in routings)
    logits.square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("train", [True, False])
def test_cnn_batch_one(train):
    net = DynamicCNN(num_experts=2).train(train)
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_cnn_state_dict_round_trip():
    torch.manual_seed(0)
    net = DynamicCNN(num_experts=3)
    net(torch.randn(4, 3, 16, 16))  # move the BN running stats away from their init
    net.eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    twin = DynamicCNN(num_experts=3)
    twin.load_state_dict(torch.load(buffer))
    twin.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), twin(x), rtol=0, atol=0)


def test_set_temperature_reaches_every_router():
    net = DynamicCNN(num_experts=2)
    assert set_temperature(net, 10.0) == 3
    assert all(stage.conv.temperature == 10.0 for stage in net.stages)


def test_temperature_schedule_anneals_linearly_then_holds():
    net = DynamicCNN(num_experts=2)
    sched = TemperatureSchedule(start=30.0, end=1.0, steps=29)
    assert sched.apply(net) == 30.0
    values = [sched.step(net) for _ in range(40)]
    expected = [max(1.0, 30.0 - (i + 1)) for i in range(40)]
    assert values == pytest.approx(expected)
    assert net.stages[2].conv.temperature == pytest.approx(1.0)
    restored = TemperatureSchedule(steps=5)
    restored.load_state_dict(sched.state_dict())
    assert restored.temperature == pytest.approx(1.0) and restored.step_count == 40
    with pytest.raises(ValueError, match="steps"):
        TemperatureSchedule(steps=0)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    net = DynamicCNN(num_experts=3, widths=(8, 16, 16), stem_channels=8)
    x, target = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("init", RoutingMLP.INIT_SCHEMES)
def test_router_init_schemes(init):
    torch.manual_seed(0)
    router = RoutingMLP(64, num_experts=4, init=init)
    assert router.init == init and f"init={init!r}" in repr(router)
    fc2 = router.fc2
    if init == "small":
        assert float(fc2.weight.std()) == pytest.approx(1e-2, rel=0.3)
        assert not fc2.bias.any()
    elif init == "linear":  # nn.Linear's own: uniform in +-1/sqrt(fan_in)
        bound = 1 / math.sqrt(fc2.in_features)
        assert float(fc2.weight.abs().max()) <= bound and float(fc2.bias.abs().max()) <= bound
        assert float(fc2.weight.std()) > 0.5 * bound / math.sqrt(3)
    else:  # Kaiming normal on fan_out with the ReLU gain, zero biases
        expected = math.sqrt(2 / fc2.out_features)
        assert float(router.fc1.weight.std()) == pytest.approx(
            math.sqrt(2 / router.fc1.out_features), rel=0.2)
        assert float(fc2.weight.std()) == pytest.approx(expected, rel=0.5)
        assert not fc2.bias.any() and not router.fc1.bias.any()


def test_router_reset_with_a_scheme_makes_it_the_modules_own():
    router = RoutingMLP(16, num_experts=4)
    router.reset_parameters("dyconv")
    assert router.init == "dyconv"
    torch.manual_seed(0)
    router.reset_parameters()  # again by its own scheme
    assert router.init == "dyconv" and router.fc2.weight.std() > 0.1
    with pytest.raises(ValueError, match="init must be one of"):
        router.reset_parameters("zeros")
    with pytest.raises(ValueError, match="init must be one of"):
        RoutingMLP(16, init="normal")
