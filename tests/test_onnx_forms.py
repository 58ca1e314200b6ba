"""The ONNX export forms (``dynconv.export_onnx``, ``dynconv.onnx_export_form``): each equals
PyTorch in onnxruntime at batch 1, 3 and 8 from one export with a dynamic batch, uses only
standard ops, folds the BatchNorms that follow dynamic convs, and the default form is the one
the committed benchmark (perf_reports/onnx) found fastest."""

from __future__ import annotations

import collections
import csv
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from helpers import onnx_ops, onnxruntime_errors
from torch import nn

import dynconv
from dynconv import DynamicConv2d
from dynconv.backends import registry
from dynconv.backends.reference import loop_dynamic_conv2d
from dynconv.export import DEFAULT_FORM, FORMS
from dynconv.geometry import ConvGeometry

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_CSV = ROOT / "perf_reports" / "onnx" / "onnx_224px.csv"


class SmallNet(nn.Module):
    """Every geometry the forms handle differently: a 7x7 stride-2 stem, a grouped dilated conv,
    a 1x1 stride-2 conv (patches without a one-hot conv), a depthwise conv without bias, each
    followed by a BatchNorm, and a last conv whose output is a single pixel (``auto`` records
    it in the spanning form)."""

    def __init__(self):
        super().__init__()
        self.stem = DynamicConv2d(3, 8, 7, stride=2, padding=3, num_experts=3)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = DynamicConv2d(8, 12, 3, padding=2, dilation=2, groups=2, num_experts=3)
        self.bn2 = nn.BatchNorm2d(12)
        self.pointwise = DynamicConv2d(12, 16, 1, stride=2, num_experts=3)
        self.bn3 = nn.BatchNorm2d(16)
        self.depthwise = DynamicConv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False,
                                       num_experts=3)
        self.bn4 = nn.BatchNorm2d(16)
        self.last = DynamicConv2d(16, 10, 3, num_experts=3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        x = torch.relu(self.bn3(self.pointwise(x)))
        x = torch.relu(self.bn4(self.depthwise(x)))
        return self.last(x).flatten(1)


INPUT = (3, 24, 24)  # stem 12x12, grouped 12x12, pointwise 6x6, depthwise 3x3, last 1x1


def small_net() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("form", FORMS)
def test_every_form_equals_pytorch_at_batch_1_3_8_with_standard_ops(form, tmp_path):
    net = small_net()
    path = tmp_path / f"{form}.onnx"
    dynconv.export_onnx(net, torch.randn(2, *INPUT), path, form=form)
    ops = onnx_ops(onnx.load(str(path)))
    assert {domain for domain, _ in ops} == {"ai.onnx"}, ops
    assert ops[("ai.onnx", "BatchNormalization")] == 0, "the BatchNorms were not folded"
    scans = ops[("ai.onnx", "Scan")]
    assert scans == {"scan": 5, "auto": 4, "spanning": 0, "matmul": 0}[form], ops
    errors = onnxruntime_errors(path, net, INPUT)
    # fp32 through onnxruntime's kernels: rounding differences only
    assert max(errors) < 1e-4, errors


def test_plain_torch_onnx_export_records_the_default_form_or_the_chosen_one(tmp_path):
    torch.manual_seed(0)
    conv = DynamicConv2d(8, 16, 3, padding=1, num_experts=4).eval()
    batch = torch.export.Dim("batch", min=1)

    def export(path):
        torch.onnx.export(conv, (torch.randn(2, 8, 10, 10),), path, dynamo=True, verbose=False,
                          dynamic_shapes=({0: batch},))
        return onnx_ops(onnx.load(str(path)))

    assert DEFAULT_FORM == registry.ONNX_EXPORT.name == "auto"
    default_ops = export(tmp_path / "default.onnx")
    assert default_ops[("ai.onnx", "Scan")] == 1  # auto: scan at 10x10
    assert max(onnxruntime_errors(tmp_path / "default.onnx", conv, (8, 10, 10))) < 1e-5
    with dynconv.onnx_export_form("spanning") as form:
        assert form == "spanning"
        spanning_ops = export(tmp_path / "spanning.onnx")
    assert spanning_ops[("ai.onnx", "Scan")] == 0 and spanning_ops[("ai.onnx", "Conv")] == 1
    assert registry.CHOSEN_ONNX_FORM.get() is None  # the block restored the default
    assert max(onnxruntime_errors(tmp_path / "spanning.onnx", conv, (8, 10, 10))) < 1e-5


def test_torchscript_exporter_records_the_spanning_form(tmp_path):
    """``dynamo=False`` traces by running the code, which would unroll a scan to the example's
    batch size: there the scan forms give way to spanning, and the batch stays dynamic."""
    torch.manual_seed(0)
    conv = DynamicConv2d(8, 16, 3, padding=1, num_experts=4).eval()
    path = tmp_path / "torchscript.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(conv, (torch.randn(2, 8, 10, 10),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    ops = onnx_ops(onnx.load(str(path)))
    assert ops[("ai.onnx", "Scan")] == 0 and ops[("ai.onnx", "Conv")] == 1, ops
    assert max(onnxruntime_errors(path, conv, (8, 10, 10))) < 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", [
    # (Cin, Cout, kernel, stride, padding, dilation, groups, bias, (H, W))
    (4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, (7, 9)),
    (6, 4, (3, 5), (2, 1), (0, 2), (1, 2), 2, False, (9, 8)),
    (4, 8, (1, 1), (2, 2), (0, 0), (1, 1), 1, True, (7, 7)),
    (4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, True, (5, 6)),
    (4, 6, (3, 3), (1, 1), (0, 0), (1, 1), 1, True, (3, 3)),  # a single output pixel
])
def test_forms_equal_the_per_sample_loop_in_eager_float64(form, case):
    in_channels, out_channels, kernel, stride, padding, dilation, groups, has_bias, hw = case
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, in_channels, *hw, generator=generator, dtype=torch.float64)
    bank = torch.randn(4, out_channels, in_channels // groups, *kernel, generator=generator,
                       dtype=torch.float64)
    routing = torch.softmax(torch.randn(3, 4, generator=generator, dtype=torch.float64), 1)
    bias = torch.randn(4, out_channels, generator=generator, dtype=torch.float64) if has_bias \
        else None
    geometry = ConvGeometry(stride, padding, dilation, groups)
    want = loop_dynamic_conv2d(x, bank, routing, bias, geometry)
    got = registry.ONNX_FORMS[form].function(x, bank, routing, bias, geometry)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cl = x.contiguous(memory_format=torch.channels_last)
    got_cl = registry.ONNX_FORMS[form].function(cl, bank, routing, bias, geometry)
    torch.testing.assert_close(got_cl, want, rtol=1e-12, atol=1e-12)
    assert got_cl.is_contiguous(memory_format=torch.channels_last) or out_channels == 1


@pytest.mark.parametrize("form", FORMS)
def test_forms_take_an_empty_batch(form):
    bank, routing = torch.randn(3, 6, 4, 3, 3), torch.empty(0, 3)
    y = registry.ONNX_FORMS[form].function(torch.empty(0, 4, 5, 5), bank, routing,
                                           torch.randn(3, 6), ConvGeometry((1, 1), (1, 1),
                                                                           (1, 1), 1))
    assert tuple(y.shape) == (0, 6, 5, 5)


def test_fold_batchnorm_folds_exclusive_pairs_only():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = DynamicConv2d(4, 4, 3, padding=1, num_experts=2)
            self.bn_a = nn.BatchNorm2d(4)  # folded
            self.b = DynamicConv2d(4, 4, 3, padding=1, num_experts=2)
            self.bn_b = nn.BatchNorm2d(4)  # b's output is also the residual: not folded
            self.c = DynamicConv2d(4, 4, 3, padding=1, num_experts=2, gate="sigmoid")
            self.bn_c = nn.BatchNorm2d(4)  # sigmoid gates: the fold would not be exact
            self.d = nn.Conv2d(4, 4, 3, padding=1)
            self.bn_d = nn.BatchNorm2d(4)  # a static conv: onnxruntime folds it itself
            self.e = DynamicConv2d(4, 4, 3, padding=1, num_experts=2)
            self.bn_e = nn.BatchNorm2d(4)  # runs twice: not folded

        def forward(self, x):
            x = self.bn_a(self.a(x))
            b = self.b(x)
            x = self.bn_b(b) + b
            x = self.bn_d(self.d(self.bn_c(self.c(x))))
            return self.bn_e(self.e(self.bn_e(x)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(2, 4, 6, 6)
    folded = dynconv.fold_batchnorm(net, (x,))
    assert isinstance(folded.bn_a, nn.Identity) and folded.a is not net.a
    assert [type(getattr(folded, name)) for name in ("bn_b", "bn_c", "bn_d", "bn_e")] == [
        nn.BatchNorm2d] * 4
    assert isinstance(net.bn_a, nn.BatchNorm2d)  # the model given is left as it is
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_export_onnx_rejects_an_unknown_form_and_keeps_the_model(tmp_path):
    net = small_net()
    with pytest.raises(ValueError, match="form must be one of"):
        dynconv.export_onnx(net, torch.randn(2, *INPUT), form="grouped")
    with pytest.raises(ValueError, match="form must be one of"):
        with dynconv.onnx_export_form("fastest"):
            pass
    dynconv.export_onnx(net, torch.randn(2, *INPUT), tmp_path / "m.onnx", fold_bn=False)
    ops = onnx_ops(onnx.load(str(tmp_path / "m.onnx")))
    assert ops[("ai.onnx", "BatchNormalization")] == 4  # fold_bn=False keeps them
    assert isinstance(net.bn1, nn.BatchNorm2d)


def test_default_form_is_the_fastest_in_the_committed_benchmark():
    """perf_reports/onnx/onnx_224px.csv (``python -m dynconv.autotune onnx``): at every model
    and batch size measured on ImageNet-sized inputs, the default form is the fastest form, or
    within the run's noise of it (auto and scan record the same graph at 224x224)."""
    with open(BENCHMARK_CSV) as f:
        rows = list(csv.DictReader(f))
    assert rows and {row["default_form"] for row in rows} == {DEFAULT_FORM}
    groups = collections.defaultdict(dict)
    for row in rows:
        if row["provider"] in FORMS:
            groups[(row["model"], row["batch"])][row["provider"]] = float(row["ratio_wall"])
    assert {model for model, _ in groups} == {"resnet18", "mobilenet_v2"}
    for key, ratios in groups.items():
        assert set(ratios) == set(FORMS), key
        assert ratios[DEFAULT_FORM] <= 1.05 * min(ratios.values()), (key, ratios)
