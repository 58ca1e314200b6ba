"""ODConv2d, the module: its four attentions (and the heads that are absent), the output against a
float64 per-sample computation written from ODConv's formula, training, state, temperature,
conversion, BatchNorm folding, optimiser groups, ONNX / torch.export / torch.compile, and the
errors for bad arguments."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import onnx_ops, onnxruntime_errors
from torch import nn

import dynconv
import dynconv.routing as routing_module
from dynconv import DynamicConv2d, ODConv2d, TemperatureSchedule, set_temperature


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere: random head biases, BatchNorm affine and running
    statistics (the initial ones are 0, 1 and fresh statistics, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("temperature_tensor") or name.endswith("num_batches_tracked"):
                continue
            noise = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise)
            elif name.endswith("bn.weight"):
                tensor.copy_(0.5 + noise)
            elif tensor.dim() <= 2 and not name.endswith("fc.weight") and name != "weight":
                tensor.copy_(noise - 0.5)  # biases, bias banks, BN shifts and means
    return module


def _reference(module: ODConv2d, x: torch.Tensor):
    """y and the four attentions, in float64, from ODConv's formula and the module's parameters
    only: GAP -> FC -> BN -> ReLU -> heads / T, then per sample
    M_b[o, i, t] = out[b, o] * in[b, c] * tap[b, t] * sum_k a[b, k] W_k[o, i, t] and
    y[b] = conv2d(x[b], M_b) + sum_k a[b, k] bias[k]. Absent heads are ones."""
    p = {name: t.detach().double() for name, t in module.state_dict().items()}
    x = x.double()
    batch, cin = x.shape[:2]
    k, cout, cin_g, kh, kw = p["weight"].shape
    groups = module.groups
    temperature = p["router.temperature_tensor"]
    hidden = x.mean(dim=(2, 3)) @ p["router.fc.weight"].T
    bn = module.router.bn
    if module.training:
        mean, var = hidden.mean(0), hidden.var(0, unbiased=False)
    else:
        mean, var = p["router.bn.running_mean"], p["router.bn.running_var"]
    hidden = (hidden - mean) / torch.sqrt(var + bn.eps) * p["router.bn.weight"] + p[
        "router.bn.bias"]
    hidden = hidden.clamp_min(0)

    def head(name):
        if f"router.{name}.weight" not in p:
            return None
        return (hidden @ p[f"router.{name}.weight"].T + p[f"router.{name}.bias"]) / temperature

    in_scale = torch.sigmoid(head("in_fc"))
    out_logits, tap_logits, kernel_logits = head("out_fc"), head("tap_fc"), head("kernel_fc")
    out_scale = None if out_logits is None else torch.sigmoid(out_logits)
    tap_scale = None if tap_logits is None else torch.sigmoid(tap_logits).view(batch, kh, kw)
    routing = None if kernel_logits is None else torch.softmax(kernel_logits, dim=1)
    # the input channel c that weight (o, i) reads: group(o) * Cin/G + i
    channel = (torch.arange(cout)[:, None] // (cout // groups)) * cin_g + torch.arange(cin_g)
    ys = []
    for b in range(batch):
        a = torch.ones(1, dtype=x.dtype) if routing is None else routing[b]
        mixed = sum(a[j] * p["weight"][j] for j in range(k))
        scale = in_scale[b][channel][:, :, None, None]
        if out_scale is not None:
            scale = scale * out_scale[b][:, None, None, None]
        if tap_scale is not None:
            scale = scale * tap_scale[b]
        bias = None if "bias" not in p else a @ p["bias"]
        ys.append(F.conv2d(x[b:b + 1], scale * mixed, bias, module.stride, module.padding,
                           module.dilation, groups))
    return torch.cat(ys), (in_scale, out_scale, tap_scale, routing)


# (Cin, Cout, kernel, stride, padding, dilation, groups, K, bias): the heads absent in turn.
CASES = {
    "all heads": (8, 12, 3, 1, 1, 1, 1, 4, True),
    "depthwise": (8, 8, 3, 2, 1, 1, 8, 3, False),  # no out-channel head
    "1x1 grouped": (8, 12, 1, 1, 0, 1, 2, 2, True),  # no spatial head
    "K=1 same": (6, 8, (3, 2), 1, "same", 1, 1, 1, True),  # no kernel head; odd "same" total
    "grouped strided": (12, 6, 3, 2, 2, 2, 3, 3, False),
}


def _build(case, **kwargs):
    cin, cout, kernel, stride, padding, dilation, groups, k, bias = CASES[case]
    return ODConv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias,
                    num_experts=k, **kwargs)


# F.conv2d warns about the copy that "same" with an even kernel makes (the reference's, not ours).
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_a_float64_computation_of_the_formula(case):
    torch.manual_seed(0)
    model = _randomise(_build(case, temperature=0.7, dtype=torch.float64))
    cin, cout, kernel, _, _, _, groups, k, _ = CASES[case]
    x = torch.randn(3, cin, 9, 10, dtype=torch.float64)
    for training in (False, True):
        model.train(training)
        want, want_attention = _reference(model, x)
        for backend in ("native", "loop"):
            model.backend = backend
            y, attention = model(x, return_attention=True)
            torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
            for got_scale, want_scale in zip(attention, want_attention):
                assert (got_scale is None) == (want_scale is None)
                if want_scale is not None:
                    torch.testing.assert_close(got_scale, want_scale, rtol=1e-12, atol=1e-12)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    assert attention.in_scale.shape == (3, cin)
    assert (attention.out_scale is None) == (cin == groups == cout)
    assert (attention.tap_scale is None) == (kh * kw == 1)
    assert (attention.routing is None) == (k == 1)
    assert model.weight.shape == (k, cout, cin // groups, kh, kw)


def test_shapes_heads_and_float32():
    torch.manual_seed(0)
    model = ODConv2d(16, 32, 3, padding=1, num_experts=4)
    y, attention = model(torch.randn(5, 16, 12, 12), return_attention=True)
    assert y.shape == (5, 32, 12, 12) and model.bias is None
    assert attention._fields == ("in_scale", "out_scale", "tap_scale", "routing")
    assert [tuple(t.shape) for t in attention] == [(5, 16), (5, 32), (5, 3, 3), (5, 4)]
    torch.testing.assert_close(attention.routing.sum(1), torch.ones(5))
    assert all(((t > 0) & (t < 1)).all() for t in attention[:3])
    router = model.router
    assert router.fc.out_features == 16 and router.fc.bias is None  # max(int(16 / 16), 16)
    assert ODConv2d(256, 8, 3, reduction=0.25).router.fc.out_features == 64
    assert ODConv2d(8, 8, 3, groups=8).router.out_fc is None
    assert ODConv2d(8, 8, 1).router.tap_fc is None
    assert ODConv2d(8, 8, 3, num_experts=1).router.kernel_fc is None
    # ODConv's initialisation: zero head biases, BN 1 / 0, Kaiming normal fan_out experts.
    assert all(layer.bias.detach().abs().max().item() == 0
               for layer in (router.in_fc, router.out_fc, router.tap_fc, router.kernel_fc))
    assert router.bn.weight.detach().min().item() == 1 and not router.bn.bias.detach().any()
    big = ODConv2d(64, 128, 3, num_experts=2)
    std = math.sqrt(2 / (128 * 9))
    assert abs(big.weight[1].detach().std().item() / std - 1) < 0.05
    assert not torch.equal(big.weight[0], big.weight[1])
    # float32 against the float64 module with the same state
    x = torch.randn(4, 16, 12, 12)
    reference = ODConv2d(16, 32, 3, padding=1, num_experts=4, dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    for mode in (True, False):
        model.train(mode), reference.train(mode)
        torch.testing.assert_close(model(x), reference(x.double()).float(), rtol=1e-4,
                                   atol=1e-5)


def test_temperature_divides_every_head():
    torch.manual_seed(0)
    model = _randomise(ODConv2d(8, 12, 3, num_experts=3).eval())
    x = torch.randn(2, 8, 6, 6)
    _, cold = model(x, return_attention=True)
    model.temperature = 1e4
    _, hot = model(x, return_attention=True)
    for t in hot[:3]:
        torch.testing.assert_close(t, torch.full_like(t, 0.5), rtol=0, atol=1e-3)
    torch.testing.assert_close(hot.routing, torch.full_like(hot.routing, 1 / 3), rtol=0,
                               atol=1e-3)
    assert not torch.allclose(cold.in_scale, hot.in_scale)


def test_gradients_reach_every_parameter_and_sgd_reduces_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(ODConv2d(3, 8, 3, padding=1, bias=True, num_experts=3), nn.ReLU(),
                          ODConv2d(8, 8, 3, padding=1, groups=8, num_experts=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, target = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    names = {name.split(".", 1)[1] for name, _ in model.named_parameters() if name[0] == "0"}
    assert {"weight", "bias", "router.fc.weight", "router.bn.weight", "router.bn.bias",
            "router.in_fc.weight", "router.out_fc.bias", "router.tap_fc.weight",
            "router.kernel_fc.bias"} <= names
    # SGD fits one layer to a fixed target (scaled to the layer's small outputs: each sigmoid
    # attention starts near 0.5).
    model = ODConv2d(4, 8, 3, padding=1, bias=True, num_experts=3)
    x = torch.randn(8, 4, 8, 8)
    target = F.conv2d(x, torch.randn(8, 4, 3, 3), padding=1)
    target = 0.1 * target / target.std()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_dict_round_trip_keeps_the_temperature(monkeypatch):
    torch.manual_seed(0)
    model = _randomise(ODConv2d(8, 12, 3, padding=1, bias=True, temperature=7.0))
    state = model.state_dict()
    assert float(state["router.temperature_tensor"]) == 7.0
    fresh = ODConv2d(8, 12, 3, padding=1, bias=True)
    fresh.load_state_dict(state)
    assert fresh.temperature == 7.0
    x = torch.randn(2, 8, 6, 6)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # an older checkpoint without the temperature: loads strictly, keeps its own, warns once
    monkeypatch.setattr(routing_module, "_warned_missing_temperature", False)
    old = {key: value for key, value in state.items() if not key.endswith("temperature_tensor")}
    built = ODConv2d(8, 12, 3, padding=1, bias=True, temperature=3.0)
    with pytest.warns(UserWarning, match="without the router temperature"):
        built.load_state_dict(old)
    assert built.temperature == 3.0
    with pytest.raises(ValueError, match="temperature"):
        built.load_state_dict({**state, "router.temperature_tensor": torch.tensor(0.0)})
    with pytest.raises(ValueError, match="num_experts"):
        ODConv2d(8, 12, 3, padding=1, bias=True, num_experts=2).load_state_dict(state)


def test_set_temperature_and_schedule_reach_odconv():
    model = nn.Sequential(ODConv2d(4, 8, 3), DynamicConv2d(8, 8, 3), ODConv2d(8, 8, 1))
    assert set_temperature(model, 5.0) == 3
    assert [m.temperature for m in model] == [5.0] * 3
    sched = TemperatureSchedule(start=30.0, end=1.0, steps=2)
    sched.apply(model)
    assert model[0].temperature == 30.0
    sched.step(model)
    assert model[0].temperature == model[2].router.temperature == 15.5
    with pytest.raises(ValueError, match="temperature"):
        model[0].temperature = -1.0


def test_from_conv2d_copies_the_experts():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=2, bias=True)
    od = ODConv2d.from_conv2d(conv, num_experts=3, temperature=2.0)
    assert (od.stride, od.padding, od.dilation, od.groups) == (
        conv.stride, conv.padding, conv.dilation, conv.groups)
    assert od.temperature == 2.0 and od.num_experts == 3
    for k in range(3):
        assert torch.equal(od.weight[k], conv.weight) and torch.equal(od.bias[k], conv.bias)
    # The attentions scale the kernel: the output is not conv's (the docstring says so).
    x = torch.randn(2, 8, 9, 9)
    assert not torch.allclose(od(x), conv(x), atol=1e-3)
    perturbed = ODConv2d.from_conv2d(conv, 4, perturb=0.1,
                                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(perturbed.weight.mean(0), conv.weight, rtol=1e-5, atol=1e-6)
    assert not torch.equal(perturbed.weight[0], perturbed.weight[1])
    assert ODConv2d.from_conv2d(nn.Conv2d(4, 4, 3, bias=False)).bias is None
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        ODConv2d.from_conv2d(nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        ODConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    with pytest.raises(TypeError, match="from conv"):
        ODConv2d.from_conv2d(conv, stride=1)
    with pytest.raises(ValueError, match="perturb"):
        ODConv2d.from_conv2d(conv, perturb=-1.0)


def test_convert_conv2d_kind_odconv():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))

    model = dynconv.convert_conv2d(build(), num_experts=2, kind="odconv", temperature=4.0)
    assert [type(m) for m in model[::2]] == [ODConv2d, ODConv2d]
    assert model[0].temperature == 4.0 and model[2].router.tap_fc is None
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)
    default = dynconv.convert_conv2d(build(), num_experts=2)
    assert [type(m) for m in default[::2]] == [DynamicConv2d, DynamicConv2d]
    kept = dynconv.convert_conv2d(build(), kind="odconv",
                                  filter=lambda name, conv: conv.kernel_size != (1, 1))
    assert [type(m) for m in kept[::2]] == [ODConv2d, nn.Conv2d]
    with pytest.raises(ValueError, match="kind must be one of"):
        dynconv.convert_conv2d(build(), kind="condconv")


@pytest.mark.parametrize("case", ["all heads", "depthwise", "K=1 same"])
def test_fuse_conv_bn_eval_is_exact(case):
    torch.manual_seed(0)
    conv = _randomise(_build(case, dtype=torch.float64)).eval()
    bn = _randomise(nn.BatchNorm2d(conv.out_channels, dtype=torch.float64), seed=1).eval()
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)  # negative scales too
    fused = dynconv.fuse_conv_bn_eval(conv, bn)
    assert isinstance(fused, ODConv2d) and fused.bias is not None
    assert fused.bias is not conv.bias and fused.weight is not conv.weight
    x = torch.randn(4, conv.in_channels, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        dynconv.fuse_conv_bn_eval(conv, nn.BatchNorm1d(conv.out_channels).eval())
    with pytest.raises(ValueError, match="eval mode"):
        dynconv.fuse_conv_bn_eval(conv, nn.BatchNorm2d(conv.out_channels))


def test_param_groups():
    model = nn.Sequential(ODConv2d(4, 8, 3, bias=True), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))
    decay, no_decay = dynconv.param_groups(model, weight_decay=0.1)
    od = model[0]
    decayed, not_decayed = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert decayed == {id(od.weight), id(model[2].weight)}
    assert not_decayed == {id(p) for p in [od.bias, *od.router.parameters(), model[1].weight,
                                           model[1].bias, model[2].bias]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    decay, _ = dynconv.param_groups(model, decay_routers=True)
    assert {id(od.router.fc.weight), id(od.router.in_fc.weight)} <= {
        id(p) for p in decay["params"]}


def test_autocast_casts_every_operand():
    torch.manual_seed(0)
    model = ODConv2d(8, 16, 3, padding=1, bias=True).eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, attention = model(x, return_attention=True)
    assert y.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in attention)
    torch.testing.assert_close(y.float(), model(x), rtol=5e-2, atol=5e-2)


def test_meta_empty_batch_and_channels_last():
    meta = ODConv2d(8, 16, 3, stride=2, padding=1, device="meta")
    assert meta(torch.empty(5, 8, 12, 12, device="meta")).shape == (5, 16, 6, 6)
    model = ODConv2d(8, 16, 3, padding=1)
    y = model.eval()(torch.randn(0, 8, 6, 6))
    assert y.shape == (0, 16, 6, 6)
    x = torch.randn(2, 8, 6, 6)
    y = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, model(x))


def _bad(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_arguments_name_the_argument():
    _bad(lambda: ODConv2d(8, 12, 3, groups=3), ValueError, "groups=3 must divide")
    _bad(lambda: ODConv2d(0, 12, 3), ValueError, "in_channels")
    _bad(lambda: ODConv2d(8, 12, 0), ValueError, "kernel_size")
    _bad(lambda: ODConv2d(8, 12, 3, padding="full"), ValueError, "padding")
    _bad(lambda: ODConv2d(8, 12, 3, stride=2, padding="same"), ValueError, "padding='same'")
    _bad(lambda: ODConv2d(8, 12, 3, num_experts=0), ValueError, "num_experts")
    _bad(lambda: ODConv2d(8, 12, 3, reduction=0.0), ValueError, "reduction")
    _bad(lambda: ODConv2d(8, 12, 3, reduction="1/16"), TypeError, "reduction")
    _bad(lambda: ODConv2d(8, 12, 3, min_channels=0), ValueError, "min_channels")
    _bad(lambda: ODConv2d(8, 12, 3, temperature=0.0), ValueError, "temperature")
    _bad(lambda: ODConv2d(8, 12, 3, backend="cudnn"), ValueError, "backend")
    _bad(lambda: ODConv2d(8, 12, 3, bias=1), TypeError, "bias")
    model = ODConv2d(8, 12, 3)
    _bad(lambda: model(torch.randn(2, 6, 8, 8)), ValueError, r"x must have shape \(B, 8, H, W\)")
    _bad(lambda: model(torch.randn(2, 8, 8)), ValueError, "x must have shape")
    _bad(lambda: model(torch.randn(2, 8, 8, 8, dtype=torch.float64)), TypeError, "dtype")
    _bad(lambda: model(torch.zeros(2, 8, 8, 8, dtype=torch.uint8)), TypeError, "floating")
    _bad(lambda: model([1.0]), TypeError, "torch.Tensor")
    _bad(lambda: model(torch.randn(2, 8, 0, 8)), ValueError, "H > 0")
    _bad(lambda: model(torch.randn(2, 8, 8, 8, device="meta")), ValueError, "meta")


def test_export_onnx_with_a_dynamic_batch(tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(_randomise(ODConv2d(8, 16, 3, padding=1, bias=True, num_experts=3)),
                          _randomise(nn.BatchNorm2d(16), seed=1), nn.ReLU(),
                          ODConv2d(16, 16, 3, stride=2, padding=1, groups=16)).eval()
    folded = dynconv.fold_batchnorm(model, (torch.randn(2, 8, 10, 10),))
    assert isinstance(folded[1], nn.Identity) and isinstance(model[1], nn.BatchNorm2d)
    path = str(tmp_path / "odconv.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynconv.export_onnx(model, (torch.randn(2, 8, 10, 10),), path)
    ops = onnx_ops(onnx.load(path))
    assert all(domain == "ai.onnx" for domain, _ in ops), ops
    assert ops[("ai.onnx", "Conv")] >= 2
    errors = onnxruntime_errors(path, model, (8, 10, 10))
    assert max(errors) < 1e-4, errors


def test_torch_export_with_a_dynamic_batch():
    torch.manual_seed(0)
    model = _randomise(ODConv2d(8, 16, 3, padding=1, bias=True, num_experts=3)).eval()
    program = torch.export.export(model, (torch.randn(2, 8, 10, 10),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    for batch in (1, 5):
        x = torch.randn(batch, 8, 10, 10)
        torch.testing.assert_close(program.module()(x), model(x))


def test_compile_fullgraph_dynamic():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ODConv2d(4, 8, 3, padding=1, num_experts=2, backend="native")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for batch, temperature in ((3, 1.0), (5, 2.0)):
        set_temperature(model, temperature)
        x = torch.randn(batch, 4, 6, 6)
        model.zero_grad()
        got = compiled(x)
        got.square().sum().backward()
        frames.append(counter.frame_count)
        got_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        want = model(x)
        want.square().sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for got_grad, parameter in zip(got_grads, model.parameters()):
            torch.testing.assert_close(got_grad, parameter.grad, rtol=1e-3, atol=1e-4)
    # No recompilation for a new batch size or temperature (the first compile may restart its
    # analysis once, which the counter counts as well).
    assert frames[0] >= 1 and frames[1] == frames[0]
