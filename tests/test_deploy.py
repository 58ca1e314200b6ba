"""Bring your own model and deploy it: conversion of nn.Conv2d layers (torchvision's ResNet-18 and
MobileNetV2), external / shared routing, BatchNorm folding, ONNX export with a dynamic batch
(standard ops only, checked in onnxruntime) and torch.export save / load."""

import os
import subprocess
import sys

import onnx
import pytest
import torch
import torchvision
from helpers import onnx_ops, onnxruntime_errors
from torch import nn

import dynconv
from dynconv import DynamicBlock, DynamicCNN, DynamicConv2d, RoutingMLP


def _eval_copy_pair(build, **convert_kwargs):
    torch.manual_seed(0)
    static = build().eval()
    dynamic = build().eval()
    dynamic.load_state_dict(static.state_dict())
    dynconv.convert_conv2d(dynamic, **convert_kwargs)
    return static, dynamic


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_converted_torchvision_model_computes_the_same_function(name):
    build = lambda: getattr(torchvision.models, name)(weights=None, num_classes=10)
    static, dynamic = _eval_copy_pair(build, num_experts=3)
    convs = [m for m in static.modules() if isinstance(m, nn.Conv2d)]
    dynamic_convs = [m for m in dynamic.modules() if isinstance(m, DynamicConv2d)]
    assert len(dynamic_convs) == len(convs) and not any(
        isinstance(m, nn.Conv2d) for m in dynamic.modules())
    for old, new in zip(convs, dynamic_convs):
        assert (new.stride, new.padding, new.dilation, new.groups) == (
            old.stride, old.padding, old.dilation, old.groups)
        assert (new.bias is None) == (old.bias is None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = static(x), dynamic(x)
    # Softmax rows sum to 1 up to fp32 rounding, so every layer's mixed weight is the original
    # one to ~1e-7 relative; through ~20 layers that stays within 1e-4.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_converted_model_trains_and_compiles():
    build = lambda: torchvision.models.resnet18(weights=None, num_classes=10)
    skip_stem_and_pointwise = lambda name, conv: conv.in_channels > 3 and conv.kernel_size != (
        1, 1)
    _, model = _eval_copy_pair(build, num_experts=2, filter=skip_stem_and_pointwise)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.layer2[0].downsample[0],
                                                             nn.Conv2d)
    assert isinstance(model.layer1[0].conv1, DynamicConv2d)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = model.layer1[0].conv1.weight.detach().clone()
    nn.functional.cross_entropy(model(x), target).backward()
    optimiser.step()
    assert not torch.equal(before, model.layer1[0].conv1.weight)
    torch._dynamo.reset()
    compiled = torch.compile(model.eval(), fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for batch in (2, 3):
            xb = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(compiled(xb), model(xb), rtol=1e-5, atol=1e-5)


def test_from_conv2d_keeps_geometry_dtype_and_can_perturb():
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding="valid", dilation=(1, 2), groups=2,
                     dtype=torch.float64)
    dynamic = DynamicConv2d.from_conv2d(conv, num_experts=4, temperature=2.0)
    assert dynamic.weight.dtype == torch.float64 and dynamic.temperature == 2.0
    assert dynamic.padding == "valid" and dynamic.kernel_size == (3, 5)
    x = torch.randn(3, 6, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(dynamic(x), conv(x), rtol=1e-12, atol=1e-12)
    noisy = DynamicConv2d.from_conv2d(conv, num_experts=4, perturb=0.1,
                                      generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy.weight[0], noisy.weight[1])
    torch.testing.assert_close(noisy.weight.mean(0), conv.weight, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="padding_mode"):
        DynamicConv2d.from_conv2d(nn.Conv2d(2, 2, 3, padding_mode="reflect"))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        DynamicConv2d.from_conv2d(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"\['stride'\] from conv"):
        DynamicConv2d.from_conv2d(conv, stride=1)


def test_external_routing_and_a_router_shared_by_three_convs():
    class SharedRouterBlock(nn.Module):
        """Pointwise -> depthwise -> pointwise, all mixed by one router (timm's CondConv
        residual pattern)."""

        def __init__(self, channels, num_experts=3):
            super().__init__()
            self.router = RoutingMLP(channels, num_experts)
            self.expand = DynamicConv2d(channels, 2 * channels, 1, num_experts=num_experts,
                                        router=False)
            self.depthwise = DynamicConv2d(2 * channels, 2 * channels, 3, padding=1,
                                           groups=2 * channels, num_experts=num_experts,
                                           router=False)
            self.project = DynamicConv2d(2 * channels, channels, 1, num_experts=num_experts,
                                         router=False)

        def forward(self, x):
            a = self.router(x)
            return x + self.project(self.depthwise(self.expand(x, a), a), a)

    block = SharedRouterBlock(4)
    x = torch.randn(2, 4, 8, 8)
    block(x).sum().backward()
    assert block.router.fc2.weight.grad is not None
    assert sum(isinstance(m, RoutingMLP) for m in block.modules()) == 1
    with pytest.raises(ValueError, match="router=False"):
        block.expand(x)
    with pytest.raises(RuntimeError, match="router=False"):
        block.expand.temperature  # noqa: B018
    # With a router, routing= overrides it.
    conv = DynamicConv2d(4, 6, 3, padding=1, num_experts=2)
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = conv(x, routing=one_hot)
    for b in range(2):
        want = nn.functional.conv2d(x[b:b + 1], conv.weight[b], conv.bias[b], padding=1)
        torch.testing.assert_close(y[b:b + 1], want, rtol=1e-5, atol=1e-5)
    block_y, block_a = DynamicBlock(4, 6, num_experts=2, router=False)(x, one_hot,
                                                                      return_routing=True)
    assert block_a is one_hot and tuple(block_y.shape) == (2, 6, 8, 8)


@pytest.mark.parametrize("has_bias", [True, False])
def test_fuse_conv_bn_eval(has_bias):
    torch.manual_seed(0)
    conv = DynamicConv2d(4, 6, 3, padding=1, num_experts=3, bias=has_bias, temperature=0.5)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    fused = dynconv.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(3, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert conv.bias is None if not has_bias else conv.bias is not fused.bias
    with pytest.raises(ValueError, match="gate='sigmoid'|gate='softmax'"):
        dynconv.fuse_conv_bn_eval(DynamicConv2d(4, 6, 3, gate="sigmoid"), bn)
    with pytest.raises(ValueError, match="eval mode"):
        dynconv.fuse_conv_bn_eval(conv, nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="num_features"):
        dynconv.fuse_conv_bn_eval(conv, nn.BatchNorm2d(5).eval())


def _onnx_round_trip(model, example, tmp_path):
    """Export with a dynamic batch, then (op counts, worst relative error at batch 1, 3, 8)."""
    path = str(tmp_path / "model.onnx")
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    program.save(path)
    ops = onnx_ops(onnx.load(path))
    errors = onnxruntime_errors(path, model, example.shape[1:])
    return ops, errors


def _resnet18_converted():
    torch.manual_seed(0)
    return dynconv.convert_conv2d(torchvision.models.resnet18(weights=None, num_classes=10), 2)


@pytest.mark.parametrize("name, build, shape", [
    ("conv", lambda: DynamicConv2d(8, 16, 3, padding=1, groups=2), (2, 8, 12, 12)),
    ("block", lambda: DynamicBlock(8, 16, stride=2), (2, 8, 12, 12)),
    ("cnn", lambda: DynamicCNN(), (2, 3, 32, 32)),
    ("resnet18", _resnet18_converted, (2, 3, 64, 64)),
    ("conv-triton", lambda: DynamicConv2d(8, 16, 3, padding=1, backend="triton"), (2, 8, 9, 9)),
    # TF "same": the odd pixel of padding at the bottom / right (an ONNX Pad before the Conv).
    ("conv-same_tf", lambda: DynamicConv2d(8, 16, 4, stride=2, padding="same_tf"),
     (2, 8, 11, 12)),
])
def test_onnx_export_with_a_dynamic_batch(name, build, shape, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    ops, errors = _onnx_round_trip(model, torch.randn(shape), tmp_path)
    assert all(domain == "ai.onnx" for domain, _ in ops), ops
    assert ops[("ai.onnx", "Conv")] >= 1
    # fp32 through onnxruntime's kernels: rounding differences only, far below 1e-4.
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("backend", ["native", "grouped", "triton"])
def test_torch_export_with_a_dynamic_batch_saves_and_loads(backend, tmp_path):
    torch.manual_seed(0)
    model = DynamicConv2d(8, 16, 3, padding=1, backend=backend).eval()
    program = torch.export.export(model, (torch.randn(2, 8, 12, 12),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = tmp_path / "conv.pt2"
    torch.export.save(program, path)
    x = torch.randn(5, 8, 12, 12)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    # The saved program calls dynconv's custom op: a fresh process loads it after import dynconv.
    code = (f"import torch, dynconv; p = torch.export.load({str(path)!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"y = torch.load({str(tmp_path / 'y.pt')!r}); "
            f"torch.testing.assert_close(p.module()(x), y); print('ok')")
    # (Without a GPU the triton op runs in Triton's interpreter, as in this process.)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
